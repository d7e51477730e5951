"""What several benchmarks measure the same way: step times, the time spent in one method, the completion tokens each
step trained on, and the forced-length SDFT config of the step benchmarks. Imported as `bench_common` (each script puts
`benchmarks/` on its path)."""

import time

from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """The wall time of every optimizer step, in `times`."""

    def __init__(self):
        self.times, self._start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def timed(owner, name: str, bucket: list) -> None:
    """Replace `owner.name` by a wrapper that appends the seconds of every call to `bucket`."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            bucket.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def count_tokens(trainer, bucket: list) -> None:
    """Append to `bucket` the completion tokens of every batch the trainer's loss is computed on."""
    compute_loss = trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        bucket.append(int(inputs["completion_mask"].sum()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted


def forced_length_fields(output_dir: str, tokens: int, **fields) -> dict:
    """`SDFTConfig` fields of a step benchmark on SmolLM2-135M: full fine-tuning in float32 on the CPU, 8 rollouts
    of exactly `tokens` tokens (`min_new_tokens`) per step, nothing saved or reported; `fields` add or override."""
    return {
        "output_dir": output_dir,
        "use_cpu": True,
        "reuse_cpu_memory": True,  # as the figures were measured (the CLI's setting)
        "bf16": False,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": tokens,
        "generation_kwargs": {"min_new_tokens": tokens},
        "learning_rate": 1e-5,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        **fields,
    }
