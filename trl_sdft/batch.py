"""From dataset rows to the tensors of one self-distillation batch: prompts, tokens, lengths, padding.

The trainer calls `round_prompts` (each row's student prompt and teacher prompt, tokenized; a teacher prompt over its
limit loses the end of its privileged context first, `fit_teacher_prompts`), a rollout backend's `generate`, then
`assemble_batch`. `fit_datasets_in_context` (each dataset's prompts against the limits and the model's context, with
`check_prompt_lengths`) runs once at trainer init. No model here, and no trainer state.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from trl.trainer.utils import pad

from .prompts import build_teacher_prompt, context_to_text, is_chat
from .utils import tokenizer_of

logger = logging.getLogger(__name__)


def teacher_prompts(prompts: list[Any], contexts: list[Any], template: str) -> list[Any]:
    """Each prompt with its privileged context, through the teacher template (text or chat, like the prompt)."""
    return [build_teacher_prompt(prompt, context, template) for prompt, context in zip(prompts, contexts, strict=True)]


def tokenize_prompts(
    processing_class, prompts: list[Any], limit: int | None = None, chat_template_kwargs: dict | None = None
) -> list[list[int]]:
    """Token ids of text or chat prompts (chat: the generation prompt appended), cut from the left to `limit` (a huge
    text prompt is cut as text first, `within_reach`)."""
    if is_chat(prompts[0]):
        ids = processing_class.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )["input_ids"]
    else:
        texts = within_reach(tokenizer_of(processing_class), prompts, limit, keep="end")
        ids = processing_class(text=texts)["input_ids"]
    ids = [list(row) for row in ids]
    return ids if limit is None else [row[-limit:] for row in ids]


class RoundPrompts(NamedTuple):
    """A round's tokenized prompts: the student's, the teacher's, and those its rollouts are generated from."""

    student: list[list[int]]
    teacher: list[list[int]]
    generation: list[list[int]]


def fit_teacher_prompts(
    processing_class,
    prompts: list[Any],
    contexts: list[Any],
    template: str,
    limit: int | None,
    chat_template_kwargs: dict | None = None,
) -> "FittedPrompts":
    """Teacher prompts of at most `limit` tokens, the question kept whole: where a prompt is too long, the end of its
    privileged context is cut (the least the teacher can lose), not the start of the prompt, which holds the question.
    Only where even an empty context does not fit (the question alone is longer than the limit) is the prompt cut from
    the left, as student prompts are."""
    tokenizer = tokenizer_of(processing_class)
    contexts = within_reach(tokenizer, contexts, limit, keep="both")
    prompts = [within_reach(tokenizer, [p], limit, keep="end")[0] if isinstance(p, str) else p for p in prompts]
    built = teacher_prompts(prompts, contexts, template)
    ids = tokenize_prompts(processing_class, built, None, chat_template_kwargs)
    cut, left_cut = [], []
    for index, row in enumerate(ids):
        if limit is None or len(row) <= limit:
            continue
        tokenizer = tokenizer_of(processing_class)
        context_ids = tokenizer(text=context_to_text(contexts[index]), add_special_tokens=False)["input_ids"]
        keep = max(0, len(context_ids) - (len(row) - limit))
        while True:  # decoding and re-encoding may merge tokens differently: shrink until it fits, down to nothing
            shortened = tokenizer.decode(context_ids[:keep]) if keep else ""
            prompt = build_teacher_prompt(prompts[index], shortened, template)
            fitted = tokenize_prompts(processing_class, [prompt], None, chat_template_kwargs)[0]
            if len(fitted) <= limit:
                built[index], ids[index] = prompt, fitted
                cut.append(index)
                break
            if keep == 0:  # the question alone is too long: cut from the left, as student prompts are
                ids[index] = row[-limit:]
                left_cut.append(index)
                break
            keep = max(0, keep - max(1, len(fitted) - limit))
    return FittedPrompts(built, ids, cut, left_cut)


CUT_MARGIN = 64  # tokens beyond the limit a pre-cut context keeps, so the cut's edge never decides what is kept


