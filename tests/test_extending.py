"""Extending the package from outside it, through its two registries (docs: "Extending"): a teacher kind registered
with `trl_sdft.teachers.register_teacher` and a rollout backend registered with
`trl_sdft.rollouts.register_rollout_backend`, each chosen by one config field and trained with."""

import pytest
import torch
from datasets import Dataset

from trl_sdft import SDFTTrainer, teachers
from trl_sdft.rollouts import ROLLOUT_BACKENDS, Rollouts, register_rollout_backend
from trl_sdft.testing import build_model, facts_rows


class OtherModelTeacher(teachers.Teacher):
    """A toy kind: the teacher is another model (same tokenizer), frozen. Counts its forwards."""

    kind = "other-model"
    moves = False

    def __init__(self, model, settings):
        self.model, self.settings, self.calls = model, settings, 0
        self.model.requires_grad_(False).eval()

    def module(self, student):
        return self.model

    def score(self, student, inputs, mask, step, view):
        self.calls += 1
        with torch.no_grad():
            return view(self.model, inputs, teacher=True)


@pytest.fixture
def other_model_kind(tokenizer):
    """Registers the toy kind for one test, with a second tiny model (another seed) as the teacher."""
    made = []

    def factory(context):
        made.append(OtherModelTeacher(build_model(tokenizer, seed=7).to(context.accelerator.device), context.settings))
        return made[-1]

    teachers.register_teacher("other-model", factory)
    yield made
    teachers.TEACHERS.pop("other-model", None)


def test_a_teacher_kind_registered_from_outside_trains(tmp_path, tokenizer, tiny_model, other_model_kind, trained):
    trainer = trained(tiny_model, tokenizer, tmp_path, teacher_model_kind="other-model", loss_chunk_size=0)
    (teacher,) = other_model_kind
    assert trainer.teacher is teacher and trainer.teacher_model is teacher.model
    assert teacher.calls == 2  # one teacher pass per step, on the registered teacher's own model
    losses = [entry["self_distillation/distillation_loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_an_unregistered_teacher_kind_is_refused_with_the_registered_ones(tmp_path, tiny_config):
    with pytest.raises(ValueError, match=r"teacher_model_kind='other-model'.*'base'.*register_teacher"):
        tiny_config(tmp_path, teacher_model_kind="other-model")


class FixedRollouts:
    """A toy backend: every completion is the same few tokens and the end of sequence. Records its calls."""

    def __init__(self, context):
        self.context, self.calls, self.closed = context, [], False
        tokens = context.tokenizer("red", add_special_tokens=False)["input_ids"]
        self.completion = [*tokens, context.eos_token_ids[0]]

    def generate(self, model, prompt_ids, num_generations, step):
        self.calls.append((len(prompt_ids), num_generations, step))
        return Rollouts([list(self.completion) for _ in prompt_ids])

    def close(self):
        self.closed = True

    def describe(self):
        return "fixed completions"


@pytest.fixture
def fixed_backend():
    made = []

    def factory(context):
        made.append(FixedRollouts(context))
        return made[-1]

    register_rollout_backend("fixed", factory)
    yield made
    ROLLOUT_BACKENDS.pop("fixed", None)


def test_a_rollout_backend_registered_from_outside_trains(tmp_path, tokenizer, tiny_model, fixed_backend):
    from trl_sdft import SDFTConfig, SelfDistillationCallback

    seen = []

    class Completions(SelfDistillationCallback):
        def on_self_distillation_batch_prepared(self, completion_ids=None, **kwargs):
            seen.append(completion_ids.tolist())

    args = SDFTConfig(
        output_dir=str(tmp_path),
        rollout_backend="fixed",
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        distillation_topk=5,
        disable_tqdm=True,
    )
    trainer = SDFTTrainer(
        tiny_model, args, Dataset.from_list(facts_rows()), processing_class=tokenizer, callbacks=[Completions()]
    )
    trainer.train()
    (backend,) = fixed_backend
    assert trainer.rollout is backend and backend.closed  # closed at the end of `train`
    assert [call[1:] for call in backend.calls] == [(2, 0), (2, 1)]  # num_generations, optimizer step
    assert seen and all(row == backend.completion for batch in seen for row in batch)
    assert len([entry for entry in trainer.state.log_history if "loss" in entry]) == 2


def test_an_unknown_or_mismatched_rollout_backend_is_refused_before_any_model(tmp_path, tiny_config):
    with pytest.raises(ValueError, match=r"rollout_backend='nope'.*'transformers'.*register_rollout_backend"):
        tiny_config(tmp_path, rollout_backend="nope")
    with pytest.raises(ValueError, match="use_vllm=True"):
        tiny_config(tmp_path, rollout_backend="vllm")
