"""Teacher strategies: which weights score the teacher prompt, how they move, and how they are checkpointed.

| kind | plain model                                  | PEFT model                                          |
|------|----------------------------------------------|-----------------------------------------------------|
| live | `LiveTeacher`: the student itself            | `LiveTeacher`: the student itself                   |
| base | `ModelCopyTeacher`: a frozen copy of the     | `AdapterTeacher`: the student with its adapter      |
|      | initial weights                              | disabled                                            |
| ema  | `ModelCopyTeacher`: a copy, lerped toward    | `AdapterTeacher`: pure LoRA, a `teacher` adapter    |
|      | the student after optimizer steps            | lerped toward the student's; else a clear error     |

`build_teacher` picks the class (and makes the model copy, placed like the student under DeepSpeed/FSDP).

The EMA state is written into every checkpoint and read back on resume, so a resumed run keeps its teacher.
"""

import copy
import os
from contextlib import nullcontext

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from .checkpoints import TEACHER_STATE_FILE
from .utils import unwrap

TEACHER_ADAPTER = "teacher"


def student_adapter_name(model) -> str:
    return getattr(model, "active_adapter", None) or "default"


def check_ema_adapter_support(model) -> None:
    """An EMA `teacher` adapter needs LoRA whose trainable weights are all LoRA weights; else say what to do."""
    adapter = student_adapter_name(model)
    config = model.peft_config[adapter]
    peft_type = str(getattr(config, "peft_type", "")).split(".")[-1]
    fix = "Use a plain LoRA config, or `teacher_model_kind` 'base' or 'live'."
    if peft_type != "LORA":
        raise ValueError(f"`teacher_model_kind='ema'` under PEFT needs a LoRA adapter, got {peft_type}. {fix}")
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"`teacher_model_kind='ema'` with LoRA `modules_to_save={config.modules_to_save}` is not supported: the "
            f"teacher adapter cannot hold a moving average of fully trained modules. Drop `modules_to_save`. {fix}"
        )
    if getattr(config, "bias", "none") != "none":
        raise ValueError(
            f"`teacher_model_kind='ema'` with LoRA `bias={config.bias!r}` is not supported: trained biases are shared "
            f"by all adapters, so the teacher cannot average them. Set `bias='none'`. {fix}"
        )
    extra = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if extra:
        raise ValueError(
            f"`teacher_model_kind='ema'` under PEFT needs only LoRA weights to be trained, but {extra[:3]} are "
            f"trainable too. Freeze them. {fix}"
        )


class Teacher:
    """What every teacher does; the defaults are those of a teacher without weights of its own (`LiveTeacher`)."""

    kind: str

    def module(self, student):
        """The module to forward for the teacher; `student` is the (possibly wrapped) training model."""
        return unwrap(student)

    def context(self):
        return nullcontext()

    def update(self, student, rate: float) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def save(self, checkpoint_dir: str) -> None:
        state = self.state_dict()
        if state is not None:
            tensors, seen = {}, set()
            for name, value in state.items():
                if value.data_ptr() in seen:  # tied weights: one copy is enough, loading restores both
                    continue
                seen.add(value.data_ptr())
                tensors[name] = value.detach().cpu().contiguous()
            save_file(tensors, os.path.join(checkpoint_dir, TEACHER_STATE_FILE))

    def load(self, checkpoint_dir: str) -> bool:
        """Restore the saved teacher; returns False where the checkpoint holds none (fine for stateless teachers)."""
        path = os.path.join(checkpoint_dir, TEACHER_STATE_FILE)
        if self.state_dict() is None:
            return True
        if not os.path.exists(path):
            return False
        self.load_state_dict(load_file(path))
        return True


class LiveTeacher(Teacher):
    """The student itself (`live`): no extra weights, nothing to update or save."""

    kind = "live"


class ModelCopyTeacher(Teacher):
    """A separate model without gradients: the initial weights, frozen (`base`), or an EMA of the student (`ema`)."""

    def __init__(self, teacher_model, kind: str):
        self.model = teacher_model
        self.model.requires_grad_(False)
        self.model.eval()
        self.kind = kind

    def module(self, student):
        return self.model

    @torch.no_grad()
    def update(self, student, rate: float) -> None:
        if self.kind != "ema":
            return
        from trl.trainer.callbacks import SyncRefModelCallback

        # TRL's reference-model sync: teacher <- (1 - rate) * teacher + rate * student, gathering ZeRO-3 shards.
        SyncRefModelCallback.sync_target_model(unwrap(student), unwrap(self.model), rate)

    def state_dict(self):
        return unwrap(self.model).state_dict() if self.kind == "ema" else None

    def load_state_dict(self, state):
        unwrap(self.model).load_state_dict(state, strict=False)


