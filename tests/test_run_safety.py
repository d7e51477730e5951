"""A run never loses what a user has: complete checkpoints only, resume checked before the model loads, an output
directory neither replaced unasked nor shared, and no NaN/inf update ever applied."""

import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from trl_sdft import SDFTTrainer, cli
from trl_sdft.checkpoints import last_complete_checkpoint, resolve_resume_from_checkpoint
from trl_sdft.cli.output_dir import OutputDirLock, claim_output_dir
from trl_sdft.guards import NonFiniteTrainingError
from trl_sdft.testing import build_model, facts_rows

EMA_SAVES = dict(teacher_model_kind="ema", save_strategy="steps", save_steps=1)


def make(tokenizer, tiny_config, output_dir, callbacks=None, **overrides):
    return SDFTTrainer(
        model=build_model(tokenizer),
        args=tiny_config(output_dir, **overrides),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_save_cut_short_keeps_the_last_complete_checkpoint(tokenizer, tiny_config, tmp_path, monkeypatch):
    """With save_total_limit=1, the older checkpoint is rotated away only once the new one is whole (teacher
    included). Before, the parent rotated first and the teacher came last: a kill in between left none."""
    from trl_sdft import teachers

    trainer = make(tokenizer, tiny_config, tmp_path, save_total_limit=1, **EMA_SAVES)
    real_save, calls = teachers.Teacher.save, []

    def killed_on_second_save(self, checkpoint_dir, write=True):
        calls.append(checkpoint_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while checkpoint-2 was written")
        real_save(self, checkpoint_dir, write)

    monkeypatch.setattr(teachers.Teacher, "save", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    first = tmp_path / "checkpoint-1"
    assert (first / "sdft_teacher.safetensors").is_file() and (first / "trainer_state.json").is_file()
    assert last_complete_checkpoint(str(tmp_path), needs_teacher_state=True) == str(first)


def test_resume_true_takes_the_newest_complete_checkpoint(tokenizer, tiny_config, tmp_path):
    make(tokenizer, tiny_config, tmp_path, **EMA_SAVES).train()
    with open(tmp_path / "checkpoint-2" / "trainer_state.json", "w") as f:
        f.write('{"global_step": 2, "log_hist')  # cut short
    ran = StepRecorder()
    resumed = make(tokenizer, tiny_config, tmp_path, callbacks=[ran], max_steps=3, **EMA_SAVES)
    resumed.train(resume_from_checkpoint=True)
    assert ran.steps == [2, 3]  # resumed after step 1, the newest complete checkpoint


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "does not exist"),
        ("state", "truncated or invalid trainer_state.json"),
        ("weights", "model.safetensors is truncated or corrupt"),
        ("optimizer", "optimizer.pt is truncated or corrupt"),
    ],
)
def test_resume_names_what_is_wrong_with_the_checkpoint(tokenizer, tiny_config, tmp_path, damage, message):
    make(tokenizer, tiny_config, tmp_path, max_steps=1, **EMA_SAVES).train()
    checkpoint = tmp_path / "checkpoint-1"
    if damage == "missing":
        checkpoint = tmp_path / "checkpoint-9"
    elif damage == "state":
        (checkpoint / "trainer_state.json").write_text('{"global_st')
    else:
        path = checkpoint / ("model.safetensors" if damage == "weights" else "optimizer.pt")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    trainer = make(tokenizer, tiny_config, tmp_path, **EMA_SAVES)
    with pytest.raises(ValueError, match=message) as caught:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(checkpoint) in str(caught.value)


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
def test_resuming_an_ema_run_with_another_teacher_warns(tokenizer, tiny_config, tmp_path, caplog):
    make(tokenizer, tiny_config, tmp_path, max_steps=1, **EMA_SAVES).train()
    trainer = make(tokenizer, tiny_config, tmp_path, teacher_model_kind="base", save_strategy="no")
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "the EMA teacher is dropped" in caplog.text


