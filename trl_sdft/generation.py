"""Greedy answers to prompts, for evaluation and quick checks (`SDFTTrainer.generate`, the knowledge evaluation,
the continual harness)."""

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
            if text_as_chat or is_chat(prompts[0]):
                encoded = tokenizer.apply_chat_template(
                    [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in prompts],
                    add_generation_prompt=True,
                    padding=True,
                    return_tensors="pt",
                    return_dict=True,
                    **(chat_template_kwargs or {}),
                )
            else:
                encoded = tokenizer(text=prompts, padding=True, return_tensors="pt")
            encoded = encoded.to(model.device)
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
