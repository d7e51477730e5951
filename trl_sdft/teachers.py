"""Teachers behind one protocol: which weights score the teacher prompt, how they move, and how they are checkpointed.

| kind          | plain model                                  | PEFT model                                          |
|---------------|----------------------------------------------|-----------------------------------------------------|
| `live`        | `LiveTeacher`: the student itself            | `LiveTeacher`: the student itself                   |
| `base`        | `FrozenCopyTeacher`: a frozen copy of the    | `AdapterOffTeacher`: the student with its adapter   |
|               | initial weights                              | disabled                                            |
| `ema`         | `EMACopyTeacher`: a copy, lerped toward the  | `EMAAdapterTeacher`: pure LoRA, a `teacher` adapter |
|               | student after optimizer steps                | lerped toward the student's; else a clear error     |
| `live@server` | `ServerTeacher`: the student's weights on the vLLM server, scored by the rollout backend (`scorer`) |

`build_teacher(TeacherContext(...))` picks the factory registered for the kind (`TEACHERS`; the key is
`f"{kind}@server"` when the teacher is scored on the server), which picks the class and makes the model copy (placed
like the student under DeepSpeed/FSDP). `register_teacher` adds a kind; `teacher_kinds()` lists the plain ones.

The EMA state is written into every checkpoint and read back on resume, so a resumed run keeps its teacher: saved
from weights gathered on every process and loaded strictly, one weight at a time, under DeepSpeed ZeRO-3 and FSDP2
too (`sharding.py`).
"""

import copy
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter

from . import sharding
from .checkpoints import TEACHER_STATE_FILE
from .utils import unwrap

TEACHER_ADAPTER = "teacher"


@dataclass(frozen=True)
class TeacherSettings:
    """What a teacher reads of the run's config (`settings.teacher_settings` builds it)."""

    kind: str = "base"  # teacher_model_kind
    update_rate: float = 0.05  # teacher_update_rate: teacher <- (1 - rate) * teacher + rate * student
    sync_steps: int = 1  # teacher_sync_steps: optimizer steps between EMA updates
    on_server: bool = False  # use_teacher_server
    server_topk: int = 1  # log-probs per position the server returns: the top-k of `topk_logits`, else 1
    model_init_kwargs: dict | None = None  # to load the copy again under ZeRO-3
    trust_remote_code: bool = False

    def __post_init__(self):
        if not 0.0 < self.update_rate <= 1.0:
            raise ValueError(
                f"`teacher_update_rate={self.update_rate}` must be in (0, 1]: 1.0 copies the student, small values "
                "(e.g. 0.05) move the EMA teacher slowly."
            )
        if self.sync_steps < 1:
            raise ValueError(f"`teacher_sync_steps={self.sync_steps}` must be >= 1 (optimizer steps).")


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


