"""Faces of the simplex: the truncations used in decoding (THEORY §3).

Each support is a filter on one context's (temperature-scaled) logits that sets the tokens it
removes to `-inf`, with the same arithmetic, tie-breaking and `min_tokens_to_keep` rule as the
corresponding Hugging Face `transformers` logits warper. A list of supports is applied in
order, each seeing the output of the previous one, as a `LogitsProcessorList` does. The face
is what survives; the flows run on it (restrict-then-flow = flow-then-restrict).

Parameters (`top_k`, `top_p`, `min_p`, `mass`, `epsilon`) are dynamic arrays, a scalar or
one per batch row: new values do not recompile. `min_tokens_to_keep` is static.
"""

import abc
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._misc import error_if_rows


class AbstractSupport(eqx.Module):
    """Base class of the faces. Subclasses implement `filter` for one context."""

    # Names of the fields that hold one value per batch row (or a scalar).
    row_fields: ClassVar[tuple[str, ...]] = ()
    # The parameter checked by the default `check`, and its interval
    # (low, high, low_open, high_open).
    interval: ClassVar[tuple[str, float, float, bool, bool] | None] = None

    @abc.abstractmethod
    def filter(self, scores: Float[Array, " vocab"]) -> Float[Array, " vocab"]:
        """`scores` with the removed tokens set to `-inf` (one context)."""

    def check(self) -> "AbstractSupport":
        """Run-time checks of traced parameters (leaves already broadcast to the batch)."""
        if self.interval is None:
            return self
        name, *bounds = self.interval
        checked = _check_interval(getattr(self, name), name, *bounds)
        return eqx.tree_at(lambda s: getattr(s, name), self, checked)

    def _init_param(self, value, min_tokens_to_keep):
        """Set the interval parameter and `min_tokens_to_keep`, checking host values."""
        _check_min_tokens(min_tokens_to_keep)
        name, low, high, low_open, high_open = self.interval
        param = _param(value, name, low, high, low_open=low_open, high_open=high_open)
        setattr(self, name, param)
        self.min_tokens_to_keep = min_tokens_to_keep

    @property
    def batch_shape(self) -> tuple[int, ...]:
        shapes = [getattr(self, name).shape for name in self.row_fields]
        return jnp.broadcast_shapes(*shapes) if shapes else ()

    def broadcast_batch(self, batch_shape: tuple[int, ...]) -> "AbstractSupport":
        if not self.row_fields:
            return self
        values = tuple(
            jnp.broadcast_to(getattr(self, name), batch_shape) for name in self.row_fields
        )
        return eqx.tree_at(
            lambda s: tuple(getattr(s, name) for name in self.row_fields), self, values
        )


def _check_min_tokens(min_tokens_to_keep):
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(
            "`min_tokens_to_keep` must be an int >= 1; received "
            f"{min_tokens_to_keep!r}."
        )


def _in_interval(xp, value, low, high, low_open, high_open):
    """Elementwise `value ∈ interval` (and finite), with numpy or jnp as `xp`."""
    ok = xp.isfinite(value)
    ok &= value > low if low_open else value >= low
    ok &= value < high if high_open else value <= high
    return ok


def _interval_str(low, high, low_open, high_open):
    return ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")


def _param(value, name: str, low, high, *, low_open: bool, high_open: bool):
    """A parameter as an array, checked now when it is a host value (device values are
    checked by `check`, inside the jitted entry points)."""
    if isinstance(value, int | float | np.ndarray | np.number | list | tuple):
        host = np.asarray(value, np.float64)
        ok = _in_interval(np, host, low, high, low_open, high_open)
        if not np.all(ok):
            interval = _interval_str(low, high, low_open, high_open)
            raise ValueError(
                f"`{name}` must be in {interval}; received {host[~ok].reshape(-1)[0]}."
            )
    return jnp.asarray(value)


