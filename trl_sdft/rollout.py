"""Rollout backends: sample completions for a batch of tokenized prompts.

Every backend has one call, `generate(model, prompt_ids, num_generations, step) -> Rollouts`: `prompt_ids` are
the token ids of each prompt (already repeated `num_generations` times by the sampler), `step` the optimizer step of
the weights to sample with; each completion ends at its first end-of-sequence token, and engines that report their
own log-probs of the sampled tokens (vLLM) return them too. `TransformersRollout` (here)
samples with `model.generate`; `vllm_rollout.VLLMRollout` with a colocated or a server vLLM engine.
"""

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from transformers import GenerationConfig
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation

from .batch import left_pad

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "cache_implementation")


class Rollouts(NamedTuple):
    """What a backend's `generate` returns: the completions' token ids, each cut after its first end-of-sequence token,
    and, from engines that report them (vLLM), the engine's log-prob of each of those tokens."""

    completions: list[list[int]]
    logprobs: list[list[float]] | None = None


class VLLMServerError(RuntimeError):
    """The vLLM server cannot be used: unreachable, a different model, or it stopped answering (`vllm_rollout.py`)."""


def cut_at_eos(rows: Iterable[Sequence[int]], eos_token_ids: Iterable[int]) -> list[list[int]]:
    """Each row up to and including its first end-of-sequence token (all of it if none)."""
    ends = set(eos_token_ids)
    completions = []
    for row in rows:
        row = list(row)
        end = next((position + 1 for position, token in enumerate(row) if token in ends), len(row))
        completions.append(row[:end])
    return completions


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end id the model declares (e.g. end-of-turn) plus the tokenizer's."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    return ids


def sampling_config(args, tokenizer, eos_ids: list[int]) -> GenerationConfig:
    """The rollouts' `GenerationConfig`: the config's sampling fields, then `generation_kwargs` over them."""
    kwargs = dict(
        max_new_tokens=args.max_completion_length,
        do_sample=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        **{name: getattr(args, name) for name in SAMPLING_FIELDS},
    )
    kwargs.update(args.generation_kwargs or {})
    return GenerationConfig(**kwargs, disable_compile=True)


class TransformersRollout:
    """Sampling with `model.generate`, under TRL's `unwrap_model_for_generation` (ZeRO-3 weights gathered).

    FSDP: version 1 wraps modules so that `generate` would see flat shards; its full parameters are summoned for the
    call. Version 2 (`fully_shard`, what `configs/accelerate/fsdp.yaml` selects) unshards each module in its own forward
    pre-hook, so `generate` needs nothing extra. TRL's `DistributedBackend.summon_full_params` does exactly this
    (summon for v1, no-op for v2). Checked by reading torch's and TRL's code: FSDP cannot run on a CPU (accelerate and
    the HF Trainer use it only on GPUs), so no test here exercises it.
    """

    def __init__(self, accelerator, generation_config, eos_ids, pad_token_id, gather_deepspeed3_params=True):
        self.accelerator = accelerator
        self.generation_config = generation_config
        self.eos_token_ids = eos_ids
        self.pad_token_id = pad_token_id
        self.gather_deepspeed3_params = gather_deepspeed3_params
        self.distributed = DistributedBackend(accelerator)

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], num_generations: int = 1, step: int | None = None):
        """Completions for `prompt_ids` (repeated by the sampler, so `num_generations` and `step` are not needed)."""
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id, self.accelerator.device)
        with (
            unwrap_model_for_generation(
                model, self.accelerator, gather_deepspeed3_params=self.gather_deepspeed3_params
            ) as unwrapped,
            self.distributed.summon_full_params(model, recurse=False),
        ):
            output = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        return Rollouts(cut_at_eos(output[:, input_ids.size(1) :].tolist(), self.eos_token_ids))
