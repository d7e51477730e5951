"""Quickstart: SDFT on a tiny Llama built locally (no download), on made-up facts.

The teacher sees each answer in its context; the student does not. Over training the student's distribution on its
own samples moves toward the teacher's: the logged KL(teacher || student) falls.
"""

import tempfile

from datasets import Dataset

from trl_sdft import SDFTConfig, SDFTTrainer
from trl_sdft.testing import build_model, build_tokenizer, facts_rows


def main():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, init_range=0.2)
    config = SDFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sdft-quickstart-"),
        max_steps=40,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        learning_rate=3e-3,
        distillation_mode="full_logits",
        distillation_alpha=0.0,
        teacher_model_kind="base",
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        use_cpu=True,
    )
    trainer = SDFTTrainer(model, args=config, train_dataset=Dataset.from_list(facts_rows()), processing_class=tokenizer)
    trainer.train()
    kl = [
        entry["self_distillation/teacher_student_kl"]
        for entry in trainer.state.log_history
        if "self_distillation/teacher_student_kl" in entry
    ]
    print(f"\nKL(teacher || student) per token: first log {kl[0]:.3f} -> last log {kl[-1]:.3f}")
    print("Greedy answer to 'What color is Zorbo?':", repr(trainer.generate("What color is Zorbo?", do_sample=False)))


if __name__ == "__main__":
    main()