def test_resume_string_true_means_latest(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        resolve_resume_from_checkpoint("true", str(tmp_path))
    assert resolve_resume_from_checkpoint("false", str(tmp_path)) is None


# -------------------------------------------------------------------------------------------- non-finite values
class PoisonTeacherAfter(TrainerCallback):
    """From optimizer step `step` on, the teacher's head outputs NaN: the loss and every gradient become NaN."""

    def __init__(self, trainer_ref, step):
        self.trainer_ref, self.step = trainer_ref, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.trainer_ref[0].teacher.model.lm_head.weight.fill_(float("nan"))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_non_finite_loss_stops_the_run_before_the_update(tokenizer, tiny_config, tmp_path, max_grad_norm):
    ref = []
    trainer = make(
        tokenizer,
        tiny_config,
        tmp_path,
        callbacks=[PoisonTeacherAfter(ref, 1)],
        max_steps=3,
        max_grad_norm=max_grad_norm,
        teacher_model_kind="base",
        save_strategy="steps",
        save_steps=1,
    )
    ref.append(trainer)
    with pytest.raises(NonFiniteTrainingError, match="Optimizer step 2: non-finite loss nan") as caught:
        trainer.train()
    assert "checkpoint-1" in str(caught.value)
    assert not (tmp_path / "checkpoint-2").exists()
    for name, param in trainer.model.named_parameters():
        assert torch.isfinite(param).all(), name  # the NaN gradients were never applied


# ------------------------------------------------------------------------------------------------ output dirs
def test_output_dir_of_a_finished_run_is_refused_then_overwritten_on_request(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ValueError, match="already holds an earlier run's results .*--overwrite_output_dir"):
        claim_output_dir(str(tmp_path))
    assert (tmp_path / "checkpoint-3").is_dir()
    assert claim_output_dir(str(tmp_path), resuming=True) is not None  # resuming is the other way in
    lock = claim_output_dir(str(tmp_path), overwrite=True, log=None)
    assert not (tmp_path / "checkpoint-3").exists()  # a later `resume true` cannot pick the old run's
    lock.release()


@pytest.mark.processes
def test_two_runs_cannot_share_an_output_dir(tmp_path):
    held = OutputDirLock(str(tmp_path))
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from trl_sdft.cli.output_dir import claim_output_dir; claim_output_dir({str(tmp_path)!r})",
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0 and f"in use by another run (pid {os.getpid()})" in other.stderr
    held.release()
    assert claim_output_dir(str(tmp_path)) is not None  # free again once the first run ends


def test_unwritable_output_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot be created|is a file"):
        claim_output_dir(str(tmp_path / "file" / "out"))


def run_cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr()


def cli_flags(tmp_path, model_dir, *extra):
    from helpers import tiny_flags

    return tiny_flags(tmp_path, model_dir, "--num_facts", "4", "--knowledge_eval", "false", *extra)


@pytest.mark.processes
def test_cli_refuses_a_finished_output_dir_before_the_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the finished model")
    monkeypatch.setattr("trl_sdft.trainer.SDFTTrainer.__init__", lambda *a, **k: pytest.fail("model loaded"))
    code, captured = run_cli(cli_flags(tmp_path, tiny_model_dir), capsys)
    assert code == 2 and "already holds an earlier run's results" in captured.err
    assert "Traceback" not in captured.err
    assert (out / "model.safetensors").read_bytes() == b"the finished model"


@pytest.mark.parametrize(
    "resume, message",
    [("missing", "does not exist"), ("true", "no complete checkpoint in")],
)
@pytest.mark.processes
def test_cli_resume_problems_are_one_line_before_the_model_loads(
    tmp_path, tiny_model_dir, capsys, monkeypatch, resume, message
):
    target = str(tmp_path / "nowhere") if resume == "missing" else resume
    monkeypatch.setattr("trl_sdft.trainer.SDFTTrainer.__init__", lambda *a, **k: pytest.fail("model loaded"))
    code, captured = run_cli(cli_flags(tmp_path, tiny_model_dir, "--resume_from_checkpoint", target), capsys)
    assert code == 2 and message in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("problem", ["missing", "truncated", "no-config"])
@pytest.mark.processes
def test_cli_model_path_problems_are_one_line(tmp_path, tiny_model_dir, capsys, problem):
    import shutil

    model = tmp_path / "model"
    if problem != "missing":
        shutil.copytree(tiny_model_dir, model)
    if problem == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    if problem == "no-config":
        (model / "config.json").unlink()
    code, captured = run_cli(cli_flags(tmp_path, str(model)), capsys)
    expected = {"missing": "does not exist", "truncated": "model.safetensors is truncated", "no-config": "config.json"}
    assert code == 2 and expected[problem] in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
def test_cli_resumes_with_true(tmp_path, tiny_model_dir, capsys):
    flags = cli_flags(tmp_path, tiny_model_dir, "--save_strategy", "steps", "--save_steps", "1")
    assert cli.main(flags) == 0
    assert cli.main(flags) == 2  # the finished run is not replaced
    assert "already holds an earlier run's results" in capsys.readouterr().err
    longer = [*flags, "--max_steps", "3", "--resume_from_checkpoint", "true"]
    assert cli.main(longer) == 0
    state = json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


# ---------------------------------------------------------------------------------------------- context limits
def test_a_completion_as_long_as_the_context_is_refused(tokenizer, tiny_config, tmp_path):
    """Before: the teacher prompt was cut to one token and training ran."""
    context = build_model(tokenizer).config.max_position_embeddings
    with pytest.raises(ValueError, match=f"leaves no room for a prompt in the model's context of {context}"):
        make(tokenizer, tiny_config, tmp_path, max_completion_length=context)


def test_prompt_plus_completion_beyond_the_context_is_refused_at_init(tokenizer, tiny_config, tmp_path):
    """Before: the trainer built, and the step ran past the model's positions."""
    rows = facts_rows(4)
    rows[2]["prompt"] = "What color is Zorbo? " * 60
    with pytest.raises(ValueError, match=r"longest prompt \(row 2 of the train dataset, .*Set `max_prompt_length`"):
        SDFTTrainer(
            model=build_model(tokenizer),
            args=tiny_config(tmp_path, max_prompt_length=None, max_completion_length=64),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("chat", [False, True])
def test_a_long_privileged_context_loses_its_end_not_the_question(tokenizer, tiny_config, tmp_path, caplog, chat):
    rows = facts_rows(4, chat=chat)
    rows[1]["privileged_context"] = "Zorbo is blue. " + "Filler words about nothing. " * 80
    with caplog.at_level("WARNING"):
        trainer = SDFTTrainer(
            model=build_model(tokenizer),
            args=tiny_config(tmp_path, max_teacher_prompt_length=48),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert "the end of their privileged context will be cut so that the question stays whole" in caplog.text
    teacher = trainer._round_prompts(rows).teacher
    assert all(len(ids) <= 48 for ids in teacher)
    text = tokenizer.decode(teacher[1])
    question = rows[1]["prompt"] if not chat else rows[1]["prompt"][-1]["content"]
    assert question.strip() in text and "Zorbo is blue." in text
    trainer.train()  # and it trains


# ------------------------------------------------------------------------------------------ found in review
def test_fp16_overflow_is_the_scalers_business_not_an_error(tokenizer, tiny_config, tmp_path):
    """Under fp16 loss scaling an inf gradient norm is the scaler's signal to skip the step and lower the scale;
    only a non-finite loss stops the run there."""
    trainer = make(tokenizer, tiny_config, tmp_path)
    trainer._nonfinite_loss = None
    inf = torch.tensor(float("inf"))
    with pytest.raises(NonFiniteTrainingError, match="gradient norm inf"):
        trainer._get_grad_norm(trainer.model, grad_norm=inf)
    trainer.accelerator.scaler = object()  # what accelerate holds under fp16
    assert trainer._get_grad_norm(trainer.model, grad_norm=inf) is inf
    trainer._nonfinite_loss = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="loss nan"):
        trainer._get_grad_norm(trainer.model, grad_norm=inf)


def test_overwrite_removes_the_old_model_files_a_loader_could_pick(tmp_path):
    for name in ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "notes.txt"):
        (tmp_path / name).write_text("old")
    claim_output_dir(str(tmp_path), overwrite=True, log=None).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".trl-sdft.lock", "notes.txt"]


