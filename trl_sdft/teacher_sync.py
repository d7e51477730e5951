"""TRL's `trl.experimental.sdft.teacher_sync` names, as thin wrappers over `trl_sdft.teachers`.

They exist so that `from trl.experimental.sdft.teacher_sync import X` becomes `from trl_sdft.teacher_sync import X`:
the same names, signatures and EMA rule, `teacher <- (1 - rate) * teacher + rate * student`. `SDFTTrainer` itself uses
`teachers.py` directly (whose PEFT EMA teacher starts as a copy of the student's adapter; TRL's, and this module's
`PEFTAdapterEMACallback`, start it at zeros).
"""

import logging
from dataclasses import replace

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .teachers import (
    TEACHER_ADAPTER,
    EMAAdapterTeacher,
    EMACopyTeacher,
    LiveTeacher,
    TeacherSettings,
    TeacherUpdateCallback,
)
from .teachers import student_adapter_name as _student_adapter_name

__all__ = ["PEFTAdapterEMACallback", "SyncTeacherModelCallback", "is_pure_lora_training", "logger"]

logger = logging.getLogger(__name__)


def is_pure_lora_training(model, accelerator=None) -> bool:
    """Whether `model` is a PEFT model whose active adapter is LoRA and whose trainable parameters are all LoRA's.

    TRL's test, which is looser than `teachers.check_ema_adapter_support` (the trainer's check, which also refuses
    `modules_to_save` or `bias != "none"` in the config even where they leave no extra weight trainable)."""
    if not is_peft_model(model):
        return False
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    config = model.peft_config.get(_student_adapter_name(model))
    if str(getattr(config, "peft_type", None)).split(".")[-1] != "LORA":
        return False
    return all("lora_" in name for name, param in model.named_parameters() if param.requires_grad)


class SyncTeacherModelCallback(TeacherUpdateCallback):
    """Moves a separate EMA teacher model toward the student after every `args.teacher_sync_steps` optimizer steps, at
    rate `args.teacher_update_rate` (`EMACopyTeacher`, which also freezes the teacher and puts it in eval mode)."""

    def __init__(self, teacher_model, accelerator=None):
        super().__init__(LiveTeacher() if teacher_model is None else EMACopyTeacher(teacher_model))
        self.ref_model = teacher_model
        self.accelerator = accelerator

    def on_step_end(self, args, state, control, **kwargs):
        model = kwargs["model"]
        if self.accelerator:
            model = self.accelerator.unwrap_model(model)
        # TRL reads the rate and the interval from the training arguments at every step.
        self.teacher.settings = replace(
            self.teacher.settings, update_rate=args.teacher_update_rate, sync_steps=args.teacher_sync_steps
        )
        super().on_step_end(args, state, control, model=model)


class PEFTAdapterEMACallback(TrainerCallback):
    """Keeps a `teacher` LoRA adapter on `model` as an EMA of the active (student) adapter (`EMAAdapterTeacher`).

    The teacher adapter is added at `on_train_begin` (or the first sync step) with zero weights, as in TRL, and moved
    by `teacher <- (1 - update_rate) * teacher + update_rate * student` after every `sync_steps` optimizer steps. Only
    the adapter name `"teacher"` is supported, and only LoRA adapters that `teachers.check_ema_adapter_support` accepts.
    """

    def __init__(
        self,
        model,
        teacher_adapter_name: str = "teacher",
        update_rate: float = 0.05,
        sync_steps: int = 1,
        accelerator=None,
    ):
        if teacher_adapter_name != TEACHER_ADAPTER:
            raise ValueError(
                f"`teacher_adapter_name={teacher_adapter_name!r}` is not supported: the EMA teacher adapter is always "
                f"named {TEACHER_ADAPTER!r} here."
            )
        self.model = model
        self.teacher_adapter_name = teacher_adapter_name
        self.update_rate = update_rate
        self.sync_steps = sync_steps
        self.accelerator = accelerator
        self.teacher_adapter_config = None
        self.teacher: EMAAdapterTeacher | None = None

    @property
    def shadow_weights(self) -> dict[str, torch.Tensor] | None:
        """The teacher adapter's weights under PEFT's state-dict keys (no adapter name); None before it exists."""
        if self.teacher is None:
            return None
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self._unwrapped(), adapter_name=self.teacher_adapter_name)

    def _unwrapped(self):
        return self.model if self.accelerator is None else self.accelerator.unwrap_model(self.model)

    def _initialize_teacher_adapter(self) -> None:
        if self.teacher is not None:
            return
        model = self._unwrapped()
        self.teacher = EMAAdapterTeacher(model, TeacherSettings(kind="ema", update_rate=self.update_rate))
        with torch.no_grad():
            for weight in self.teacher.state_dict().values():
                weight.zero_()
        self.teacher_adapter_config = model.peft_config[self.teacher_adapter_name]
        logger.info(f"Initialized PEFT adapter EMA teacher with adapter name: {self.teacher_adapter_name}")

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step % self.sync_steps != 0:
            return
        if self.accelerator is None and "accelerator" in kwargs:
            self.accelerator = kwargs["accelerator"]
        self._initialize_teacher_adapter()
        self.teacher.settings = replace(self.teacher.settings, update_rate=self.update_rate)  # TRL reads it per step
        self.teacher.update(self._unwrapped())

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.accelerator is None and "accelerator" in kwargs:
            self.accelerator = kwargs["accelerator"]
        self._initialize_teacher_adapter()
