"""Bad inputs to the offline CLIs end as one clear line (`<prog>: error: ...`, exit 2) before training, with nothing
written: the cases of a red-team run of extract_logits.py and distill_sft.py."""

import json
import math
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trl_sdft.cli.offline import distill_main, extract_main
from trl_sdft.testing import COLORS, NAMES


def conversations(n=12):
    return [
        {
            "messages": [
                {"role": "user", "content": f"What color is {NAMES[i % len(NAMES)]}?"},
                {"role": "assistant", "content": f"{NAMES[i % len(NAMES)]} is {COLORS[i % len(COLORS)]}."},
            ]
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def extract_argv(data, output, filtered, model, *extra):
    return [
        "--input_file",
        str(data),
        "--output_file",
        str(output),
        "--filtered_data",
        str(filtered),
        "--model_name",
        str(model),
        "--topk",
        "4",
        "--batch_size",
        "4",
        *extra,
    ]


def refused(capsys, code, prog, *fragments) -> str:
    """The CLI's exit code is 2 and it printed one error line holding every fragment (and no traceback)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, tiny_model_dir):
    """One extraction of 12 chats with the tiny model (top-4); tests copy the files before changing them."""
    directory = tmp_path_factory.mktemp("extraction")
    data = write_jsonl(directory / "chat.jsonl", conversations())
    argv = extract_argv(data, directory / "teacher.parquet", directory / "kept.jsonl", tiny_model_dir)
    assert extract_main(argv) == 0
    return directory


@pytest.fixture
def files(tmp_path, extraction):
    """Copies of the kept JSONL and the Parquet in this test's directory."""
    kept, logits = tmp_path / "kept.jsonl", tmp_path / "teacher.parquet"
    shutil.copy(extraction / "kept.jsonl", kept)
    shutil.copy(extraction / "teacher.parquet", logits)
    return kept, logits


@pytest.fixture
def student(tmp_path, tiny_model_dir):
    """A copy of the tiny model: a test may try to overwrite it."""
    path = tmp_path / "student"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the error must come before."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def config_file(path: Path, student, kept, logits, **overrides) -> str:
    config = {
        "model_name": str(student),
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no", "logging_steps": 1},
        "train": {"data_path": str(kept), "teacher_logits": str(logits)},
        "max_seq_length": 128,
        **overrides,
    }
    path.write_text(json.dumps(config))
    return str(path)


def distill(tmp_path, student, kept, logits, output=None, *extra, **overrides):
    config = config_file(tmp_path / "distill.json", student, kept, logits, **overrides)
    return distill_main(["--config_file", config, "--output_dir", str(output or tmp_path / "out"), *extra])


def rewrite_parquet(src: Path, dst: Path, change=None, metadata="keep", drop=()):
    """The Parquet at `src` with its rows changed in place by `change(rows)`, written to `dst`."""
    table = pq.read_table(src)
    rows = table.to_pylist()
    if change:
        change(rows)
    new = pa.Table.from_pylist(rows, schema=table.schema)
    if metadata != "keep":
        new = new.replace_schema_metadata(metadata)
    if drop:
        new = new.drop_columns(list(drop))
    pq.write_table(new, dst)
    return dst


# 1 ------------------------------------------------------------------------------------------------------------------
def test_outputs_that_are_the_input_are_refused(tmp_path, tiny_model_dir, capsys, no_model_load):
    data = tmp_path / "chat.jsonl"
    write_jsonl(data, conversations(6))
    original = data.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(data)
    cases = [
        (data, tmp_path / "out.parquet", data, "--filtered_data"),  # the same path
        (data, tmp_path / "out.parquet", tmp_path / "link.jsonl", "--filtered_data"),  # the same file via a symlink
        (data, tmp_path / "sub" / ".." / "chat.jsonl", tmp_path / "kept.jsonl", "--output_file"),
        (data, tmp_path / "out.parquet", tmp_path / "out.parquet", "--output_file"),  # output == filtered
    ]
    for source, output, filtered, flag in cases:
        (tmp_path / "sub").mkdir(exist_ok=True)
        code = extract_main(extract_argv(source, output, filtered, tiny_model_dir))
        refused(capsys, code, "extract_logits", flag, "the same file")
        assert data.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "link.jsonl", "sub"]


def test_an_existing_filtered_file_is_replaced_only_with_overwrite(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(4))
    notes = tmp_path / "notes.jsonl"
    notes.write_text("the user's own file\n")
    code = extract_main(extract_argv(data, tmp_path / "a.parquet", notes, tiny_model_dir))
    refused(capsys, code, "extract_logits", "--filtered_data", str(notes), "--overwrite")
    assert notes.read_text() == "the user's own file\n" and not (tmp_path / "a.parquet").exists()
    assert extract_main(extract_argv(data, tmp_path / "a.parquet", notes, tiny_model_dir, "--overwrite")) == 0
    kept = notes.read_text()
    argv = extract_argv(data, tmp_path / "b.parquet", notes, tiny_model_dir)
    argv[argv.index("--topk") + 1] = "2"  # another K of the same records rewrites the same file: allowed
    assert extract_main(argv) == 0 and notes.read_text() == kept


# 2 ------------------------------------------------------------------------------------------------------------------
def test_output_dir_holding_a_model_is_refused_without_overwrite(tmp_path, files, student, capsys):
    kept, logits = files
    weights = (student / "model.safetensors").read_bytes()
    refused(capsys, distill(tmp_path, student, kept, logits, student), "distill_sft", "--output_dir", "student model")
    refused(
        capsys,
        distill(tmp_path, student, kept, logits, student, "--overwrite"),
        "distill_sft",
        "student model",
    )
    assert (student / "model.safetensors").read_bytes() == weights
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "adapter_config.json").write_text("{}")
    refused(capsys, distill(tmp_path, student, kept, logits, finished), "distill_sft", str(finished), "--overwrite")
    assert distill(tmp_path, student, kept, logits, finished, "--overwrite") == 0
    assert (finished / "model.safetensors").exists()


