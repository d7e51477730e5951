"""Non-finite training, caught before the optimizer step: which loss or gradient norm is NaN/inf, and the error
that says so (naming the run's last complete checkpoint). Functions over tensors and numbers; the trainer gathers the flags across processes so that every
process stops at the same step (one raising alone would leave the others waiting in a collective)."""

import torch


class NonFiniteTrainingError(ValueError):
    """A loss or gradient became NaN or inf; raised before the optimizer step that would have applied it."""


def norm_value(grad_norm) -> float:
    """A gradient norm as a float: a tensor, a DTensor (FSDP2), a number, or None (nothing measured: 0)."""
    if grad_norm is None:
        return 0.0
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    return float(grad_norm)


def step_flags(grad_norm, nonfinite_loss: float | None, scaled: bool) -> torch.Tensor:
    """`[gradient norm, loss was non-finite]` of this process. Under fp16 loss scaling an inf norm is the scaler's
    overflow signal (it skips the step and lowers the scale), so the norm is not judged there (0)."""
    return torch.tensor([0.0 if scaled else norm_value(grad_norm), float(nonfinite_loss is not None)])


def nonfinite_problem(flags: torch.Tensor, nonfinite_loss: float | None, grad_norm) -> str | None:
    """What is non-finite in the gathered `[norm, loss flag]` rows of every process, or None."""
    bad_norm = not torch.isfinite(flags[:, 0]).all()
    if not bad_norm and not flags[:, 1].any():
        return None
    what = [] if nonfinite_loss is None else [f"loss {nonfinite_loss}"]
    if bad_norm:
        what.append(f"gradient norm {norm_value(grad_norm)}")
    return " and ".join(what) or "loss on another process"


def loss_problem(loss: torch.Tensor, gather, device) -> str | None:
    """What is non-finite about this step's loss on any process (`gather`: the accelerator's, a collective), or None.
    Checked before backward where the engine updates the weights inside it (DeepSpeed)."""
    flag = torch.tensor([float(not torch.isfinite(loss.detach()).all())], device=device)
    if not gather(flag).any():
        return None
    return f"loss {loss.item()}" if flag.item() else "loss on another process"


def message(step: int, problem: str, deepspeed: bool, last_checkpoint: str | None) -> str:
    if deepspeed:  # DeepSpeed's engine steps inside backward, before the check
        kept = "DeepSpeed applied the update already: resume from the last complete checkpoint"
    else:
        saved = f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved"
        kept = f"training stopped before the update, so the weights hold no NaN/inf ({saved})"
    return (
        f"Optimizer step {step}: non-finite {problem}; {kept}. Lower `learning_rate`, check the data and "
        "`max_grad_norm`, or train in float32 (`bf16=False`)."
    )


def error(step: int, problem: str, engine_stepped: bool, output_dir: str) -> NonFiniteTrainingError:
    """The error that stops the run at optimizer step `step`. `engine_stepped`: DeepSpeed's engine applied the
    update already (the check after backward); otherwise the message names the last complete checkpoint."""
    from .checkpoints import last_complete_checkpoint

    last = None if engine_stepped else last_complete_checkpoint(output_dir)
    return NonFiniteTrainingError(message(step, problem, engine_stepped, last))
