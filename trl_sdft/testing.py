"""Tiny models and a tokenizer trained locally, for tests and examples: no model hub needed."""

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
NAMES = ["Zorbo", "Quilla", "Mendax", "Tovi", "Brannic", "Elsvet", "Yarrow", "Pindle"]


def corpus() -> list[str]:
    lines = []
    for name, color in zip(NAMES, COLORS):
        lines += [
            f"What color is {name}? {name} is {color}.",
            f"The secret color of {name} is {color}. Answer: {color}",
            f"Question: which color does {name} have? Example answer: {color}",
        ]
    lines += ["This is an example for a response to the question:", "Now answer with a response of your own"]
    return lines * 4


def build_tokenizer(vocab_size: int = 400, extra_lines: list[str] | None = None, chat_template: str | None = None):
    """A byte-level BPE tokenizer (about `vocab_size` tokens) trained on the toy corpus (plus `extra_lines`), with a
    ChatML-style chat template (`CHAT_TEMPLATE` unless given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus() + (extra_lines or []), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        padding_side="left",
        truncation_side="left",
    )
    fast.chat_template = chat_template or CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer, seed: int = 0, tie: bool = False, init_range: float = 0.02, hidden_size: int = 32, heads: int = 4
):
    """A 2-layer Llama with hidden size 32 (about 40k parameters). vLLM's CPU attention needs a head size of at least
    32: `hidden_size=64, heads=2`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=init_range,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def facts_rows(n: int = 8, chat: bool = False) -> list[dict]:
    """Toy SDFT rows: a question about a made-up name, and the answer as privileged context."""
    rows = []
    for i in range(n):
        name, color = NAMES[i % len(NAMES)], COLORS[i % len(COLORS)]
        question = f"What color is {name}?"
        prompt = [{"role": "user", "content": question}] if chat else question
        rows.append({"prompt": prompt, "privileged_context": f"{name} is {color}. Answer: {color}"})
    return rows


def completion_logits(model, input_ids, attention_mask, num_tokens: int, temperature: float = 1.0):
    """Logits at the positions that predict the last `num_tokens` tokens, positions counted past left padding: what
    the trainer's logits path computes, written out independently as a reference for tests."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return logits[:, -(num_tokens + 1) : -1] / temperature


def logged_losses(trainer) -> list[float]:
    """The training losses a trainer logged, one per logging step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model) -> dict:
    """Detached copies of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def loss_and_grads(trainer, batch):
    """The trainer's loss on `batch` and the gradient of every trainable parameter."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_step(reference, other, batch, atol=1e-5, rtol=None):
    """Two trainers give the same loss and the same gradients on `batch`, within `atol`. With `rtol`, each gradient
    must also agree to `rtol` times its largest entry: a check that still means something when
    the gradients themselves are below `atol`."""
    want_loss, want_grads = loss_and_grads(reference, batch)
    got_loss, got_grads = loss_and_grads(other, batch)
    assert torch.allclose(want_loss, got_loss, atol=atol), (want_loss, got_loss)
    assert want_grads.keys() == got_grads.keys() and want_grads
    assert any(bool(grad.any()) for grad in want_grads.values()), "every gradient is 0: nothing was compared"
    for name, grad in want_grads.items():
        error = (grad - got_grads[name]).abs().max()
        assert torch.allclose(grad, got_grads[name], atol=atol), (name, error)
        if rtol is not None:
            assert error <= rtol * grad.abs().max(), (name, float(error), float(grad.abs().max()))


# ------------------------------------------------------------------------------------------- tools (agentic SDFT)
# A compact ChatML with tool calls in the format TRL's `qwen3_template` parser reads; the tools are not listed (the
# tiny model's context is short), so the prompt is the same with and without them.
TOOL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}{% set f = call.function if call.function is defined else call %}"
    '<tool_call>\n{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def lookup(name: str) -> str:
    """Look up the secret color of a made-up name.

    Args:
        name: The name to look up.
    """
    colors = dict(zip(NAMES, COLORS, strict=True))
    if name not in colors:
        raise KeyError(f"no entry for {name!r}")
    return colors[name]


def tool_call_text(name: str, tool: str = "lookup") -> str:
    return f'<tool_call>\n{{"name": "{tool}", "arguments": {{"name": "{name}"}}}}\n</tool_call>'


def tool_trajectory(name: str, color: str) -> list[dict]:
    """A question, the call that answers it, the result and the answer, as chat messages."""
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"name": name}}}
    return [
        {"role": "user", "content": f"What color is {name}?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup", "content": color},
        {"role": "assistant", "content": f"{name} is {color}."},
    ]


def build_tool_tokenizer():
    """The test tokenizer trained on the toy corpus plus tool-call text, with `TOOL_CHAT_TEMPLATE` and TRL's parser of
    `<tool_call>` JSON (`qwen3_template`)."""
    from trl.chat_template_utils import qwen3_template

    extra = [
        tool_call_text(name) + f"\n<tool_response>\n{color}\n</tool_response>" for name, color in zip(NAMES, COLORS)
    ]
    fast = build_tokenizer(500, extra * 4, TOOL_CHAT_TEMPLATE)
    fast.response_template = qwen3_template
    return fast


def tool_rows(n: int = 8) -> list[dict]:
    """Chat rows whose questions the `lookup` tool answers; the privileged context shows the call."""
    rows = []
    for i in range(n):
        name, color = NAMES[i % len(NAMES)], COLORS[i % len(COLORS)]
        context = f"Call the tool: {tool_call_text(name)} It returns {color}. Answer: {name} is {color}."
        rows.append({"prompt": [{"role": "user", "content": f"What color is {name}?"}], "privileged_context": context})
    return rows


def build_tool_model(tokenizer, steps: int = 250, seed: int = 0):
    """The tiny Llama (vLLM-sized: hidden 64, 2 heads) trained on `tool_trajectory` rendered by the chat template, so
    that it calls `lookup` and then answers: real multi-turn rollouts from a real model, in seconds."""
    model = build_model(tokenizer, seed=seed, hidden_size=64, heads=2)
    texts = [
        tokenizer.apply_chat_template(tool_trajectory(name, color), tokenize=False)
        for name, color in zip(NAMES, COLORS)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, float(loss.detach())