def _check_interval(value, name, low, high, low_open, high_open, *, attach_to=None):
    """Run-time error naming the batch row where `value` leaves the interval; the check
    is attached to `attach_to` (default `value`), the array the filter goes on to read."""
    ok = _in_interval(jnp, value, low, high, low_open, high_open)
    interval = _interval_str(low, high, low_open, high_open)
    return error_if_rows(
        value if attach_to is None else attach_to,
        ~ok,
        f"`{name}` must be in {interval}; it is not at batch index {{index}}.",
    )


def _kth_largest(scores, k):
    """The `k`-th largest entry (k dynamic, 1-based): what `torch.topk(...)[0][-1]` gives."""
    ascending = jnp.sort(scores)
    return jnp.take(ascending, scores.shape[-1] - k)


def _softmax(scores):
    # As torch.softmax on a row that may hold -inf (at least one entry finite).
    return jax.nn.softmax(scores)


class Full(AbstractSupport):
    """The whole simplex: no truncation."""

    def filter(self, scores):
        return scores


class TopK(AbstractSupport):
    """Keep the `top_k` largest logits (ties with the `top_k`-th are kept), as
    `transformers.TopKLogitsWarper`. Independent of temperature.

    **Arguments:**

    - `top_k`: an int `>= 1` (clipped to the vocabulary size), or one per batch row.
    - `min_tokens_to_keep`: at least this many tokens survive (`top_k` is raised to it).
    """

    row_fields: ClassVar[tuple[str, ...]] = ("top_k",)
    top_k: Int[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, top_k: Int[ArrayLike, "*batch"] | int, min_tokens_to_keep: int = 1):
        _check_min_tokens(min_tokens_to_keep)
        if isinstance(top_k, float) or (
            isinstance(top_k, np.ndarray | jax.Array)
            and not jnp.issubdtype(jnp.asarray(top_k).dtype, jnp.integer)
        ):
            raise ValueError(f"`top_k` must be an integer; received {top_k!r}.")
        self.top_k = _param(top_k, "top_k", 1, np.inf, low_open=False, high_open=True)
        self.min_tokens_to_keep = min_tokens_to_keep

    def check(self):
        bad = self.top_k < 1
        top_k = error_if_rows(
            self.top_k, bad, "`top_k` must be >= 1; it is not at batch index {index}."
        )
        return eqx.tree_at(lambda s: s.top_k, self, top_k)

    def filter(self, scores):
        vocab = scores.shape[-1]
        k = jnp.clip(jnp.maximum(self.top_k, self.min_tokens_to_keep), 1, vocab)
        return jnp.where(scores < _kth_largest(scores, k), -jnp.inf, scores)


class TopP(AbstractSupport):
    """Nucleus: the smallest set of most likely tokens with mass `>= top_p`, as
    `transformers.TopPLogitsWarper` (tokens sorted by logit, ascending; those whose
    cumulative probability is `<= 1 - top_p` removed). Grows with temperature.

    **Arguments:**

    - `top_p`: in `(0, 1]`, or one per batch row. `1.0` keeps every token.
    - `min_tokens_to_keep`: at least this many tokens survive.
    """

    row_fields: ClassVar[tuple[str, ...]] = ("top_p", "tail_mass")
    interval: ClassVar = ("top_p", 0, 1, True, False)
    top_p: Float[Array, "*batch"]
    # `1 - top_p`, formed in float64 for host values (as transformers forms it from a
    # Python float) and only then rounded: rounding `top_p` first can move the threshold
    # by an ulp in float32 and change the face.
    tail_mass: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, top_p: Float[ArrayLike, "*batch"] | float, min_tokens_to_keep: int = 1):
        self._init_param(top_p, min_tokens_to_keep)
        if isinstance(top_p, int | float | np.ndarray | np.number | list | tuple):
            self.tail_mass = jnp.asarray(1.0 - np.asarray(top_p, np.float64))
        else:
            self.tail_mass = 1 - self.top_p

    def check(self):
        # The filter reads `tail_mass`: the check must be attached to it (an `error_if`
        # on an unused value would be dropped by the compiler).
        name, *bounds = self.interval
        tail_mass = _check_interval(self.top_p, name, *bounds, attach_to=self.tail_mass)
        return eqx.tree_at(lambda s: s.tail_mass, self, tail_mass)

    def filter(self, scores):
        vocab = scores.shape[-1]
        order = jnp.argsort(scores, stable=True)
        cumulative = jnp.cumsum(_softmax(scores[order]))
        # transformers compares in the scores' dtype with `1 - top_p` formed first.
        remove = cumulative <= self.tail_mass.astype(scores.dtype)
        remove &= jnp.arange(vocab) < vocab - self.min_tokens_to_keep
        remove = jnp.zeros(vocab, bool).at[order].set(remove)
        return jnp.where(remove, -jnp.inf, scores)


