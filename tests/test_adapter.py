"""`replicax.adapters.transformers` against the model's own logits.

A tiny GPT-2 (2 layers, width 32, random weights, built from a config: no download) and
a word-level tokenizer built in memory. The reference for a prompt is always the model
run on that prompt alone, unpadded: what the adapter returns for a left-padded batch
must not depend on the padding (attention mask and position ids), and must agree with
what transformers' own `generate` sees at its first step.
"""

import copy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import replicax as rx
import replicax.adapters.transformers as rxt

from .torch_helpers import one_torch_thread, word_tokenizer  # noqa: F401 (fixture)

VOCAB = 40  # the model's output size; the tokenizer knows the first 12 ids
PROMPTS = ["the cat", "a dog ran far on the mat .", "dog"]  # 2, 8 and 1 tokens

# float32: the padded batch and the lone prompt run the same sums over different
# shapes (masked keys contribute exact zeros); measured differences are ~3e-8.
TOL_F32 = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model_bf16(model):
    return copy.deepcopy(model).to(torch.bfloat16)


def _alone(model, ids):
    """The model's own last-position logits for one unpadded row (float32 NumPy)."""
    with torch.no_grad():
        ids = torch.tensor([ids])
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return out.logits[0, -1].float().numpy()


def _rows(tokenizer):
    return tokenizer(PROMPTS)["input_ids"]


def test_left_padding_does_not_change_logits(model, tokenizer):
    logits = rxt.next_token_logits(model, tokenizer, PROMPTS)
    assert logits.shape == (3, VOCAB) and logits.dtype == jnp.float32
    rows = _rows(tokenizer)
    assert sorted(map(len, rows)) == [1, 2, 8]  # three paddings: 6, 0 and 7
    for i, ids in enumerate(rows):
        np.testing.assert_allclose(logits[i], _alone(model, ids), rtol=0, atol=TOL_F32)

    # The test can fail: the same padded batch without position ids counted from each
    # row's first token (the model's default, positions 0..L-1) gives other logits.
    ids, mask = rxt.encode(tokenizer, PROMPTS)
    with torch.no_grad():
        naive = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits[:, -1]
    assert np.max(np.abs(naive[0].numpy() - _alone(model, rows[0]))) > 100 * TOL_F32

    # transformers' `generate` on the same left-padded batch: its first-step logits.
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    np.testing.assert_array_equal(enc["input_ids"].numpy(), ids)
    out = model.generate(
        **enc, max_new_tokens=1, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )
    np.testing.assert_allclose(logits, out.logits[0].numpy(), rtol=0, atol=TOL_F32)


def test_input_ids_path(model, tokenizer):
    """`input_ids` / `attention_mask` as torch, NumPy or JAX give the prompts' logits;
    one unpadded row needs no mask."""
    expected = np.asarray(rxt.next_token_logits(model, tokenizer, PROMPTS))
    ids, mask = rxt.encode(tokenizer, PROMPTS)
    assert ids.dtype == mask.dtype == np.int64
    assert ids[2, 0] == tokenizer.pad_token_id and mask[2].tolist() == [0] * 7 + [1]
    for convert in (torch.tensor, np.asarray, jnp.asarray):
        got = rxt.next_token_logits(
            model, input_ids=convert(ids), attention_mask=convert(mask)
        )
        np.testing.assert_array_equal(got, expected)
    row = _rows(tokenizer)[1]
    got = rxt.next_token_logits(model, input_ids=np.array(row))  # 1-D: one row
    np.testing.assert_allclose(got[0], _alone(model, row), rtol=0, atol=TOL_F32)
    one = rxt.next_token_logits(model, tokenizer, PROMPTS[0])  # a string: batch of 1
    assert one.shape == (1, VOCAB)


