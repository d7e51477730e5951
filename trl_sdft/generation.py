"""Answers to prompts, for evaluation and quick checks: greedy and batched (the knowledge evaluation, the continual
harness), or one prompt with a generation config (`SDFTTrainer.generate`)."""

import copy

import torch
from tqdm.auto import tqdm

from .prompts import is_chat
from .utils import tokenizer_of


@torch.no_grad()
def greedy_answers(
    model,
    processing_class,
    questions: list,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    desc: str | None = None,
    text_as_chat: bool = True,
    chat_template_kwargs: dict | None = None,
) -> list[str]:
    """Greedy answers to prompts, batched with left padding: chat messages, or text, which becomes one user turn
    (`text_as_chat`, the default) or is tokenized as it is."""
    tokenizer = tokenizer_of(processing_class)
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        batches = range(0, len(questions), batch_size)
        for start in tqdm(batches, desc=desc, disable=desc is None, leave=False):
            prompts = questions[start : start + batch_size]
            encoded = encode(tokenizer, prompts, text_as_chat, chat_template_kwargs).to(model.device)
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


def encode(tokenizer, prompts: list, text_as_chat: bool, chat_template_kwargs: dict | None = None):
    """Prompts as a left-padded batch: chat messages through the chat template, text as one user turn
    (`text_as_chat`) or as it is."""
    if text_as_chat or is_chat(prompts[0]):
        return tokenizer.apply_chat_template(
            [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in prompts],
            add_generation_prompt=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
            **(chat_template_kwargs or {}),
        )
    return tokenizer(text=prompts, padding=True, return_tensors="pt")


GREEDY_UNSET = ("temperature", "top_p", "top_k", "min_p")


def answer_config(generation_config, max_new_tokens: int | None = None, **overrides):
    """A copy of `generation_config` with `max_new_tokens` and `overrides` (any `GenerationConfig` field) set;
    `do_sample=False` also unsets the sampling fields, which greedy decoding ignores (and transformers warns about)."""
    config = copy.deepcopy(generation_config)
    if max_new_tokens is not None:
        overrides["max_new_tokens"] = max_new_tokens
    unknown = sorted(name for name in overrides if not hasattr(config, name))
    if unknown:
        raise ValueError(f"generate(): {unknown} are not generation settings (GenerationConfig fields).")
    config.update(**overrides)
    if not config.do_sample:
        config.update(**dict.fromkeys(GREEDY_UNSET))
    return config


@torch.no_grad()
def answer_one(model, processing_class, query, generation_config, chat_template_kwargs: dict | None = None) -> str:
    """One answer to `query` (chat messages, or text: one user turn when the tokenizer has a chat template, as it is
    otherwise) under `generation_config`."""
    tokenizer = tokenizer_of(processing_class)
    as_chat = getattr(tokenizer, "chat_template", None) is not None
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        encoded = encode(tokenizer, [query], as_chat, chat_template_kwargs).to(model.device)
        output = model.generate(**encoded, generation_config=generation_config)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
