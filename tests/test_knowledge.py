"""The embedded knowledge task (`demo/knowledge.py`): its facts, its probes and the answer scoring."""

from trl_sdft.demo.knowledge import is_correct, load_facts, load_probes, question_sets


def test_facts_file():
    facts = load_facts()
    assert len(facts) == 64
    assert len({f["entity"] for f in facts}) == 64 and len({f["id"] for f in facts}) == 64
    for fact in facts:
        assert fact["entity"] in fact["question"] and fact["entity"] in fact["paraphrase"]
        assert fact["question"] != fact["paraphrase"]
        assert is_correct(fact["fact"], fact["answer"])
        assert not is_correct(fact["question"], fact["answer"])
    assert load_facts(8) == facts[:8]


def test_probes_file_and_scoring():
    probes = load_probes()
    assert len(probes) >= 32 and all(p["answers"] for p in probes)
    assert is_correct("The capital is Paris.", ["Paris"])
    assert not is_correct("Parisian food", ["Paris"])
    assert not is_correct("about 17 days", ["7"])
    assert is_correct("It has 7 days", ["seven", "7"])
    sets = question_sets(load_facts(3), probes[:5])
    assert [len(v) for v in sets.values()] == [3, 3, 5]
