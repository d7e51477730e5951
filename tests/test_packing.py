"""Padding-free forwards: `packing.pack` on its own, and the trainer's loss and gradients against the padded batch."""

import dataclasses

import pytest
import torch

from trl_sdft import packing
from trl_sdft.batch import assemble_batch


def ragged(prompts, completions):
    batch = assemble_batch(prompts, prompts, completions, pad_token_id=0, device="cpu")
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    return ids, mask, batch["completion_mask"].bool()


@pytest.mark.parametrize("capacity", [None, 0, 7])
def test_pack_keeps_real_tokens_restarts_positions_and_finds_completion_slots(capacity):
    prompts = [[11, 12], [21, 22, 23], [31]]
    completions = [[13, 14, 15], [24], [32, 33]]
    ids, mask, real = ragged(prompts, completions)
    packed = packing.pack(ids, mask, completion_length=3, capacity=capacity)
    rows, positions = packed.input_ids.flatten(), packed.position_ids.flatten()
    for prompt, completion in zip(prompts, completions, strict=True):
        sequence = torch.tensor(prompt + completion)
        starts = [i for i in range(len(rows) - len(sequence) + 1) if torch.equal(rows[i : i + len(sequence)], sequence)]
        assert len(starts) == 1  # each sequence once, whole, with positions 0, 1, ...
        assert positions[starts[0] : starts[0] + len(sequence)].tolist() == list(range(len(sequence)))
    assert packed.input_ids.numel() - sum(map(len, prompts + completions)) < packed.input_ids.size(1)
    if capacity is None:
        assert packed.input_ids.size(0) == 1
    else:  # no row longer than the longest sequence (or the capacity): attention costs no more than padded
        assert packed.input_ids.size(1) == max(capacity, 5)
    # Completion token t of a sequence is predicted by the packed position just before it.
    for b, completion in enumerate(completions):
        for t, token in enumerate(completion):
            assert rows[packed.predicting[b, t] + 1] == token
    assert packed.gather(packed.input_ids[..., None]).shape == (3, 3, 1)


def test_first_fit_decreasing_fills_rows_longest_first():
    assert packing.first_fit_decreasing([5, 2, 4, 1, 3], 5) == [[0], [2, 3], [4, 1]]


def test_pack_refuses_rows_without_a_prompt_token():
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="prompt token"):
        packing.pack(ids, torch.ones_like(ids), completion_length=2)


@pytest.mark.parametrize("capacity", [None, 0])
def test_packed_forward_equals_the_padded_forward(tiny_model, capacity):
    """transformers reads restarting `position_ids` as separate sequences: same hidden states as padded rows."""
    ids, mask, real = ragged([[5, 6, 7], [9, 10], [11]], [[12, 13], [14, 15, 16, 17, 18], [19]])
    padded = tiny_model(
        input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), output_hidden_states=True
    ).hidden_states[-1][:, -6:-1]
    packed = packing.pack(ids, mask, completion_length=5, capacity=capacity)
    assert packed.input_ids.size(0) == (1 if capacity is None else 2)  # sequences share rows
    hidden = tiny_model(
        input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False, output_hidden_states=True
    ).hidden_states[-1]
    assert torch.allclose(packed.gather(hidden)[real], padded[real], atol=1e-5)
    # Packed rows without restarting positions are long sequences: the check above can fail.
    joined = tiny_model(input_ids=packed.input_ids, use_cache=False, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(packed.gather(joined)[real], padded[real], atol=1e-3)


# ------------------------------------------------------------------------------------------------ in the trainer
MODES = [
    dict(distillation_mode="topk_logits", distillation_alpha=0.5),
    dict(distillation_mode="topk_logits", distillation_alpha=0.0, distillation_add_tail=True),
    dict(distillation_mode="full_logits", distillation_alpha=0.0),
    dict(distillation_mode="sampled_token", distillation_alpha=1.0),
]
TEACHERS = [("base", False), ("live", False), ("ema", False), ("base", True), ("ema", True)]
COMPLETIONS = [[7, 8, 9, 10, 11, 2], [12, 2], [13, 14, 15], [16]]  # different lengths: padding in every forward


def ragged_batch(trainer, rows, steps_per_generation):
    """A batch of the trainer's own prompts with completions of different lengths, and rollout log-probs when the
    rollouts outlive an optimizer step (importance-sampling clipping)."""
    prompts = trainer._round_prompts(rows)  # tokenized as the trainer does
    batch = assemble_batch(prompts.student, prompts.teacher, COMPLETIONS, 0, trainer.accelerator.device)
    if steps_per_generation > 1:
        generator = torch.Generator().manual_seed(0)
        batch["old_per_token_logps"] = -torch.rand(batch["completion_ids"].shape, generator=generator) * 3
    return batch


@pytest.mark.parametrize("kind, use_lora", TEACHERS, ids=lambda v: str(v))
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(str(v) for v in m.values()))
@pytest.mark.parametrize("chunk", [0, 5], ids=["logits", "chunked"])
@pytest.mark.parametrize("capacity", [0, None], ids=["rows", "one-row"])
def test_padding_free_equals_padded(
    sharp_model_dir, tokenizer, tmp_path, tiny_config, lora_config, mode, kind, use_lora, chunk, capacity
):
    """Loss and every gradient of the packed forwards equal the padded ones, for each mode, teacher and loss path,
    with importance-sampling clipping and skipped tokens in play."""
    from datasets import Dataset

    from trl_sdft import SDFTTrainer
    from trl_sdft.testing import assert_same_step, facts_rows

    def build(directory, padding_free):
        args = tiny_config(
            tmp_path / directory,
            teacher_model_kind=kind,
            loss_chunk_size=chunk,
            padding_free=padding_free,
            steps_per_generation=2,
            num_loss_tokens_to_skip=1,
            **mode,
        )
        trainer = SDFTTrainer(
            sharp_model_dir,
            args=args,
            train_dataset=Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
            peft_config=lora_config(task_type=None) if use_lora else None,
        )
        assert trainer.padding_free is padding_free
        return trainer

    padded, packed = build("padded", False), build("packed", True)
    # rows of the longest sequence (sdpa, eager) or one row (flash-attention)
    packed.forward_settings = dataclasses.replace(packed.forward_settings, pack_capacity=capacity)
    batch = ragged_batch(padded, facts_rows()[:4], steps_per_generation=2)
    assert_same_step(padded, packed, batch, rtol=1e-4)


def test_row_capacity_follows_the_attention_implementation():
    from types import SimpleNamespace

    def model(attention):
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))

    assert packing.row_capacity(model("sdpa")) == 0 and packing.row_capacity(model("eager")) == 0
    assert packing.row_capacity(model("flash_attention_2")) is None  # varlen kernels: one row costs nothing extra
