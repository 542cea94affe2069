"""Next-token logits of a Hugging Face causal LM (PyTorch), as JAX arrays.

The flows of THEORY §1 start from a row of logits `s` per context. This module gets
those rows from a `transformers` causal LM: it tokenises a batch of prompts with left
padding (or takes `input_ids` / `attention_mask` as given), runs the model once without
autograd, and hands the last position's logits to JAX, by DLPack (no copy) where the two
libraries can share the buffer.

Two entry points:

- `next_token_logits(model, tokenizer, prompts)`: one batch, one call.
- `TransformersLogits(model, tokenizer)`: a callable
    `(tokens, attention_mask) -> logits` for a decoding loop, which reuses the model's
    key/value cache when a call extends the tokens of the previous one.
- `TransformersLogits.as_logits_fn(attention_mask)` (or `logits_fn(model, ...)`): the
    model as `rx.generate`'s `logits_fn(tokens, state) -> (logits, state)`, with the
    tokens so far and the mask in the state, and `state0` to start from:

        ids, mask = rxt.encode(tokenizer, prompts)
        fn, state0 = rxt.TransformersLogits(model).as_logits_fn(mask)
        out = rx.generate(fn, ids, state0, jit=False, attention_mask=mask, ...)

Neither PyTorch nor transformers is imported by `import replicax`; this module imports
PyTorch when first called, and says which extra to install when it is missing.
"""

import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

_INSTALL = "pip install 'replicax[transformers]'"

# What `jax.dlpack.from_dlpack` raises when it cannot take a tensor as it is (a device
# JAX has no backend for, a dtype or layout its DLPack importer refuses).
_DLPACK_ERRORS = (BufferError, TypeError, ValueError, RuntimeError)


def _torch():
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "replicax.adapters.transformers needs PyTorch and transformers; install "
            f"them with `{_INSTALL}`."
        ) from error
    return torch


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def encode(
    tokenizer: Any, prompts: str | Sequence[str]
) -> tuple[Int[np.ndarray, "batch length"], Int[np.ndarray, "batch length"]]:
    """Tokenise prompts into one left-padded batch.

    Each prompt is tokenised on its own, as `tokenizer(prompt)` does (special tokens
    included, no truncation); the rows are then padded on the left to the longest. The
    tokenizer is not modified (its `padding_side` is not used).

    **Arguments:**

    - `tokenizer`: a `transformers` tokenizer (anything callable as
        `tokenizer(list_of_str)["input_ids"]`).
    - `prompts`: a string, or a sequence of strings (one row each).

    **Returns:**

    `(input_ids, attention_mask)`, two int64 NumPy arrays of shape `(batch, length)`:
    padding positions hold the tokenizer's `pad_token_id` (or its `eos_token_id`, or 0,
    when it has none: they are masked out either way) and a 0 in the mask.

    **Raises:**

    `ValueError` if `prompts` is empty or a prompt tokenises to no token; `TypeError` if
    a prompt is not a string.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty; pass at least one string.")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(
                f"`prompts[{i}]` must be a string; received {type(prompt).__name__}."
            )
    rows = [list(row) for row in tokenizer(prompts)["input_ids"]]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(
                f"`prompts[{i}]` ({prompts[i]!r}) gives no token; a causal LM needs at "
                "least one token to predict the next."
            )
    pad = next(
        (
            int(t)
            for t in (tokenizer.pad_token_id, tokenizer.eos_token_id)
            if t is not None
        ),
        0,
    )
    length = max(len(row) for row in rows)
    input_ids = np.full((len(rows), length), pad, np.int64)
    attention_mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = row
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


def _host_ints(torch, x, name: str) -> np.ndarray:
    """`x` (NumPy, JAX, torch or nested lists) as a 2-D int64 NumPy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.bool_ and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integers; received dtype {x.dtype}.")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(
            f"`{name}` must have shape (batch, length) with length >= 1 (or (length,) "
            f"for one row); received shape {x.shape}."
        )
    return x.astype(np.int64)