# 3 ------------------------------------------------------------------------------------------------------------------
def test_non_finite_teacher_logits_are_refused(tmp_path, files, student, capsys, no_model_load):
    kept, logits = files

    def poison(value, row):
        def change(rows):
            rows[row]["topk_values"][3] = value

        return change

    for value, row in ((math.nan, 5), (math.inf, 0), (-math.inf, 11)):
        bad = rewrite_parquet(logits, tmp_path / "bad.parquet", poison(value, row))
        refused(capsys, distill(tmp_path, student, kept, bad), "distill_sft", str(bad), f"row {row}", "non-finite")
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_non_finite_logits_is_refused(tmp_path, tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    model.save_pretrained(tmp_path / "nan-teacher")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "nan-teacher")
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(4))
    argv = extract_argv(data, tmp_path / "t.parquet", tmp_path / "k.jsonl", tmp_path / "nan-teacher")
    refused(capsys, extract_main(argv), "extract_logits", "non-finite", "idx 0")
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "k.jsonl").exists()


# 4 ------------------------------------------------------------------------------------------------------------------
def test_out_of_vocabulary_indices_are_refused(tmp_path, files, student, tokenizer, capsys, no_model_load):
    kept, logits = files
    for index, row in ((len(tokenizer), 2), (-1, 7)):

        def change(rows, index=index, row=row):
            rows[row]["topk_indices"][1] = index

        bad = rewrite_parquet(logits, tmp_path / "bad.parquet", change)
        refused(capsys, distill(tmp_path, student, kept, bad), "distill_sft", str(bad), f"row {row}", str(index))


