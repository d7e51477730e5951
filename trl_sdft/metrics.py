"""Completion metrics, under the names TRL's GRPO and SDFT trainers log them (`completions/...`), and the log that
holds a trainer's values until they are logged."""

from collections import defaultdict

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


class MetricLog:
    """The values recorded between two `log` calls, per mode ("train", "eval"): `values` is TRL's `_metrics`.
    `gather`: `accelerator.gather` (values recorded with it are averaged over every process)."""

    def __init__(self, gather, device):
        self.gather, self.device = gather, device
        self.values = {mode: defaultdict(list) for mode in ("train", "eval")}

    def add(self, mode: str, name: str, value: float) -> None:
        self.values[mode][name].append(value)

    def add_loss_term(self, mode: str, name: str, value: torch.Tensor) -> None:
        """A loss term's mean over every process, as `self_distillation/<name>`; the loss also as
        `sdft/distillation_loss`, the name TRL's SDFT trainer logs it under."""
        value = self.gather(value.detach().reshape(1)).mean().item()
        self.add(mode, f"self_distillation/{name}", value)
        if name == "distillation_loss":
            self.add(mode, "sdft/distillation_loss", value)

    def add_round(self, mode: str, rollouts, eos_token_ids) -> None:
        """A round's completion (and tool) metrics over every process (`round_metrics`)."""
        for name, value in round_metrics(rollouts, eos_token_ids, self.gather, self.device).items():
            self.add(mode, name, value)

    def pop(self, mode: str) -> dict[str, float]:
        """The mean of each value recorded in `mode` since the last call (`eval_` before eval names); then cleared."""
        values = self.values[mode]
        means = {f"eval_{k}" if mode == "eval" else k: sum(v) / len(v) for k, v in values.items() if v}
        values.clear()
        return means
