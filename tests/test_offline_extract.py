"""Offline top-K extraction: record rules, the Parquet file and its metadata, resume, several processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trl_sdft.cli.offline import extract_parser, run_extraction
from trl_sdft.offline import POSITIONS_RULE, normalize_record, read_settings, tokenize_with_assistant_span
from trl_sdft.offline import extract as extract_module

ROOT = Path(__file__).resolve().parents[1]


def chat(user, assistant, system=None, assistant_role="assistant"):
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": [*messages, {"role": "user", "content": user}, {"role": assistant_role, "content": assistant}]}


GOOD = [
    chat("What color is Zorbo?", "Zorbo is red."),
    chat("What color is Quilla?", "Quilla is blue. Answer: blue", system="Be brief."),
    chat("Question: which color does Tovi have?", "Tovi is green.", assistant_role="bot"),
    chat("What color is Mendax?", "The secret color of Mendax is black. Answer: black"),
    chat("What color is Elsvet?", "white"),
]
BAD = [
    {"messages": []},
    {"text": "no messages here"},
    {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}]},
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    },
]


def test_record_rules():
    assert normalize_record(GOOD[2])[0][1] == {"role": "assistant", "content": "Tovi is green."}
    reasons = [normalize_record(record)[1] for record in BAD]
    assert reasons == [
        "no messages",
        "no messages",
        "unknown role 'narrator'",
        "empty content",
        "more than one assistant turn",
    ]
    assert normalize_record({"messages": [{"role": "user", "content": "a"}]})[1] == "no assistant turn"


def test_assistant_span_is_the_answer_and_the_end_of_turn(tokenizer):
    messages = normalize_record(GOOD[1])[0]
    ids, start, end = tokenize_with_assistant_span(tokenizer, messages)
    assert tokenizer.decode(ids[start:end]) == "Quilla is blue. Answer: blue<|im_end|>\n"
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")


def write_data(path: Path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def args_for(tmp_path, data, model_dir, name="out", *extra):
    return extract_parser().parse_args(
        [
            "--data_file",
            data,
            "--output_file",
            str(tmp_path / f"{name}.parquet"),
            "--filtered_data_file",
            str(tmp_path / f"{name}.jsonl"),
            "--model_name",
            model_dir,
            "--topk",
            "5",
            "--batch_size",
            "2",
            *extra,
        ]
    )


def reference_topk(model_dir, tokenizer, messages, k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, start, end = tokenize_with_assistant_span(tokenizer, messages)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    values, indices = logits[start - 1 : end - 1].topk(k, dim=-1)
    return indices, values, end - start


def test_extraction_writes_aligned_parquet_and_jsonl(tmp_path, tiny_model_dir, tokenizer, capsys):
    records = [GOOD[0], BAD[0], GOOD[1], BAD[2], GOOD[2], BAD[4], GOOD[3], GOOD[4], BAD[3]]
    data = write_data(tmp_path / "data.jsonl", records)
    summary = run_extraction(args_for(tmp_path, data, tiny_model_dir))
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("idx").type == pa.int64()
    assert table.schema.field("topk_indices").type == pa.list_(pa.int32())
    assert table.schema.field("topk_values").type == pa.list_(pa.float32())
    assert table.column("idx").to_pylist() == [0, 2, 4, 6, 7]
    settings = read_settings(str(tmp_path / "out.parquet"))
    assert settings["topk"] == 5 and settings["positions"] == POSITIONS_RULE
    assert settings["vocab_size"] == len(tokenizer)
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == [{"idx": i, "messages": normalize_record(records[i])[0]} for i in [0, 2, 4, 6, 7]]
    assert summary["skipped"] == {
        "no messages": 1,
        "unknown role 'narrator'": 1,
        "more than one assistant turn": 1,
        "empty content": 1,
    }
    assert "skipped 4 records" in capsys.readouterr().out
    # each row equals a direct forward of the same model on that record alone
    for row, messages in zip(table.to_pylist(), [k["messages"] for k in kept]):
        indices, values, count = reference_topk(tiny_model_dir, tokenizer, messages, 5)
        assert len(row["topk_indices"]) == count * 5
        assert row["topk_indices"] == indices.flatten().tolist()
        torch.testing.assert_close(torch.tensor(row["topk_values"]), values.flatten(), atol=1e-5, rtol=1e-5)
    assert not os.path.exists(tmp_path / "out.parquet.parts")


def test_long_records_and_sorting(tmp_path, tiny_model_dir, tokenizer):
    long = chat("What color is Zorbo? " * 20, "Zorbo is red.")
    data = write_data(tmp_path / "data.jsonl", [GOOD[3], long, GOOD[4], GOOD[0]])
    lengths = {
        i: len(tokenize_with_assistant_span(tokenizer, normalize_record(r)[0])[0])
        for i, r in enumerate([GOOD[3], long, GOOD[4], GOOD[0]])
    }
    summary = run_extraction(args_for(tmp_path, data, tiny_model_dir, "out", "--max_length", "60", "--sort_by_len"))
    assert lengths[1] > 60 and summary["skipped"] == {"longer than max_length 60": 1}
    idx = pq.read_table(tmp_path / "out.parquet").column("idx").to_pylist()
    assert idx == sorted([0, 2, 3], key=lambda i: (lengths[i], i))


def test_interrupted_extraction_resumes_to_the_same_file(tmp_path, tiny_model_dir, monkeypatch):
    data = write_data(tmp_path / "data.jsonl", GOOD * 2)
    run_extraction(args_for(tmp_path, data, tiny_model_dir, "whole"))
    original = extract_module.topk_for_batch
    calls = []

    class Killed(Exception):
        pass

    def failing(model, items, *rest):
        calls.append([item.idx for item in items])
        if len(calls) == 3 and fail[0]:
            raise Killed  # the process dies while the third batch runs
        return original(model, items, *rest)

    fail = [True]

    monkeypatch.setattr(extract_module, "topk_for_batch", failing)
    with pytest.raises(Killed):
        run_extraction(args_for(tmp_path, data, tiny_model_dir, "resumed"))
    fail[0] = False
    assert len(os.listdir(tmp_path / "resumed.parquet.parts")) == 2 and not (tmp_path / "resumed.parquet").exists()
    calls.clear()
    run_extraction(args_for(tmp_path, data, tiny_model_dir, "resumed"))
    assert calls == [[4, 5], [6, 7], [8, 9]]  # batches 0 and 1 were not computed again
    assert pq.read_table(tmp_path / "resumed.parquet").equals(pq.read_table(tmp_path / "whole.parquet"))
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    # a finished file with other settings is not silently mixed with a new run
    with pytest.raises(ValueError, match="topk: 5 there, 3 now"):
        run_extraction(args_for(tmp_path, data, tiny_model_dir, "resumed", "--topk", "3"))
    other = write_data(tmp_path / "data.jsonl", GOOD)  # the same path, other records
    with pytest.raises(ValueError, match="data_hash"):
        run_extraction(args_for(tmp_path, other, tiny_model_dir, "resumed"))


@pytest.mark.processes
def test_two_processes_write_the_same_file_as_one(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "data.jsonl", GOOD * 3 + BAD)
    run_extraction(args_for(tmp_path, data, tiny_model_dir, "one"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(ROOT / "scripts" / "extract_logits.py"),
        "--data_file",
        data,
        "--output_file",
        str(tmp_path / "two.parquet"),
        "--filtered_data_file",
        str(tmp_path / "two.jsonl"),
        "--model_name",
        tiny_model_dir,
        "--topk",
        "5",
        "--batch_size",
        "2",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "two.parquet")
    assert two.column("idx").to_pylist() == one.column("idx").to_pylist() == list(range(15))
    assert two.column("topk_indices").to_pylist() == one.column("topk_indices").to_pylist()
    for a, b in zip(one.column("topk_values").to_pylist(), two.column("topk_values").to_pylist()):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)
    assert one.schema.metadata == two.schema.metadata
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()


@pytest.mark.parametrize(
    "data_flag, filtered_flag",
    [("--input_file", "--filtered_data"), ("--data_file", "--filtered_data_file")],
    ids=["documented", "long-names"],
)
@pytest.mark.processes
def test_the_documented_command_and_its_aliases(tmp_path, tiny_model_dir, data_flag, filtered_flag):
    """The README's extraction command, typed with the pipeline's flag names and with the long aliases."""
    data = write_data(tmp_path / "data.jsonl", GOOD[:2])
    command = [
        sys.executable,
        "scripts/extract_logits.py",
        data_flag,
        data,
        "--output_file",
        str(tmp_path / "out.parquet"),
        filtered_flag,
        str(tmp_path / "kept.jsonl"),
        "--model_name",
        tiny_model_dir,
        "--topk",
        "5",
    ]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    assert pq.read_table(tmp_path / "out.parquet").column("idx").to_pylist() == [0, 1]
    assert len((tmp_path / "kept.jsonl").read_text().splitlines()) == 2
