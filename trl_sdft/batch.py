"""From dataset rows to the tensors of one self-distillation batch: prompts, tokens, lengths, padding.

The trainer calls these in order: `teacher_prompts` (the privileged-context prompt of each row), `tokenize_prompts`
(student and teacher prompts), a rollout backend's `generate`, then `assemble_batch`. `check_prompt_lengths` runs once
per dataset at trainer init. No model here, and no trainer state.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from trl.trainer.utils import pad

from .prompts import build_teacher_prompt, is_chat
from .utils import tokenizer_of

logger = logging.getLogger(__name__)


def teacher_prompts(prompts: list[Any], contexts: list[Any], template: str) -> list[Any]:
    """Each prompt with its privileged context, through the teacher template (text or chat, like the prompt)."""
    return [build_teacher_prompt(prompt, context, template) for prompt, context in zip(prompts, contexts, strict=True)]


def tokenize_prompts(
    processing_class, prompts: list[Any], limit: int | None = None, chat_template_kwargs: dict | None = None
) -> list[list[int]]:
    """Token ids of text or chat prompts (chat: the generation prompt appended), cut from the left to `limit`."""
    if is_chat(prompts[0]):
        ids = processing_class.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )["input_ids"]
    else:
        ids = processing_class(text=prompts)["input_ids"]
    ids = [list(row) for row in ids]
    return ids if limit is None else [row[-limit:] for row in ids]


class RoundPrompts(NamedTuple):
    """A round's tokenized prompts: the student's, the teacher's, and those its rollouts are generated from."""

    student: list[list[int]]
    teacher: list[list[int]]
    generation: list[list[int]]


def round_prompts(
    processing_class,
    rows: list[dict],
    template: str,
    limits: tuple[int | None, int | None],
    chat_template_kwargs: dict | None,
    from_teacher: bool,
) -> tuple[RoundPrompts, list[Any]]:
    """The rows' student and teacher prompts, tokenized (cut to `limits`: student, teacher), and the prompts the
    rollouts are generated from (the teacher's with `generate_from_teacher`) before tokenization."""
    prompts = [row["prompt"] for row in rows]
    teachers = teacher_prompts(prompts, [row["privileged_context"] for row in rows], template)
    student_ids = tokenize_prompts(processing_class, prompts, limits[0], chat_template_kwargs)
    teacher_ids = tokenize_prompts(processing_class, teachers, limits[1], chat_template_kwargs)
    generation = (teacher_ids, teachers) if from_teacher else (student_ids, prompts)
    return RoundPrompts(student_ids, teacher_ids, generation[0]), generation[1]


@dataclass
class PromptLengths:
    """The longest student and teacher prompt (in tokens, after the cut) seen so far: what vLLM's context must hold."""

    student: int = 0
    teacher: int = 0


def check_prompt_lengths(
    processing_class,
    dataset,
    name: str,
    template: str,
    max_prompt_length: int | None,
    max_teacher_prompt_length: int | None,
    chat_template_kwargs: dict | None = None,
    lengths: PromptLengths | None = None,
    warn: Callable[[str], None] = logger.warning,
) -> PromptLengths:
    """Tokenize every prompt of `dataset` once: fail on prompts with no tokens, `warn` how many will be cut, and
    return the longest prompts (updating `lengths` when given)."""
    lengths = lengths or PromptLengths()
    prompts = list(dataset["prompt"])
    student_ids = tokenize_prompts(processing_class, prompts, None, chat_template_kwargs)
    teacher_ids = tokenize_prompts(
        processing_class, teacher_prompts(prompts, dataset["privileged_context"], template), None, chat_template_kwargs
    )
    if not is_chat(prompts[0]):
        bare = tokenizer_of(processing_class)(text=prompts, add_special_tokens=False)["input_ids"]
        for index, ids in enumerate(bare):
            if not ids:
                raise ValueError(f"Row {index} of the {name} dataset: the prompt is empty after tokenization.")
    for key, label, ids_list, limit, field in (
        ("student", "prompts", student_ids, max_prompt_length, "max_prompt_length"),
        ("teacher", "teacher prompts", teacher_ids, max_teacher_prompt_length, "max_teacher_prompt_length"),
    ):
        longest = max(len(ids) for ids in ids_list)
        setattr(lengths, key, max(getattr(lengths, key), min(longest, limit or longest)))
        cut = 0 if limit is None else sum(len(ids) > limit for ids in ids_list)
        if cut:
            warn(
                f"{cut} of {len(ids_list)} {label} of the {name} dataset are longer than {limit} tokens and will "
                f"be cut from the left; raise `{field}` to keep them whole."
            )
    return lengths


def left_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for a list of token-id lists."""
    tensors = [torch.tensor(ids, dtype=torch.long) for ids in sequences]
    ids = pad(tensors, padding_value=pad_token_id, padding_side="left").to(device)
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(device)
    return ids, mask


def right_pad(
    sequences: list[list[int]], pad_token_id: int, device, dtype: torch.dtype = torch.long
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (or values of `dtype`) and mask; an all-empty batch gives one padded column so shapes stay
    valid."""
    tensors = [torch.tensor(ids if ids else [pad_token_id], dtype=dtype) for ids in sequences]
    masks = [torch.tensor([1] * len(ids) if ids else [0], dtype=torch.long) for ids in sequences]
    ids = pad(tensors, padding_value=pad_token_id, padding_side="right").to(device)
    mask = pad(masks, padding_value=0, padding_side="right").to(device)
    return ids, mask


def assemble_batch(
    student_prompt_ids: list[list[int]],
    teacher_prompt_ids: list[list[int]],
    completions: list[list[int]],
    pad_token_id: int,
    device,
) -> dict[str, torch.Tensor | None]:
    """The batch `compute_loss` reads: left-padded prompts, right-padded completions, and the teacher's prompt +
    completion. `old_per_token_logps` (the rollout policy's log-probs, for importance clipping) starts as None."""
    prompt_ids, prompt_mask = left_pad(student_prompt_ids, pad_token_id, device)
    completion_ids, completion_mask = right_pad(completions, pad_token_id, device)
    teacher_ids, teacher_mask = left_pad(teacher_prompt_ids, pad_token_id, device)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([teacher_ids, completion_ids], dim=1),
        "teacher_attention_mask": torch.cat([teacher_mask, completion_mask], dim=1),
        "old_per_token_logps": None,
    }
