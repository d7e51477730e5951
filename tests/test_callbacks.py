"""The self-distillation hooks: dispatch rules, and their payloads in a real run."""

import pytest
from datasets import Dataset

from trl_sdft import SDFTTrainer, SelfDistillationCallback
from trl_sdft.callbacks import HOOKS, dispatch
from trl_sdft.testing import facts_rows


def test_dispatch_calls_only_callbacks_that_define_the_hook():
    calls = []

    class Defines:
        def on_generation_batch_built(self, **kwargs):
            calls.append(kwargs)

    class DoesNot:
        pass

    callbacks = [Defines(), DoesNot(), SelfDistillationCallback()]
    dispatch(callbacks, "on_generation_batch_built", args=None, state=None, control=None, generate_every=2)
    assert calls == [{"args": None, "state": None, "control": None, "generate_every": 2}]
    with pytest.raises(ValueError, match="Unknown self-distillation hook 'on_nothing'"):
        dispatch([], "on_nothing")
    assert all(hasattr(SelfDistillationCallback, hook) for hook in HOOKS)


def test_hooks_fire_with_payloads(tiny_model, tokenizer, tmp_path, tiny_config):
    events = []

    class Recorder(SelfDistillationCallback):
        def on_generation_prompts_selected(self, args, state, control, **kwargs):
            events.append(("selected", kwargs))

        def on_generation_batch_built(self, args, state, control, **kwargs):
            events.append(("built", kwargs))

        def on_self_distillation_batch_prepared(self, args, state, control, **kwargs):
            events.append(("prepared", kwargs))

    class PlainCallback:  # any object with the method gets it, as in TRL
        calls = 0

        def on_generation_batch_built(self, **kwargs):
            PlainCallback.calls += 1

        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *a, **k: None
            raise AttributeError(name)

    SDFTTrainer(
        model=tiny_model,
        args=tiny_config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        callbacks=[Recorder(), PlainCallback()],
    ).train()
    names = [name for name, _ in events]
    assert names == ["selected", "prepared", "built"]
    selected, prepared, built = (payload for _, payload in events)
    assert selected["generation_prompts"][0].startswith("What color is") and selected["generation_prompt_text"] is None
    assert {"model", "processing_class"} <= set(selected)
    assert set(prepared) >= {
        "old_per_token_logps",
        "prompt_ids",
        "completion_ids",
        "teacher_input_ids",
        "teacher_attention_mask",
    }
    assert prepared["teacher_input_ids"].shape[1] > prepared["prompt_ids"].shape[1]
    assert built["generate_every"] == 1
    assert PlainCallback.calls == 1
