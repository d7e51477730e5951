"""Padding-free forwards: a padded batch packed into a few full rows, and the completion positions read back out.

A batch row here is a left-padded prompt followed by a right-padded completion (`batch.assemble_batch`). Packed, the
real tokens of several sequences sit side by side in one row and `position_ids` restart at 0 for each sequence.
transformers reads restarting positions as separate sequences: with no attention mask, `masking_utils` builds the
block-diagonal causal mask (sdpa, eager, flex) and flash-attention takes the sequence boundaries from them.

How many rows: sdpa and eager attend over a whole row (the block-diagonal mask only hides the other sequences), so one
row of N tokens costs N^2 attention where the padded batch cost B x L^2. Sequences are therefore packed into rows no
longer than the longest sequence (first-fit decreasing): attention costs at most what it did padded, and the MLPs and
projections, most of the compute, run on little more than the real tokens. Flash-attention computes each sequence on
its own, so there one row is best (`capacity=None`). The few slots left at the end of a row continue the positions of
its last sequence: causal attention keeps them out of every real token's output.

The loss still reads `[B, T]` (the completion slots of the padded batch): `Packed.gather` puts the packed outputs back
in that layout. Slots past a completion's end point at an arbitrary real position; the loss mask covers them.
"""

from typing import NamedTuple

import torch


class Packed(NamedTuple):
    input_ids: torch.Tensor  # [R, C]: the real tokens of every sequence, a few sequences per row
    position_ids: torch.Tensor  # [R, C]: 0, 1, ... within each sequence
    predicting: torch.Tensor  # [B, T]: flat index (row * C + column) whose output predicts completion token t of b

    def gather(self, outputs: torch.Tensor) -> torch.Tensor:
        """`[R, C, ...]` outputs of the packed rows -> `[B, T, ...]` at the completion slots."""
        return outputs.flatten(0, 1)[self.predicting]


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices grouped into rows of at most `capacity` tokens, longest sequences placed first."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return rows


def pack(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int, capacity: int | None = 0
) -> Packed:
    """Pack `[B, L]` rows whose last `completion_length` columns are the (right-padded) completions.

    `capacity`: tokens per packed row; 0 (default) = the longest sequence, None = everything in one row. Every row
    needs at least one real token before its completion (a prompt): the first completion token is predicted from it."""
    real = attention_mask.bool()
    lengths = real.sum(1).tolist()
    completion_lengths = real[:, real.size(1) - completion_length :].sum(1).tolist()
    if any(length - done < 1 for length, done in zip(lengths, completion_lengths)):
        raise ValueError("Packing needs at least one prompt token in every row.")
    if capacity is None:
        groups = [list(range(len(lengths)))]
    else:
        groups = first_fit_decreasing(lengths, max(capacity, max(lengths)))
    width = max(sum(lengths[i] for i in group) for group in groups)
    ids = input_ids.new_zeros(len(groups), width)
    positions = torch.zeros_like(ids)
    first = [0] * len(lengths)  # flat index predicting completion token 0 of each sequence
    for row, group in enumerate(groups):
        start = 0
        for index in group:
            length = lengths[index]
            ids[row, start : start + length] = input_ids[index][real[index]]
            positions[row, start : start + length] = torch.arange(length)
            first[index] = row * width + start + length - completion_lengths[index] - 1
            start += length
        # Trailing slots continue the last sequence's positions, so that they start no new sequence.
        positions[row, start:] = torch.arange(width - start) + (lengths[group[-1]] if group else 0)
    offsets = torch.arange(completion_length)
    first = torch.tensor(first)
    done = torch.tensor(completion_lengths)
    predicting = torch.where(offsets[None] < done[:, None], first[:, None] + offsets[None], first[:, None])
    return Packed(ids, positions.to(ids.device), predicting.to(ids.device))


def row_capacity(model) -> int | None:
    """`pack`'s capacity for `model`: one row under flash-attention (it attends per sequence), else rows of the
    longest sequence (sdpa and eager attend over whole rows)."""
    return None if "flash" in str(getattr(model.config, "_attn_implementation", "")) else 0


def completion_hidden_states(model, input_ids, attention_mask, completion_length: int, capacity: int | None = 0):
    """`model`'s last hidden states `[B, T, H]` at the positions that predict each completion token, from one forward
    on the packed rows (only the last position's logits are computed)."""
    packed = pack(input_ids, attention_mask, completion_length, capacity)
    outputs = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return packed.gather(outputs.hidden_states[-1])
