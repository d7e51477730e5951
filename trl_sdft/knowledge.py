"""The embedded knowledge-acquisition task: made-up facts to learn, and general probes to keep.

`facts.jsonl`: 64 facts about entities that do not exist (so the base model cannot know them), each with a question
(the training prompt and the in-distribution test), a paraphrased question, the fact stated as a demonstration (the
privileged context) and the answer word. `probes.jsonl`: general-knowledge questions that SmolLM2-135M-Instruct
answers correctly with greedy decoding (checked when the file was made), to measure forgetting.
"""

import json
import re
from importlib import resources

from datasets import Dataset

FACT_FIELDS = ("id", "question", "paraphrase", "fact", "answer")


def _read_jsonl(name: str) -> list[dict]:
    text = resources.files("trl_sdft.resources").joinpath(name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
