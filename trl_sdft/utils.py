"""Small helpers every module needs once: unwrapping models, the tokenizer of a processor, a pad token, packages."""

from importlib.util import find_spec


def unwrap(model):
    """The model under DDP / accelerate / DeepSpeed wrappers (each keeps the wrapped model in `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def tokenizer_of(processing_class):
    """The tokenizer of a processor (multimodal models), or the tokenizer itself."""
    return getattr(processing_class, "tokenizer", processing_class)


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token its end-of-sequence token as pad token (padding is always masked)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_package(module: str, feature: str, install: str) -> None:
    """Raise an `ImportError` naming the feature that needs `module` and how to install it."""
    if find_spec(module) is None:
        raise ImportError(f"{feature} needs the `{module}` package: {install}.")