# --------------------------------------------------------------------------------------------------- the protocol
class Teacher:
    """What the trainer calls on a teacher. The defaults are those of a teacher without weights of its own that
    scores in process (`LiveTeacher`): subclasses override what differs.

    - `kind`: the config's `teacher_model_kind` it implements; `moves`: updated after optimizer steps (EMA kinds).
    - `module(student)`: the module that scores the teacher prompt (`SDFTTrainer.teacher_model`).
    - `score(student, inputs, mask, step, view)`: the teacher's side of the loss for a batch; `view(module, inputs,
      teacher=True)` is the trainer's completion view (logits or `chunked_loss.HiddenStates`).
    - `update(student)`: one EMA step at `settings.update_rate`.
    - `state_dict()` / `load_state_dict()`, `save(dir)` / `load(dir)`: the teacher state a checkpoint holds (None /
      nothing for teachers that keep none).
    """

    kind: str = "live"
    moves: bool = False

    def __init__(self, settings: TeacherSettings | None = None):
        self.settings = TeacherSettings(kind=self.kind) if settings is None else settings

    def module(self, student):
        """The module to forward for the teacher; `student` is the (possibly wrapped) training model."""
        return unwrap(student)

    def context(self):
        """Entered around the teacher's forward (an adapter switch for PEFT teachers)."""
        return nullcontext()

    def score(self, student, inputs: dict[str, Any], mask: torch.Tensor, step: int, view: Callable):
        """The teacher's logits (or hidden states) at the completion positions of `inputs`, without gradients."""
        with torch.no_grad(), self.context():
            return view(self.module(student), inputs, teacher=True)

    def bind(self, rollout) -> None:
        """Called once the rollout backend exists (built after the teacher, so that a teacher's errors come before
        an engine starts): a teacher scored by the backend keeps it."""

    def update(self, student) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The live tensors a checkpoint holds (ZeRO-3 placeholders and FSDP2 shards included; `save` gathers them),
        each tied weight once; None for teachers that keep no state."""
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "the teacher state") -> None:
        """Strictly: the same names and shapes as `state_dict()` (tied copies may be absent or present), finite
        values; else a `ValueError` naming `source`. Collective under the sharded engines."""
        own = self.state_dict()
        if own is None:
            return
        check_teacher_state({name: tuple(value.shape) for name, value in state.items()}, own, self.tied_names(), source)
        for name, tensor in own.items():
            _load_checked(tensor, state[name], name, source)

    def tied_names(self) -> set[str]:
        """Names of weights tied to one in `state_dict()` (a checkpoint may hold them or not)."""
        return set()

    def save(self, checkpoint_dir: str, write: bool = True) -> None:
        """Write the teacher state into `checkpoint_dir` from weights gathered on every process (call it on every
        process: gathering is a collective); `write` is whether this process writes the file (the main one)."""
        state = self.state_dict()
        if state is None:
            return
        tensors = {}
        for name, value in sharding.full_tensors(state.items()):
            if write:
                tensors[name] = value.contiguous()
        if write:
            path = os.path.join(checkpoint_dir, TEACHER_STATE_FILE)
            save_file(tensors, path + ".partial", metadata={"format": "pt"})
            os.replace(path + ".partial", path)

    def frozen_weights(self, write: bool = True) -> dict[str, torch.Tensor] | None:
        """Whole weights of the teacher that live in the student model, frozen, under the student's state-dict names
        (the EMA adapter), for the Trainer's model save; None for the others. A collective under the engines."""
        return None

    def load(self, checkpoint_dir: str) -> bool:
        """Restore the saved teacher; returns False where the checkpoint holds none (fine for stateless teachers).
        The file is read one weight at a time (every process reads it: a whole copy per process would not fit where
        the model is sharded)."""
        from safetensors import safe_open

        path = os.path.join(checkpoint_dir, TEACHER_STATE_FILE)
        own = self.state_dict()
        if own is None:
            return True
        if not os.path.exists(path):
            return False
        if type(self).load_state_dict is not Teacher.load_state_dict:  # a teacher that loads its own way
            self.load_state_dict(load_file(path))
            return True
        with safe_open(path, "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            check_teacher_state(shapes, own, self.tied_names(), path)
            for name, tensor in own.items():
                _load_checked(tensor, f.get_tensor(name), name, path)
        return True


def _load_checked(tensor, value: torch.Tensor, name: str, source: str) -> None:
    if not torch.isfinite(value).all():
        raise ValueError(f"{source} holds NaN or inf in teacher weight {name}: resume from an earlier checkpoint.")
    sharding.load_full(tensor, value)


def check_teacher_state(shapes: dict, own: dict, tied: set[str], source: str) -> None:
    """A file's weight shapes (`shapes`: name -> shape) against the teacher's (`own`): the same names up to tied
    copies and the same shapes; else a `ValueError` that names `source` and what differs."""
    missing = [name for name in own if name not in shapes]
    unexpected = [name for name in shapes if name not in own and name not in tied]
    differ = [
        f"{name} {shapes[name]} vs {tuple(sharding.full_shape(own[name]))}"
        for name in own
        if name in shapes and shapes[name] != tuple(sharding.full_shape(own[name]))
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weight(s) missing ({', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unknown weight(s) ({', '.join(unexpected[:3])})")
    if differ:
        problems.append(f"{len(differ)} shape(s) differ, file vs model ({'; '.join(differ[:3])})")
    if problems:
        raise ValueError(
            f"{source} does not match this run's EMA teacher: {'; '.join(problems)}. It was saved from another model "
            "or another adapter setup: resume with the model and `peft_config` it was trained with, or start without "
            "`resume_from_checkpoint`."
        )


def _named_state(model) -> dict[str, torch.Tensor]:
    """`model`'s parameters (each tied weight once, under its first name) and persistent buffers."""
    state = dict(model.named_parameters())
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                state[f"{module_name}.{name}" if module_name else name] = buffer
    return state


def _tied_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))


# ---------------------------------------------------------------------------------------------------- the kinds
class LiveTeacher(Teacher):
    """The student itself (`live`): no extra weights, nothing to update or save."""

    kind = "live"


class _ModelCopy(Teacher):
    """A separate model without gradients, in eval mode."""

    def __init__(self, teacher_model, settings: TeacherSettings | None = None):
        super().__init__(settings)
        self.model = teacher_model
        self.model.requires_grad_(False)
        self.model.eval()

    def module(self, student):
        return self.model


class FrozenCopyTeacher(_ModelCopy):
    """A frozen copy of the student's initial weights (`base`, plain model)."""

    kind = "base"


class EMACopyTeacher(_ModelCopy):
    """A copy of the student moved toward it after optimizer steps (`ema`, plain model)."""

    kind = "ema"
    moves = True

    @torch.no_grad()
    def update(self, student) -> None:
        # teacher <- (1 - rate) * teacher + rate * student, on each process's own part of every weight (FSDP2 shards,
        # ZeRO-3 partitions): nothing is gathered.
        teacher, current = unwrap(self.model), unwrap(student)
        sharding.reshard(teacher)
        sharding.lerp_(list(teacher.parameters()), list(current.parameters()), self.settings.update_rate)

    def state_dict(self):
        sharding.reshard(unwrap(self.model))
        return _named_state(unwrap(self.model))

    def tied_names(self):
        return _tied_names(unwrap(self.model))


class _AdapterSwitch(Teacher):
    """The PEFT student itself, forwarded with another adapter (`adapter`; None: all adapters disabled)."""

    adapter: str | None = None

    def __init__(self, student, settings: TeacherSettings | None = None):
        super().__init__(settings)
        self.student = unwrap(student)
        self.student_adapter = student_adapter_name(student)

    def context(self):
        # TRL's adapter switch: None disables adapters (base weights); a name activates that adapter and restores
        # the student's afterwards (which also hands the trainable flags back to it).
        return use_adapter(self.student, self.adapter)


class AdapterOffTeacher(_AdapterSwitch):
    """The PEFT student with its adapter disabled: the base weights (`base`, PEFT model)."""

    kind = "base"


class EMAAdapterTeacher(_AdapterSwitch):
    """A `teacher` LoRA adapter lerped toward the student's adapter (`ema`, PEFT model; pure LoRA only)."""

    kind = "ema"
    moves = True
    adapter = TEACHER_ADAPTER

    def __init__(self, student, settings: TeacherSettings | None = None):
        super().__init__(student, settings)
        self._add_teacher_adapter(student)

    def _add_teacher_adapter(self, student) -> None:
        check_ema_adapter_support(student)
        config = copy.deepcopy(student.peft_config[self.student_adapter])
        student.add_adapter(TEACHER_ADAPTER, config)
        # The EMA starts at the student's adapter, as a plain EMA teacher starts at the student's weights.
        pairs = self._pairs(student)
        teacher, current = (list(params) for params in zip(*pairs, strict=True))
        sharding.lerp_(teacher, current, 1.0)  # a copy (lerp at 1 is exact), also of sharded weights
        for teacher_param in teacher:
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

    @torch.no_grad()
    def update(self, student) -> None:
        teacher, current = zip(*self._pairs(student), strict=True)
        sharding.lerp_(list(teacher), list(current), self.settings.update_rate)

    def state_dict(self):
        return {name: p for name, p in self.student.named_parameters() if f".{TEACHER_ADAPTER}." in name}

    def frozen_weights(self, write=True):
        gathered = sharding.full_tensors(self.state_dict().items())
        return {name: value for name, value in gathered if write}


class ServerTeacher(Teacher):
    """The live student scored on the vLLM server (`use_teacher_server`): `scorer` is the rollout backend, whose
    `teacher_scores` syncs the weights for `step` and returns `losses.ServerTeacherScores`."""

    kind = "live"

    def __init__(self, scorer=None, settings: TeacherSettings | None = None):
        super().__init__(settings)
        self.scorer = None
        if scorer is not None:
            self.bind(scorer)

    def bind(self, rollout) -> None:
        if not callable(getattr(rollout, "teacher_scores", None)):
            raise ValueError(
                "`use_teacher_server=True` needs a rollout backend that scores the teacher (`teacher_scores`), such "
                f"as vLLM in server mode; got {type(rollout).__name__}."
            )
        self.scorer = rollout

    def score(self, student, inputs, mask, step, view):
        if self.scorer is None:
            raise RuntimeError("The server teacher scores through the rollout backend: `bind` it first.")
        return self.scorer.teacher_scores(
            inputs["teacher_input_ids"], inputs["teacher_attention_mask"], mask, self.settings.server_topk, step
        )


# ------------------------------------------------------------------------------------------------- the registry
@dataclass
class TeacherContext:
    """What a teacher factory gets: the (prepared, not yet wrapped) student, the accelerator, the settings, and the
    rollout backend (the server teacher's scorer; None where nothing scores on a server)."""

    student: Any
    accelerator: Any
    settings: TeacherSettings
    scorer: Any = None


TeacherFactory = Callable[[TeacherContext], Teacher]
TEACHERS: dict[str, TeacherFactory] = {}


def register_teacher(kind: str, factory: TeacherFactory, replace: bool = False) -> None:
    """Make `teacher_model_kind=kind` build `factory(context)`; `kind@server` is the kind scored on the server
    (`use_teacher_server`). A registered kind is replaced only with `replace=True`."""
    if kind in TEACHERS and not replace:
        raise ValueError(f"Teacher kind {kind!r} is already registered; pass `replace=True` to replace it.")
    TEACHERS[kind] = factory


def teacher_kinds() -> tuple[str, ...]:
    """The registered `teacher_model_kind` values (the keys without a `@server` suffix)."""
    return tuple(kind for kind in TEACHERS if "@" not in kind)


def build_teacher(context: TeacherContext) -> Teacher:
    """The teacher registered for `context.settings.kind` (`f"{kind}@server"` when it is scored on the server)."""
    settings = context.settings
    key = f"{settings.kind}@server" if settings.on_server else settings.kind
    factory = TEACHERS.get(key)
    if factory is None:
        raise ValueError(
            f"No teacher is registered for {key!r}: the registered kinds are {', '.join(map(repr, TEACHERS))}. "
            "Add one with `trl_sdft.teachers.register_teacher`."
        )
    return factory(context)


def copy_for_teacher(student, accelerator, settings: TeacherSettings):
    """A copy of the student's current (initial) weights without gradients, placed like the student."""
    from trl.models import prepare_deepspeed, prepare_fsdp

    student = unwrap(student)
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None and deepspeed_plugin.zero_stage == 3:
        # ZeRO-3 shards are empty on each rank: a deep copy would copy nothing. Load the weights again.
        init_kwargs = dict(settings.model_init_kwargs or {})
        init_kwargs.update(device_map=None, dtype=student.dtype, trust_remote_code=settings.trust_remote_code)
        teacher = create_model_from_path(get_config_model_id(student.config), **init_kwargs)
    else:
        teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    if deepspeed_plugin is not None:
        return prepare_deepspeed(teacher, accelerator)
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and fsdp_plugin.fsdp_version == 2:
        # Sharded like the student, unit by unit (accelerate's own FSDP2 preparation, with the config's wrap policy):
        # TRL's `prepare_fsdp` shards only the root, so each teacher forward would gather the whole model at once.
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        teacher = fsdp2_prepare_model(accelerator, teacher)
        teacher.eval()
        return teacher
    if fsdp_plugin is not None:
        return prepare_fsdp(teacher, accelerator)
    # On the student's device, and under the same mixed-precision autocast as the student's forward.
    return accelerator.prepare_model(teacher.to(accelerator.device), evaluation_mode=True)


def _base_teacher(context: TeacherContext) -> Teacher:
    if is_peft_model(context.student):
        return AdapterOffTeacher(context.student, context.settings)
    return FrozenCopyTeacher(copy_for_teacher(context.student, context.accelerator, context.settings), context.settings)


def _ema_teacher(context: TeacherContext) -> Teacher:
    if is_peft_model(context.student):
        return EMAAdapterTeacher(context.student, context.settings)
    return EMACopyTeacher(copy_for_teacher(context.student, context.accelerator, context.settings), context.settings)


register_teacher("base", _base_teacher)
register_teacher("live", lambda context: LiveTeacher(context.settings))
register_teacher("ema", _ema_teacher)
register_teacher("live@server", lambda context: ServerTeacher(context.scorer, context.settings))


class TeacherUpdateCallback(TrainerCallback):
    """Moves a teacher that `moves` (EMA kinds) after every `teacher.settings.sync_steps` optimizer steps."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.teacher.moves and state.global_step % self.teacher.settings.sync_steps == 0:
            self.teacher.update(model)
