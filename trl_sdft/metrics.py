"""Completion metrics, under the names TRL's GRPO and SDFT trainers log them (`completions/...`)."""

import torch


def completion_stats(
    completions: list[list[int]],
    eos_token_ids: list[int],
    tool_mask: list[list[int]] | None = None,
    truncated: list[bool] | None = None,
) -> tuple[list[int], list[bool]]:
    """Each completion's length (with `tool_mask`: its generated tokens only, not tool results), and whether it was
    cut: `truncated` when given (a trajectory that ended with an unanswered tool call), else no end-of-sequence token
    at its end."""
    ends = set(eos_token_ids)
    lengths = [len(c) for c in completions] if tool_mask is None else [sum(mask) for mask in tool_mask]
    if truncated is None:
        truncated = [not c or c[-1] not in ends for c in completions]
    return lengths, list(truncated)


def tool_metrics(calls: int, failures: int, rollouts: int) -> dict[str, float]:
    """TRL GRPO's tool metrics over a round (every process's counts summed): calls per rollout, failed calls per call."""
    return {
        "tools/call_frequency": calls / max(rollouts, 1),
        "tools/failure_frequency": failures / calls if calls else 0.0,
    }


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


def round_metrics(rollouts, eos_token_ids, gather, device) -> dict[str, float]:
    """A round's completion metrics over every process (`gather`: `accelerator.gather`), and with tools (the
    rollouts' `tool_stats`, a `tools.ToolStats`) the tool metrics. `rollouts`: a `rollouts.Rollouts`."""
    spec = (rollouts.tool_mask, rollouts.truncated)
    lengths, truncated = completion_stats(rollouts.completions, eos_token_ids, *spec)
    tool_stats = rollouts.tool_stats
    lengths, truncated = gather(torch.tensor(lengths, device=device)), gather(torch.tensor(truncated, device=device))
    metrics = completion_metrics(lengths, truncated)
    if tool_stats is not None:
        counts = gather(torch.tensor([tool_stats.calls, tool_stats.failures], device=device)).view(-1, 2).sum(0)
        metrics.update(tool_metrics(int(counts[0]), int(counts[1]), len(lengths)))
    return metrics