def within_reach(tokenizer, contexts: list[Any], limit: int | None, keep: str = "start") -> list[Any]:
    """The contexts (or text prompts), each cut as text to what `limit` tokens could at most hold, before anything is
    tokenized: a 50 MB context is not tokenized whole to keep its first few hundred tokens. No token is longer than
    the vocabulary's longest entry, so a text of `(limit + CUT_MARGIN) x longest` characters already holds more than
    `limit` tokens, and the tokens kept are those of the whole text: its start, its end (`keep="end"`), or either
    (`"both"`: the start and the end joined, for a teacher prompt that keeps the start of its context, or, when the
    question alone is too long, the end of the whole prompt)."""
    if limit is None:
        return contexts
    texts = [c if isinstance(c, str) else context_to_text(c) if is_chat(c) else None for c in contexts]
    rough = (limit + CUT_MARGIN) * 16  # below this no context can need the cut: skip reading the vocabulary
    if not any(text is not None and len(text) > rough for text in texts):
        return contexts
    reach = (limit + CUT_MARGIN) * max((len(token) for token in tokenizer.get_vocab()), default=1)
    cuts = {"start": lambda t: t[:reach], "end": lambda t: t[-reach:], "both": lambda t: t[:reach] + t[-reach:]}
    size = 2 * reach if keep == "both" else reach
    return [cuts[keep](text) if text is not None and len(text) > size else c for c, text in zip(contexts, texts)]


class FittedPrompts(NamedTuple):
    """Teacher prompts within their limit: texts (or messages), token ids, and which rows lost the end of their
    context (`context_cut`) or, the question alone being too long, their start (`left_cut`)."""

    prompts: list[Any]
    ids: list[list[int]]
    context_cut: list[int]
    left_cut: list[int]


def round_prompts(
    processing_class,
    rows: list[dict],
    template: str,
    limits: tuple[int | None, int | None],
    chat_template_kwargs: dict | None,
    from_teacher: bool,
) -> tuple[RoundPrompts, list[Any]]:
    """The rows' student and teacher prompts, tokenized (cut to `limits`: student, teacher; teacher prompts lose the
    end of their privileged context first, `fit_teacher_prompts`), and the prompts the rollouts are generated from
    (the teacher's with `generate_from_teacher`) before tokenization."""
    prompts = [row["prompt"] for row in rows]
    contexts = [row["privileged_context"] for row in rows]
    teachers, teacher_ids = fit_teacher_prompts(
        processing_class, prompts, contexts, template, limits[1], chat_template_kwargs
    )[:2]
    student_ids = tokenize_prompts(processing_class, prompts, limits[0], chat_template_kwargs)
    generation = (teacher_ids, teachers) if from_teacher else (student_ids, prompts)
    return RoundPrompts(student_ids, teacher_ids, generation[0]), generation[1]


@dataclass
class PromptLengths:
    """The longest student and teacher prompt (in tokens, after the cut) seen so far: what vLLM's context must hold."""

    student: int = 0
    teacher: int = 0
    student_row: str = ""  # where the longest student prompt is, for errors


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
    return the longest prompts after the cut (updating `lengths` when given)."""
    lengths = lengths or PromptLengths()
    prompts, contexts = list(dataset["prompt"]), list(dataset["privileged_context"])
    student_ids = tokenize_prompts(processing_class, prompts, None, chat_template_kwargs)
    if not is_chat(prompts[0]):
        bare = tokenizer_of(processing_class)(text=prompts, add_special_tokens=False)["input_ids"]
        for index, ids in enumerate(bare):
            if not ids:
                raise ValueError(f"Row {index} of the {name} dataset: the prompt is empty after tokenization.")
    student_cut = 0 if max_prompt_length is None else sum(len(ids) > max_prompt_length for ids in student_ids)
    if student_cut:
        warn(
            f"{student_cut} of {len(student_ids)} prompts of the {name} dataset are longer than {max_prompt_length} "
            "tokens and will be cut from the left; raise `max_prompt_length` to keep them whole."
        )
    student_ids = [ids if max_prompt_length is None else ids[-max_prompt_length:] for ids in student_ids]
    _, teacher_ids, context_cut, left_cut = fit_teacher_prompts(
        processing_class, prompts, contexts, template, max_teacher_prompt_length, chat_template_kwargs
    )
    if context_cut:
        shown = ", ".join(map(str, context_cut[:5])) + (", ..." if len(context_cut) > 5 else "")
        warn(
            f"{len(context_cut)} of {len(teacher_ids)} teacher prompts of the {name} dataset (rows {shown}) are "
            f"longer than {max_teacher_prompt_length} tokens: the end of their privileged context will be cut so that "
            "the question stays whole. Raise `max_teacher_prompt_length` or shorten the contexts to keep them."
        )
    if left_cut:
        warn(
            f"{len(left_cut)} of {len(teacher_ids)} teacher prompts of the {name} dataset are longer than "
            f"{max_teacher_prompt_length} tokens even without their privileged context, and will be cut from the "
            "left; raise `max_teacher_prompt_length` to keep them whole."
        )
    longest = max(range(len(student_ids)), key=lambda i: len(student_ids[i]))
    if len(student_ids[longest]) > lengths.student:
        lengths.student, lengths.student_row = len(student_ids[longest]), f"row {longest} of the {name} dataset"
    lengths.teacher = max(lengths.teacher, max(len(ids) for ids in teacher_ids))
    return lengths


def teacher_prompt_limit(
    context: int | None, max_completion_length: int, max_teacher_prompt_length: int | None, warn=logger.warning
) -> int | None:
    """The teacher prompt's token limit: what fits beside a full-length completion in the model's `context`
    (`max_position_embeddings`), or the user's smaller limit. A completion that fills the context is refused."""
    if context is None:
        return max_teacher_prompt_length
    if max_completion_length >= context:
        raise ValueError(
            f"`max_completion_length={max_completion_length}` leaves no room for a prompt in the model's context of "
            f"{context} tokens (`max_position_embeddings`): lower it well below {context}."
        )
    room = context - max_completion_length
    if max_teacher_prompt_length is not None and max_teacher_prompt_length > room:
        warn(
            f"`max_teacher_prompt_length={max_teacher_prompt_length}` does not fit beside a full completion in the "
            f"model's context ({context} - {max_completion_length}): using {room}."
        )
    return room if max_teacher_prompt_length is None else min(max_teacher_prompt_length, room)