class MinP(AbstractSupport):
    """Keep tokens with probability `>= min_p × (top probability)`, as
    `transformers.MinPLogitsWarper`. In logits: `s_i >= max s + T log min_p`; grows with T.

    **Arguments:**

    - `min_p`: in `(0, 1]`, or one per batch row.
    - `min_tokens_to_keep`: at least this many (most likely) tokens survive.
    """

    row_fields: ClassVar[tuple[str, ...]] = ("min_p",)
    interval: ClassVar = ("min_p", 0, 1, True, False)
    min_p: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, min_p: Float[ArrayLike, "*batch"] | float, min_tokens_to_keep: int = 1):
        self._init_param(min_p, min_tokens_to_keep)

    def filter(self, scores):
        probs = _softmax(scores)
        remove = probs < self.min_p.astype(probs.dtype) * jnp.max(probs)
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        _, top = jax.lax.top_k(probs, k)
        remove = remove.at[top].set(False)
        return jnp.where(remove, -jnp.inf, scores)


class Typical(AbstractSupport):
    """Locally typical sampling, as `transformers.TypicalLogitsWarper`: tokens sorted by
    `|-log p_i - H(p)|`, kept until their mass reaches `mass`.

    **Arguments:**

    - `mass`: in `(0, 1)`, or one per batch row (transformers' `typical_p`).
    - `min_tokens_to_keep`: at least this many tokens survive.
    """

    row_fields: ClassVar[tuple[str, ...]] = ("mass",)
    interval: ClassVar = ("mass", 0, 1, True, True)
    mass: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, mass: Float[ArrayLike, "*batch"] | float = 0.9, min_tokens_to_keep: int = 1):
        self._init_param(mass, min_tokens_to_keep)

    def filter(self, scores):
        vocab = scores.shape[-1]
        log_p = jax.nn.log_softmax(scores)
        p = jnp.exp(log_p)
        alive = scores > -jnp.inf
        entropy = -jnp.sum(jnp.where(alive, log_p * p, 0))
        shifted = jnp.abs(-log_p - entropy)  # +inf off the support
        order = jnp.argsort(shifted, stable=True)
        sorted_shifted = shifted[order]
        cumulative = jnp.cumsum(_softmax(scores[order]))
        last = jnp.minimum(jnp.sum(cumulative < self.mass.astype(scores.dtype)), vocab - 1)
        remove = sorted_shifted > sorted_shifted[last]
        remove &= jnp.arange(vocab) >= self.min_tokens_to_keep
        remove = jnp.zeros(vocab, bool).at[order].set(remove)
        return jnp.where(remove, -jnp.inf, scores)


