"""The "transformers" rollout backend: sampling with `model.generate`."""

from __future__ import annotations

import copy

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from trl.distributed import DistributedBackend
from trl.models import unwrap_model_for_generation

from ..batch import left_pad
from .base import RolloutContext, Rollouts, cut_at_eos, sampling_config


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

    @classmethod
    def from_context(cls, context: RolloutContext) -> TransformersRollout:
        """The backend `build_rollout` makes: the sampling config of `context.settings`."""
        settings, eos_ids = context.settings, list(context.eos_token_ids)
        return cls(
            context.accelerator,
            sampling_config(settings, context.tokenizer, eos_ids),
            eos_ids,
            context.tokenizer.pad_token_id,
            settings.gather_deepspeed3_params,
        )

    @torch.no_grad()
    def generate(
        self,
        model,
        prompt_ids: list[list[int]],
        num_generations: int = 1,
        step: int | None = None,
        max_new_tokens: list[int] | None = None,
    ):
        """Completions for `prompt_ids` (repeated by the sampler, so `num_generations` and `step` are not needed), each
        row stopped at its `max_new_tokens` entry (the batch decodes only as far as its largest budget)."""
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id, self.accelerator.device)
        config, budgets = self.generation_config, {}
        if max_new_tokens is not None and getattr(config, "num_return_sequences", 1) in (None, 1):
            most = max(max_new_tokens)
            config = copy.copy(config)  # the call's lengths in its own config (transformers deprecates both at once)
            config.max_new_tokens = most
            if (config.min_new_tokens or 0) > most:  # a forced length cannot outgrow the room left
                config.min_new_tokens = most
            budgets["stopping_criteria"] = StoppingCriteriaList([RowBudgets(max_new_tokens, input_ids.size(1))])
        with (
            unwrap_model_for_generation(
                model, self.accelerator, gather_deepspeed3_params=self.gather_deepspeed3_params
            ) as unwrapped,
            self.distributed.summon_full_params(model, recurse=False),
        ):
            output = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **budgets
            )
        rows = output[:, input_ids.size(1) :].tolist()
        if max_new_tokens is not None:  # a row stopped by its budget is padded after it: cut before looking for ends
            rows = [row[:budget] for row, budget in zip(rows, max_new_tokens, strict=True)]
        return Rollouts(cut_at_eos(rows, self.eos_token_ids))

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str | None:
        return None


class RowBudgets(StoppingCriteria):
    """Stops each row of a batched `generate` once it has `budgets[row]` new tokens (transformers then pads it)."""

    def __init__(self, budgets: list[int], prompt_width: int):
        self.budgets = torch.tensor(budgets)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        budgets = self.budgets.to(input_ids.device)
        return (input_ids.size(1) - self.prompt_width) >= budgets