def test_bfloat16(model_bf16, tokenizer):
    """bf16 logits stay bf16 (the model's own numbers, exactly); `dtype` upcasts."""
    logits = rxt.next_token_logits(model_bf16, tokenizer, PROMPTS)
    assert logits.dtype == jnp.bfloat16 and logits.shape == (3, VOCAB)
    # Exactly the model's bf16 output for the same batch and positions as `generate`.
    ids, mask = rxt.encode(tokenizer, PROMPTS)
    positions = np.where(mask == 1, np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        own = model_bf16(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits[:, -1]
    np.testing.assert_array_equal(logits.astype(jnp.float32), own.float().numpy())
    # Against each prompt alone: the padded batch rounds its sums to bf16 in other
    # places, so only agreement to bf16 resolution is expected: 2^-8 relative per
    # rounding, a few roundings deep, on logits of size ~0.5 here.
    tol_bf16 = 4 * 2.0**-8 * float(jnp.max(jnp.abs(logits.astype(jnp.float32))))
    for i, ids_i in enumerate(_rows(tokenizer)):
        np.testing.assert_allclose(
            logits[i].astype(jnp.float32), _alone(model_bf16, ids_i), rtol=0,
            atol=tol_bf16,
        )
    up = rxt.next_token_logits(model_bf16, tokenizer, PROMPTS, dtype=jnp.float32)
    assert up.dtype == jnp.float32
    np.testing.assert_array_equal(up, logits.astype(jnp.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dlpack_is_zero_copy(dtype, model, model_bf16, tokenizer, monkeypatch):
    tensor = torch.arange(12, dtype=dtype).reshape(3, 4)
    out = rxt.to_jax(tensor)
    assert out.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert out.unsafe_buffer_pointer() == tensor.data_ptr()  # the same memory
    np.testing.assert_array_equal(out.astype(jnp.float32), tensor.float().numpy())
    # A non-contiguous view is made contiguous first (one copy, in torch).
    out = rxt.to_jax(tensor.T)
    np.testing.assert_array_equal(out.astype(jnp.float32), tensor.T.float().numpy())
    # When DLPack refuses, a host copy with the same dtype and values.
    with monkeypatch.context() as m:

        def refuse(x):
            raise BufferError("no DLPack today")

        m.setattr(jax.dlpack, "from_dlpack", refuse)
        out = rxt.to_jax(tensor)
    assert out.dtype == jnp.dtype(str(dtype).removeprefix("torch."))
    assert out.unsafe_buffer_pointer() != tensor.data_ptr()
    np.testing.assert_array_equal(out.astype(jnp.float32), tensor.float().numpy())

    # `next_token_logits` hands the model's output tensor over without a copy.
    seen = []
    to_jax = rxt.to_jax

    def spy(t):
        out = to_jax(t)
        seen.append(out.unsafe_buffer_pointer() == t.data_ptr())
        return out

    monkeypatch.setattr(rxt, "to_jax", spy)
    used = model if dtype == torch.float32 else model_bf16
    rxt.next_token_logits(used, tokenizer, PROMPTS)
    assert seen == [True]


def test_logits_fn_with_cache(model, tokenizer):
    """Greedy decoding for 4 steps through the cached and the uncached callables: the
    same logits, each equal to the model on the row alone; the cached one runs only the
    new position after the first call."""
    cached = rxt.TransformersLogits(model, tokenizer)
    plain = rxt.TransformersLogits(model, tokenizer, use_cache=False)
    assert cached.vocab_size == VOCAB
    run = []  # positions each call of `cached` fed the model
    hook = model.transformer.wte.register_forward_hook(
        lambda module, args, out: run.append(out.shape[1])
    )
    tokens, mask = cached.encode(PROMPTS)
    rows = [list(r) for r in _rows(tokenizer)]
    try:
        for _ in range(4):
            logits = cached(jnp.asarray(tokens), mask)
            hook.remove()
            assert logits.shape == (3, VOCAB) and logits.dtype == jnp.float32
            np.testing.assert_allclose(
                logits, plain(tokens, mask), rtol=0, atol=TOL_F32
            )
            for i, row in enumerate(rows):
                np.testing.assert_allclose(
                    logits[i], _alone(model, row), rtol=0, atol=TOL_F32
                )
            nxt = np.asarray(jnp.argmax(logits, -1))
            tokens = np.concatenate([tokens, nxt[:, None]], 1)
            mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
            rows = [row + [int(t)] for row, t in zip(rows, nxt, strict=True)]
            hook = model.transformer.wte.register_forward_hook(
                lambda module, args, out: run.append(out.shape[1])
            )
    finally:
        hook.remove()
    assert run == [8, 1, 1, 1]  # the whole batch once, then the new token only
    # A call that does not extend the previous one starts again.
    again = cached(*cached.encode(PROMPTS[:2]))
    np.testing.assert_allclose(
        again, rxt.next_token_logits(model, tokenizer, PROMPTS[:2]), rtol=0,
        atol=TOL_F32,
    )


def test_dropout_is_off_and_modes_restored(tokenizer):
    torch.manual_seed(1)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                   bos_token_id=1, eos_token_id=1, resid_pdrop=0.5)
    )
    model.train()
    model.transformer.h[0].eval()  # a mixed state, to be restored as it was
    modes = [m.training for m in model.modules()]
    first = rxt.next_token_logits(model, tokenizer, PROMPTS)
    second = rxt.next_token_logits(model, tokenizer, PROMPTS)
    np.testing.assert_array_equal(first, second)  # dropout at 0.5 would differ
    assert [m.training for m in model.modules()] == modes
    model.eval()
    again = rxt.next_token_logits(model, tokenizer, PROMPTS)
    np.testing.assert_array_equal(first, again)


def test_solve_runs_on_the_logits(model, model_bf16, tokenizer):
    """The entropic flow from the uniform start: log p(t) = log_softmax((1 - e^-t) s/T)
    (THEORY §1), checked in float64 against the returned logits."""
    T, t1 = 0.7, 1.5
    for m in (model, model_bf16):
        logits = rxt.next_token_logits(m, tokenizer, PROMPTS)
        sol = rx.solve(rx.EntropicReplicator(logits, T), t1=t1)
        s = np.asarray(logits.astype(jnp.float32), np.float64)
        expected = jax.nn.log_softmax(jnp.asarray((1 - np.exp(-t1)) * s / T), -1)
        log_p = np.asarray(sol.log_p, np.float64).reshape(3, VOCAB)
        np.testing.assert_allclose(log_p, expected, rtol=0, atol=1e-5)


def test_errors(model, tokenizer, monkeypatch):
    ids, mask = rxt.encode(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="exactly one of `prompts` and `input_ids`"):
        rxt.next_token_logits(model, tokenizer)
    with pytest.raises(ValueError, match="exactly one of `prompts` and `input_ids`"):
        rxt.next_token_logits(model, tokenizer, PROMPTS, input_ids=ids)
    with pytest.raises(ValueError, match="`prompts` needs a `tokenizer`"):
        rxt.next_token_logits(model, None, PROMPTS)
    with pytest.raises(ValueError, match=r"`attention_mask\[0, -1\]` is 0"):
        rxt.next_token_logits(
            model, input_ids=ids[:, ::-1], attention_mask=mask[:, ::-1]
        )
    with pytest.raises(ValueError, match="shape of `input_ids`"):
        rxt.next_token_logits(model, input_ids=ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="only 0 and 1"):
        rxt.next_token_logits(model, input_ids=ids, attention_mask=2 * mask)
    with pytest.raises(ValueError, match=rf"`input_ids\[0, 1\]` is {VOCAB}, outside"):
        rxt.next_token_logits(model, input_ids=np.array([[1, VOCAB]]))
    with pytest.raises(TypeError, match="`input_ids` must hold integers"):
        rxt.next_token_logits(model, input_ids=np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"`input_ids` must have shape \(batch, len"):
        rxt.next_token_logits(model, input_ids=np.zeros((1, 0), np.int64))
    with pytest.raises(ValueError, match=r"`prompts\[1\]` \(''\) gives no token"):
        rxt.next_token_logits(model, tokenizer, ["the", ""])
    # (under the test suite's runtime type checks, beartype reports it first)
    with pytest.raises(TypeError, match=r"`prompts\[0\]` must be a string|'prompts'"):
        rxt.next_token_logits(model, tokenizer, [3])
    with pytest.raises(ValueError, match="`dtype` must be a floating dtype"):
        rxt.next_token_logits(model, tokenizer, PROMPTS, dtype=jnp.int32)
    with pytest.raises(ValueError, match="`encode` needs the `tokenizer`"):
        rxt.TransformersLogits(model).encode(PROMPTS)
    # Without PyTorch: an ImportError that names the extra.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'replicax\[transformers\]'"):
        rxt.next_token_logits(model, tokenizer, PROMPTS)


def test_core_imports_without_torch():
    """No module of replicax imports torch or transformers at import time (only inside
    the adapter's functions), so `import replicax` works without the extra."""
    import ast
    import pathlib

    offences = []
    for path in pathlib.Path(rx.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offences += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] in ("torch", "transformers", "tokenizers")
            ]
    assert not offences, offences
