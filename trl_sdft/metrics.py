"""Completion metrics, under the names TRL's GRPO and SDFT trainers log them (`completions/...`)."""

import torch


def completion_stats(completions: list[list[int]], eos_token_ids: list[int]) -> tuple[list[int], list[bool]]:
    """Each completion's length, and whether it was cut by the length limit (no end-of-sequence token at its end)."""
    ends = set(eos_token_ids)
    return [len(c) for c in completions], [not c or c[-1] not in ends for c in completions]


def completion_metrics(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """Length statistics of all completions and of those that ended on their own, and the share that was cut."""
    lengths = lengths.float()
    truncated = truncated.bool()
    terminated = lengths[~truncated] if (~truncated).any() else torch.zeros(1, device=lengths.device)
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
        "completions/mean_terminated_length": terminated.mean().item(),
        "completions/min_terminated_length": terminated.min().item(),
        "completions/max_terminated_length": terminated.max().item(),
    }
