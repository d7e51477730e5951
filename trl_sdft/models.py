"""Models for the trainer: loading (`ModelSettings`), PEFT and tokenizer preparation, and the checks a model passes
before training (a whole model directory, finite weights, an adapter it already carries).

The embedded default model (SmolLM2 from GGUF) is the demo's, in `demo/default_model.py`.
"""

import os
from dataclasses import dataclass


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


def check_finite_weights(model, source: str | None = None) -> None:
    """Weights holding NaN or inf (a diverged or damaged checkpoint) are refused before training: they would crash
    sampling at the first step or train into more NaN. One pass over the parameters, on their device. `source` names
    where they were loaded from (a checkpoint resumed)."""
    import torch

    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta" and not torch.isfinite(param).all():
            where = f"The weights of {source}" if source else "The model's weights"
            raise ValueError(
                f"{where} hold NaN or inf (first in `{name}`): training cannot start from them. Load an earlier "
                "checkpoint or the original model."
            )


@dataclass(frozen=True)
class ModelSettings:
    """How a model given by name is loaded (`settings.model_settings`)."""

    init_kwargs: dict | None = None  # `model_init_kwargs`
    trust_remote_code: bool = False
    distributed_type: str = ""  # accelerate's `DistributedType` value


def context_length(model, settings: ModelSettings) -> int | None:
    """The model's context (`max_position_embeddings` of its text config), read from its config alone when `model` is
    a path or hub id, so that prompt lengths are checked before any weight is read."""
    if not isinstance(model, str):
        return getattr(model.config.get_text_config(), "max_position_embeddings", None)
    from transformers import AutoConfig

    init_kwargs = settings.init_kwargs or {}
    if init_kwargs.get("config") is not None and not isinstance(init_kwargs["config"], str):
        return getattr(init_kwargs["config"].get_text_config(), "max_position_embeddings", None)
    # What loading passes to the config too: a longer context (`max_position_embeddings`, `rope_scaling`) counts.
    wanted = ("revision", "token", "max_position_embeddings", "rope_scaling", "rope_parameters")
    kwargs = {key: value for key, value in init_kwargs.items() if key in wanted}
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=settings.trust_remote_code, **kwargs)
    except (OSError, ValueError):
        return None  # an adapter directory, say: loading the model says what is wrong, the length check comes after
    return getattr(config.get_text_config(), "max_position_embeddings", None)


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


def ready_for_training(model, pad_token_id: int) -> frozenset[str]:
    """Sets `pad_token_id` where the model and its generation config read it, and silences the parent trainer's
    token-count estimate (which has no meaning here); returns the names the base model's forward takes."""
    import inspect

    model.config.get_text_config().pad_token_id = pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_token_id
    if hasattr(model, "warnings_issued"):
        model.warnings_issued["estimate_tokens"] = True
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return frozenset(inspect.signature(base_model.forward).parameters)


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


def prepare_processing_class(model, processing_class, trust_remote_code: bool = False, chat_template=None):
    """The processor (loaded from the model's path when None: `model` is that path, or a model) and its tokenizer,
    which gets a pad token if it has none, and `chat_template` where given (`chat_template_path`). Needs no loaded
    model, so the tokenizer's checks come before the weights are read."""
    from transformers import AutoProcessor, PreTrainedTokenizerBase
    from trl.trainer.utils import get_config_model_id

    from .utils import ensure_pad_token, tokenizer_of

    if processing_class is None:
        processing_class = AutoProcessor.from_pretrained(
            model if isinstance(model, str) else get_config_model_id(model.config),
            padding_side="left",
            truncation_side="left",
            trust_remote_code=trust_remote_code,
        )
    tokenizer = tokenizer_of(processing_class)
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError("`processing_class` must be a `PreTrainedTokenizerBase` or a `ProcessorMixin`.")
    if chat_template is not None:
        processing_class.chat_template = tokenizer.chat_template = chat_template
    return processing_class, ensure_pad_token(tokenizer)
