"""The forwards the loss reads: student or teacher over prompt + completion, and what comes back at the positions
that predict the completion tokens (temperature-scaled logits, or hidden states and the LM-head weight for the
chunked paths). Padded, or packed into rows without padding (`packing.py`)."""

from dataclasses import dataclass

import torch
from torch.nn.functional import linear

from . import packing
from .chunked_loss import HiddenStates, packing_problem
from .sharding import is_dtensor, readable_head
from .utils import unwrap


@dataclass(frozen=True)
class ForwardSettings:
    """Built once at trainer init: whether forwards run packed, the packed row size, the names the model's forward
    takes, and the sampling temperature the logits are divided by."""

    padding_free: bool
    pack_capacity: int | None
    forward_params: frozenset
    temperature: float


def plan(
    model, forward_params: frozenset, padding_free: bool, fsdp_logits: bool, temperature: float
) -> tuple[ForwardSettings, str | None]:
    """The run's forward settings, and why the forwards are padded though `padding_free` asked for packing (None if
    they are packed or padding was asked for). `fsdp_logits`: sharded by FSDP on the logits path
    (`chunked_loss.packing_problem`)."""
    problem = packing_problem(model, forward_params, fsdp_logits) if padding_free else None
    capacity = packing.row_capacity(unwrap(model))
    return ForwardSettings(padding_free and problem is None, capacity, frozenset(forward_params), temperature), problem


def completion_view(model, input_ids, attention_mask, length: int, settings: ForwardSettings, hidden_path: bool):
    """Logits `[B, length, V]` / temperature, or `HiddenStates` when `hidden_path` (only the last position's logits
    are computed there), at the `length` positions that predict the completion."""
    if settings.padding_free:
        hidden = packing.completion_hidden_states(model, input_ids, attention_mask, length, settings.pack_capacity)
        head = unwrap(model).get_output_embeddings()
        if not hidden_path:  # the LM head on the completion positions only (a plain head: see `packing_problem`)
            logits = head(hidden) if not is_dtensor(head.weight) else linear(hidden, readable_head(head.weight))
            return logits.float() / settings.temperature
        return HiddenStates(hidden, readable_head(head.weight))
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in settings.forward_params:
        # Left padding must not shift positions (matters for models with absolute positions).
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in settings.forward_params:
        kwargs["logits_to_keep"] = 1 if hidden_path else length + 1
    if not hidden_path:
        return model(**kwargs).logits[:, -length - 1 : -1] / settings.temperature
    hidden = model(**kwargs, output_hidden_states=True).hidden_states[-1][:, -length - 1 : -1]
    return HiddenStates(hidden, readable_head(unwrap(model).get_output_embeddings().weight))


def sequence(inputs: dict, teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and mask of the teacher's prompt + completion, or the student's."""
    if teacher:
        return inputs["teacher_input_ids"], inputs["teacher_attention_mask"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    return ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