class AdapterTeacher(Teacher):
    """The PEFT student with its adapter disabled (`base`) or switched to the EMA `teacher` adapter (`ema`)."""

    def __init__(self, student, kind: str):
        self.kind = kind
        self.student = unwrap(student)
        self.student_adapter = student_adapter_name(student)
        if kind == "ema":
            self._add_teacher_adapter(student)

    def _add_teacher_adapter(self, student) -> None:
        check_ema_adapter_support(student)
        config = copy.deepcopy(student.peft_config[self.student_adapter])
        student.add_adapter(TEACHER_ADAPTER, config)
        # The EMA starts at the student's adapter, as a plain EMA teacher starts at the student's weights.
        pairs = self._pairs(student)
        with torch.no_grad():
            for teacher_param, student_param in pairs:
                teacher_param.copy_(student_param)
                teacher_param.requires_grad_(False)
        student.set_adapter(self.student_adapter)
        for teacher_param, _ in pairs:
            teacher_param.requires_grad_(False)

    def _pairs(self, student) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        params = dict(unwrap(student).named_parameters())
        marker = f".{self.student_adapter}."
        pairs = []
        for name, param in params.items():
            if "lora_" in name and marker in name:
                teacher_name = name.replace(marker, f".{TEACHER_ADAPTER}.")
                pairs.append((params[teacher_name], param))
        if not pairs:
            raise RuntimeError(f"No LoRA weights of adapter {self.student_adapter!r} found for the EMA teacher.")
        return pairs

    def context(self):
        # TRL's adapter switch: None disables adapters (base weights); a name activates that adapter and restores
        # the student's afterwards (which also hands the trainable flags back to it).
        return use_adapter(self.student, None if self.kind == "base" else TEACHER_ADAPTER)

    @torch.no_grad()
    def update(self, student, rate: float) -> None:
        if self.kind != "ema":
            return
        teacher, current = zip(*self._pairs(student), strict=True)
        torch._foreach_lerp_(list(teacher), list(current), rate)

    def state_dict(self):
        if self.kind != "ema":
            return None
        return {name: p for name, p in self.student.named_parameters() if f".{TEACHER_ADAPTER}." in name}

    def load_state_dict(self, state):
        params = dict(self.student.named_parameters())
        missing = [name for name in state if name not in params]
        if missing:
            raise ValueError(f"The checkpoint's EMA teacher adapter does not match this model: {missing[:3]} ...")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def copy_for_teacher(student, accelerator, args):
    """A copy of the student's current (initial) weights without gradients, placed like the student."""
    from trl.models import prepare_deepspeed, prepare_fsdp

    student = unwrap(student)
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        # ZeRO-3 shards are empty on each rank: a deep copy would copy nothing. Load the weights again.
        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.update(device_map=None, dtype=student.dtype, trust_remote_code=args.trust_remote_code)
        teacher = create_model_from_path(get_config_model_id(student.config), **init_kwargs)
    else:
        teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    if deepspeed_plugin is not None:
        return prepare_deepspeed(teacher, accelerator)
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return prepare_fsdp(teacher, accelerator)
    # On the student's device, and under the same mixed-precision autocast as the student's forward.
    return accelerator.prepare_model(teacher.to(accelerator.device), evaluation_mode=True)


def build_teacher(kind: str, student, accelerator, args) -> Teacher:
    """The teacher for `kind` and the (prepared, not yet wrapped) student."""
    if kind == "live":
        return LiveTeacher()
    if is_peft_model(student):
        return AdapterTeacher(student, kind)
    return ModelCopyTeacher(copy_for_teacher(student, accelerator, args), kind)


class TeacherUpdateCallback(TrainerCallback):
    """Moves the EMA teacher after every `teacher_sync_steps` optimizer steps."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.teacher.kind == "ema" and state.global_step % args.teacher_sync_steps == 0:
            self.teacher.update(model, args.teacher_update_rate)