# 5 ------------------------------------------------------------------------------------------------------------------
def test_rows_tied_to_their_records_content(tmp_path, extraction, files, student, tokenizer, capsys, no_model_load):
    from trl_sdft.offline.records import tokenize_with_assistant_span

    kept, logits = files
    records = [json.loads(line) for line in kept.read_text().splitlines()]
    spans = [tokenize_with_assistant_span(tokenizer, r["messages"])[1:] for r in records]
    a, b = next(
        (i, j)
        for i in range(len(records))
        for j in range(i + 1, len(records))
        if spans[i][1] - spans[i][0] == spans[j][1] - spans[j][0] and records[i]["messages"] != records[j]["messages"]
    )
    swapped = [dict(r) for r in records]
    swapped[a]["messages"], swapped[b]["messages"] = records[b]["messages"], records[a]["messages"]  # idx kept
    write_jsonl(tmp_path / "swapped.jsonl", swapped)
    refused(
        capsys, distill(tmp_path, student, tmp_path / "swapped.jsonl", logits), "distill_sft", f"idx {a}", "re-extract"
    )
    edited = [json.loads(json.dumps(r)) for r in records]
    answer = edited[0]["messages"][-1]
    answer["content"] = answer["content"].replace("red", "blue")  # the same number of tokens
    assert len(tokenizer(answer["content"])["input_ids"]) == len(
        tokenizer(records[0]["messages"][-1]["content"])["input_ids"]
    )
    write_jsonl(tmp_path / "edited.jsonl", edited)
    refused(capsys, distill(tmp_path, student, tmp_path / "edited.jsonl", logits), "distill_sft", "idx 0", "re-extract")
    # a Parquet from before the content hashes: re-extract (distillation refuses it, extraction does not resume it)
    metadata = {k: v for k, v in pq.read_schema(logits).metadata.items() if k != b"trl_sdft.row_hash"}
    old = rewrite_parquet(logits, tmp_path / "old.parquet", metadata=metadata, drop=["input_hash"])
    refused(capsys, distill(tmp_path, student, kept, old), "distill_sft", str(old), "re-extract")
    argv = extract_argv(extraction / "chat.jsonl", old, tmp_path / "k.jsonl", student)
    refused(capsys, extract_main(argv), "extract_logits", str(old), "older extract_logits.py", "re-extract")


# 6 ------------------------------------------------------------------------------------------------------------------
def test_parquet_without_the_extractors_metadata_is_refused(tmp_path, files, student, capsys, no_model_load):
    kept, logits = files
    bare = rewrite_parquet(logits, tmp_path / "bare.parquet", metadata={})
    refused(
        capsys, distill(tmp_path, student, kept, bare), "distill_sft", str(bare), "not written by extract_logits.py"
    )


