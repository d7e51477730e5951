"""Weights read outside a forward under the sharded engines, DeepSpeed ZeRO-3 and FSDP2.

Under ZeRO-3 every partitioned parameter is a 0-element placeholder except inside its module's forward (and backward);
under FSDP2 a parameter is a sharded `DTensor` except while its FSDP unit is unsharded. Code that reads a weight on its
own (the chunked loss reads the LM head; teachers save, load and move their weights) gathers that weight for the read,
with the engine's own API, one parameter at a time: never the whole model at once.

Every function here that gathers is a collective: every process must call it, in the same order, with the same
parameters. Without an engine (one process, DDP) they are plain reads and writes.
"""

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def is_zero3(param) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (it carries DeepSpeed's `ds_id`)."""
    return hasattr(param, "ds_id")


def is_dtensor(tensor) -> bool:
    """A `DTensor` (FSDP2's sharded parameters, tensor parallelism)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def _available(param) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


@contextmanager
def gathered(params: Iterable):
    """ZeRO-3 parameters among `params` whole for the duration, to read (`deepspeed.zero.GatheredParameters`); others
    as they are. Parameters already whole (persistent ones, a tied weight inside its module's forward) are left to
    their owner. Writes go through `load_full` and `lerp_`, which keep them in the partitions."""
    todo = list({id(p): p for p in params if is_zero3(p) and not _available(p)}.values())
    if not todo:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(todo):
        yield


def full_tensor(param) -> torch.Tensor:
    """The whole value of one parameter or buffer, detached (gathered under ZeRO-3 and FSDP2; a copy there)."""
    if is_dtensor(param):
        return param.detach().full_tensor()
    if is_zero3(param):
        with gathered([param]):
            return param.data.detach().clone()
    return param.detach()


def full_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, whole value on the CPU)` for each of `named`, gathered one at a time (a collective under the engines:
    every process iterates to the end)."""
    for name, tensor in named:
        yield name, full_tensor(tensor).to("cpu", copy=True)


def load_full(param, value: torch.Tensor) -> None:
    """Write the whole `value` into `param`, whose shard (ZeRO-3 or FSDP2) is updated on every process."""
    with torch.no_grad():
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
            param.to_local().copy_(shard.to_local())
        elif is_zero3(param):
            import deepspeed

            # Rank 0's write is kept in every partition on exit; persistent (always whole) weights included, whose
            # partition is what DeepSpeed restores them from after each step.
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(value.to(param.data.device, param.data.dtype))
        else:
            param.copy_(value.to(param.device, param.dtype))


def full_shape(tensor) -> torch.Size:
    """The whole shape of a parameter (ZeRO-3's placeholders are empty; a `DTensor`'s shape is already whole)."""
    return tensor.ds_shape if is_zero3(tensor) else tensor.shape


def reshard(model) -> None:
    """FSDP2 units of `model` back to their shards, so that its parameters are the sharded `DTensor`s (an unsharded
    copy is dropped at the next reshard: writing into it would be lost)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def lerp_(targets: list, sources: list, rate: float) -> None:
    """`target <- (1 - rate) * target + rate * source` for each pair (at `rate` 1 an exact copy), on each process's
    own part where the pair is sharded alike: FSDP2 shards, ZeRO-3 partitions (no gathering; a weight DeepSpeed keeps
    whole is moved too), whole weights otherwise."""
    with torch.no_grad():
        plain = not any(is_zero3(t) or is_dtensor(t) for t in (*targets, *sources))
        if plain and len(targets) == len(sources) and all(t.dtype == s.dtype for t, s in zip(targets, sources)):
            torch._foreach_lerp_(targets, sources, rate)  # one process, DDP: one fused pass
            return
        for target, source in zip(targets, sources, strict=True):
            _lerp_pair(target, source, rate)


def _partitioned_alike(target, source) -> bool:
    """Two ZeRO-3 weights whose partitions hold the same elements (hpZ's secondary copies excluded)."""
    return (
        is_zero3(target)
        and is_zero3(source)
        and target.ds_shape == source.ds_shape
        and target.ds_tensor is not None
        and source.ds_tensor is not None
        and target.ds_tensor.numel() == source.ds_tensor.numel()
        and getattr(target, "ds_secondary_tensor", None) is None
    )


def _lerp_pair(target, source, rate: float) -> None:
    if _partitioned_alike(target, source):
        target.ds_tensor.data.lerp_(source.ds_tensor.data.to(target.ds_tensor.dtype), rate)
        if _available(target):  # whole right now (persistent, or in use): the whole copy moves too
            whole = full_tensor(source) if not _available(source) else source.data
            target.data.lerp_(whole.to(target.dtype), rate)
    elif is_zero3(target) or is_zero3(source):
        import deepspeed

        with (
            gathered([source]),
            deepspeed.zero.GatheredParameters([target] if is_zero3(target) else [], modifier_rank=0),
        ):
            target.data.lerp_(source.data.to(target.dtype), rate)
    elif is_dtensor(target) or is_dtensor(source):
        local_target = target.to_local() if is_dtensor(target) else target
        if is_dtensor(target) and is_dtensor(source) and source.placements == target.placements:
            local_source = source.to_local()
        else:  # placed differently: the source's whole value, cut like the target
            local_source = _like(full_tensor(source), target)
        local_target.lerp_(local_source.to(local_target.dtype), rate)
    else:
        target.data.lerp_(source.data.to(target.dtype), rate)


def _like(value: torch.Tensor, target) -> torch.Tensor:
    if not is_dtensor(target):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements).to_local()


# --------------------------------------------------------------------------------------- the LM head in the loss
def readable_head(weight: torch.Tensor) -> torch.Tensor:
    """An LM-head weight that matmuls with plain hidden states: an FSDP2 `DTensor` gathered (`full_tensor`, which
    carries the gradient back to the shards); anything else as it is (ZeRO-3 heads are gathered around the loss by
    `with_gathered_heads`)."""
    return weight.full_tensor() if is_dtensor(weight) else weight


class _Holder:
    """A `GatheredParameters` entered and left in two different autograd nodes (`_Gather`, `_Release`)."""

    def __init__(self, params):
        self.params, self.context = params, None

    def enter(self):
        import deepspeed

        if self.context is None:
            self.context = deepspeed.zero.GatheredParameters(self.params)
            self.context.__enter__()

    def exit(self):
        if self.context is not None:
            context, self.context = self.context, None
            context.__exit__(None, None, None)


class _Gather(torch.autograd.Function):
    """Identity on the loss; its backward, the first node of the loss's backward, gathers the head again."""

    @staticmethod
    def forward(ctx, holder, loss):
        ctx.holder = holder
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.holder.enter()
        return None, grad


class _Release(torch.autograd.Function):
    """Identity on the hidden states; its backward runs once the loss's gradients are handed on (autograd runs a
    parameter's gradient accumulation, and ZeRO-3's reduction hook with it, before any other ready node) and
    partitions the head again."""

    @staticmethod
    def forward(ctx, holder, hidden):
        ctx.holder = holder
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        ctx.holder.exit()
        return None, grad


def with_gathered_heads(loss_fn, settings, student, teacher, **rest):
    """`loss_fn(settings, student, teacher, **rest)` (`chunked_loss.loss_function`), with ZeRO-3 LM heads whole.

    On the paths from hidden states (`student` and `teacher` are `HiddenStates`) the loss reads the heads directly and
    computes the head's gradient in its forward; under ZeRO-3 the heads are placeholders there, and the student head's
    gradient can only be accumulated into a whole parameter. So both heads are gathered for the forward, and the
    student's again in backward, from the loss's first node until its gradient has been accumulated (and reduced by
    ZeRO-3's hook). Without ZeRO-3, or on the logits path, this is a plain call."""
    weights = [getattr(view, "weight", None) for view in (student, teacher)]
    heads = [w for w in weights if w is not None and is_zero3(w) and not _available(w)]
    if not heads:
        return loss_fn(settings, student, teacher, **rest)
    trainable = student.weight.requires_grad and torch.is_grad_enabled()
    holder = _Holder([student.weight]) if trainable and any(w is student.weight for w in heads) else None
    with gathered(heads):
        if holder is not None:
            student = student._replace(hidden=_Release.apply(holder, student.hidden))
        result = loss_fn(settings, student, teacher, **rest)
    if holder is None:
        return result
    return dataclasses.replace(result, loss=_Gather.apply(holder, result.loss))
