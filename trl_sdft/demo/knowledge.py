"""The embedded knowledge-acquisition task: made-up facts to learn, and general probes to keep.

`facts.jsonl`: 64 facts about entities that do not exist (so the base model cannot know them), each with a question
(the training prompt and the in-distribution test), a paraphrased question, the fact stated as a demonstration (the
privileged context) and the answer word. `probes.jsonl`: general-knowledge questions that SmolLM2-135M-Instruct
answers correctly with greedy decoding (checked when the file was made), to measure forgetting.
"""

import os
import re
from importlib import resources

from datasets import Dataset

from ..jsonl import JSONLineError, json_lines


def _read_jsonl(name: str) -> list[dict]:
    text = resources.files("trl_sdft.resources").joinpath(name).read_text()
    return [record for _, record in json_lines(text.splitlines())]


def load_facts(num_facts: int | None = None) -> list[dict]:
    facts = _read_jsonl("facts.jsonl")
    return facts if num_facts is None else facts[:num_facts]


def load_probes(num_probes: int | None = None) -> list[dict]:
    probes = _read_jsonl("probes.jsonl")
    return probes if num_probes is None else probes[:num_probes]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def facts_dataset(facts: list[dict]) -> Dataset:
    """SDFT rows: the question as a chat prompt, the fact as the privileged context."""
    return Dataset.from_list([{"prompt": chat(f["question"]), "privileged_context": f["fact"]} for f in facts])


def is_correct(answer: str, accepted: list[str] | str) -> bool:
    """True when one accepted answer appears in `answer` as a whole word (case-insensitive)."""
    accepted = [accepted] if isinstance(accepted, str) else accepted
    text = answer.lower()
    return any(re.search(rf"(?<![0-9a-z]){re.escape(a.lower())}(?![0-9a-z])", text) for a in accepted)


def question_sets(facts: list[dict], probes: list[dict]) -> dict[str, list[tuple[str, list[str]]]]:
    """The three evaluation sets: (question, accepted answers)."""
    return {
        "new_facts": [(f["question"], [f["answer"]]) for f in facts],
        "paraphrases": [(f["paraphrase"], [f["answer"]]) for f in facts],
        "general_probes": [(p["question"], p["answers"]) for p in probes],
    }


QUESTION_FORMAT = (
    'one JSON object per line: {"question": "...", "answers": ["accepted", "answers"]} (or "answer": "..."), '
    'optionally "paraphrase": "the question asked another way"'
)


def _numbered(rows, source: str):
    """`json_lines` rows, with a line that does not parse worded for a question file."""
    try:
        yield from rows
    except JSONLineError as err:
        what = "not UTF-8 text (save the file as UTF-8)" if err.not_utf8 else f"not valid JSON ({err.msg})"
        raise ValueError(f"{source}, line {err.number}: {what}. Write {QUESTION_FORMAT}.") from None


def read_question_file(path: str, flag: str = "--eval_questions", paraphrases: bool = True) -> list[dict]:
    """Rows `{question, answers, paraphrase?}` of a user's question file (JSONL). Every problem is a `ValueError`
    naming the file, the line and the fix, raised before any model is loaded."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} does not exist (expected a JSONL file: {QUESTION_FORMAT}).")
    rows = []
    with open(path, "rb") as f:
        for number, record in _numbered(json_lines(f), f"{flag} {path}"):
            where = f"{flag} {path}, line {number}"
            if not isinstance(record, dict):
                raise ValueError(
                    f"{where}: expected a JSON object, got {type(record).__name__}. Write {QUESTION_FORMAT}."
                )
            question = record.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f'{where}: "question" is missing or empty. Write {QUESTION_FORMAT}.')
            answers = record.get("answers", record.get("answer"))
            answers = [answers] if isinstance(answers, str) else answers
            if (
                not isinstance(answers, list)
                or not answers
                or not all(isinstance(a, str) and a.strip() for a in answers)
            ):
                raise ValueError(
                    f'{where}: "answers" must be a non-empty list of non-empty strings (or "answer": one string), '
                    f"got {answers!r}."
                )
            paraphrase = record.get("paraphrase")
            if paraphrase is not None and (
                not paraphrases or not isinstance(paraphrase, str) or not paraphrase.strip()
            ):
                fix = "remove it (probes have none)" if not paraphrases else "make it a non-empty string or remove it"
                raise ValueError(f'{where}: "paraphrase" {paraphrase!r} is not usable: {fix}.')
            rows.append({"question": question, "answers": answers, "paraphrase": paraphrase})
    if not rows:
        raise ValueError(f"{flag} {path!r} holds no questions. Write {QUESTION_FORMAT}.")
    return rows


def question_sets_from_files(questions_path: str, probes_path: str | None, num_probes: int | None = None) -> dict:
    """The evaluation sets of a user's run: its questions, their paraphrases (where given) and the general probes (the
    user's file, or the bundled ones)."""
    rows = read_question_file(questions_path)
    sets = {"new_facts": [(row["question"], row["answers"]) for row in rows]}
    paraphrased = [(row["paraphrase"], row["answers"]) for row in rows if row["paraphrase"]]
    if paraphrased:
        sets["paraphrases"] = paraphrased
    if probes_path:
        probes = read_question_file(probes_path, "--eval_probes", paraphrases=False)
        probes = probes if num_probes is None else probes[:num_probes]
        sets["general_probes"] = [(row["question"], row["answers"]) for row in probes]
    else:
        sets["general_probes"] = [(p["question"], p["answers"]) for p in load_probes(num_probes)]
    return sets
