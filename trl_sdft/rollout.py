"""Rollout backends: sample completions for a batch of tokenized prompts.

`TransformersRollout` uses `model.generate` through TRL's `unwrap_model_for_generation` (DeepSpeed/FSDP aware).
"""

from contextlib import nullcontext

import torch
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad


class VLLMServerError(RuntimeError):
    """The vLLM server cannot be used: unreachable, a different model, or it stopped answering (`vllm_rollout.py`)."""


def cut_at_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row up to and including its first end-of-sequence token (all of it if none)."""
    rows = []
    eos = torch.tensor(eos_token_ids, device=completion_ids.device)
    for row in completion_ids:
        hits = torch.isin(row, eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else row.numel()
        rows.append(row[:end].tolist())
    return rows


def left_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask for a list of token-id lists."""
    tensors = [torch.tensor(ids, dtype=torch.long) for ids in sequences]
    ids = pad(tensors, padding_value=pad_token_id, padding_side="left").to(device)
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(device)
    return ids, mask


def right_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask; an all-empty batch gives one padded column so shapes stay valid."""
    tensors = [torch.tensor(ids if ids else [pad_token_id], dtype=torch.long) for ids in sequences]
    masks = [torch.tensor([1] * len(ids) if ids else [0], dtype=torch.long) for ids in sequences]
    ids = pad(tensors, padding_value=pad_token_id, padding_side="right").to(device)
    mask = pad(masks, padding_value=0, padding_side="right").to(device)
    return ids, mask


class TransformersRollout:
    """Sampling with `model.generate`."""

    def __init__(self, accelerator, generation_config, eos_token_ids, pad_token_id, gather_deepspeed3_params=True):
        self.accelerator = accelerator
        self.generation_config = generation_config
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.gather_deepspeed3_params = gather_deepspeed3_params

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], generation_config=None) -> list[list[int]]:
        generation_config = generation_config or self.generation_config
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id, self.accelerator.device)
        fsdp = getattr(self.accelerator.state, "fsdp_plugin", None) is not None
        if fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel

            full_params = FullyShardedDataParallel.summon_full_params(model, recurse=False)
        else:
            full_params = nullcontext()
        with (
            unwrap_model_for_generation(
                model, self.accelerator, gather_deepspeed3_params=self.gather_deepspeed3_params
            ) as unwrapped,
            full_params,
        ):
            output = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
            )
        return cut_at_eos(output[:, input_ids.size(1) :], self.eos_token_ids)
