"""Score terms `z(t, p, history)`: what the flows push the distribution towards.

A score is a sum of terms. Each term is an `eqx.Module` evaluated for *one* context (a
single row of length `V`); batching is done by `solve` with `jax.vmap`. A term may carry
an auxiliary state (a history such as token counts) that is integrated alongside the
log-weights; its rate is given by `aux_rate`.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._misc import as_numpy, compute_dtype, is_concrete


class AbstractScore(eqx.Module):
    """Base class of score terms.

    Subclasses implement `__call__(t, log_p, aux)` for a single context and, when they
    hold a history, `init_aux` and `aux_rate`. Terms add with `+`.
    """

    # `True` when the score depends neither on time, nor on the state, nor on a history:
    # then the flows have closed forms and `solve` uses them.
    is_constant: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(
        self, t: Float[Array, ""], log_p: Float[Array, " vocab"], aux: PyTree
    ) -> Float[Array, " vocab"]:
        """Scores of one context at time `t`, given its log-probabilities and history.

        Must be finite on the support; entries off the support are ignored.
        """

    def init_aux(self, log_p0: Float[Array, " vocab"]) -> PyTree:
        """Initial auxiliary state of one context (`None`: no history)."""
        del log_p0
        return None

    def aux_rate(
        self, t: Float[Array, ""], log_p: Float[Array, " vocab"], aux: PyTree
    ) -> PyTree:
        """Time derivative of the auxiliary state of one context."""
        del t, log_p, aux
        return None

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size this term fixes, or `None` if it works for any."""
        return None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading (batch) shape of this term's parameters."""
        return ()

    def broadcast_batch(self, batch_shape: tuple[int, ...]) -> "AbstractScore":
        """This term with every array leaf given the leading shape `batch_shape`."""
        del batch_shape
        return self

    def support(self) -> Bool[Array, "*batch vocab"] | None:
        """Tokens this term allows (`None`: all of them)."""
        return None

    def constant_value(self) -> Float[Array, "*batch vocab"]:
        """The score itself, for constant terms (used by the closed forms)."""
        raise NotImplementedError(
            f"{type(self).__name__} is not constant, so it has no closed form."
        )

    def constant_logits(self) -> Float[Array, "*batch vocab"] | None:
        """The time- and state-independent part of the score, `-inf` off its support
        (what decoding truncations such as top-p are evaluated on); `None` if none."""
        if not self.is_constant:
            return None
        value = self.constant_value()
        mask = self.support()
        return value if mask is None else jnp.where(mask, value, -jnp.inf)

    def __add__(self, other):
        if not isinstance(other, AbstractScore):
            return NotImplemented
        return ScoreSum(_terms(self) + _terms(other))


def _terms(score: AbstractScore) -> tuple[AbstractScore, ...]:
    return score.terms if isinstance(score, ScoreSum) else (score,)


def _broadcast_param(x: Array, batch_shape: tuple[int, ...], name: str) -> Array:
    try:
        return jnp.broadcast_to(x, batch_shape)
    except ValueError:
        raise ValueError(
            f"`{name}` has shape {x.shape}, which does not broadcast to the batch "
            f"shape {batch_shape}."
        ) from None


class Logits(AbstractScore):
    """Constant scores: the logits of a language model for a batch of contexts.

    **Arguments:**

    - `logits`: array of shape `(*batch, vocab)`. `-inf` entries are masked tokens (the
        flows run on the face of the remaining ones); NaN, `+inf` and rows with no finite
        entry are errors, raised (with the batch index) by `solve` and the other entry
        points, on device, without copying the logits to the host.
        Half-precision logits are computed in float32.
    """

    is_constant: ClassVar[bool] = True
    logits: Float[Array, "*batch vocab"]

    def __init__(self, logits: Float[ArrayLike, "*batch vocab"]):
        logits = jnp.asarray(logits)
        if logits.ndim == 0:
            raise ValueError(
                "`logits` must have shape (*batch, vocab); received a scalar."
            )
        if not jnp.issubdtype(logits.dtype, jnp.floating):
            logits = logits.astype(compute_dtype(logits.dtype))
        if logits.shape[-1] == 0:
            raise ValueError("`logits` has an empty vocabulary axis (shape[-1] == 0).")
        self.logits = logits

    def __call__(self, t, log_p, aux):
        del t, log_p, aux
        return self.constant_value()

    def constant_value(self):
        s = self.logits.astype(compute_dtype(self.logits.dtype))
        # Masked tokens are zeroed (not -inf) so that arithmetic and gradients stay
        # finite; the face itself is carried by `support()`.
        return jnp.where(s == -jnp.inf, jnp.zeros((), s.dtype), s)

    def support(self):
        return self.logits != -jnp.inf

    @property
    def vocab_size(self):
        return self.logits.shape[-1]

    @property
    def batch_shape(self):
        return self.logits.shape[:-1]

    def broadcast_batch(self, batch_shape):
        logits = _broadcast_param(
            self.logits, batch_shape + self.logits.shape[-1:], "logits"
        )
        return eqx.tree_at(lambda s: s.logits, self, logits)


