"""What the trainer adds to the HF Trainer's saving: the teacher's state in every checkpoint, written before the
parent's `trainer_state.json` (what makes a checkpoint complete, `checkpoints.py`), and whole under the sharded engines.

`TeacherSaving` is a mixin of `SDFTTrainer` (it reads `self.teacher`); the teachers themselves know what to save and
how to gather it (`teachers.Teacher.save`).
"""

import inspect
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


class TeacherSaving:
    """Trainer overrides: every process takes part in a save (the sharded engines gather the teacher's weights, a
    collective), the main one writes."""

    _frozen_weights = None

    def _save_checkpoint(self, model, trial):
        """The teacher state first: the parent writes `trainer_state.json` last and only then rotates older
        checkpoints away."""
        step_dir = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        checkpoint_dir = os.path.join(self._get_output_dir(trial=trial), step_dir)
        if self.args.should_save:
            os.makedirs(checkpoint_dir, exist_ok=True)
        if "write" in inspect.signature(self.teacher.save).parameters:
            self.teacher.save(checkpoint_dir, write=self.args.should_save)
        elif self.args.should_save:  # a registered teacher written before saving took part on every process
            self.teacher.save(checkpoint_dir)
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under ZeRO-3 the parent's state dict leaves frozen weights out, the EMA teacher adapter among them, and PEFT
        would then write the student's adapter as the teacher's (`teacher/`): gathered here and added back."""
        if self.is_deepspeed_enabled:
            self._frozen_weights = self.teacher.frozen_weights(write=self.args.should_save)
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            self._frozen_weights = None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The checkpoint's weights are checked as the starting model's are: NaN or inf stops the run here, naming the
        checkpoint, instead of at the first sampling step; weights that do not fit are another model's."""
        from .models import check_finite_weights, first_line

        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except RuntimeError as err:
            if "size mismatch" not in str(err) and "loading state_dict" not in str(err):
                raise
            raise ValueError(
                f"--resume_from_checkpoint {resume_from_checkpoint!r}: its weights do not fit this model "
                f"({first_line(err)}): resume with the model it was trained from."
            ) from None
        if not self.is_fsdp_enabled:  # FSDP's shards are per process: a check on one rank alone would hang the others
            check_finite_weights(model or self.model, f"--resume_from_checkpoint {resume_from_checkpoint!r}")

    def _save(self, output_dir: str | None = None, state_dict=None):
        if state_dict is not None and self._frozen_weights:
            state_dict = {**self._frozen_weights, **state_dict}
        return super()._save(output_dir, state_dict)