# 7 ------------------------------------------------------------------------------------------------------------------
def test_topk_above_the_vocabulary_is_refused(tmp_path, tiny_model_dir, tokenizer, capsys, no_model_load):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(2))
    argv = extract_argv(data, tmp_path / "t.parquet", tmp_path / "k.jsonl", tiny_model_dir)
    argv[argv.index("--topk") + 1] = str(len(tokenizer) + 1)
    refused(capsys, extract_main(argv), "extract_logits", "--topk", str(len(tokenizer)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl"]


# 8 ------------------------------------------------------------------------------------------------------------------
def test_no_usable_record_is_refused(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv = extract_argv(empty, tmp_path / "t.parquet", tmp_path / "k.jsonl", tiny_model_dir)
    refused(capsys, extract_main(argv), "extract_logits", str(empty), "no records")
    rejected = write_jsonl(
        tmp_path / "rejected.jsonl", [{"text": "x"}, {"messages": [{"role": "user", "content": "a"}]}]
    )
    argv = extract_argv(rejected, tmp_path / "t.parquet", tmp_path / "k.jsonl", tiny_model_dir)
    refused(capsys, extract_main(argv), "extract_logits", rejected, "1 no messages", "1 no assistant turn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "rejected.jsonl"]


# 9 ------------------------------------------------------------------------------------------------------------------
GOOD_LINE = json.dumps(conversations(1)[0])
SURROGATE = '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "ok"}]}'


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("corrupt-line", ["line 3", "not valid JSON"]),
        ("lone-surrogate", ["line 2", "surrogate"]),
        ("missing-model", ["--model_name", "no-such-model"]),
        ("output-under-a-file", ["--output_file", "not a directory"]),
        ("existing-garbage-output", ["--output_file", "not a Parquet file written by extract_logits.py"]),
        pytest.param(
            "read-only-dir",
            ["--output_file", "cannot write"],
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only directories"),
        ),
    ],
)
def test_extraction_input_errors_are_one_line(tmp_path, tiny_model_dir, capsys, case, fragments):
    lines = [GOOD_LINE] * 4
    if case == "corrupt-line":
        lines[2] = '{"messages": [{"role": "user", "content": "trunc'
    if case == "lone-surrogate":
        lines[1] = SURROGATE
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    output, model = tmp_path / "t.parquet", tiny_model_dir
    if case == "missing-model":
        model = tmp_path / "no-such-model"
    if case == "output-under-a-file":
        output = data / "t.parquet"
    if case == "existing-garbage-output":
        output.write_bytes(b"not parquet at all")
    if case == "read-only-dir":
        (tmp_path / "ro").mkdir(mode=0o555)
        output = tmp_path / "ro" / "t.parquet"
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(capsys, extract_main(extract_argv(data, output, tmp_path / "k.jsonl", model)), "extract_logits", *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("loss_multi-string", ["loss_multi", "a number"]),
        ("loss_multi-nan", ["loss_multi", "finite"]),
        ("loss_multi-negative", ["loss_multi", ">= 0"]),
        ("max_seq_length-string", ["max_seq_length", "an integer"]),
        ("trainer-list", ["trainer", "an object"]),
        ("train-string", ["train", "an object"]),
        ("train-data_path-number", ["data_path", "a path"]),
        ("missing-model", ["model_name", "no-such-model"]),
        ("garbage-parquet", ["garbage.parquet", "not a readable Parquet file"]),
        ("truncated-parquet", ["truncated.parquet", "not a readable Parquet file"]),
        ("surrogate-jsonl", ["line 1", "surrogate"]),
        ("output-under-a-file", ["--output_dir", "not a directory"]),
    ],
)
def test_distillation_input_errors_are_one_line(tmp_path, files, student, capsys, no_model_load, case, fragments):
    kept, logits = files
    overrides, output = {}, tmp_path / "out"
    if case.startswith("loss_multi"):
        overrides["loss_multi"] = {"string": "abc", "nan": math.nan, "negative": -1.0}[case.split("-")[1]]
    if case == "max_seq_length-string":
        overrides["max_seq_length"] = "10"
    if case == "trainer-list":
        overrides["trainer"] = [{"max_steps": 2}]
    if case == "train-string":
        overrides["train"] = str(kept)
    if case == "train-data_path-number":
        overrides["train"] = {"data_path": 3, "teacher_logits": str(logits)}
    if case == "missing-model":
        student = tmp_path / "no-such-model"
    if case == "garbage-parquet":
        logits = tmp_path / "garbage.parquet"
        logits.write_bytes(b"PAR1 this is not a parquet file")
    if case == "truncated-parquet":
        data = logits.read_bytes()
        logits = tmp_path / "truncated.parquet"
        logits.write_bytes(data[: len(data) // 2])
    if case == "surrogate-jsonl":
        kept.write_text(SURROGATE + "\n" + "\n".join(kept.read_text().splitlines()[1:]) + "\n")
    if case == "output-under-a-file":
        output = kept / "out"
    refused(capsys, distill(tmp_path, student, kept, logits, output, **overrides), "distill_sft", *fragments)
    assert not (tmp_path / "out").exists()


def test_two_distillations_cannot_share_an_output_dir(tmp_path, files, student, capsys, no_model_load):
    """The CLIs share one rule: a second run into a directory another run is writing is refused."""
    from trl_sdft.cli.output_dir import OutputDirLock

    out = tmp_path / "out"
    out.mkdir()
    held = OutputDirLock(str(out))
    try:
        refused(capsys, distill(tmp_path, student, *files, out), "distill_sft", "in use by another run")
    finally:
        held.release()


def test_a_truncated_model_is_one_line_in_both_clis(tmp_path, files, student, capsys, tiny_model_dir):
    """Before: a SafetensorError traceback from deep inside loading."""
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(2))
    code = extract_main(extract_argv(data, tmp_path / "t.parquet", tmp_path / "k.jsonl", student))
    refused(capsys, code, "extract_logits", "model.safetensors is truncated")
    refused(capsys, distill(tmp_path, student, *files), "distill_sft", "model.safetensors is truncated")
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "out").exists()
