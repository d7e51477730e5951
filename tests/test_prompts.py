import pytest

from trl_sdft.prompts import (
    DEMONSTRATION_TEMPLATE,
    build_teacher_prompt,
    context_to_text,
    resolve_teacher_prompt_template,
)


def test_presets():
    assert resolve_teacher_prompt_template("plain") == "{prompt}\n\n{privileged_context}"
    demo = resolve_teacher_prompt_template("demonstration")
    assert demo == DEMONSTRATION_TEMPLATE
    text = build_teacher_prompt("What is 2+2?", "2+2 is 4.", demo)
    assert text.split("\n") == [
        "<Question>",
        "What is 2+2?",
        "This is an example for a response to the question:",
        "<Demonstration>",
        "2+2 is 4.",
        "Now answer with a response of your own, including the thinking process:",
    ]


@pytest.mark.parametrize(
    "template, message",
    [
        ("{prompt} only", r"lacks \{privileged_context\}"),
        ("{privileged_context}", r"lacks \{prompt\}"),
        ("{prompt} {privileged_context} {extra}", "unknown placeholders"),
        ("{prompt} {privileged_context} {", "not a valid format string"),
        ("nonexistent-preset", "preset name"),
    ],
)
def test_bad_templates(template, message):
    with pytest.raises(ValueError, match=message):
        resolve_teacher_prompt_template(template)


def test_literal_braces_allowed():
    template = resolve_teacher_prompt_template('{prompt} {{"json": 1}} {privileged_context}')
    assert build_teacher_prompt("Q", "C", template) == 'Q {"json": 1} C'


def test_text_prompt():
    assert build_teacher_prompt("Q?", "ctx", "{prompt}\n\n{privileged_context}") == "Q?\n\nctx"


def test_chat_prompt_wraps_last_user_turn_and_keeps_system():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is X?"},
    ]
    out = build_teacher_prompt(prompt, "X is 3.", "{privileged_context}\n{prompt}")
    assert out[:3] == prompt[:3]
    assert out[3] == {"role": "user", "content": "X is 3.\nWhat is X?"}
    assert prompt[3]["content"] == "What is X?"  # input untouched


def test_chat_context_and_multimodal_parts():
    context = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "text", "text": "second"}, {"type": "image"}]},
    ]
    assert context_to_text(context) == "first\nsecond"
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]
    assert build_teacher_prompt(prompt, context, "{prompt}|{privileged_context}")[0]["content"] == "Q|first\nsecond"


def test_chat_prompt_must_end_with_user():
    with pytest.raises(ValueError, match="must end with a user turn"):
        build_teacher_prompt(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "c",
            "{prompt}{privileged_context}",
        )


def test_bad_context_type():
    with pytest.raises(ValueError, match="string or a list of chat messages"):
        context_to_text(42)


def test_demonstration_trajectory_keeps_tool_calls_and_results():
    call = {"type": "function", "function": {"name": "lookup", "arguments": {"name": "Zorbo"}}}
    context = [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "lookup", "content": "red"},
        {"role": "assistant", "content": "Zorbo is red."},
    ]
    assert context_to_text(context) == (
        'Tool call: {"name": "lookup", "arguments": {"name": "Zorbo"}}\nTool result (lookup): red\nZorbo is red.'
    )