def _batch(torch, input_ids, attention_mask, num_embeddings: int | None):
    """Checked `(input_ids, attention_mask, position_ids)` as int64 NumPy arrays."""
    input_ids = _host_ints(torch, input_ids, "input_ids")
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    else:
        attention_mask = _host_ints(torch, attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids`, "
                f"{input_ids.shape}; received {attention_mask.shape}."
            )
        if not np.all((attention_mask == 0) | (attention_mask == 1)):
            raise ValueError("`attention_mask` must hold only 0 and 1.")
        last = np.flatnonzero(attention_mask[:, -1] == 0)
        if last.size:
            raise ValueError(
                f"`attention_mask[{last[0]}, -1]` is 0: the last position of every row "
                "must be a real token, whose logits are the next-token logits. Pad on "
                "the left (`encode` does)."
            )
    if num_embeddings is not None:
        bad = np.argwhere((input_ids < 0) | (input_ids >= num_embeddings))
        if bad.size:
            i, j = bad[0]
            raise ValueError(
                f"`input_ids[{i}, {j}]` is {input_ids[i, j]}, outside the model's "
                f"vocabulary [0, {num_embeddings})."
            )
    # As `generate` does for left-padded batches: real tokens are numbered 0, 1, ...
    # from the first unmasked position, so that a row's positions do not depend on how
    # much padding its batch needed. Padding gets 0 (it is masked out).
    position_ids = np.where(attention_mask == 1, np.cumsum(attention_mask, -1) - 1, 0)
    return input_ids, attention_mask, position_ids


def _check_dtype(dtype):
    if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise ValueError(
            f"`dtype` must be a floating dtype or None; received {jnp.dtype(dtype)}."
        )


# --------------------------------------------------------------------------------------
# The model call and the hand-over to JAX
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _evaluating(model):
    """Run `model` in eval mode (no dropout), restoring each submodule's mode after."""
    modes = [(module, module.training) for module in model.modules()]
    if not any(training for _, training in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _Forward:
    """How to call one model: which of the optional keyword arguments it takes."""

    def __init__(self, torch, model):
        self.torch = torch
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.keep_last = "logits_to_keep" in params
        self.positions = "position_ids" in params
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns).
        self.cache_name = next(
            (n for n in ("cache", "past_key_values") if n in params), None
        )
        self.use_cache = "use_cache" in params
        embeddings = model.get_input_embeddings()
        self.num_embeddings = getattr(embeddings, "num_embeddings", None)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")

    def __call__(self, input_ids, attention_mask, position_ids, cache=None, keep=False):
        """Last-position logits (a torch tensor `(batch, vocab)`) and the new cache."""
        torch = self.torch

        def tensor(x):
            return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

        kwargs = dict(
            input_ids=tensor(input_ids), attention_mask=tensor(attention_mask)
        )
        if self.positions:
            kwargs["position_ids"] = tensor(position_ids)
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        if self.use_cache:
            kwargs["use_cache"] = keep
        if cache is not None:
            kwargs[self.cache_name] = cache
        out = self.model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        new_cache = None
        if keep:
            new_cache = getattr(out, "cache", None)
            if new_cache is None:
                new_cache = getattr(out, "past_key_values", None)
        return logits[:, -1], new_cache


def to_jax(tensor: Any) -> Array:
    """A torch tensor as a JAX array, sharing its memory when DLPack allows.

    The tensor is made contiguous (a copy inside torch only if it is not) and handed
    over with `jax.dlpack.from_dlpack`: on CPU, or on a GPU that JAX also has, the JAX
    array then uses the tensor's buffer (no copy). The caller must not modify the tensor
    afterwards. When DLPack refuses (a device JAX has no backend for, a dtype or layout
    its importer does not take), the tensor is copied through host memory instead; a
    bfloat16 tensor stays bfloat16 on that path too.

    **Arguments:**

    - `tensor`: a `torch.Tensor`.

    **Returns:**

    A JAX array of the same shape and dtype.
    """
    torch = _torch()
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    try:
        return jax.dlpack.from_dlpack(tensor)
    except _DLPACK_ERRORS:
        return _copy_to_jax(torch, tensor)


def _copy_to_jax(torch, tensor) -> Array:
    host = tensor.cpu()
    if host.dtype == torch.bfloat16:
        # NumPy has no bfloat16; its bits travel as int16 and are read back as JAX's.
        return jnp.asarray(host.view(torch.int16).numpy().view(jnp.bfloat16))
    return jnp.asarray(host.numpy())


def _finish(logits, dtype) -> Array:
    out = to_jax(logits)
    return out if dtype is None else out.astype(dtype)


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def next_token_logits(
    model: Any,
    tokenizer: Any = None,
    prompts: str | Sequence[str] | None = None,
    *,
    input_ids: Any = None,
    attention_mask: Any = None,
    dtype: Any = None,
) -> Float[Array, "batch vocab"]:
    """The next-token logits of a causal LM for a batch of prompts, as a JAX array.

    The prompts are tokenised and padded on the left (`encode`), or `input_ids` and
    `attention_mask` are taken as given. The model runs once under
    `torch.inference_mode()`, in eval mode (dropout off; each submodule's mode is
    restored afterwards), with position ids counted from each row's first real token as
    `transformers`' `generate` does, so that a row's logits do not depend on the padding
    its batch needed. Only the last position's logits are computed where the model
    supports it (`logits_to_keep=1`).

    The logits keep the model's dtype unless `dtype` says otherwise: a bfloat16 model
    gives a bfloat16 array (replicax's flows compute in float32 from it). They reach JAX
    by DLPack, without a copy, when JAX can address the tensor's device (see `to_jax`);
    otherwise they are copied through host memory.

    **Arguments:**

    - `model`: a `transformers` causal LM (e.g. `AutoModelForCausalLM.from_pretrained`),
        on any device.
    - `tokenizer`: its tokenizer; needed only with `prompts`.
    - `prompts`: a string or a sequence of strings. Exclusive with `input_ids`.
    - `input_ids`: integer token ids of shape `(batch, length)` (or `(length,)`), as a
        NumPy, JAX or torch array. Padding must be on the left.
    - `attention_mask`: 0/1 of the same shape (1 = real token); all ones when omitted.
        The last position of every row must be 1.
    - `dtype`: the floating dtype of the result (e.g. `jnp.float32`); `None` keeps the
        model's.

    **Returns:**

    The logits of shape `(batch, vocab)`, `vocab` being the model's output size (which
    may exceed the tokenizer's vocabulary). A single string prompt gives `batch = 1`.

    **Raises:**

    `ImportError` naming the extra to install if PyTorch is missing; `ValueError` or
    `TypeError` naming the argument for missing, conflicting or malformed inputs
    (right padding, ids outside the vocabulary, a prompt with no token).
    """
    torch = _torch()
    _check_dtype(dtype)
    if (prompts is None) == (input_ids is None):
        raise ValueError("Pass exactly one of `prompts` and `input_ids`.")
    if prompts is not None:
        if tokenizer is None:
            raise ValueError("`prompts` needs a `tokenizer`.")
        if attention_mask is not None:
            raise ValueError(
                "`attention_mask` goes with `input_ids`; `prompts` builds its own."
            )
        input_ids, attention_mask = encode(tokenizer, prompts)
    forward = _Forward(torch, model)
    batch = _batch(torch, input_ids, attention_mask, forward.num_embeddings)
    with torch.inference_mode(), _evaluating(model):
        logits, _ = forward(*batch)
        return _finish(logits, dtype)


class TransformersLogits:
    """A causal LM as a `logits_fn` for a decoding loop: `(tokens, mask) -> logits`.

    Each call returns the next-token logits of every row, as `next_token_logits` does.
    With `use_cache=True` (the default) the model's key/value cache is kept between
    calls: when a call's tokens and mask start with the previous call's (the loop
    appended tokens), only the new positions run through the model. Any other call
    starts again from scratch. Cached and uncached logits agree to floating-point
    rounding (the same sums, in a different order).

    The object holds that cache (and the previous tokens); one object serves one
    decoding loop at a time. `reset()` drops the cache.

    **Arguments:**

    - `model`: a `transformers` causal LM.
    - `tokenizer`: its tokenizer, used only by `encode`; optional.
    - `dtype`: the floating dtype of the logits; `None` keeps the model's.
    - `use_cache`: reuse the key/value cache across calls that extend the previous
        tokens.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        dtype: Any = None,
        use_cache: bool = True,
    ):
        torch = _torch()
        _check_dtype(dtype)
        self.model = model
        self.tokenizer = tokenizer
        self.dtype = dtype
        self._forward = _Forward(torch, model)
        self.use_cache = use_cache and self._forward.cache_name is not None
        self.reset()

    @property
    def vocab_size(self) -> int:
        """The number of logits per row (the model's output size)."""
        return int(self.model.config.vocab_size)

    def reset(self) -> None:
        """Forget the previous tokens and drop the key/value cache."""
        self._input_ids = None
        self._attention_mask = None
        self._cache = None

    def encode(
        self, prompts: str | Sequence[str]
    ) -> tuple[Int[np.ndarray, "batch length"], Int[np.ndarray, "batch length"]]:
        """`encode(tokenizer, prompts)` with this object's tokenizer: a left-padded
        `(input_ids, attention_mask)` to start a decoding loop from."""
        if self.tokenizer is None:
            raise ValueError("`encode` needs the `tokenizer` argument of the object.")
        return encode(self.tokenizer, prompts)

    def _extends_previous(self, input_ids, attention_mask) -> bool:
        previous = self._input_ids
        if previous is None or self._cache is None:
            return False
        n = previous.shape[1]
        return (
            input_ids.shape[0] == previous.shape[0]
            and input_ids.shape[1] > n
            and np.array_equal(input_ids[:, :n], previous)
            and np.array_equal(attention_mask[:, :n], self._attention_mask)
        )

    def __call__(
        self, tokens: Any, attention_mask: Any = None
    ) -> Float[Array, "batch vocab"]:
        """Next-token logits after `tokens`.

        **Arguments:**

        - `tokens`: integer token ids of shape `(batch, length)` (NumPy, JAX or torch),
            padded on the left.
        - `attention_mask`: 0/1 of the same shape (1 = real token); all ones when
            omitted. The last position of every row must be 1.

        **Returns:**

        The logits of shape `(batch, vocab)`.
        """
        torch = self._forward.torch
        input_ids, attention_mask, position_ids = _batch(
            torch, tokens, attention_mask, self._forward.num_embeddings
        )
        with torch.inference_mode(), _evaluating(self.model):
            try:
                if self.use_cache and self._extends_previous(input_ids, attention_mask):
                    n = self._input_ids.shape[1]
                    logits, cache = self._forward(
                        input_ids[:, n:],
                        attention_mask,  # the whole mask: the cache holds the past
                        position_ids[:, n:],
                        cache=self._cache,
                        keep=True,
                    )
                else:
                    logits, cache = self._forward(
                        input_ids, attention_mask, position_ids, keep=self.use_cache
                    )
            except BaseException:
                self.reset()  # the cache may hold part of the failed call
                raise
            if cache is None:
                self.reset()
            else:
                self._input_ids, self._attention_mask = input_ids, attention_mask
                self._cache = cache
            return _finish(logits, self.dtype)

    def as_logits_fn(
        self, attention_mask: Any = None
    ) -> tuple[Callable[[Any, Any], tuple[Array, Any]], Any]:
        """This model as the `logits_fn` of `rx.generate` (with `jit=False`).

        `rx.generate` calls its model as `logits_fn(tokens, state) -> (logits, state)`:
        first on the whole prompt, then on one new token per row. The function returned
        here keeps in its state the tokens so far and their attention mask (the
        prompt's mask, then a 1 per generated token), and calls this object on them, so
        that the key/value cache serves every step after the first. The cache is
        dropped now (`reset()`): a new loop starts from scratch.

        **Arguments:**

        - `attention_mask`: the prompt's mask, 0/1 of shape `(batch, prompt)` (as
            `encode` returns it), or `None` for unpadded prompts. Pass the same mask to
            `rx.generate(..., attention_mask=mask)` for its repetition penalty.

        **Returns:**

        `(logits_fn, state0)`: use as `rx.generate(logits_fn, input_ids, state0,
        jit=False, attention_mask=attention_mask, ...)`. The state is the pair
        `(tokens, attention_mask)` of int64 NumPy arrays (`tokens` is `None` in
        `state0`); the final state in `Generation.state` holds the prompt and every
        generated token.
        """
        self.reset()
        torch = self._forward.torch
        if attention_mask is not None:
            attention_mask = _host_ints(torch, attention_mask, "attention_mask")

        def logits_fn(tokens, state):
            previous, mask = state
            tokens = _host_ints(torch, tokens, "tokens")
            if previous is not None:
                tokens = np.concatenate([previous, tokens], axis=1)
            if mask is None:
                mask = np.ones_like(tokens)
            elif mask.shape[1] < tokens.shape[1]:
                new = tokens.shape[1] - mask.shape[1]
                mask = np.concatenate([mask, np.ones((len(mask), new), np.int64)], 1)
            return self(tokens, mask), (tokens, mask)

        return logits_fn, (None, attention_mask)


def logits_fn(
    model: Any,
    tokenizer: Any = None,
    attention_mask: Any = None,
    *,
    dtype: Any = None,
    use_cache: bool = True,
) -> tuple[Callable[[Any, Any], tuple[Array, Any]], Any]:
    """A causal LM as the `logits_fn` of `rx.generate`, with its initial state.

    Shorthand for `TransformersLogits(model, tokenizer, dtype=dtype,
    use_cache=use_cache).as_logits_fn(attention_mask)`:

        ids, mask = rxt.encode(tokenizer, prompts)
        fn, state0 = rxt.logits_fn(model, tokenizer, mask)
        out = rx.generate(fn, ids, state0, jit=False, attention_mask=mask,
                          max_new_tokens=20, key=jax.random.key(0))

    **Arguments:**

    - `model`, `tokenizer`, `dtype`, `use_cache`: as for `TransformersLogits`.
    - `attention_mask`: the prompt's 0/1 mask, `(batch, prompt)`, or `None` for
        unpadded prompts.

    **Returns:**

    `(logits_fn, state0)` (see `TransformersLogits.as_logits_fn`).
    """
    adapter = TransformersLogits(model, tokenizer, dtype=dtype, use_cache=use_cache)
    return adapter.as_logits_fn(attention_mask)
