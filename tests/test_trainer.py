"""Training runs on a tiny Llama: every mode x teacher x LoRA, buffering, hooks, EMA, resume, eval, generate."""

import json
import os

import pytest
import torch
from conftest import tiny_config
from datasets import Dataset

from trl_sdft import SDFTTrainer, SelfDistillationCallback
from trl_sdft.rollout import left_pad, right_pad
from trl_sdft.testing import build_model, facts_rows

MODES = [("topk_logits", 0.5), ("full_logits", 0.0), ("sampled_token", 1.0)]


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kwargs)


def trained(model, tokenizer, tmp_path, dataset=None, peft_config=None, callbacks=None, **overrides):
    trainer = SDFTTrainer(
        model=model,
        args=tiny_config(tmp_path, **overrides),
        train_dataset=dataset if dataset is not None else Dataset.from_list(facts_rows()),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def losses_of(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode, alpha", MODES)
@pytest.mark.parametrize("kind", ["base", "live", "ema"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train_every_mode_teacher_and_lora(tiny_model, tokenizer, tmp_path, mode, alpha, kind, use_lora):
    before = snapshot(tiny_model)
    trainer = trained(
        tiny_model,
        tokenizer,
        tmp_path,
        distillation_mode=mode,
        distillation_alpha=alpha,
        teacher_model_kind=kind,
        peft_config=lora_config() if use_lora else None,
    )
    history = losses_of(trainer)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    changed = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert changed, "nothing was trained"
    after = dict(trainer.model.named_parameters())
    if use_lora:
        assert any(not torch.equal(after[n], torch.zeros_like(after[n])) for n in changed if "lora_B" in n)
    else:
        assert any(not torch.equal(after[n], before[n]) for n in changed)
    kl_metric = [e["self_distillation/teacher_student_kl"] for e in trainer.state.log_history if "loss" in e]
    assert all(value >= 0 for value in kl_metric)


def fixed_kl(trainer, rows):
    """Mean teacher-student KL on fixed (prompt, demonstration) sequences: no sampling noise."""
    tok, device = trainer._tokenizer, trainer.accelerator.device
    prompts = [r["prompt"] for r in rows]
    from trl_sdft.prompts import build_teacher_prompt

    teacher_prompts = [
        build_teacher_prompt(r["prompt"], r["privileged_context"], trainer.teacher_prompt_template) for r in rows
    ]
    completions = [
        tok(" " + r["privileged_context"].split(". ")[0] + ".", add_special_tokens=False)["input_ids"] for r in rows
    ]
    p_ids, p_mask = left_pad(trainer._tokenize(prompts, None), tok.pad_token_id, device)
    t_ids, t_mask = left_pad(trainer._tokenize(teacher_prompts, None), tok.pad_token_id, device)
    c_ids, c_mask = right_pad(completions, tok.pad_token_id, device)
    n = c_ids.size(1)
    with torch.no_grad():
        s = trainer._completion_logits(trainer.model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), n)
        with trainer.teacher.context():
            t = trainer._completion_logits(
                trainer.teacher.module(trainer.model), torch.cat([t_ids, c_ids], 1), torch.cat([t_mask, c_mask], 1), n
            )
    from trl_sdft.losses import teacher_student_kl

    return teacher_student_kl(s, t, c_mask).item()


@pytest.mark.parametrize("mode, alpha", MODES)
def test_loss_falls_on_toy_task(tokenizer, tmp_path, mode, alpha):
    """The teacher sees the answer in context; the student learns to answer like it without the context."""
    rows = facts_rows()
    model = build_model(tokenizer, init_range=0.2)
    trainer = SDFTTrainer(
        model=model,
        args=tiny_config(
            tmp_path,
            distillation_mode=mode,
            distillation_alpha=alpha,
            max_steps=30,
            learning_rate=3e-3,
            per_device_train_batch_size=8,
            num_generations=4,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    start = fixed_kl(trainer, rows)
    trainer.train()
    end = fixed_kl(trainer, rows)
    assert end < 0.8 * start, (start, end)
    logged = [e["self_distillation/teacher_student_kl"] for e in trainer.state.log_history if "loss" in e]
    assert sum(logged[-5:]) < sum(logged[:5])


def test_chat_prompts_with_system_turns(tiny_model, tokenizer, tmp_path):
    rows = facts_rows(chat=True)
    for row in rows:
        row["prompt"] = [{"role": "system", "content": "Answer briefly."}, *row["prompt"]]
    seen = []

    class Spy(SelfDistillationCallback):
        def on_generation_prompts_selected(self, args, state, control, generation_prompts=None, **kwargs):
            seen.extend(generation_prompts)

    trainer = trained(
        tiny_model,
        tokenizer,
        tmp_path,
        dataset=Dataset.from_list(rows),
        callbacks=[Spy()],
        generate_from_teacher=True,
        teacher_prompt_template="demonstration",
    )
    assert len(losses_of(trainer)) == 2
    assert seen[0][0] == {"role": "system", "content": "Answer briefly."}
    assert seen[0][1]["content"].startswith("<Question>\nWhat color is")


@pytest.mark.parametrize(
    "steps_per_generation, num_iterations, grad_accum, max_steps",
    [(1, 1, 1, 4), (2, 1, 2, 2), (2, 2, 2, 4), (4, 1, 1, 4)],
)
def test_buffering_generates_the_expected_number_of_times(
    tiny_model, tokenizer, tmp_path, steps_per_generation, num_iterations, grad_accum, max_steps
):
    built, payloads = [], []

    class Counter(SelfDistillationCallback):
        def on_generation_batch_built(self, args, state, control, **kwargs):
            built.append(kwargs)

        def on_self_distillation_batch_prepared(self, args, state, control, **kwargs):
            payloads.append(kwargs)

    trainer = trained(
        tiny_model,
        tokenizer,
        tmp_path,
        callbacks=[Counter()],
        per_device_train_batch_size=2,
        num_generations=2,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
        gradient_accumulation_steps=grad_accum,
        max_steps=max_steps,
    )
    micro_steps = max_steps * grad_accum
    expected = micro_steps // (steps_per_generation * num_iterations)
    assert trainer.num_generation_rounds == expected == len(built)
    assert built[0]["generate_every"] == steps_per_generation * num_iterations
    assert built[0]["steps_per_generation"] == steps_per_generation
    # One generation round holds every slice of the round: per_device batch x steps_per_generation rows.
    assert payloads[0]["completion_ids"].shape[0] == 2 * steps_per_generation
    # Rollouts reused after an optimizer step carry their sampling log-probs for importance-sampling clipping.
    reused = grad_accum % (steps_per_generation * num_iterations) != 0
    assert (payloads[0]["old_per_token_logps"] is not None) == reused


def test_hooks_fire_with_payloads(tiny_model, tokenizer, tmp_path):
    events = []

    class Recorder(SelfDistillationCallback):
        def on_generation_prompts_selected(self, args, state, control, **kwargs):
            events.append(("selected", kwargs))

        def on_generation_batch_built(self, args, state, control, **kwargs):
            events.append(("built", kwargs))

        def on_self_distillation_batch_prepared(self, args, state, control, **kwargs):
            events.append(("prepared", kwargs))

    class PlainCallback:  # any object with the method gets it, as in TRL
        calls = 0

        def on_generation_batch_built(self, **kwargs):
            PlainCallback.calls += 1

        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *a, **k: None
            raise AttributeError(name)

    trained(tiny_model, tokenizer, tmp_path, callbacks=[Recorder(), PlainCallback()], max_steps=1)
    names = [name for name, _ in events]
    assert names == ["selected", "prepared", "built"]
    selected, prepared, built = (payload for _, payload in events)
    assert selected["generation_prompts"][0].startswith("What color is") and selected["generation_prompt_text"] is None
    assert {"model", "processing_class"} <= set(selected)
    assert set(prepared) >= {
        "old_per_token_logps",
        "prompt_ids",
        "completion_ids",
        "teacher_input_ids",
        "teacher_attention_mask",
    }
    assert prepared["teacher_input_ids"].shape[1] > prepared["prompt_ids"].shape[1]
    assert built["generate_every"] == 1
    assert PlainCallback.calls == 1


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_ema_update_rule(tiny_model, tokenizer, tmp_path, use_lora):
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


def test_base_teacher_under_lora_is_the_adapter_free_model(tiny_model_dir, tokenizer, tmp_path):
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


def test_base_teacher_plain_model_stays_frozen(tiny_model, tokenizer, tmp_path):
    initial = snapshot(tiny_model)
    trainer = trained(tiny_model, tokenizer, tmp_path, teacher_model_kind="base", learning_rate=5e-2)
    for name, param in trainer.teacher.model.named_parameters():
        assert torch.equal(param, initial[name])
    assert trainer.teacher.model is not trainer.model


def test_resume_with_ema_teacher_matches_uninterrupted_run(tokenizer, tmp_path):
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
    expected = losses_of(full)[2:]
    got = [e["loss"] for e in resumed.state.log_history if "loss" in e and e["step"] > 2]
    assert len(got) == 2
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-7)
    for (name, a), b in zip(full.teacher.model.named_parameters(), resumed.teacher.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_refuses_checkpoint_without_teacher_state(tokenizer, tmp_path):
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


def test_evaluation_reports_distillation_loss(tiny_model, tokenizer, tmp_path):
    trainer = SDFTTrainer(
        model=tiny_model,
        args=tiny_config(
            tmp_path,
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=4,
            num_generations_eval=2,
            max_steps=1,
        ),
        train_dataset=Dataset.from_list(facts_rows()),
        eval_dataset={"facts": Dataset.from_list(facts_rows(4))},
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_facts_loss" in metrics and metrics["eval_facts_loss"] >= 0
    logged = [e for e in trainer.state.log_history if "eval_self_distillation/distillation_loss" in e]
    assert logged and all(e["eval_self_distillation/distillation_loss"] >= 0 for e in logged)
    assert all("eval_completions/mean_length" in e for e in logged)


def test_generate_and_model_card(tiny_model_dir, tokenizer, tmp_path):
    trainer = trained(tiny_model_dir, tokenizer, tmp_path, max_steps=1)
    answer = trainer.generate("What color is Zorbo?", max_new_tokens=5)
    assert isinstance(answer, str)
    chat_answer = trainer.generate([{"role": "user", "content": "What color is Zorbo?"}], max_new_tokens=5)
    assert isinstance(chat_answer, str)
    assert answer == trainer.generate("What color is Zorbo?", max_new_tokens=5)  # greedy: deterministic
    trainer.save_model(str(tmp_path / "final"))
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "2601.19897" in card and "SDFT" in card


def test_model_path_and_default_args(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from trl_sdft import SDFTConfig

    trainer = SDFTTrainer(
        model=tiny_model_dir, train_dataset=Dataset.from_list(facts_rows()), processing_class=tokenizer
    )
    assert isinstance(trainer.args, SDFTConfig)
    assert trainer.args.output_dir.endswith("-SDFT")
    assert trainer.model.config.pad_token_id == tokenizer.pad_token_id


def test_skipped_tokens_leave_loss_zero_when_nothing_remains(tiny_model, tokenizer, tmp_path):
    trainer = trained(tiny_model, tokenizer, tmp_path, num_loss_tokens_to_skip=100, max_steps=1)
    assert losses_of(trainer) == [0.0]


def test_checkpoint_metadata(tiny_model, tokenizer, tmp_path):
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


@pytest.mark.parametrize("support", ["teacher", "union"])
def test_topk_support_choices_train(tiny_model, tokenizer, tmp_path, support):
    trainer = trained(
        tiny_model,
        tokenizer,
        tmp_path,
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_topk_support=support,
        distillation_add_tail=True,
    )
    history = losses_of(trainer)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history))) and all(h >= 0 for h in history)
