"""`batch.py`: tokens, prompt lengths, padding and the batch `compute_loss` reads."""

import pytest
from datasets import Dataset

from trl_sdft import SDFTTrainer
from trl_sdft.batch import (
    PromptLengths,
    assemble_batch,
    check_prompt_lengths,
    left_pad,
    right_pad,
    teacher_prompts,
    tokenize_prompts,
)
from trl_sdft.testing import facts_rows


def test_tokenize_text_and_chat_prompts_and_cut_from_the_left(tokenizer):
    text = tokenize_prompts(tokenizer, ["What color is Zorbo?", "What color is Quilla?"])
    assert text == [tokenizer("What color is Zorbo?")["input_ids"], tokenizer("What color is Quilla?")["input_ids"]]
    chat = tokenize_prompts(tokenizer, [[{"role": "user", "content": "What color is Zorbo?"}]])[0]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What color is Zorbo?"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(chat) == rendered  # the generation prompt is appended
    cut = tokenize_prompts(tokenizer, ["What color is Zorbo?"], limit=3)[0]
    assert cut == text[0][-3:]


def test_teacher_prompts_follow_the_template():
    rows = facts_rows(2)
    built = teacher_prompts(
        [r["prompt"] for r in rows], [r["privileged_context"] for r in rows], "{prompt}|{privileged_context}"
    )
    assert built == [f"{r['prompt']}|{r['privileged_context']}" for r in rows]


def test_prompt_lengths_are_the_longest_after_the_cut(tokenizer, caplog):
    rows = facts_rows(3)
    rows[1]["prompt"] = "What color is Zorbo? " * 10
    dataset = Dataset.from_list(rows)
    full = check_prompt_lengths(tokenizer, dataset, "train", "{prompt} {privileged_context}", None, None)
    longest_student = max(len(ids) for ids in tokenize_prompts(tokenizer, [r["prompt"] for r in rows]))
    assert full.student == longest_student and full.teacher > full.student
    with caplog.at_level("WARNING"):
        cut = check_prompt_lengths(tokenizer, dataset, "train", "{prompt} {privileged_context}", 8, 12)
    assert (cut.student, cut.teacher) == (8, 12)
    assert "1 of 3 prompts of the train dataset are longer than 8 tokens" in caplog.text
    # Several datasets: the running maximum is kept.
    lengths = PromptLengths(student=100, teacher=1)
    check_prompt_lengths(tokenizer, dataset, "eval", "{prompt} {privileged_context}", None, None, lengths=lengths)
    assert lengths.student == 100 and lengths.teacher == full.teacher


def test_padding_and_batch_assembly():
    ids, mask = left_pad([[1, 2, 3], [4]], 0, "cpu")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad([[5, 6], []], 0, "cpu")
    assert ids.tolist() == [[5, 6], [0, 0]] and mask.tolist() == [[1, 1], [0, 0]]
    ids, mask = right_pad([[], []], 9, "cpu")  # an all-empty batch keeps one column
    assert ids.tolist() == [[9], [9]] and mask.sum() == 0
    batch = assemble_batch([[1, 2], [3]], [[7, 8, 9], [7]], [[5], [6, 6]], 0, "cpu")
    assert batch["prompt_ids"].tolist() == [[1, 2], [0, 3]]
    assert batch["completion_ids"].tolist() == [[5, 0], [6, 6]]
    assert batch["teacher_input_ids"].tolist() == [[7, 8, 9, 5, 0], [0, 0, 7, 6, 6]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["old_per_token_logps"] is None


def test_prompt_empty_after_tokenization(tiny_model, tokenizer, tmp_path, make_trainer):
    # A zero-width character is text to Python but no token to a tokenizer that does not know it.
    class DroppingTokenizer(type(tokenizer)):
        def __call__(self, text=None, add_special_tokens=True, **kwargs):
            out = super().__call__(text=text, add_special_tokens=add_special_tokens, **kwargs)
            if not add_special_tokens:
                out["input_ids"] = [[] if t.strip("\u200b") == "" else ids for t, ids in zip(text, out["input_ids"])]
            return out

    dropping = DroppingTokenizer.from_pretrained(tokenizer.name_or_path)
    rows = facts_rows(2) + [{"prompt": "\u200b\u200b", "privileged_context": "c"}]
    with pytest.raises(ValueError, match="Row 2 of the train dataset: the prompt is empty after tokenization"):
        make_trainer(tiny_model, dropping, tmp_path, Dataset.from_list(rows))


def test_long_prompts_are_cut_and_counted(tiny_model, tokenizer, tmp_path, caplog, tiny_config):
    rows = facts_rows(4)
    rows[0]["prompt"] = "What color is Zorbo? " * 20
    with caplog.at_level("WARNING"):
        trainer = SDFTTrainer(
            model=tiny_model,
            args=tiny_config(tmp_path, max_prompt_length=16),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert "1 of 4 prompts of the train dataset are longer than 16 tokens" in caplog.text
    # The teacher prompt has its own limit: the model's context minus the completion, so nothing is cut here.
    assert trainer.max_teacher_prompt_length == 256 - 8
    teacher = tokenize_prompts(tokenizer, [rows[0]["prompt"] + "\n\nctx"], trainer.max_teacher_prompt_length)[0]
    assert len(teacher) > 16


def test_a_context_is_cut_to_nothing_before_the_question_is_cut(tokenizer):
    """Where only an empty context fits, the teacher prompt keeps the whole question (and the template)."""
    from trl_sdft.batch import fit_teacher_prompts

    prompt, template = "What color is Zorbo?", "{prompt}\n\n{privileged_context}"
    bare = len(tokenize_prompts(tokenizer, [template.format(prompt=prompt, privileged_context="")])[0])
    fitted = fit_teacher_prompts(tokenizer, [prompt], ["Zorbo is blue. " * 20], template, bare)
    assert fitted.context_cut == [0] and fitted.left_cut == []
    assert prompt in tokenizer.decode(fitted.ids[0]) and len(fitted.ids[0]) <= bare
    shorter = fit_teacher_prompts(tokenizer, [prompt], ["Zorbo is blue."], template, bare - 2)
    assert shorter.left_cut == [0] and len(shorter.ids[0]) == bare - 2
