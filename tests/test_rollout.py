"""`rollout.py`: the transformers backend and its helpers (end tokens, sampling config)."""

import pytest
import torch

from trl_sdft.batch import tokenize_prompts
from trl_sdft.rollout import TransformersRollout, cut_at_eos, eos_token_ids, sampling_config


def test_cut_at_eos_keeps_the_first_end_token():
    assert cut_at_eos([[1, 2, 9, 3, 9], [4, 5], [8, 1]], [9, 8]) == [[1, 2, 9], [4, 5], [8]]
    assert cut_at_eos(torch.tensor([[1, 9, 2]]).tolist(), [9]) == [[1, 9]]


def test_eos_ids_join_the_model_and_the_tokenizer(tiny_model, tokenizer):
    tiny_model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert eos_token_ids(tiny_model, tokenizer) == [tokenizer.eos_token_id, 7]
    tiny_model.generation_config.eos_token_id = 7
    assert eos_token_ids(tiny_model, tokenizer) == [tokenizer.eos_token_id, 7]


def test_sampling_config_takes_generation_kwargs_last(tmp_path, tiny_config, tokenizer):
    args = tiny_config(tmp_path, temperature=0.7, top_k=5, generation_kwargs={"top_k": 3, "min_new_tokens": 2})
    config = sampling_config(args, tokenizer, [tokenizer.eos_token_id])
    assert config.do_sample and config.temperature == 0.7 and config.top_k == 3 and config.min_new_tokens == 2
    assert config.max_new_tokens == args.max_completion_length


@pytest.mark.parametrize("forced", [3, 6])
def test_transformers_rollout_samples_until_the_limit_or_the_end(tmp_path, tiny_config, tiny_model, tokenizer, forced):
    from accelerate import Accelerator

    args = tiny_config(tmp_path, max_completion_length=6, generation_kwargs={"min_new_tokens": forced})
    eos = [tokenizer.eos_token_id]
    rollout = TransformersRollout(
        Accelerator(cpu=True), sampling_config(args, tokenizer, eos), eos, tokenizer.pad_token_id
    )
    prompts = tokenize_prompts(tokenizer, ["What color is Zorbo?", "What color is Quilla? It is"])
    completions, logprobs = rollout.generate(tiny_model, prompts, num_generations=1, step=0)
    assert len(completions) == 2 and logprobs is None  # transformers reports no log-probs of its own
    for completion in completions:
        assert forced <= len(completion) <= 6
        assert eos[0] not in completion[:-1]  # nothing after an end token
