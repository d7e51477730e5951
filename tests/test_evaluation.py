"""Greedy answers (`generation.py`, shared by the trainer, the CLI's knowledge task and the harness) and accuracies
(`demo/evaluation.py`)."""

import re

from trl_sdft.demo.evaluation import accuracies, summary
from trl_sdft.generation import greedy_answers


def test_greedy_answers_are_deterministic_and_batched(tiny_model, tokenizer):
    questions = ["What color is Zorbo?", "What color is Quilla?", "What color is Tovi?"]
    one_batch = greedy_answers(tiny_model, tokenizer, questions, max_new_tokens=4)
    two_batches = greedy_answers(tiny_model, tokenizer, questions, max_new_tokens=4, batch_size=2)
    assert one_batch == two_batches and len(one_batch) == 3
    as_messages = greedy_answers(tiny_model, tokenizer, [[{"role": "user", "content": q}] for q in questions], 4)
    assert as_messages == one_batch  # a question string is one user turn


def test_text_prompts_can_skip_the_chat_template(tiny_model, tokenizer):
    tiny_model.train()
    raw = greedy_answers(tiny_model, tokenizer, ["What color is Zorbo?"], 6, text_as_chat=False)[0]
    inputs = tokenizer("What color is Zorbo?", return_tensors="pt")
    tiny_model.eval()
    output = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert raw == tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_training_mode_is_restored(tiny_model, tokenizer):
    tiny_model.train()
    greedy_answers(tiny_model, tokenizer, ["q"], 2)
    assert tiny_model.training


def test_accuracies_count_whole_word_matches(tiny_model, tokenizer):
    question = "What color is Zorbo?"
    answer = greedy_answers(tiny_model, tokenizer, [question], 6)[0]
    words = re.findall(r"[0-9A-Za-z]+", answer)
    sets = {"never": [(question, ["xyzzy-not-a-word"])]}
    if words:
        sets["own"] = [(question, [words[0]])]
    results = accuracies(tiny_model, tokenizer, sets, max_new_tokens=6)
    assert results["never"]["correct"] == 0 and results["never"]["total"] == 1
    assert results["never"]["answers"][0] == {"question": question, "answer": answer, "correct": False}
    if words:
        assert results["own"]["correct"] == 1
    assert summary(results) == {name: value["accuracy"] for name, value in results.items()}
