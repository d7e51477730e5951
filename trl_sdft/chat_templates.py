"""Chat templates and tool calls: what a multi-turn rollout needs from the tokenizer.

- `load_chat_template`: the `chat_template_path` field (a bundled preset name, a Jinja file, or a tokenizer directory).
- `prepare_tool_tokenizer`: at construction, refuse a template that cannot render a tool conversation (TRL's
  `supports_tool_calling`) or is not prefix-preserving (TRL's `is_chat_template_prefix_preserving`), and give the
  tokenizer a parser of tool calls (TRL's `add_response_schema`, or `qwen3_template` for the bundled templates).
- `parse_turn`: one generated turn as an assistant message (TRL's `parse_response`), a malformed call marked as such.
- `tool_suffix_ids`: the tokens the template puts between the end of a turn and the next turn: the tool results and
  the next assistant header. They are appended to the completion and masked from the loss.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any

PRESETS = ("smollm2-tools",)
MALFORMED = "malformed_tool_call"  # the key `parse_turn` sets on a turn whose tool call could not be parsed


def preset_path(name: str) -> str:
    return str(resources.files("trl_sdft.resources") / "chat_templates" / f"{name}.jinja")


def load_chat_template(path: str) -> str:
    """The Jinja text `chat_template_path` names: a preset (`PRESETS`), a `.jinja` file, or a tokenizer directory
    (its `chat_template`); checked (`check_chat_template`) before any model loads."""
    if path in PRESETS:
        return _read_preset(path)
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            template = AutoTokenizer.from_pretrained(path).chat_template
        except (OSError, ValueError, TypeError) as err:
            message = " ".join(str(err).split())[:200]
            raise ValueError(
                f"`chat_template_path={path!r}` is a directory, but no tokenizer loads from it ({type(err).__name__}: "
                f"{message}): pass a Jinja file, a tokenizer directory or a bundled template ({', '.join(PRESETS)})."
            ) from None
        if not template:
            raise ValueError(f"`chat_template_path={path!r}`: the tokenizer in that directory has no chat template.")
    elif not os.path.isfile(path):
        raise ValueError(
            f"`chat_template_path={path!r}` is neither a bundled template ({', '.join(PRESETS)}), a Jinja file nor a "
            "tokenizer directory."
        )
    else:
        from .text_files import read_text

        template = read_text(path, "`chat_template_path`")
    check_chat_template(template, f"`chat_template_path={path!r}`")
    return template


def _read_preset(name: str) -> str:
    with open(preset_path(name), encoding="utf-8") as file:
        return file.read()


def check_chat_template(template, where: str) -> None:
    """Refuse a template that is not Jinja (a syntax error, by line) or not a chat template: one that renders two
    different user messages without their text would render every prompt alike (and train on nothing). A template
    that raises on a lone user message (it wants a system turn first, say) is not judged: real prompts may satisfy
    it. Named templates (a dict) are checked one by one."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if isinstance(template, dict):
        for name, text in template.items():
            check_chat_template(text, f"{where} (template {name!r})")
        return
    if not isinstance(template, str):
        raise ValueError(f"{where}: the chat template is a {type(template).__name__}, not Jinja text.")
    try:
        compiled = _compile_jinja_template(template)
    except TemplateSyntaxError as err:
        raise ValueError(f"{where}: not valid Jinja at line {err.lineno} ({err.message}). Fix the template.") from None
    markers = ("trl-sdft check: first message", "trl-sdft check: second message")
    rendered = []
    for marker in markers:
        try:
            rendered.append(
                compiled.render(
                    messages=[{"role": "user", "content": marker}],
                    tools=None,
                    documents=None,
                    add_generation_prompt=True,
                    bos_token="",
                    eos_token="",
                )
            )
        except Exception:  # the template's own rules (raise_exception), or variables it expects from the caller
            return
    if not all(marker in text for marker, text in zip(markers, rendered)):
        raise ValueError(
            f"{where} holds no chat template: it renders a user message without the message's text, so every prompt "
            "would look the same to the model. A chat template is Jinja over `messages`, e.g. "
            "`{% for message in messages %}{{ message.role }}: {{ message.content }}\\n{% endfor %}`."
        )


def is_preset(template: str | None) -> bool:
    return template is not None and any(template == _read_preset(name) for name in PRESETS)