@pytest.mark.processes
def test_the_model_being_trained_is_never_its_own_output_dir(tmp_path, tiny_model_dir, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = (model / "model.safetensors").read_bytes()
    flags = cli_flags(tmp_path, str(model), "--output_dir", str(model), "--overwrite_output_dir")
    code, captured = run_cli(flags, capsys)
    assert code == 2 and "is the directory of the model being trained" in captured.err
    assert (model / "model.safetensors").read_bytes() == before


def test_a_filesystem_without_flock_runs_unlocked(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        assert claim_output_dir(str(tmp_path / "out")) is not None
    assert "no lock on this filesystem" in caplog.text


def test_resuming_before_later_checkpoints_warns(tokenizer, tiny_config, tmp_path, caplog):
    make(tokenizer, tiny_config, tmp_path, **EMA_SAVES).train()
    trainer = make(tokenizer, tiny_config, tmp_path, **EMA_SAVES)
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert "Resuming from step 1 while 1 later checkpoint(s)" in caplog.text


def test_model_path_weight_checks(tmp_path, tiny_model_dir):
    import shutil

    from trl_sdft.models import check_model_path

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "pytorch_model.bin").write_bytes(b"an old hub snapshot's extra file")
    check_model_path(str(model))  # transformers loads the safetensors: the .bin beside it is not ours to judge
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pytorch_model.bin is empty"):
        check_model_path(str(model))


def test_a_model_with_nan_weights_is_refused_before_training(tokenizer, tiny_config, tmp_path):
    """Before: the trainer built, and sampling crashed at step 1 ('probability tensor contains either inf, nan')."""
    model = build_model(tokenizer)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weights hold NaN or inf \(first in `model.layers.1.mlp.up_proj.weight`\)"):
        SDFTTrainer(
            model=model,
            args=tiny_config(tmp_path),
            train_dataset=Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("damage", ["latest", "ranks", "fsdp"])
def test_checkpoints_with_cut_short_engine_state_are_incomplete(tmp_path, damage):
    """DeepSpeed's `global_stepN/` and FSDP's sharded state dicts are part of a complete checkpoint."""
    import json

    import torch

    from trl_sdft.checkpoints import checkpoint_problem

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    if damage == "fsdp":
        (checkpoint / "pytorch_model_fsdp_0").mkdir()
        (checkpoint / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
        assert "without its .metadata" in checkpoint_problem(str(checkpoint))
        (checkpoint / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
        assert checkpoint_problem(str(checkpoint)) is None
        return
    (checkpoint / "latest").write_text("global_step2")
    assert "does not hold" in checkpoint_problem(str(checkpoint))
    state = checkpoint / "global_step2"
    state.mkdir()
    for rank in (0, 1):
        torch.save({}, state / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        if damage == "latest" or rank == 1:
            torch.save({}, state / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    if damage == "ranks":
        assert "2 model-state and 1 optimizer-state files" in checkpoint_problem(str(checkpoint))
        for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"):
            os.remove(state / name)
        torch.save({}, state / "mp_rank_00_model_states.pt")  # ZeRO-1/2: one model file, optimizer files per rank
        torch.save({}, state / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
        assert checkpoint_problem(str(checkpoint)) is None
    else:
        assert checkpoint_problem(str(checkpoint)) is None
        path = state / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
        path.write_bytes(path.read_bytes()[:10])
        assert "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated" in checkpoint_problem(
            str(checkpoint)
        )


# ------------------------------------------------------------------- round two: nothing a user starts from is lost
def finished_run(tmp_path, tiny_model_dir, name="out"):
    """A finished 2-step CLI run in `tmp_path/name` with checkpoint-1 and checkpoint-2."""
    flags = cli_flags(tmp_path, tiny_model_dir, "--save_strategy", "steps", "--save_steps", "1")
    flags[flags.index("--output_dir") + 1] = str(tmp_path / name)
    assert cli.main(flags) == 0
    return tmp_path / name


@pytest.mark.processes
def test_overwrite_never_removes_the_model_it_starts_from(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Before: every checkpoint, the starting one included, was removed, then a misleading tokenizer error."""
    out = finished_run(tmp_path, tiny_model_dir)
    start = out / "checkpoint-2"
    before = (start / "model.safetensors").read_bytes()
    monkeypatch.setattr("trl_sdft.trainer.SDFTTrainer.__init__", lambda *a, **k: pytest.fail("model loaded"))
    code, captured = run_cli(cli_flags(tmp_path, str(start), "--overwrite_output_dir"), capsys)
    assert code == 2 and "--model_name_or_path" in captured.err and "'checkpoint-2'" in captured.err
    assert "would remove" in captured.err and "Traceback" not in captured.err
    assert (start / "model.safetensors").read_bytes() == before
    assert (out / "checkpoint-1").is_dir() and (out / "model.safetensors").is_file()  # nothing removed at all


def test_overwrite_never_removes_an_input_file(tmp_path):
    (tmp_path / "model.safetensors").write_text("old")
    (tmp_path / "checkpoint-4").mkdir()
    data = tmp_path / "checkpoint-4" / "rows.jsonl"
    data.write_text("{}")
    with pytest.raises(ValueError, match=r"--dataset_path .*rows\.jsonl.* inside 'checkpoint-4'"):
        claim_output_dir(str(tmp_path), overwrite=True, log=None, inputs=[("--dataset_path", str(data))])
    assert data.is_file() and (tmp_path / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"--model_name_or_path .* inside 'model.safetensors'"):
        claim_output_dir(
            str(tmp_path),
            overwrite=True,
            log=None,
            inputs=[("--model_name_or_path", str(tmp_path / "model.safetensors"))],
        )


@pytest.mark.processes
def test_resume_from_another_dir_does_not_replace_a_finished_run(tmp_path, tiny_model_dir, capsys):
    """Before: any resume skipped the output-dir check, and the finished run in --output_dir was replaced."""
    finished_run(tmp_path, tiny_model_dir, "first")
    out = finished_run(tmp_path, tiny_model_dir, "out")
    before = (out / "model.safetensors").read_bytes()
    resume = ["--resume_from_checkpoint", str(tmp_path / "first" / "checkpoint-1")]
    code, captured = run_cli(cli_flags(tmp_path, tiny_model_dir, *resume), capsys)
    assert code == 2 and "already holds an earlier run's results" in captured.err
    assert (out / "model.safetensors").read_bytes() == before
    # Asked for: the earlier run is replaced (its checkpoints go), the run resumes from the other directory.
    code, captured = run_cli(cli_flags(tmp_path, tiny_model_dir, *resume, "--overwrite_output_dir"), capsys)
    assert code == 0, captured.err
    assert not (out / "checkpoint-1").exists() and (tmp_path / "first" / "checkpoint-1").is_dir()


def test_a_users_file_the_run_would_write_is_not_replaced_unasked(tmp_path):
    """Before: a README.md in an otherwise empty output dir was replaced by the model card without a word."""
    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "notes.txt").write_text("other notes")
    with pytest.raises(ValueError, match=r"holds README\.md, which this run would write over.*--overwrite_output_dir"):
        claim_output_dir(str(tmp_path))
    assert (tmp_path / "README.md").read_text() == "my notes"
    (tmp_path / "README.md").unlink()
    claim_output_dir(str(tmp_path)).release()  # a file the run does not write is no obstacle
    # The knowledge evaluation's own results.json (written as training begins) is an earlier run's, not the user's.
    (tmp_path / "results.json").write_text(json.dumps({"baseline": None, "evaluations": []}))
    claim_output_dir(str(tmp_path)).release()
    (tmp_path / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(ValueError, match=r"holds results\.json"):
        claim_output_dir(str(tmp_path))


def test_the_lock_file_as_a_symlink_or_directory_is_one_line(tmp_path):
    """Before: ELOOP / EISDIR tracebacks, and an AttributeError from the half-built lock's cleanup."""
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".trl-sdft.lock").symlink_to(victim)
    with pytest.raises(ValueError, match=r"lock file \.trl-sdft\.lock is a symlink"):
        claim_output_dir(str(tmp_path / "a"))
    (tmp_path / "b" / ".trl-sdft.lock").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"lock file \.trl-sdft\.lock is a directory"):
        claim_output_dir(str(tmp_path / "b"))
    assert victim.read_text() == "the user's"


def test_overwrite_unlinks_a_symlinked_checkpoint_and_keeps_its_target(tmp_path):
    """Before: `shutil.rmtree` refused the link with a traceback."""
    out, kept = tmp_path / "out", tmp_path / "kept"
    (kept / "checkpoint-1").mkdir(parents=True)
    (kept / "checkpoint-1" / "trainer_state.json").write_text("{}")
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / "checkpoint-1").symlink_to(kept / "checkpoint-1")
    claim_output_dir(str(out), overwrite=True, log=None).release()
    assert not os.path.lexists(out / "checkpoint-1")
    assert (kept / "checkpoint-1" / "trainer_state.json").read_text() == "{}"


def test_overwrite_with_an_undeletable_checkpoint_is_one_line(tmp_path, monkeypatch):
    """Before: a PermissionError traceback from `shutil.rmtree`. (Root deletes from read-only directories, so the
    refusal is simulated at `os.unlink`.)"""
    (tmp_path / "model.safetensors").write_text("old")
    stuck = tmp_path / "checkpoint-2"
    stuck.mkdir()
    (stuck / "trainer_state.json").write_text("{}")
    unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if str(path).endswith("trainer_state.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    with pytest.raises(ValueError, match=r"cannot be removed \(Permission denied\).*permissions"):
        claim_output_dir(str(tmp_path), overwrite=True, log=None)


def test_a_dangling_symlink_output_dir_is_named(tmp_path):
    """Before: 'cannot be created (File exists)'."""
    (tmp_path / "out").symlink_to(tmp_path / "gone" / "run")
    with pytest.raises(ValueError, match=r"is a symlink to .*gone/run.*which does not exist"):
        claim_output_dir(str(tmp_path / "out"))


def test_resuming_a_checkpoint_with_nan_weights_is_refused_at_resume(tokenizer, tiny_config, tmp_path):
    """Before: the run resumed and sampling crashed at step 3 ('probability tensor contains either inf, nan')."""
    from safetensors.torch import load_file, save_file

    make(tokenizer, tiny_config, tmp_path, save_strategy="steps", save_steps=1).train()
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.layers.0.mlp.up_proj.weight"][3, 1] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    trainer = make(tokenizer, tiny_config, tmp_path, max_steps=3)
    with pytest.raises(ValueError, match=r"checkpoint-2.* hold NaN or inf \(first in `model.layers.0.mlp.up_proj"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.processes
def test_resuming_another_models_checkpoint_is_named_as_such(tmp_path, tiny_model_dir, tokenizer, capsys, monkeypatch):
    """Before: a 'size mismatch' RuntimeError traceback from load_state_dict."""
    out = finished_run(tmp_path, tiny_model_dir)
    wide = tmp_path / "wide"
    build_model(tokenizer, hidden_size=64, heads=2).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    monkeypatch.setattr("trl_sdft.trainer.SDFTTrainer.__init__", lambda *a, **k: pytest.fail("model loaded"))
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-2"), "--max_steps", "3"]
    code, captured = run_cli(cli_flags(tmp_path, str(wide), *resume), capsys)
    assert code == 2 and "was saved from another model (hidden_size 32 there, 64 here" in captured.err


def test_the_library_names_another_models_checkpoint_too(tokenizer, tiny_config, tmp_path):
    make(tokenizer, tiny_config, tmp_path, **EMA_SAVES).train()
    trainer = SDFTTrainer(
        model=build_model(tokenizer, hidden_size=64, heads=2),
        args=tiny_config(tmp_path, max_steps=3, teacher_model_kind="ema"),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match=r"checkpoint-2.* was saved from another model \(hidden_size 32 there"):
        trainer.train(resume_from_checkpoint=True)


def test_a_nested_checkpoint_config_of_the_same_model_is_not_another_model(tmp_path):
    """transformers saves some configs nested (`text_config`) that a model directory holds flat: the same model."""
    from trl_sdft.checkpoints import model_mismatch

    flat = {"model_type": "qwen2_vl", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 400}
    nested = {"model_type": "qwen2_vl", "text_config": {**flat, "model_type": "qwen2_vl_text"}}
    (tmp_path / "config.json").write_text(json.dumps(nested))
    assert model_mismatch(str(tmp_path), flat) is None
    assert "hidden_size 32 there, 64 here" in model_mismatch(str(tmp_path), {**flat, "hidden_size": 64})
