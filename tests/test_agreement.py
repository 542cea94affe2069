"""`rx.generate` with the transformers adapter against transformers' own decoding.

A tiny GPT-2 with random weights (built from a config, no download) and a word-level
tokenizer built in memory, as in tests/test_adapter.py. The model has no end-of-sequence
token, so transformers' `generate` runs every row for all its steps, as `rx.generate`
does.

- Greedy: `rx.generate` (the default flow (E) to its limit, i.e. softmax(s'/T), then
  the argmax) gives the same tokens as `model.generate(do_sample=False)` with the same
  repetition penalty and no-repeat-n-gram rule, on a left-padded batch.
- Sampling: the two libraries' random draws cannot be aligned, so each step's
  distribution is compared instead: replicax's `exp(log_p)` against transformers' own
  processors and warpers (`RepetitionPenaltyLogitsProcessor`,
  `NoRepeatNGramLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`,
  `TopPLogitsWarper`) applied to the model's logits after the same tokens, then a
  softmax: the distribution transformers' `generate` samples from.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import replicax as rx
import replicax.adapters.transformers as rxt

from .torch_helpers import one_torch_thread, word_tokenizer  # noqa: F401 (fixture)

VOCAB = 40
PROMPTS = ["the cat sat", "a dog ran far on the mat .", "dog"]  # 3, 8 and 1 tokens
STEPS = 14  # new tokens per row
# Each step's distribution: replicax's (float64, from the model's float32 logits)
# against transformers' processors and warpers on the same logits in float64; both
# compute softmax((s' - max)/T) on the same face, so they differ by float64 round-off
# (measured ~1e-16). The acceptance bound of the issue is 1e-6.
DIST_ATOL = 1e-12
# The logits replicax got (padded batch, key/value cache) against the model run on the
# unpadded row: float32 sums in another order (tests/test_adapter.py).
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # A wide initialisation: logits of order 1, so greedy choices are not near-ties
    # that float32 round-off could flip. No end-of-sequence token: no early stop.
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
        initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _alone(model, ids):
    """The model's last-position logits for one unpadded row, float64 torch."""
    with torch.no_grad():
        ids = torch.tensor([ids])
        return model(input_ids=ids).logits[0, -1].double()


def test_greedy_matches_transformers_generate(model, tokenizer):
    ids, mask = rxt.encode(tokenizer, PROMPTS)
    assert mask.sum(1).tolist() == [3, 8, 1]  # a left-padded batch
    fn, state0 = rxt.TransformersLogits(model, tokenizer).as_logits_fn(mask)
    # transformers' repetition penalty counts every position of `input_ids`, padding
    # included (its pad id is then "seen"); its n-gram rule too. Without
    # `attention_mask` rx.generate counts them all the same way; the model itself gets
    # the mask through the state.
    out = rx.generate(
        fn, ids, state0, max_new_tokens=STEPS, jit=False, repetition_penalty=1.5,
        no_repeat_ngram_size=2, progress=False,
    )
    with torch.no_grad():
        reference = model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
            repetition_penalty=1.5, no_repeat_ngram_size=2, pad_token_id=0,
        )[:, ids.shape[1]:].numpy()
    assert reference.shape == (3, STEPS)
    np.testing.assert_array_equal(np.asarray(out.tokens), reference)
    # The final state holds the prompt and every generated token, and the mask.
    tokens, final_mask = out.state
    np.testing.assert_array_equal(tokens, np.concatenate([ids, reference], 1))
    assert final_mask[:, ids.shape[1]:].all()

    # The test can fail: without the penalties the greedy tokens differ (the penalties
    # change at least one choice on this model).
    fn, state0 = rxt.logits_fn(model, tokenizer, mask)
    plain = rx.generate(fn, ids, state0, max_new_tokens=STEPS, jit=False)
    assert not np.array_equal(np.asarray(plain.tokens), reference)
    assert np.all(np.asarray(out.repeated_ngrams) == 0)  # no bigram occurs twice