def prepare_tool_tokenizer(processing_class, tokenizer) -> None:
    """Check, before any rollout, that the chat template can hold a tool conversation, and set a tool-call parser on
    `tokenizer` where it has none. Raises `ValueError` saying how to fix the template."""
    from trl.chat_template_utils import add_response_schema, is_chat_template_prefix_preserving, supports_tool_calling

    fix = (
        "Pass a tool-capable chat template: `chat_template_path` (a Jinja file, a tokenizer directory, or the bundled "
        "'smollm2-tools' for ChatML models such as SmolLM2), or a processing_class whose chat_template renders "
        "assistant `tool_calls` and `tool` messages."
    )
    if not supports_tool_calling(processing_class):
        raise ValueError(f"The chat template cannot render a tool conversation (tool calls, tool results). {fix}")
    if not is_chat_template_prefix_preserving(processing_class):
        raise ValueError(
            "The chat template renders earlier turns differently once a tool result follows (it is not "
            f"prefix-preserving), so a trajectory's tokens would not match what the model generated. {fix}"
        )
    if getattr(tokenizer, "response_template", None) is not None or getattr(tokenizer, "response_schema", None):
        return
    if is_preset(processing_class.chat_template):
        from trl.chat_template_utils import qwen3_template

        tokenizer.response_template = qwen3_template
        return
    try:
        add_response_schema(processing_class)
    except ValueError:
        raise ValueError(
            "No parser of tool calls is known for this chat template, so the model's tool calls cannot be read. Set "
            "`tokenizer.response_template` (transformers' response parsing), or use a template TRL knows (Qwen, "
            "Llama 3.1/3.2, ...) or the bundled 'smollm2-tools' (`chat_template_path`)."
        ) from None


def call_marker(tokenizer) -> str | None:
    """The text that opens a tool call in this tokenizer's parser (e.g. `<tool_call>`), where it says."""
    template = getattr(tokenizer, "response_template", None) or {}
    field = template.get("fields", {}).get("tool_calls", {}) if isinstance(template, dict) else {}
    return field.get("open") if isinstance(field, dict) else None


def parse_turn(tokenizer, ids: list[int], prefix: list[int], tools: list[dict] | None) -> dict:
    """A generated turn as an assistant message (`content`, `tool_calls`). A turn that opens a tool call the parser
    cannot read is marked `MALFORMED` (its raw text), so the loop can answer it with an error."""
    from trl.chat_template_utils import parse_response

    message = parse_response(tokenizer, ids, prefix=prefix, tools=tools)
    marker = call_marker(tokenizer)
    if not message.get("tool_calls") and marker and marker in tokenizer.decode(ids):
        message = {**message, MALFORMED: tokenizer.decode(ids, skip_special_tokens=True)}
    return message


def tool_suffix_ids(
    processing_class, tokenizer, tool_messages: list[dict], chat_template_kwargs: dict, end_ids=None
) -> list[int]:
    """The tokens after a turn that ended with its end token (any of `end_ids`; default: the tokenizer's end of
    sequence): the tool results as the template renders them, then the next assistant header. Read off the template
    by rendering a short conversation with and without the results."""
    kwargs = {key: value for key, value in chat_template_kwargs.items() if key != "tools"}
    tool_messages = [defused(tokenizer, message) for message in tool_messages]
    calls = [{"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}]
    head = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    before = _ids(processing_class.apply_chat_template(head, tokenize=True, add_generation_prompt=False, **kwargs))
    after = _ids(
        processing_class.apply_chat_template(head + tool_messages, tokenize=True, add_generation_prompt=True, **kwargs)
    )
    end_ids = set(end_ids or [tokenizer.eos_token_id])  # a turn ends at any of the model's end ids (Gemma-style)
    ends = [index for index, token in enumerate(before) if token in end_ids]
    if ends:  # the turn the model generated stops at its end token; what the template adds after it is suffix
        before = before[: ends[-1] + 1]
    if after[: len(before)] != before:
        raise ValueError("The chat template renders the turn before a tool result differently once the result follows.")
    return after[len(before) :]


def control_tokens(tokenizer) -> list[str]:
    """The text of every special token (`<|im_end|>`, `<|im_start|>`, ...), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = set(tokenizer.all_special_tokens) | {token.content for token in added.values() if token.special}
    return sorted((token for token in found if len(token) > 1), key=len, reverse=True)


def defused(tokenizer, message: dict) -> dict:
    """A tool message whose text cannot turn into control tokens: a result holding `<|im_end|>` would otherwise end
    the tool turn and could forge turns inside the masked result. A zero-width space after each such token's first
    character keeps the text readable and tokenizes it as text."""
    content = message.get("content")
    if not isinstance(content, str):
        return message
    for token in control_tokens(tokenizer):
        if token in content:
            content = content.replace(token, token[0] + "\u200b" + token[1:])
    return {**message, "content": content}


def _ids(rendered: Any) -> list[int]:
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return list(rendered)
