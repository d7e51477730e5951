"""`configs/paper.yaml`: the original SDFT recipe, and a check that each of its settings takes effect in training."""

import math
import pathlib

import torch
from datasets import Dataset
from transformers import get_cosine_schedule_with_warmup

from trl_sdft import SDFTTrainer, cli
from trl_sdft.batch import assemble_batch, teacher_prompts, tokenize_prompts
from trl_sdft.losses import kl, sequence_mean
from trl_sdft.prompts import DEMONSTRATION_TEMPLATE, resolve_teacher_prompt_template
from trl_sdft.testing import completion_logits, facts_rows, snapshot

PAPER = pathlib.Path(__file__).resolve().parents[1] / "configs" / "paper.yaml"


def paper_trainer(model, tokenizer, tmp_path, steps=10):
    """The paper's config, with only what a tiny CPU run needs changed: output, steps, batch, lengths, precision."""
    flags = ["--config", str(PAPER), "--output_dir", str(tmp_path), "--max_steps", str(steps)]
    flags += ["--per_device_train_batch_size", "4", "--max_completion_length", "8", "--use_cpu", "--bf16", "false"]
    flags += ["--logging_steps", "1", "--disable_tqdm", "true"]
    _, args, _ = cli.parse(flags)
    return SDFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(facts_rows()), processing_class=tokenizer
    )


def test_the_recipe_reads_as_the_original():
    _, args, _ = cli.parse(["--config", str(PAPER), "--use_cpu"])
    assert (args.distillation_mode, args.distillation_alpha, args.num_loss_tokens_to_skip) == ("full_logits", 0.0, 3)
    assert (args.teacher_model_kind, args.teacher_update_rate, args.teacher_sync_steps) == ("ema", 0.01, 1)
    assert args.num_generations == 1 and not args.generate_from_teacher
    assert resolve_teacher_prompt_template(args.teacher_prompt_template) == DEMONSTRATION_TEMPLATE
    assert args.learning_rate in (5e-6, 1e-5, 5e-5)
    assert (str(args.lr_scheduler_type).split(".")[-1].lower(), args.warmup_steps, args.max_grad_norm) == (
        "cosine",
        0.1,
        1.0,
    )


def test_the_loss_is_forward_kl_past_the_first_three_tokens_with_the_demonstration(tiny_model, tokenizer, tmp_path):
    trainer = paper_trainer(tiny_model, tokenizer, tmp_path)
    rows = facts_rows(4)
    prompts = [r["prompt"] for r in rows]
    teacher = teacher_prompts(prompts, [r["privileged_context"] for r in rows], trainer.teacher_prompt_template)
    assert all("This is an example for a response to the question" in t for t in teacher)
    completions = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17, 18, 19, 20, 21]]
    batch = assemble_batch(
        tokenize_prompts(tokenizer, prompts), tokenize_prompts(tokenizer, teacher), completions, 0, "cpu"
    )
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        n = batch["completion_ids"].size(1)
        student = completion_logits(
            trainer.model,
            torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
            n,
        )
        teacher_logits = completion_logits(
            trainer.teacher.model, batch["teacher_input_ids"], batch["teacher_attention_mask"], n
        )
    per_token = kl(teacher_logits.log_softmax(-1), student.log_softmax(-1))  # KL(teacher || student), full vocabulary
    mask = batch["completion_mask"].clone()
    mask[:, :3] = 0  # the first three completion tokens are skipped; the second row keeps none
    torch.testing.assert_close(loss, sequence_mean(per_token, mask), atol=1e-5, rtol=1e-5)


def test_ema_every_step_at_one_percent_and_a_cosine_schedule_with_warm_up(tiny_model, tokenizer, tmp_path):
    steps = 10
    trainer = paper_trainer(tiny_model, tokenizer, tmp_path, steps=steps)
    teacher_before = snapshot(trainer.teacher.model)
    student_before = snapshot(trainer.model)
    trainer.train()
    # After step 1 the teacher is 0.99 teacher + 0.01 student, after every step: unrolled over the run, the teacher
    # stays within 1 - 0.99^10 (about 10%) of the way from the initial weights toward the student.
    student_after = dict(trainer.model.named_parameters())
    moved = 0.0
    for name, param in trainer.teacher.model.named_parameters():
        travel = (student_after[name] - student_before[name]).abs().sum()
        if travel > 0:
            share = ((param - teacher_before[name]).abs().sum() / travel).item()
            assert share <= 1 - 0.99**steps + 1e-3, name
            moved = max(moved, share)
    assert moved > 0.5 * 0.01, "the EMA teacher did not move"
    # The learning rates the trainer logged are those of a cosine schedule with 10% warm-up.
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=trainer.args.learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.1 * steps), steps)
    expected = []
    for _ in range(steps):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert len(logged) == steps and logged[0] == 0.0  # warm-up starts at zero
    torch.testing.assert_close(torch.tensor(logged, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))
    grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(grad_norms) == steps and trainer.args.max_grad_norm == 1.0