class Epsilon(AbstractSupport):
    """Keep tokens with probability `>= epsilon`, as `transformers.EpsilonLogitsWarper`.

    **Arguments:**

    - `epsilon`: in `(0, 1)`, or one per batch row.
    - `min_tokens_to_keep`: the most likely tokens always kept.
    """

    row_fields: ClassVar[tuple[str, ...]] = ("epsilon",)
    interval: ClassVar = ("epsilon", 0, 1, True, True)
    epsilon: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, epsilon: Float[ArrayLike, "*batch"] | float, min_tokens_to_keep: int = 1):
        self._init_param(epsilon, min_tokens_to_keep)

    def cutoff(self, scores):
        return self.epsilon.astype(scores.dtype)

    def filter(self, scores):
        probs = _softmax(scores)
        remove = probs < self.cutoff(scores)
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove &= scores < _kth_largest(scores, k)
        return jnp.where(remove, -jnp.inf, scores)


class Eta(Epsilon):
    """Entropy-dependent cutoff `η = min(ε, √ε e^{-H(p)})`, as
    `transformers.EtaLogitsWarper`.

    **Arguments:** as `Epsilon`.
    """

    def cutoff(self, scores):
        eps = self.epsilon.astype(scores.dtype)
        log_p = jax.nn.log_softmax(scores)
        alive = scores > -jnp.inf
        entropy = -jnp.sum(jnp.where(alive, log_p * jnp.exp(log_p), 0))
        return jnp.minimum(eps, jnp.sqrt(eps) * jnp.exp(-entropy))


class Mask(AbstractSupport):
    """An explicit face: keep the tokens where `mask` is `True`.

    **Arguments:**

    - `mask`: boolean array of shape `(*batch, vocab)` or `(vocab,)`; no row may be all
        `False`.
    """

    mask: Bool[Array, "*batch vocab"]

    def __init__(self, mask: Bool[ArrayLike, "*batch vocab"]):
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_ or mask.ndim == 0:
            raise ValueError(
                "`Mask` takes a boolean array of shape (*batch, vocab); received dtype "
                f"{mask.dtype} and shape {mask.shape}."
            )
        self.mask = mask

    def check(self):
        mask = error_if_rows(
            self.mask,
            ~jnp.any(self.mask, axis=-1),
            "`Mask` is all False at batch index {index}: no token is left.",
        )
        return eqx.tree_at(lambda s: s.mask, self, mask)

    @property
    def batch_shape(self):
        return self.mask.shape[:-1]

    def broadcast_batch(self, batch_shape):
        return eqx.tree_at(
            lambda s: s.mask,
            self,
            jnp.broadcast_to(self.mask, batch_shape + self.mask.shape[-1:]),
        )

    def filter(self, scores):
        if self.mask.shape[-1] != scores.shape[-1]:
            raise ValueError(
                f"`Mask` has {self.mask.shape[-1]} tokens but the logits have "
                f"{scores.shape[-1]}."
            )
        return jnp.where(self.mask, scores, -jnp.inf)


def as_supports(support) -> tuple[AbstractSupport, ...]:
    """`None`, one support, or a sequence of them, as a tuple applied in order."""
    if support is None:
        return ()
    if isinstance(support, AbstractSupport):
        return (support,)
    if isinstance(support, Sequence) and all(
        isinstance(s, AbstractSupport) for s in support
    ):
        return tuple(support)
    raise TypeError(
        "`support` must be a replicax support (TopK, TopP, MinP, Typical, Epsilon, Eta, "
        f"Mask, Full) or a list of them; received {type(support).__name__}."
    )


def face_of_row(
    scores: Float[Array, " vocab"],
    temperature: Float[Array, ""],
    supports: tuple[AbstractSupport, ...],
    temperature_first: bool,
) -> Bool[Array, " vocab"]:
    """The face one context's supports leave, from its logits (`-inf` = masked).

    With `temperature_first` (the default, as transformers' generation does) the supports
    see `logits / T`; otherwise the raw logits. The face is a discrete choice: no gradient
    flows through it (the flow on the face is differentiable in the logits).
    """
    x = jax.lax.stop_gradient(scores)
    if temperature_first:
        x = x / jax.lax.stop_gradient(temperature).astype(x.dtype)
    for support in supports:
        x = support.filter(x)
    return x > -jnp.inf
