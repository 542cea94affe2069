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

from ._misc import (
    broadcast_fields,
    check_host_interval,
    check_interval,
    error_if_rows,
    fields_batch_shape,
    is_host_value,
)


class AbstractSupport(eqx.Module):
    """Base class of the supports: rules that choose a face for one context.

    Subclasses implement `filter` for one context. Parameters that may differ between
    contexts are declared in `row_fields` (field name to number of trailing non-batch
    axes), and the one that must lie in an interval in `interval`
    `(name, low, high, low_open, high_open)`; `check` and the batching follow from them.
    """

    row_fields: ClassVar[dict[str, int]] = {}
    interval: ClassVar[tuple[str, float, float, bool, bool] | None] = None

    @abc.abstractmethod
    def filter(self, scores: Float[Array, " vocab"]) -> Float[Array, " vocab"]:
        """`scores` with the removed tokens set to `-inf` (one context)."""

    def check(self) -> "AbstractSupport":
        """Run-time checks of traced parameters (leaves already broadcast to the batch)."""
        if self.interval is None:
            return self
        name, *bounds = self.interval
        checked = check_interval(getattr(self, name), name, *bounds)
        return eqx.tree_at(lambda s: getattr(s, name), self, checked)

    def check_vocab(self, vocab_size: int) -> None:
        """`ValueError` now if this support cannot apply to `vocab_size` tokens."""
        del vocab_size

    def _init_param(self, value, min_tokens_to_keep):
        """Set the interval parameter and `min_tokens_to_keep`, checking host values."""
        _check_min_tokens(min_tokens_to_keep)
        name, *bounds = self.interval
        check_host_interval(value, name, *bounds)
        setattr(self, name, jnp.asarray(value))
        self.min_tokens_to_keep = min_tokens_to_keep

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return fields_batch_shape(self, self.row_fields, type(self).__name__)

    def broadcast_batch(self, batch_shape: tuple[int, ...]) -> "AbstractSupport":
        return broadcast_fields(self, self.row_fields, batch_shape, type(self).__name__)


