"""Teachers (`teachers.py`): which weights score the teacher prompt, the EMA rule, checkpoint and resume."""

import json
import os

import pytest
import torch
from datasets import Dataset

from trl_sdft import SDFTTrainer
from trl_sdft.testing import build_model, facts_rows, logged_losses, snapshot


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_ema_update_rule(tiny_model, tokenizer, tmp_path, use_lora, tiny_config, lora_config):
    """After one optimizer step: teacher = (1 - rate) * initial + rate * student."""
    rate = 0.25
    trainer = SDFTTrainer(
        model=tiny_model,
        args=tiny_config(tmp_path, teacher_model_kind="ema", teacher_update_rate=rate, max_steps=1),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        peft_config=lora_config() if use_lora else None,
    )
    if use_lora:
        params = dict(trainer.model.named_parameters())
        pairs = [(n, n.replace(".default.", ".teacher.")) for n in params if "lora_" in n and ".default." in n]
        initial = {t: params[t].detach().clone() for _, t in pairs}
        assert all(torch.equal(params[s], params[t]) for s, t in pairs)  # the EMA starts at the student
        assert not any(params[t].requires_grad for _, t in pairs)
        trainer.train()
        params = dict(trainer.model.named_parameters())
        for student, teacher in pairs:
            expected = (1 - rate) * initial[teacher] + rate * params[student]
            torch.testing.assert_close(params[teacher], expected)
        assert any(not torch.equal(params[s], initial[t]) for s, t in pairs if "lora_B" in s)
    else:
        initial = snapshot(trainer.teacher.model)
        trainer.train()
        student = dict(trainer.model.named_parameters())
        for name, param in trainer.teacher.model.named_parameters():
            torch.testing.assert_close(param, (1 - rate) * initial[name] + rate * student[name])


def test_base_teacher_under_lora_is_the_adapter_free_model(tiny_model_dir, tokenizer, tmp_path, trained, lora_config):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = trained(tiny_model_dir, tokenizer, tmp_path, peft_config=lora_config(), learning_rate=5e-2)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), trainer.teacher.context():
        teacher_logits = trainer.teacher.module(trainer.model)(input_ids=ids).logits
        with_adapter = None
    with torch.no_grad():
        with_adapter = trainer.model(input_ids=ids).logits
        torch.testing.assert_close(teacher_logits, reference(input_ids=ids).logits)
    assert not torch.allclose(with_adapter, teacher_logits)