class SelfReinforcement(AbstractScore):
    """State-dependent score `z = beta * p`: tokens that are likely become likelier.

    With constant logits added this is the lock-in model of THEORY §4 (brittle
    attractors). It has no closed form; `solve` integrates it with diffrax.

    **Arguments:**

    - `beta`: strength, a scalar or one per batch row. Must be finite.
    """

    beta: Float[Array, "*batch"]

    def __init__(self, beta: Float[ArrayLike, "*batch"]):
        self.beta = jnp.asarray(beta)
        if is_concrete(self.beta) and not np.all(np.isfinite(as_numpy(self.beta))):
            raise ValueError(f"`beta` must be finite; received {self.beta}.")

    def __call__(self, t, log_p, aux):
        del t, aux
        return self.beta.astype(log_p.dtype) * jnp.exp(log_p)

    @property
    def batch_shape(self):
        return self.beta.shape

    def broadcast_batch(self, batch_shape):
        beta = _broadcast_param(self.beta, batch_shape, "beta")
        return eqx.tree_at(lambda s: s.beta, self, beta)


class FrequencyPenalty(AbstractScore):
    """History-dependent score `z = -alpha * c` with counts `ċ = p`, `c(0) = 0`.

    The fluid limit of transformers' / OpenAI's frequency penalty (THEORY §4): `c` is
    the expected number of times each token has been emitted. Under the replicator the
    quantity `logsumexp θ - <s, c>/T + alpha |c|^2 / (2T)` is conserved.

    **Arguments:**

    - `alpha`: penalty strength, a scalar or one per batch row; must be >= 0.
    """

    alpha: Float[Array, "*batch"]

    def __init__(self, alpha: Float[ArrayLike, "*batch"]):
        self.alpha = jnp.asarray(alpha)
        if is_concrete(self.alpha) and not np.all(
            np.isfinite(as_numpy(self.alpha)) & (as_numpy(self.alpha) >= 0)
        ):
            raise ValueError(
                f"`alpha` (frequency penalty) must be finite and >= 0; received "
                f"{self.alpha}."
            )

    def __call__(self, t, log_p, aux):
        del t, log_p
        return -self.alpha.astype(aux.dtype) * aux

    def init_aux(self, log_p0):
        return jnp.zeros_like(log_p0)

    def aux_rate(self, t, log_p, aux):
        del t, aux
        return jnp.exp(log_p)

    @property
    def batch_shape(self):
        return self.alpha.shape

    def broadcast_batch(self, batch_shape):
        alpha = _broadcast_param(self.alpha, batch_shape, "alpha")
        return eqx.tree_at(lambda s: s.alpha, self, alpha)


class ScoreSum(AbstractScore):
    """The sum of several score terms (made with `+`); its history is a tuple."""

    terms: tuple[AbstractScore, ...]

    @property
    def is_constant(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return all(term.is_constant for term in self.terms)

    def __call__(self, t, log_p, aux):
        zs = [term(t, log_p, a) for term, a in zip(self.terms, aux, strict=True)]
        return sum(zs[1:], zs[0])

    def init_aux(self, log_p0):
        return tuple(term.init_aux(log_p0) for term in self.terms)

    def aux_rate(self, t, log_p, aux):
        return tuple(
            term.aux_rate(t, log_p, a) for term, a in zip(self.terms, aux, strict=True)
        )

    @property
    def vocab_size(self):
        sizes = {term.vocab_size for term in self.terms} - {None}
        if len(sizes) > 1:
            raise ValueError(f"Score terms disagree on the vocabulary size: {sizes}.")
        return sizes.pop() if sizes else None

    @property
    def batch_shape(self):
        return jnp.broadcast_shapes(*(term.batch_shape for term in self.terms))

    def broadcast_batch(self, batch_shape):
        return ScoreSum(tuple(term.broadcast_batch(batch_shape) for term in self.terms))

    def support(self):
        masks = [m for m in (term.support() for term in self.terms) if m is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out

    def constant_value(self):
        # A face contributes no score, only its support.
        terms = [t for t in self.terms if not isinstance(t, FaceMask)]
        values = [term.constant_value() for term in terms]
        return sum(values[1:], values[0])

    def constant_logits(self):
        values = [v for v in (t.constant_logits() for t in self.terms) if v is not None]
        return sum(values[1:], values[0]) if values else None


class FaceMask(AbstractScore):
    """A face as a (zero) score term: the tokens outside `mask` are removed, once.

    `solve` adds one when it is given `support=`; users pass supports, not this."""

    is_constant: ClassVar[bool] = True
    mask: Bool[Array, "*batch vocab"]

    def __call__(self, t, log_p, aux):
        del t, aux
        return jnp.zeros_like(log_p)

    def constant_value(self):
        return jnp.broadcast_to(jnp.asarray(0.0), self.mask.shape)  # weakly typed

    def constant_logits(self):
        return None  # the face does not change the logits it was computed from

    def support(self):
        return self.mask

    @property
    def vocab_size(self):
        return self.mask.shape[-1]

    @property
    def batch_shape(self):
        return self.mask.shape[:-1]

    def broadcast_batch(self, batch_shape):
        mask = jnp.broadcast_to(self.mask, batch_shape + self.mask.shape[-1:])
        return eqx.tree_at(lambda s: s.mask, self, mask)
