"""The demo's parts: the embedded default model (SmolLM2-135M-Instruct, `default_model.py`) and the knowledge task
(`knowledge.py`, `evaluation.py`) that the demo and the CLI's evaluation use. Nothing of the trainer depends on it."""

from . import tool_format  # noqa: F401  (registers `smollm2-135m-tools` with `default_model.resolve_model`)