def test_base_teacher_plain_model_stays_frozen(tiny_model, tokenizer, tmp_path, trained):
    initial = snapshot(tiny_model)
    trainer = trained(tiny_model, tokenizer, tmp_path, teacher_model_kind="base", learning_rate=5e-2)
    for name, param in trainer.teacher.model.named_parameters():
        assert torch.equal(param, initial[name])
    assert trainer.teacher.model is not trainer.model


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
def test_resume_with_ema_teacher_matches_uninterrupted_run(tokenizer, tmp_path, trained, tiny_config):
    common = dict(
        teacher_model_kind="ema",
        teacher_update_rate=0.5,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        distillation_mode="full_logits",
        distillation_alpha=0.5,
    )
    full = trained(build_model(tokenizer, init_range=0.2), tokenizer, tmp_path / "full", **common)
    from transformers import TrainerCallback

    class StopAfterTwo(TrainerCallback):  # an interruption: same schedule, stopped after the step-2 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True
                control.should_save = True

    first = SDFTTrainer(
        model=build_model(tokenizer, init_range=0.2),
        args=tiny_config(tmp_path / "resumed", **common),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        callbacks=[StopAfterTwo()],
    )
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "sdft_teacher.safetensors").exists()
    resumed = SDFTTrainer(
        model=build_model(tokenizer, init_range=0.2),
        args=tiny_config(tmp_path / "resumed", **common),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = logged_losses(full)[2:]
    got = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 2]
    assert len(got) == 2
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)
    for (name, a), b in zip(full.teacher.model.named_parameters(), resumed.teacher.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_refuses_checkpoint_without_teacher_state(tokenizer, tmp_path, trained, tiny_config):
    common = dict(teacher_model_kind="ema", max_steps=1, save_strategy="steps", save_steps=1)
    trained(build_model(tokenizer), tokenizer, tmp_path, **common)
    checkpoint = tmp_path / "checkpoint-1"
    os.remove(checkpoint / "sdft_teacher.safetensors")
    trainer = SDFTTrainer(
        model=build_model(tokenizer),
        args=tiny_config(tmp_path, **common),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="no EMA teacher state"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert (checkpoint / "model.safetensors").exists()  # nothing already written is touched


def test_checkpoint_metadata(tiny_model, tokenizer, tmp_path, trained, lora_config):
    trained(
        tiny_model,
        tokenizer,
        tmp_path,
        teacher_model_kind="ema",
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        peft_config=lora_config(),
    )
    checkpoint = tmp_path / "checkpoint-1"
    from safetensors.torch import load_file

    state = load_file(checkpoint / "sdft_teacher.safetensors")
    assert state and all(".teacher." in name for name in state)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1


@pytest.mark.parametrize(
    "lora_kwargs, message",
    [(dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(bias="all"), "bias='all'")],
)
def test_ema_adapter_limits(tiny_model, tokenizer, tmp_path, lora_kwargs, message, tiny_config):
    from peft import LoraConfig

    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", **lora_kwargs)
    with pytest.raises(ValueError, match=message):
        SDFTTrainer(
            model=tiny_model,
            args=tiny_config(tmp_path, teacher_model_kind="ema"),
            train_dataset=Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
            peft_config=config,
        )


@pytest.mark.parametrize(
    "kind, use_lora", [("base", False), ("ema", False), ("live", False), ("base", True), ("ema", True)]
)
def test_teacher_model_is_the_module_that_scores_the_teacher_prompt(
    tokenizer, tmp_path, tiny_config, lora_config, kind, use_lora
):
    """TRL's `trainer.teacher_model`: a separate frozen module for a full-model base/EMA teacher, the student itself
    for `live` and for PEFT students (whose teacher is an adapter switch)."""
    trainer = SDFTTrainer(
        model=build_model(tokenizer),
        args=tiny_config(tmp_path, teacher_model_kind=kind),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        peft_config=lora_config() if use_lora else None,
    )
    if kind == "live" or use_lora:
        assert trainer.teacher_model is trainer.model
    else:
        assert trainer.teacher_model is not trainer.model
        assert not any(p.requires_grad for p in trainer.teacher_model.parameters())


def test_a_student_that_already_has_an_adapter_is_warned_about(tokenizer, tmp_path, tiny_config, lora_config, caplog):
    from peft import get_peft_model

    student = get_peft_model(build_model(tokenizer), lora_config())
    with caplog.at_level("WARNING"):
        SDFTTrainer(
            model=student,
            args=tiny_config(tmp_path),
            train_dataset=Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
        )
    assert "already carries a PEFT adapter" in caplog.text


# ---------------------------------------------------------------------------------------------- protocol, registry
def test_unknown_teacher_kind_names_the_registered_kinds():
    from trl_sdft.teachers import TeacherContext, TeacherSettings, build_teacher

    with pytest.raises(ValueError, match="register_teacher") as error:
        build_teacher(TeacherContext(student=None, accelerator=None, settings=TeacherSettings(kind="nope")))
    for kind in ("'nope'", "'base'", "'live'", "'ema'", "'live@server'"):
        assert kind in str(error.value)
    with pytest.raises(ValueError, match="'ema@server'"):  # only the live student is scored on the server
        build_teacher(TeacherContext(None, None, TeacherSettings(kind="ema", on_server=True), scorer=object()))


def test_register_teacher_refuses_duplicates_unless_replace(monkeypatch):
    from trl_sdft import teachers

    monkeypatch.setattr(teachers, "TEACHERS", dict(teachers.TEACHERS))  # the registry is restored afterwards
    assert teachers.teacher_kinds() == ("base", "live", "ema")

    class Constant(teachers.Teacher):
        kind = "constant"

    teachers.register_teacher("constant", lambda context: Constant(context.settings))
    assert teachers.teacher_kinds() == ("base", "live", "ema", "constant")
    context = teachers.TeacherContext(None, None, teachers.TeacherSettings(kind="constant"))
    built = teachers.build_teacher(context)
    assert isinstance(built, Constant) and built.settings is context.settings and not built.moves
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        teachers.register_teacher("constant", lambda context: teachers.LiveTeacher(context.settings))
    with pytest.raises(ValueError, match="already registered"):
        teachers.register_teacher("base", lambda context: teachers.LiveTeacher(context.settings))
    assert isinstance(teachers.build_teacher(context), Constant)  # the refused factory did not replace it
    teachers.register_teacher("constant", lambda context: teachers.LiveTeacher(context.settings), replace=True)
    assert type(teachers.build_teacher(context)) is teachers.LiveTeacher


@pytest.mark.parametrize(
    "kind, use_lora, expected, moves",
    [
        ("live", False, "LiveTeacher", False),
        ("base", False, "FrozenCopyTeacher", False),
        ("ema", False, "EMACopyTeacher", True),
        ("live", True, "LiveTeacher", False),
        ("base", True, "AdapterOffTeacher", False),
        ("ema", True, "EMAAdapterTeacher", True),
    ],
)
def test_one_class_per_kind(tokenizer, lora_config, kind, use_lora, expected, moves):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft import get_peft_model

    from trl_sdft import teachers

    student = build_model(tokenizer)
    if use_lora:
        student = get_peft_model(student, lora_config())
    settings = teachers.TeacherSettings(kind=kind, update_rate=0.5)
    try:
        teacher = teachers.build_teacher(teachers.TeacherContext(student, Accelerator(cpu=True), settings))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert type(teacher).__name__ == expected
    assert (teacher.kind, teacher.moves, teacher.settings) == (kind, moves, settings)
    assert (teacher.state_dict() is not None) == moves  # only a moving teacher has state to checkpoint
    if expected.endswith("CopyTeacher"):
        assert teacher.module(student) is teacher.model is not student
        assert not any(p.requires_grad for p in teacher.model.parameters())
    else:
        assert teacher.module(student) is student


def test_score_forwards_the_teacher_module_without_gradients(tokenizer):
    from trl_sdft.teachers import FrozenCopyTeacher, TeacherSettings

    student, copy = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    teacher = FrozenCopyTeacher(copy, TeacherSettings(kind="base"))
    calls = []

    def view(module, inputs, teacher=False):
        calls.append((module, inputs, teacher, torch.is_grad_enabled()))
        return "logits"

    inputs = {"teacher_input_ids": torch.ones(1, 3, dtype=torch.long)}
    assert teacher.score(student, inputs, torch.ones(1, 2), 7, view) == "logits"
    assert calls == [(copy, inputs, True, False)]


def test_server_teacher_calls_its_scorer(tokenizer):
    """The server teacher scores through the rollout backend: the teacher prompt and mask of the batch, the top-k
    of its settings and the optimizer step (the scorer syncs the weights for it); it never forwards a module."""
    from trl_sdft.teachers import ServerTeacher, TeacherContext, TeacherSettings, build_teacher

    class FakeScorer:
        def __init__(self):
            self.calls = []

        def teacher_scores(self, teacher_input_ids, teacher_attention_mask, mask, top, step):
            self.calls.append((teacher_input_ids, teacher_attention_mask, mask, top, step))
            return "scores"

    scorer, student = FakeScorer(), build_model(tokenizer)
    settings = TeacherSettings(kind="live", on_server=True, server_topk=5)
    teacher = build_teacher(TeacherContext(student, None, settings, scorer))
    assert isinstance(teacher, ServerTeacher) and (teacher.kind, teacher.moves) == ("live", False)
    assert teacher.module(student) is student and teacher.state_dict() is None
    inputs = {"teacher_input_ids": torch.arange(6).view(2, 3), "teacher_attention_mask": torch.ones(2, 3)}
    mask = torch.tensor([[1, 0], [1, 1]])

    def view(*args, **kwargs):
        raise AssertionError("the server teacher forwards no module")

    assert teacher.score(student, inputs, mask, 11, view) == "scores"
    ((ids, attention, got_mask, top, step),) = scorer.calls
    assert ids is inputs["teacher_input_ids"] and attention is inputs["teacher_attention_mask"]
    assert got_mask is mask and (top, step) == (5, 11)
    unbound = build_teacher(TeacherContext(student, None, settings))  # the trainer binds its backend after
    with pytest.raises(RuntimeError, match="bind"):
        unbound.score(student, inputs, mask, 11, view)
    with pytest.raises(ValueError, match="teacher_scores"):
        unbound.bind(object())  # a backend that cannot score the teacher (transformers)
    unbound.bind(scorer)
    assert unbound.score(student, inputs, mask, 12, view) == "scores" and scorer.calls[-1][-1] == 12


def test_update_callback_moves_a_moving_teacher_every_sync_steps():
    from types import SimpleNamespace

    from trl_sdft.teachers import LiveTeacher, Teacher, TeacherSettings, TeacherUpdateCallback

    class Recording(Teacher):
        kind, moves = "ema", True

        def __init__(self, settings):
            super().__init__(settings)
            self.updates = []

        def update(self, student):
            self.updates.append(student)

    teacher = Recording(TeacherSettings(kind="ema", sync_steps=3))
    callback, still = TeacherUpdateCallback(teacher), TeacherUpdateCallback(LiveTeacher())
    for step in range(1, 8):
        state = SimpleNamespace(global_step=step)
        callback.on_step_end(None, state, None, model=f"student@{step}")
        still.on_step_end(None, state, None, model=f"student@{step}")  # a live teacher never updates: no error
    assert teacher.updates == ["student@3", "student@6"]


def _ema_checkpoint(tokenizer, tmp_path, trained, model=None):
    common = dict(teacher_model_kind="ema", max_steps=1, save_strategy="steps", save_steps=1)
    trained(model if model is not None else build_model(tokenizer), tokenizer, tmp_path, **common)
    return tmp_path / "checkpoint-1", common


def test_resume_refuses_an_ema_teacher_saved_from_another_model(tokenizer, tmp_path, trained, tiny_config):
    """A teacher file whose shapes do not fit the model is a clear error naming it, not a silent restart. (With its
    config.json the checkpoint is refused earlier, as another model's: without it, the teacher file's check is the
    one that speaks.)"""
    checkpoint, common = _ema_checkpoint(tokenizer, tmp_path, trained)
    (checkpoint / "config.json").unlink()
    trainer = SDFTTrainer(
        model=build_model(tokenizer, hidden_size=64, heads=2),
        args=tiny_config(tmp_path, **common),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
    )
    with pytest.raises(ValueError, match="does not match this run's EMA teacher: .*shape") as caught:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert str(checkpoint / "sdft_teacher.safetensors") in str(caught.value)


@pytest.mark.parametrize("damage", ["missing", "unknown", "nan"])
def test_resume_refuses_a_damaged_ema_teacher_file(tokenizer, tmp_path, trained, tiny_config, damage):
    from safetensors.torch import load_file, save_file

    checkpoint, common = _ema_checkpoint(tokenizer, tmp_path, trained)
    path = checkpoint / "sdft_teacher.safetensors"
    state = load_file(path)
    name = "model.layers.0.mlp.up_proj.weight"
    if damage == "missing":
        del state[name]
    elif damage == "unknown":
        state["model.layers.9.mlp.up_proj.weight"] = state[name].clone()
    else:
        state[name][0, 0] = float("nan")
    save_file(state, path)
    trainer = SDFTTrainer(
        model=build_model(tokenizer),
        args=tiny_config(tmp_path, **common),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
    )
    message = {"missing": "1 weight\\(s\\) missing", "unknown": "1 unknown weight", "nan": "NaN or inf"}[damage]
    with pytest.raises(ValueError, match=message):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_ema_teacher_with_tied_weights_saves_one_copy_and_loads_either_form(tokenizer, tmp_path, trained, tiny_config):
    from safetensors.torch import load_file, save_file

    checkpoint, common = _ema_checkpoint(tokenizer, tmp_path, trained, build_model(tokenizer, tie=True))
    path = checkpoint / "sdft_teacher.safetensors"
    state = load_file(path)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # tied: once
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, path)  # both names: fine too
    trainer = SDFTTrainer(
        model=build_model(tokenizer, tie=True, seed=1),
        args=tiny_config(tmp_path, **common),
        train_dataset=Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
    )
    assert trainer.teacher.load(str(checkpoint))
    teacher = trainer.teacher.model
    assert torch.equal(teacher.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
