"""Tiny models and a locally trained tokenizer: no model hub, built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CI", "1")  # TRL sends no telemetry under CI

import pytest
import torch
from datasets import Dataset

from trl_sdft.testing import build_model, build_tokenizer, facts_rows  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama and its tokenizer saved to disk, so tests can pass `model` as a path."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def facts_dataset():
    return Dataset.from_list(facts_rows())


@pytest.fixture
def chat_facts_dataset():
    return Dataset.from_list(facts_rows(chat=True))


def tiny_config(output_dir, **overrides):
    from trl_sdft import SDFTConfig

    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        distillation_topk=5,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return SDFTConfig(**defaults)
