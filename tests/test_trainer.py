"""Training runs on a tiny Llama: every mode x teacher x LoRA, buffering, hooks, EMA, resume, eval, generate."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from trl_sdft import SDFTTrainer, SelfDistillationCallback
from trl_sdft.batch import left_pad, right_pad, tokenize_prompts
from trl_sdft.testing import build_model, completion_logits, facts_rows, logged_losses, snapshot

MODES = [("topk_logits", 0.5), ("full_logits", 0.0), ("sampled_token", 1.0)]


@pytest.mark.parametrize("mode, alpha", MODES)
@pytest.mark.parametrize("kind", ["base", "live", "ema"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train_every_mode_teacher_and_lora(
    tiny_model,
    tokenizer,
    tmp_path,
    mode,
    alpha,
    kind,
    use_lora,
    trained,
    lora_config,
):
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
    history = logged_losses(trainer)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history)))
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    after = dict(trainer.model.named_parameters())
    if use_lora:  # LoRA's B matrices start at zero; the base weights are frozen
        changed = [n for n in trainable if "lora_B" in n and not torch.equal(after[n], torch.zeros_like(after[n]))]
        assert trainable and all("lora_" in n for n in trainable)
    else:
        changed = [n for n in trainable if not torch.equal(after[n], before[n])]
    assert changed, "no trainable parameter changed"
    kl_metric = [e["self_distillation/teacher_student_kl"] for e in trainer.state.log_history if "loss" in e]
    assert len(kl_metric) == 2 and all(value >= 0 for value in kl_metric)


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
    p_ids, p_mask = left_pad(tokenize_prompts(tok, prompts), tok.pad_token_id, device)
    t_ids, t_mask = left_pad(tokenize_prompts(tok, teacher_prompts), tok.pad_token_id, device)
    c_ids, c_mask = right_pad(completions, tok.pad_token_id, device)
    n = c_ids.size(1)
    with torch.no_grad():
        s = completion_logits(trainer.model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), n)
        with trainer.teacher.context():
            t = completion_logits(
                trainer.teacher.module(trainer.model), torch.cat([t_ids, c_ids], 1), torch.cat([t_mask, c_mask], 1), n
            )
    from trl_sdft.losses import teacher_student_kl

    return teacher_student_kl(s, t, c_mask).item()


@pytest.mark.slow  # over 2 s alone on 2 cores: not in `make test-fast`
@pytest.mark.parametrize("mode, alpha", MODES)
def test_loss_falls_on_toy_task(tokenizer, tmp_path, mode, alpha, tiny_config):
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


def test_chat_prompts_with_system_turns(tiny_model, tokenizer, tmp_path, trained):
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
    assert len(logged_losses(trainer)) == 2
    assert seen[0][0] == {"role": "system", "content": "Answer briefly."}
    assert seen[0][1]["content"].startswith("<Question>\nWhat color is")


@pytest.mark.parametrize(
    "steps_per_generation, num_iterations, grad_accum, max_steps",
    [(1, 1, 1, 4), (2, 1, 2, 2), (2, 2, 2, 4), (4, 1, 1, 4)],
)
def test_buffering_generates_the_expected_number_of_times(
    tiny_model,
    tokenizer,
    tmp_path,
    steps_per_generation,
    num_iterations,
    grad_accum,
    max_steps,
    trained,
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


def test_evaluation_reports_distillation_loss(tiny_model, tokenizer, tmp_path, tiny_config):
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


def test_generate_and_model_card(tiny_model_dir, tokenizer, tmp_path, trained):
    trainer = trained(tiny_model_dir, tokenizer, tmp_path, max_steps=1)
    messages = [{"role": "user", "content": "What color is Zorbo?"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    model = trainer.model
    # Text is one user turn through the chat template (the tokenizer has one), as messages are: it was tokenized as
    # it is, and a chat model answered a bare string with an empty reply.
    for query in ("What color is Zorbo?", messages):
        was_training = model.training
        answer = trainer.generate(query, max_new_tokens=5, do_sample=False)
        assert model.training == was_training  # restored after generating
        output = model.generate(**chat, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(output[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    trainer.save_model(str(tmp_path / "final"))
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "2601.19897" in card and "SDFT" in card


def test_generate_samples_as_training_does_unless_told(tiny_model_dir, tokenizer, tmp_path, trained, monkeypatch):
    trainer = trained(tiny_model_dir, tokenizer, tmp_path, max_steps=1, temperature=0.7, top_p=0.9)
    model = trainer.accelerator.unwrap_model(trainer.model)
    seen = []
    real_generate = model.generate

    def recorded(*args, generation_config=None, **kwargs):
        seen.append((generation_config, kwargs["input_ids"]))
        return real_generate(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(model, "generate", recorded)
    trainer.generate("What color is Zorbo?")
    config = seen[-1][0]
    assert config.do_sample and config.temperature == 0.7 and config.top_p == 0.9
    assert config.max_new_tokens == trainer.args.max_completion_length
    trainer.generate("What color is Zorbo?", max_new_tokens=3, temperature=0.2)
    assert seen[-1][0].temperature == 0.2 and seen[-1][0].max_new_tokens == 3 and seen[-1][0].top_p == 0.9
    trainer.generate("What color is Zorbo?", do_sample=False)
    assert not seen[-1][0].do_sample and seen[-1][0].temperature is None
    assert trainer.generation_config.temperature == 0.7  # the training's own config is untouched
    with pytest.raises(ValueError, match="temprature"):
        trainer.generate("What color is Zorbo?", temprature=0.5)
    trainer.processing_class.chat_template = None  # no template: text goes as it is
    trainer.generate("What color is Zorbo?", max_new_tokens=2)
    assert seen[-1][1].tolist() == [tokenizer("What color is Zorbo?")["input_ids"]]


def test_model_path_and_default_args(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from trl_sdft import SDFTConfig

    # The default max_completion_length (256) would fill the tiny model's whole context: refused, with the fix.
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        SDFTTrainer(model=tiny_model_dir, train_dataset=Dataset.from_list(facts_rows()), processing_class=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(tmp_path / "long-context")
    trainer = SDFTTrainer(
        model=str(tmp_path / "long-context"), train_dataset=Dataset.from_list(facts_rows()), processing_class=tokenizer
    )
    assert isinstance(trainer.args, SDFTConfig)
    assert trainer.args.output_dir.endswith("-SDFT")
    assert trainer.model.config.pad_token_id == tokenizer.pad_token_id


def test_skipped_tokens_leave_loss_zero_when_nothing_remains(tiny_model, tokenizer, tmp_path, make_trainer):
    """Completions that end within the skipped tokens leave nothing: zero loss, not an error. (A skip count that
    covers `max_completion_length` is refused by the config; completions that stop early reach this at run time.)"""
    trainer = make_trainer(tiny_model, tokenizer, tmp_path, Dataset.from_list(facts_rows()))
    trainer.args.max_steps, trainer.args.num_loss_tokens_to_skip = 1, 100  # as if every completion had stopped early
    trainer.train()
    assert logged_losses(trainer) == [0.0]


@pytest.mark.parametrize("support", ["teacher", "union"])
def test_topk_support_choices_train(tiny_model, tokenizer, tmp_path, support, trained):
    trainer = trained(
        tiny_model,
        tokenizer,
        tmp_path,
        distillation_mode="topk_logits",
        distillation_topk=5,
        distillation_topk_support=support,
        distillation_add_tail=True,
    )
    history = logged_losses(trainer)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(history))) and all(h >= 0 for h in history)


def test_dataset_smaller_than_a_generation_batch(tokenizer, tmp_path, make_trainer, exploding_model):
    # tiny_config: 4 completions per step, 2 per prompt -> 2 distinct prompts; one row could never fill a batch
    with pytest.raises(ValueError, match="has 1 rows but one generation batch takes 2 distinct prompts"):
        make_trainer(exploding_model, tokenizer, tmp_path, Dataset.from_list(facts_rows(1)))


def test_missing_train_dataset(tokenizer, tmp_path, make_trainer, exploding_model):
    with pytest.raises(ValueError, match="train_dataset"):
        make_trainer(exploding_model, tokenizer, tmp_path, None)
