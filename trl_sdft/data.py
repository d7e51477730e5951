"""Dataset checks for SDFT, run once at trainer init so that no training starts on wrong data, and the training
sampler."""

from typing import Any

import torch
from datasets import Dataset, IterableDataset, IterableDatasetDict
from trl.trainer.utils import RepeatSampler

from .prompts import context_to_text, is_chat, message_text

REQUIRED_COLUMNS = ("prompt", "privileged_context")


class EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose order depends only on the epoch: `set_epoch(e)` (called by accelerate's loader at
    every pass) puts the generator where the e-th pass of a fresh sampler starts, so every epoch reads what it read
    before. A resumed run (a fresh sampler) then reads the rows the uninterrupted run read after the checkpoint; TRL's
    draws each order from where the last pass left its generator, a state checkpoints do not keep."""

    def set_epoch(self, epoch: int) -> None:
        if not self.shuffle or self.seed is None:
            return
        self.generator.manual_seed(self.seed)
        for _ in range(epoch):  # the orders of the earlier passes, drawn and dropped
            torch.randperm(self.num_samples, generator=self.generator)


def _describe(name: str) -> str:
    return f"the {name} dataset"


def check_dataset_type(dataset: Any, name: str) -> None:
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        raise ValueError(
            f"{_describe(name).capitalize()} is an IterableDataset, which SDFTTrainer does not support yet: load it "
            "without `streaming=True`, or materialise it with `Dataset.from_generator`/`Dataset.from_list`."
        )


def prompt_text(prompt: Any) -> str:
    """The text a prompt asks: the string itself, or the last turn of a chat prompt."""
    if is_chat(prompt):
        return message_text(prompt[-1].get("content"))
    return prompt if isinstance(prompt, str) else ""


def prompt_kind(prompt: Any) -> str:
    """`"chat messages"` or `"text"`: one batch is templated one way, so a dataset holds one kind of prompt."""
    return "chat messages" if is_chat(prompt) else "text"


def lone_surrogate(value: Any) -> bool:
    """Whether a string in `value` (nested lists and dicts too) holds half of a UTF-16 surrogate pair: JSON allows the
    escape, Python keeps it, and the tokenizer fails on it mid-training."""
    if isinstance(value, str):
        if value.isascii():
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(lone_surrogate(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(lone_surrogate(item) for item in value)
    return False


def validate_dataset(dataset: Dataset, name: str = "train") -> None:
    """Check columns and every row; raise a `ValueError` naming the first bad row and the fix."""
    check_dataset_type(dataset, name)
    if len(dataset) == 0:
        raise ValueError(
            f"{_describe(name).capitalize()} has no rows. Add rows with `prompt` and `privileged_context`."
        )
    columns = list(dataset.column_names)
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise ValueError(
            f"{_describe(name).capitalize()} lacks the column(s) {missing}; found {columns}. SDFT needs `prompt` "
            "(text or chat messages) and `privileged_context` (what the teacher sees, e.g. a demonstration). Rename "
            "your columns, e.g. `dataset.rename_column('question', 'prompt')`."
        )
    first_kind = None
    for index, (prompt, context) in enumerate(zip(dataset["prompt"], dataset["privileged_context"], strict=True)):
        validate_row(prompt, context, index, name)
        kind = prompt_kind(prompt)
        first_kind = first_kind or kind
        if kind != first_kind:
            raise ValueError(
                f"Row {index} of {_describe(name)}: the prompt is {kind} but row 0's is {first_kind}; prompts must be "
                "all text or all chat messages (a batch is templated one way). Convert the odd rows, e.g. a text "
                "prompt to `[{'role': 'user', 'content': text}]`."
            )


def validate_row(prompt: Any, context: Any, index: int, name: str = "train") -> None:
    where = f"Row {index} of {_describe(name)}"
    if is_chat(prompt):
        role = prompt[-1].get("role")
        if role != "user":
            raise ValueError(
                f"{where}: the chat prompt ends with a {role!r} turn, but it must end with a user turn (the teacher "
                "template wraps it, and the model answers it). Drop trailing assistant/tool turns."
            )
    elif not isinstance(prompt, str):
        raise ValueError(f"{where}: `prompt` must be a string or a list of chat messages, got {type(prompt).__name__}.")
    for field_name, value in (("prompt", prompt), ("privileged_context", context)):
        if lone_surrogate(value):
            raise ValueError(
                f"{where}: `{field_name}` holds a lone surrogate (half of a UTF-16 pair, e.g. the JSON escape "
                "\\ud800), which is not text and would fail in the tokenizer. Fix or remove the row."
            )
    if not prompt_text(prompt).strip():
        raise ValueError(f"{where}: the prompt is empty. Remove the row or fill in its prompt.")
    if context is None:
        raise ValueError(
            f"{where}: `privileged_context` is None. Every row needs the context the teacher sees; filter such rows "
            "out first (e.g. `dataset.filter(lambda r: r['privileged_context'])`)."
        )
    try:
        text = context_to_text(context)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if not text.strip():
        raise ValueError(
            f"{where}: `privileged_context` is empty, so the teacher would see nothing the student does not. Remove "
            "the row or fill in its context."
        )


def named_eval_sets(eval_dataset) -> list[tuple[str, Any]]:
    """`(name, dataset)` for each evaluation set, named as errors call them."""
    if eval_dataset is None:
        return []
    if isinstance(eval_dataset, dict):
        return [(f"eval[{key!r}]", value) for key, value in eval_dataset.items()]
    return [("eval", eval_dataset)]


def check_datasets(train_dataset, eval_dataset, generation_batch_size: int, num_generations: int) -> None:
    """Every data problem of the trainer's datasets, before any model is loaded."""
    if train_dataset is None:
        raise ValueError("`train_dataset` is required: a Dataset with `prompt` and `privileged_context` columns.")
    validate_dataset(train_dataset, "train")
    prompts_per_generation = generation_batch_size // num_generations
    if len(train_dataset) < prompts_per_generation:
        # The repeat sampler drops incomplete batches: a smaller dataset would end training at step 0, silently.
        raise ValueError(
            f"The train dataset has {len(train_dataset)} rows but one generation batch takes "
            f"{prompts_per_generation} distinct prompts (generation_batch_size {generation_batch_size} / "
            f"num_generations {num_generations}), so no step could be built. Add rows, lower "
            "`per_device_train_batch_size` / `steps_per_generation`, or raise `num_generations`."
        )
    for name, dataset in named_eval_sets(eval_dataset):
        validate_dataset(dataset, name)
