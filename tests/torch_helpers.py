"""What the tests against PyTorch models share: a word-level tokenizer built in memory
(no download) and a fixture that runs torch on one thread.

Imported only by the test files that need torch (tests/helpers.py stays torch-free).
"""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


# The tokenizer's words: id 0 pads, id 1 ends a sequence.
WORDS = ["<pad>", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
WORDS += ["."]


def word_tokenizer(words=WORDS) -> PreTrainedTokenizerFast:
    """A fast tokenizer over `words` (split on whitespace), padding with `<pad>`."""
    backend = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models' matmuls are far too small to share: with two threads on a busy
    machine, each call waits ~0.3 s for the other thread (measured); with one, ~2 ms.
    Import it into a test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
