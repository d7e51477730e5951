"""Bad input: a clear ValueError naming the row or field, raised before any training starts."""

import pytest
from conftest import tiny_config
from datasets import Dataset, IterableDataset

from trl_sdft import SDFTTrainer
from trl_sdft.testing import facts_rows


def make(model, tokenizer, tmp_path, dataset, **kwargs):
    return SDFTTrainer(
        model=model, args=tiny_config(tmp_path), train_dataset=dataset, processing_class=tokenizer, **kwargs
    )


class ExplodingModel:
    """Stands in for a model path: data errors must surface before the model is touched."""

    def __getattr__(self, name):
        raise AssertionError("the model was used before the dataset was validated")


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"question": "q", "privileged_context": "c"}],
            r"lacks the column\(s\) \['prompt'\]; found \['question', 'privileged_context'\]",
        ),
        ([{"prompt": "q", "answer": "c"}], r"lacks the column\(s\) \['privileged_context'\]"),
        ([{"prompt": "q", "privileged_context": "c"}, {"prompt": "q2", "privileged_context": None}], "Row 1 .*is None"),
        ([{"prompt": "q", "privileged_context": "  "}], "Row 0 .*is empty"),
        ([{"prompt": "", "privileged_context": "c"}], "Row 0 .*prompt is empty"),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                    "privileged_context": "c",
                }
            ],
            "Row 0 .*ends with a 'assistant' turn.*must end with a user turn",
        ),
        ([{"prompt": "q", "privileged_context": [{"role": "user", "content": ""}]}], "Row 0 .*is empty"),
    ],
)
def test_bad_rows_fail_before_the_model_is_loaded(tokenizer, tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        make(ExplodingModel(), tokenizer, tmp_path, Dataset.from_list(rows))


def test_bad_eval_rows_are_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"Row 0 of the eval\['probe'\] dataset"):
        make(
            ExplodingModel(),
            tokenizer,
            tmp_path,
            Dataset.from_list(facts_rows()),
            eval_dataset={"probe": Dataset.from_list([{"prompt": "q", "privileged_context": None}])},
        )


def test_iterable_dataset_is_refused(tokenizer, tmp_path):
    stream = IterableDataset.from_generator(lambda: iter(facts_rows()))
    with pytest.raises(ValueError, match="IterableDataset.*not support"):
        make(ExplodingModel(), tokenizer, tmp_path, stream)


def test_dataset_smaller_than_a_generation_batch(tokenizer, tmp_path):
    # tiny_config: 4 completions per step, 2 per prompt -> 2 distinct prompts; one row could never fill a batch
    with pytest.raises(ValueError, match="has 1 rows but one generation batch takes 2 distinct prompts"):
        make(ExplodingModel(), tokenizer, tmp_path, Dataset.from_list(facts_rows(1)))


def test_missing_train_dataset(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="train_dataset"):
        make(ExplodingModel(), tokenizer, tmp_path, None)


def test_prompt_empty_after_tokenization(tiny_model, tokenizer, tmp_path):
    # A zero-width character is text to Python but no token to a tokenizer that does not know it.
    class DroppingTokenizer(type(tokenizer)):
        def __call__(self, text=None, add_special_tokens=True, **kwargs):
            out = super().__call__(text=text, add_special_tokens=add_special_tokens, **kwargs)
            if not add_special_tokens:
                out["input_ids"] = [[] if t.strip("\u200b") == "" else ids for t, ids in zip(text, out["input_ids"])]
            return out

    dropping = DroppingTokenizer.from_pretrained(tokenizer.name_or_path)
    rows = facts_rows(2) + [{"prompt": "\u200b\u200b", "privileged_context": "c"}]
    with pytest.raises(ValueError, match="Row 2 of the train dataset: the prompt is empty after tokenization"):
        make(tiny_model, dropping, tmp_path, Dataset.from_list(rows))


def test_peft_config_with_peft_model(tiny_model, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    wrapped = get_peft_model(tiny_model, config)
    with pytest.raises(ValueError, match="already a PEFT model.*Pass the base model"):
        make(wrapped, tokenizer, tmp_path, Dataset.from_list(facts_rows()), peft_config=config)


@pytest.mark.parametrize(
    "lora_kwargs, message",
    [(dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(bias="all"), "bias='all'")],
)
def test_ema_adapter_limits(tiny_model, tokenizer, tmp_path, lora_kwargs, message):
    from peft import LoraConfig

    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", **lora_kwargs)
    with pytest.raises(ValueError, match=message):
        SDFTTrainer(
            model=tiny_model,
            args=tiny_config(tmp_path, teacher_model_kind="ema"),
            train_dataset=Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
            peft_config=config,
        )


def test_long_prompts_are_cut_and_counted(tiny_model, tokenizer, tmp_path, caplog):
    rows = facts_rows(4)
    rows[0]["prompt"] = "What color is Zorbo? " * 20
    with caplog.at_level("WARNING"):
        trainer = SDFTTrainer(
            model=tiny_model,
            args=tiny_config(tmp_path, max_prompt_length=16),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert "1 of 4 prompts of the train dataset are longer than 16 tokens" in caplog.text
    # The teacher prompt has its own limit: the model's context minus the completion, so nothing is cut here.
    assert trainer.max_teacher_prompt_length == 256 - 8
    teacher = trainer._tokenize([rows[0]["prompt"] + "\n\nctx"], trainer.max_teacher_prompt_length)[0]
    assert len(teacher) > 16
