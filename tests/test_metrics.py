import torch

from trl_sdft.metrics import completion_metrics, completion_stats


def test_completion_stats_and_metrics():
    lengths, truncated = completion_stats([[1, 2, 9], [3, 4, 5, 6], [9], []], eos_token_ids=[9])
    assert lengths == [3, 4, 1, 0] and truncated == [False, True, False, True]
    metrics = completion_metrics(torch.tensor(lengths), torch.tensor(truncated))
    assert metrics["completions/mean_length"] == 2.0
    assert (metrics["completions/min_length"], metrics["completions/max_length"]) == (0.0, 4.0)
    assert metrics["completions/clipped_ratio"] == 0.5
    assert metrics["completions/mean_terminated_length"] == 2.0
    assert (metrics["completions/min_terminated_length"], metrics["completions/max_terminated_length"]) == (1.0, 3.0)


def test_all_truncated_reports_zero_terminated_length():
    metrics = completion_metrics(torch.tensor([5, 5]), torch.tensor([True, True]))
    assert metrics["completions/clipped_ratio"] == 1.0 and metrics["completions/mean_terminated_length"] == 0.0
