"""Dataset checks (`data.py`): a clear ValueError naming the row or column, before any model is loaded."""

import pytest
from datasets import Dataset, IterableDataset

from trl_sdft.testing import facts_rows


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
def test_bad_rows_fail_before_the_model_is_loaded(tokenizer, tmp_path, rows, message, make_trainer, exploding_model):
    with pytest.raises(ValueError, match=message):
        make_trainer(exploding_model, tokenizer, tmp_path, Dataset.from_list(rows))


def test_bad_eval_rows_are_named(tokenizer, tmp_path, make_trainer, exploding_model):
    with pytest.raises(ValueError, match=r"Row 0 of the eval\['probe'\] dataset"):
        make_trainer(
            exploding_model,
            tokenizer,
            tmp_path,
            Dataset.from_list(facts_rows()),
            eval_dataset={"probe": Dataset.from_list([{"prompt": "q", "privileged_context": None}])},
        )


def test_iterable_dataset_is_refused(tokenizer, tmp_path, make_trainer, exploding_model):
    stream = IterableDataset.from_generator(lambda: iter(facts_rows()))
    with pytest.raises(ValueError, match="IterableDataset.*not support"):
        make_trainer(exploding_model, tokenizer, tmp_path, stream)
