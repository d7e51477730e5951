import pytest
import torch

from trl_sdft.utils import ensure_pad_token, require_package, tokenizer_of, unwrap


def test_unwrap_goes_through_every_wrapper():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(inner))) is inner and unwrap(inner) is inner


def test_tokenizer_of_a_processor_and_pad_fallback(tokenizer):
    class Processor:
        pass

    processor = Processor()
    processor.tokenizer = tokenizer
    assert tokenizer_of(processor) is tokenizer and tokenizer_of(tokenizer) is tokenizer
    tokenizer.pad_token = None
    assert ensure_pad_token(tokenizer).pad_token == tokenizer.eos_token


def test_missing_package_names_the_feature_and_the_fix():
    require_package("torch", "anything", "nothing")
    with pytest.raises(ImportError, match="`use_x=True` needs the `no_such_pkg_42` package: pip install it"):
        require_package("no_such_pkg_42", "`use_x=True`", "pip install it")