def test_sampled_distributions_match_transformers_processors(model, tokenizer):
    temperature, top_k, top_p, penalty, ngram = 0.7, 10, 0.9, 1.3, 2
    ids, mask = rxt.encode(tokenizer, PROMPTS[:2])
    fn, state0 = rxt.logits_fn(model, tokenizer, mask, dtype=jnp.float64)
    seen = []  # the logits the model handed to rx.generate, call by call

    def recording(tokens, state):
        logits, state = fn(tokens, state)
        seen.append(np.asarray(logits))
        return logits, state

    out = rx.generate(
        recording, ids, state0, max_new_tokens=STEPS, jit=False,
        key=jax.random.key(3), temperature=temperature,
        support=[rx.TopK(top_k), rx.TopP(top_p)], repetition_penalty=penalty,
        no_repeat_ngram_size=ngram, attention_mask=mask, save_log_p=True,
    )
    tokens = np.asarray(out.tokens)
    p = np.exp(np.asarray(out.log_p))
    assert p.shape == (2, STEPS, VOCAB) and p.dtype == np.float64
    assert len(seen) == STEPS + 1  # the prompt, then each generated token

    def reference(row, step, with_penalty=True):
        """transformers' processed and warped distribution after the same tokens, on
        the logits replicax was given. rx.generate's documented semantics in
        transformers' own code: the repetition penalty sees the real tokens (the
        mask), the n-gram rule every position of the row (padding included, as
        transformers')."""
        done = tokens[row, :step].tolist()
        real = torch.tensor([ids[row][mask[row] == 1].tolist() + done])
        every = torch.tensor([ids[row].tolist() + done])
        scores = torch.from_numpy(seen[step][row : row + 1].copy())
        if with_penalty:
            scores = RepetitionPenaltyLogitsProcessor(penalty)(real, scores)
        processors = [
            NoRepeatNGramLogitsProcessor(ngram),
            TemperatureLogitsWarper(temperature),
            TopKLogitsWarper(top_k),
            TopPLogitsWarper(top_p),
        ]
        for process in processors:
            scores = process(every, scores)
        return torch.softmax(scores, -1)[0].numpy()

    worst = plain_gap = 0.0
    for row in range(2):
        prompt = ids[row][mask[row] == 1].tolist()
        for step in range(STEPS):
            # The logits are the model's own for the unpadded tokens so far.
            done = tokens[row, :step].tolist()
            np.testing.assert_allclose(
                seen[step][row], _alone(model, prompt + done).numpy(), rtol=0,
                atol=LOGITS_ATOL,
            )
            q = reference(row, step)
            worst = max(worst, float(np.max(np.abs(p[row, step] - q))))
            assert q[tokens[row, step]] > 0  # a token transformers could draw
            plain = reference(row, step, with_penalty=False)
            plain_gap = max(plain_gap, float(np.max(np.abs(p[row, step] - plain))))
    assert worst <= DIST_ATOL, worst
    # The test can fail: without the repetition penalty the distributions differ by
    # far more than the tolerance; and the faces did cut below the top-k somewhere.
    assert plain_gap > 1e-2, plain_gap
    assert np.min(np.sum(p > 0, -1)) < top_k


def test_progress_bar(model, tokenizer, capsys):
    """`progress=True` draws a tqdm bar over the steps on stderr; `False` draws none,
    nor does the default when stderr is not a terminal (as under pytest)."""
    pytest.importorskip("tqdm")
    ids, mask = rxt.encode(tokenizer, PROMPTS[:1])
    assert not sys.stderr.isatty()
    for progress in (True, False, None):
        fn, state0 = rxt.logits_fn(model, tokenizer, mask)
        rx.generate(fn, ids, state0, max_new_tokens=3, jit=False, progress=progress)
        err = capsys.readouterr().err
        if progress:
            assert "rx.generate" in err and "3/3" in err, err
        else:
            assert err == "", err
    with pytest.raises(TypeError, match="progress"):
        rx.generate(fn, ids, state0, max_new_tokens=3, jit=False, progress="yes")