class AbstractThresholdSupport(AbstractSupport):
    """A support that keeps a token while a margin computed from the distribution stays
    positive (`TopP`, `MinP`, `Epsilon`, `Eta`). Re-evaluated along a path, such a rule
    drops tokens at the times their margins reach zero (`rx.Switched`)."""

    min_tokens_to_keep: eqx.AbstractVar[int]

    @abc.abstractmethod
    def margins(
        self,
        log_p: Float[Array, " vocab"],
        scores: Float[Array, " vocab"],
        alive: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """Per token: positive while the rule, applied to the distribution `exp(log_p)`
        on the tokens `alive`, keeps it; the rule drops it once its margin is `<= 0`.
        `scores` break ties in the order of the tokens. Protected tokens (the
        `min_tokens_to_keep` most likely) get `+inf`."""

    def _protect_top(self, margin, p):
        k = min(self.min_tokens_to_keep, p.shape[-1])
        _, top = jax.lax.top_k(p, k)
        return margin.at[top].set(jnp.inf)


def _check_min_tokens(min_tokens_to_keep):
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(
            "`min_tokens_to_keep` must be an int >= 1; received "
            f"{min_tokens_to_keep!r}."
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

    row_fields: ClassVar[dict[str, int]] = {"top_k": 0}
    top_k: Int[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, top_k: Int[ArrayLike, "*batch"] | int, min_tokens_to_keep: int = 1):
        _check_min_tokens(min_tokens_to_keep)
        dtype = getattr(top_k, "dtype", None)
        if isinstance(top_k, bool | float) or (
            dtype is not None and not jnp.issubdtype(dtype, jnp.integer)
        ) or (isinstance(top_k, list | tuple) and not all(
            isinstance(k, int) and not isinstance(k, bool) for k in top_k
        )):
            raise ValueError(
                f"`top_k` must be an integer (or integers, one per row); received "
                f"{top_k!r}."
            )
        check_host_interval(top_k, "top_k", 1, np.inf, False, True)
        self.top_k = jnp.asarray(top_k)
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


class TopP(AbstractThresholdSupport):
    """Nucleus: the smallest set of most likely tokens with mass `>= top_p`, as
    `transformers.TopPLogitsWarper` (tokens sorted by logit, ascending; those whose
    cumulative probability is `<= 1 - top_p` removed). Grows with temperature.

    **Arguments:**

    - `top_p`: in `(0, 1]`, or one per batch row. `1.0` keeps every token.
    - `min_tokens_to_keep`: at least this many tokens survive.
    """

    row_fields: ClassVar[dict[str, int]] = {"top_p": 0, "tail_mass": 0}
    interval: ClassVar = ("top_p", 0, 1, True, False)
    top_p: Float[Array, "*batch"]
    # `1 - top_p`, formed in float64 for host values (as transformers forms it from a
    # Python float) and only then rounded: rounding `top_p` first can move the threshold
    # by an ulp in float32 and change the face.
    tail_mass: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, top_p: Float[ArrayLike, "*batch"] | float, min_tokens_to_keep: int = 1):
        self._init_param(top_p, min_tokens_to_keep)
        if is_host_value(top_p):
            self.tail_mass = jnp.asarray(1.0 - np.asarray(top_p, np.float64))
        else:
            self.tail_mass = 1 - self.top_p

    def check(self):
        # The filter reads `tail_mass`: the check must be attached to it (an `error_if`
        # on an unused value would be dropped by the compiler).
        name, *bounds = self.interval
        tail_mass = check_interval(self.top_p, name, *bounds, attach_to=self.tail_mass)
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

    def margins(self, log_p, scores, alive):
        # transformers' arithmetic: tokens sorted by probability, ascending (ties broken
        # by the scores, the order at `t0 + 0` from a uniform start); a token goes when
        # the cumulative mass up to it is `<= 1 - top_p`.
        vocab = log_p.shape[-1]
        p = jnp.where(alive, jnp.exp(log_p), 0)
        order = jnp.lexsort((scores, jnp.where(alive, log_p, -jnp.inf)))
        cumulative = jnp.cumsum(p[order])
        margin_sorted = cumulative - self.tail_mass.astype(p.dtype)
        protected = jnp.arange(vocab) >= vocab - self.min_tokens_to_keep
        margin_sorted = jnp.where(protected, jnp.inf, margin_sorted)
        return jnp.zeros_like(p).at[order].set(margin_sorted)


class MinP(AbstractThresholdSupport):
    """Keep tokens with probability `>= min_p × (top probability)`, as
    `transformers.MinPLogitsWarper`. In logits: `s_i >= max s + T log min_p`; grows with T.

    **Arguments:**

    - `min_p`: in `(0, 1]`, or one per batch row.
    - `min_tokens_to_keep`: at least this many (most likely) tokens survive.
    """

    row_fields: ClassVar[dict[str, int]] = {"min_p": 0}
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

    def margins(self, log_p, scores, alive):
        del scores
        p = jnp.where(alive, jnp.exp(log_p), 0)
        return self._protect_top(p - self.min_p.astype(p.dtype) * jnp.max(p), p)


class Typical(AbstractSupport):
    """Locally typical sampling, as `transformers.TypicalLogitsWarper`: tokens sorted by
    `|-log p_i - H(p)|`, kept until their mass reaches `mass`.

    **Arguments:**

    - `mass`: in `(0, 1)`, or one per batch row (transformers' `typical_p`).
    - `min_tokens_to_keep`: at least this many tokens survive.
    """

    row_fields: ClassVar[dict[str, int]] = {"mass": 0}
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


class AbstractCutoff(AbstractThresholdSupport):
    """Keep tokens whose probability is at least a cutoff (`Epsilon`, `Eta`); the most
    likely `min_tokens_to_keep` tokens always stay."""

    row_fields: ClassVar[dict[str, int]] = {"epsilon": 0}
    interval: ClassVar = ("epsilon", 0, 1, True, True)
    epsilon: eqx.AbstractVar[Float[Array, "*batch"]]

    @abc.abstractmethod
    def cutoff(self, log_p: Float[Array, " vocab"]) -> Float[Array, ""]:
        """The probability below which a token goes, for the distribution `log_p`."""

    def filter(self, scores):
        # The probabilities as transformers computes them (a softmax), so that borderline
        # tokens fall on the same side of the cutoff.
        remove = _softmax(scores) < self.cutoff(jax.nn.log_softmax(scores))
        k = min(self.min_tokens_to_keep, scores.shape[-1])
        remove &= scores < _kth_largest(scores, k)
        return jnp.where(remove, -jnp.inf, scores)

    def margins(self, log_p, scores, alive):
        del scores
        log_p = jnp.where(alive, log_p, -jnp.inf)
        p = jnp.exp(log_p)
        return self._protect_top(p - self.cutoff(log_p), p)


class Epsilon(AbstractCutoff):
    """Keep tokens with probability `>= epsilon`, as `transformers.EpsilonLogitsWarper`.

    **Arguments:**

    - `epsilon`: in `(0, 1)`, or one per batch row.
    - `min_tokens_to_keep`: the most likely tokens always kept.
    """

    epsilon: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, epsilon: Float[ArrayLike, "*batch"] | float, min_tokens_to_keep: int = 1):
        self._init_param(epsilon, min_tokens_to_keep)

    def cutoff(self, log_p):
        return self.epsilon.astype(log_p.dtype)


class Eta(AbstractCutoff):
    """Entropy-dependent cutoff `η = min(ε, √ε e^{-H(p)})`, as
    `transformers.EtaLogitsWarper`.

    **Arguments:** as `Epsilon`.
    """

    epsilon: Float[Array, "*batch"]
    min_tokens_to_keep: int = eqx.field(static=True)

    def __init__(self, epsilon: Float[ArrayLike, "*batch"] | float, min_tokens_to_keep: int = 1):
        self._init_param(epsilon, min_tokens_to_keep)

    def cutoff(self, log_p):
        eps = self.epsilon.astype(log_p.dtype)
        # The entropy as torch's `Categorical(logits=...).entropy()` forms it (log-
        # probabilities clamped to the most negative float, times their softmax), so that
        # a token near the cutoff falls on the same side as in transformers.
        clamped = jnp.maximum(log_p, jnp.finfo(log_p.dtype).min)
        entropy = -jnp.sum(clamped * jax.nn.softmax(clamped))
        return jnp.minimum(eps, jnp.sqrt(eps) * jnp.exp(-entropy))


class Mask(AbstractSupport):
    """An explicit face: keep the tokens where `mask` is `True`.

    **Arguments:**

    - `mask`: boolean array of shape `(*batch, vocab)` or `(vocab,)`; no row may be all
        `False`.
    """

    row_fields: ClassVar[dict[str, int]] = {"mask": 1}
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

    def check_vocab(self, vocab_size):
        if self.mask.shape[-1] != vocab_size:
            raise ValueError(
                f"`Mask` must have shape (*batch, {vocab_size}); received shape "
                f"{self.mask.shape}."
            )

    def filter(self, scores):
        self.check_vocab(scores.shape[-1])
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