def check_context(
    lengths: PromptLengths, context: int | None, max_completion_length: int, max_prompt_length: int | None
) -> None:
    """Refuse, before training, a student prompt that does not fit beside a full-length completion in the model's
    context: the step would run past the model's positions."""
    if context is None or lengths.student <= context - max_completion_length:
        return
    cut = " after the max_prompt_length cut" if max_prompt_length else ""
    raise ValueError(
        f"The longest prompt ({lengths.student_row}, {lengths.student} tokens{cut}) plus "
        f"`max_completion_length={max_completion_length}` exceeds the model's context of {context} tokens "
        f"(`max_position_embeddings`). Set `max_prompt_length` to at most {context - max_completion_length} (prompts "
        "are cut from the left), or lower `max_completion_length`."
    )


def fit_datasets_in_context(
    processing_class,
    datasets: list[tuple[str, Any]],
    template: str,
    chat_template_kwargs: dict | None,
    limits: tuple[int | None, int | None, int],
    context: int | None,
    warn: Callable[[str], None] = logger.warning,
) -> tuple[int | None, PromptLengths]:
    """Once, at trainer init: the teacher prompt limit (`teacher_prompt_limit`), every dataset's prompts checked
    against it (`check_prompt_lengths`), and the longest student prompt against the model's context
    (`check_context`). `limits`: max_prompt_length, max_teacher_prompt_length, max_completion_length."""
    max_prompt_length, max_teacher_prompt_length, max_completion_length = limits
    teacher_limit = teacher_prompt_limit(context, max_completion_length, max_teacher_prompt_length, warn)
    lengths = PromptLengths()
    for name, dataset in datasets:
        check_prompt_lengths(
            processing_class,
            dataset,
            name,
            template,
            max_prompt_length,
            teacher_limit,
            chat_template_kwargs,
            lengths,
            warn=warn,
        )
    check_context(lengths, context, max_completion_length, max_prompt_length)
    return teacher_limit, lengths


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
    tool_mask: list[list[int]] | None = None,
) -> dict[str, torch.Tensor | None]:
    """The batch `compute_loss` reads: left-padded prompts, right-padded completions, and the teacher's prompt +
    completion. `old_per_token_logps` (the rollout policy's log-probs, for importance clipping) starts as None. With
    `tool_mask` (multi-turn rollouts: 1 on generated tokens, 0 on tool results) the batch carries it, padded with 0."""
    prompt_ids, prompt_mask = left_pad(student_prompt_ids, pad_token_id, device)
    completion_ids, completion_mask = right_pad(completions, pad_token_id, device)
    teacher_ids, teacher_mask = left_pad(teacher_prompt_ids, pad_token_id, device)
    tools = {} if tool_mask is None else {"tool_mask": right_pad(tool_mask, 0, device)[0] * completion_mask}
    return {
        **tools,
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([teacher_ids, completion_ids], dim=1),
        "teacher_attention_mask": torch.cat([teacher_mask, completion_mask], dim=1),
        "old_per_token_logps": None,
    }


def add_engine_logps(batch: dict, plan, engine_logps: list[list[float]] | None, device) -> None:
    """The engine's log-probs of the sampled tokens, right-padded, where the importance plan (`importance.plan`)
    reads them: `sampling_per_token_logps` (its sampling mismatch is corrected) and, in asynchronous rounds generated
    with older weights, `old_per_token_logps` (the rollout policy's)."""
    if plan.engine:
        batch["sampling_per_token_logps"] = right_pad(engine_logps, 0.0, device, torch.float32)[0]
    if plan.old == "server":
        batch["old_per_token_logps"] = right_pad(engine_logps, 0.0, device, torch.float32)[0]
