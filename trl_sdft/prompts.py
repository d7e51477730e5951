"""Teacher prompts: the student prompt plus privileged context, for text and chat prompts. Pure functions."""

import json
import string
from typing import Any

PLAIN_TEMPLATE = "{prompt}\n\n{privileged_context}"

# The template of the SDFT paper (Shenfeld et al., 2026): the demonstration is shown as an example, and the model is
# asked for its own answer, so the teacher does not just copy it.
DEMONSTRATION_TEMPLATE = (
    "<Question>\n"
    "{prompt}\n"
    "This is an example for a response to the question:\n"
    "<Demonstration>\n"
    "{privileged_context}\n"
    "Now answer with a response of your own, including the thinking process:"
)

TEMPLATE_PRESETS = {"plain": PLAIN_TEMPLATE, "demonstration": DEMONSTRATION_TEMPLATE}
_PLACEHOLDERS = {"prompt", "privileged_context"}


def resolve_teacher_prompt_template(template: str) -> str:
    """Return the format string for a preset name or a format string; raise if it cannot build a teacher prompt."""
    if not isinstance(template, str):
        raise ValueError(f"`teacher_prompt_template` must be a string, got {type(template).__name__}.")
    template = TEMPLATE_PRESETS.get(template, template)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(
            f"`teacher_prompt_template` is not a valid format string ({err}). Write literal braces as '{{{{' and "
            "'}}}}'."
        ) from None
    missing = _PLACEHOLDERS - fields
    if missing:
        raise ValueError(
            f"`teacher_prompt_template` lacks {', '.join('{' + m + '}' for m in sorted(missing))}: it must contain "
            f"both {{prompt}} and {{privileged_context}}, or be a preset name ({', '.join(TEMPLATE_PRESETS)})."
        )
    unknown = fields - _PLACEHOLDERS
    if unknown:
        raise ValueError(
            f"`teacher_prompt_template` has unknown placeholders {sorted(unknown)}: only {{prompt}} and "
            "{privileged_context} are filled in. Write literal braces as '{{' and '}}'."
        )
    try:  # a format spec or conversion that text cannot take (`{prompt:d}`, `{prompt!z}`) fails here, not at step 1
        template.format(prompt="a prompt", privileged_context="a context")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(
            f"`teacher_prompt_template` cannot be filled with text ({type(err).__name__}: {err}): write the "
            "placeholders plainly, {prompt} and {privileged_context}, without a format spec or conversion."
        ) from None
    return template


def is_chat(prompt: Any) -> bool:
    """A chat prompt is a list of `{"role", "content"}` messages."""
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


def message_text(content: Any) -> str:
    """Text of a message content: a string, or the text parts of a multimodal content list."""
    if isinstance(content, list):
        texts = [part.get("text", "") for part in content if part.get("type") == "text"]
        return " ".join(texts)
    return "" if content is None else str(content)


def tool_call_json(call: dict) -> str:
    """A tool call of a message (`{"type": "function", "function": {...}}` or flat) as `{"name", "arguments"}` JSON."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    return json.dumps({"name": function.get("name"), "arguments": function.get("arguments")})


def message_context(message: dict) -> str:
    """A context message's text; a demonstration's tool calls and tool results are kept, not dropped."""
    text = message_text(message.get("content"))
    calls = [tool_call_json(call) for call in message.get("tool_calls") or []]
    if message.get("role") == "tool" and text:
        text = f"Tool result ({message.get('name', 'tool')}): {text}"
    return "\n".join(part for part in [text, *(f"Tool call: {call}" for call in calls)] if part)


def context_to_text(privileged_context: Any) -> str:
    """Privileged context as text: a string as is, chat messages as their texts joined by newlines (a demonstration
    trajectory's tool calls as `Tool call: {"name", "arguments"}` lines and its tool results as `Tool result`)."""
    if isinstance(privileged_context, str):
        return privileged_context
    if is_chat(privileged_context):
        texts = (message_context(message) for message in privileged_context)
        return "\n".join(text for text in texts if text)
    raise ValueError(
        f"`privileged_context` must be a string or a list of chat messages, got {type(privileged_context).__name__}."
    )


def build_teacher_prompt(prompt: Any, privileged_context: Any, template: str) -> Any:
    """The teacher's prompt, of the same kind as `prompt`.

    Text prompts are formatted directly. In chat prompts the template wraps the text of the last user turn; every
    earlier turn (system prompts included) stays as it is.
    """
    context = context_to_text(privileged_context)
    if not is_chat(prompt):
        return template.format(prompt=prompt, privileged_context=context)
    last = prompt[-1]
    if last.get("role") != "user":
        raise ValueError(
            f"A chat prompt must end with a user turn to build the teacher prompt; it ends with role "
            f"{last.get('role')!r}. Remove trailing assistant/tool turns from the prompt."
        )
    wrapped = template.format(prompt=message_text(last.get("content")), privileged_context=context)
    return [*prompt[:-1], {"role": "user", "content": wrapped}]
