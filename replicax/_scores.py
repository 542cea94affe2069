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

from ._misc import (
    broadcast_fields,
    check_host_interval,
    check_interval,
    compute_dtype,
    error_if_rows,
    fields_batch_shape,
)


class AbstractScore(eqx.Module):
    """Base class of score terms.

    Subclasses implement `__call__(t, log_p, aux)` for a single context and, when they
    hold a history, `init_aux` and `aux_rate`. Terms add with `+`.

    Parameters that may differ between contexts are declared in `row_fields` (field name
    to the number of trailing non-batch axes: `0` for a scalar per row, `1` for a vector
    over the vocabulary); the batch shape and the broadcasting follow from it. Each term
    checks its own values in `check`, on device, naming the batch index.
    """

    # `True` when the score depends neither on time, nor on the state, nor on a history:
    # then the flows have closed forms and `solve` uses them.
    is_constant: ClassVar[bool] = False
    row_fields: ClassVar[dict[str, int]] = {}

    @abc.abstractmethod
    def __call__(
        self, t: Float[Array, ""], log_p: Float[Array, " vocab"], aux: PyTree
    ) -> Float[Array, " vocab"]:
        """Scores of one context at time `t`, given its log-probabilities and history.

        Must be finite on the face; entries off the face are ignored.
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

    def check(self) -> "AbstractScore":
        """This term with run-time checks of its values attached (leaves already
        broadcast to the batch shape, so that a bad row is named by its index)."""
        return self

    @property
    def vocab_size(self) -> int | None:
        """The vocabulary size this term fixes, or `None` if it works for any."""
        return None

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading (batch) shape of this term's per-row parameters."""
        return fields_batch_shape(self, self.row_fields, type(self).__name__)

    def broadcast_batch(self, batch_shape: tuple[int, ...]) -> "AbstractScore":
        """This term with every per-row parameter given the leading shape `batch_shape`."""
        return broadcast_fields(self, self.row_fields, batch_shape, type(self).__name__)

    def face(self) -> Bool[Array, "*batch vocab"] | None:
        """Tokens this term allows (`None`: all of them)."""
        return None

    def constant_value(self) -> Float[Array, "*batch vocab"]:
        """The score itself, for constant terms (used by the closed forms)."""
        raise NotImplementedError(
            f"{type(self).__name__} is not constant, so it has no closed form."
        )

    def constant_logits(self) -> Float[Array, "*batch vocab"] | None:
        """The time- and state-independent part of the score, `-inf` off its face
        (what decoding truncations such as top-p are evaluated on); `None` if none."""
        if not self.is_constant:
            return None
        value = self.constant_value()
        mask = self.face()
        return value if mask is None else jnp.where(mask, value, -jnp.inf)

    def __add__(self, other):
        if not isinstance(other, AbstractScore):
            return NotImplemented
        return ScoreSum(_terms(self) + _terms(other))


def _terms(score: AbstractScore) -> tuple[AbstractScore, ...]:
    return score.terms if isinstance(score, ScoreSum) else (score,)


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
    row_fields: ClassVar[dict[str, int]] = {"logits": 1}
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
        # finite; the face itself is carried by `face()`.
        return jnp.where(s == -jnp.inf, jnp.zeros((), s.dtype), s)

    def face(self):
        return self.logits != -jnp.inf

    @property
    def vocab_size(self):
        return self.logits.shape[-1]

    def check(self):
        logits = error_if_rows(
            self.logits,
            jnp.any(jnp.isnan(self.logits) | (self.logits == jnp.inf), axis=-1),
            "`logits` contains NaN or +inf at batch index {index}. Use -inf to mask "
            "a token.",
        )
        logits = error_if_rows(
            logits,
            jnp.all(logits == -jnp.inf, axis=-1),
            "`logits` is all -inf at batch index {index}: no token is left.",
        )
        return eqx.tree_at(lambda s: s.logits, self, logits)


class SelfReinforcement(AbstractScore):
    """State-dependent score `z = beta * p`: tokens that are likely become likelier.

    With constant logits added this is the lock-in model of THEORY §4 (brittle
    attractors). It has no closed form; `solve` integrates it with diffrax.

    **Arguments:**

    - `beta`: strength, a scalar or one per batch row. Must be finite.
    """

    row_fields: ClassVar[dict[str, int]] = {"beta": 0}
    beta: Float[Array, "*batch"]

    def __init__(self, beta: Float[ArrayLike, "*batch"]):
        check_host_interval(beta, "beta", -np.inf, np.inf, True, True)
        self.beta = jnp.asarray(beta)

    def check(self):
        beta = check_interval(self.beta, "beta", -np.inf, np.inf, True, True)
        return eqx.tree_at(lambda s: s.beta, self, beta)

    def __call__(self, t, log_p, aux):
        del t, aux
        return self.beta.astype(log_p.dtype) * jnp.exp(log_p)



class FrequencyPenalty(AbstractScore):
    """History-dependent score `z = -alpha * c` with counts `ċ = p`, `c(0) = 0`.

    The fluid limit of transformers' / OpenAI's frequency penalty (THEORY §4): `c` is
    the expected number of times each token has been emitted. Under the replicator the
    quantity `logsumexp θ - <s, c>/T + alpha |c|^2 / (2T)` is conserved.

    **Arguments:**

    - `alpha`: penalty strength, a scalar or one per batch row; must be >= 0.
    """

    row_fields: ClassVar[dict[str, int]] = {"alpha": 0}
    alpha: Float[Array, "*batch"]

    def __init__(self, alpha: Float[ArrayLike, "*batch"]):
        check_host_interval(alpha, "alpha", 0, np.inf, False, True)
        self.alpha = jnp.asarray(alpha)

    def check(self):
        alpha = check_interval(self.alpha, "alpha", 0, np.inf, False, True)
        return eqx.tree_at(lambda s: s.alpha, self, alpha)

    def __call__(self, t, log_p, aux):
        del t, log_p
        return -self.alpha.astype(aux.dtype) * aux

    def init_aux(self, log_p0):
        return jnp.zeros_like(log_p0)

    def aux_rate(self, t, log_p, aux):
        del t, aux
        return jnp.exp(log_p)



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

    def check(self):
        return ScoreSum(tuple(term.check() for term in self.terms))

    def face(self):
        masks = [m for m in (term.face() for term in self.terms) if m is not None]
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out

    def constant_value(self):
        values = [term.constant_value() for term in self.terms]
        return sum(values[1:], values[0])

    def constant_logits(self):
        values = [v for v in (t.constant_logits() for t in self.terms) if v is not None]
        return sum(values[1:], values[0]) if values else None
