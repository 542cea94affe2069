"""Score terms `z(t, p, history)`: what the flows push the distribution towards.

A score is a sum of terms. Each term is an `eqx.Module` evaluated for *one* context (a
single row of length `V`); batching is done by `solve` with `jax.vmap`. A term may carry
an auxiliary state (a history such as token counts) that is integrated alongside the
log-weights; its rate is given by `aux_rate`.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._misc import (
    broadcast_fields,
    check_host_interval,
    check_interval,
    compute_dtype,
    error_if_rows,
    fields_batch_shape,
    in_interval,
)


class AbstractScore(eqx.Module):
    """Base class of score terms.

    Subclasses implement `__call__(t, log_p, aux)` for a single context and, when they
    hold a history, `init_aux` and `aux_rate`. Terms add with `+`.

    A term whose `__call__` ignores `log_p` (it reads only the time, its parameters and
    its history) sets the class attribute `reads_p = False`: the ODE path then evaluates
    the flow's field with fewer reductions over the vocabulary. The default `True` is
    always correct.

    Parameters that may differ between contexts are declared in `row_fields` (field name
    to the number of trailing non-batch axes: `0` for a scalar per row, `1` for a vector
    over the vocabulary); the batch shape and the broadcasting follow from it. Each term
    checks its own values in `check`, on device, naming the batch index.
    """

    # `True` when the score depends neither on time, nor on the state, nor on a history:
    # then the flows have closed forms and `solve` uses them.
    is_constant: ClassVar[bool] = False
    # `False` when `__call__` ignores `log_p` (it may read the time and the history):
    # the ODE path then evaluates the field in fewer passes over the vocabulary
    # (`AbstractFlow.state_rate`). `True` is always safe.
    reads_p: ClassVar[bool] = True
    row_fields: ClassVar[dict[str, int]] = {}
    # The field that fixes the vocabulary size, named when terms disagree on it.
    vocab_field: ClassVar[str | None] = None

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

    def rest_aux(self, log_p: Float[Array, " vocab"]) -> PyTree:
        """The auxiliary state of one context held at rest at `log_p`: the history that
        a path resting at `p` forever would have (what `rx.equilibrium` evaluates the
        score with). `None` for a term without history.

        **Raises:**

        `ValueError` for a term that has a history but no rest value (subclasses with a
        history override this).
        """
        if not jtu.tree_leaves(self.init_aux(log_p)):
            return None
        raise ValueError(
            f"{type(self).__name__} has a history but does not define its value at rest "
            "(`rest_aux`), so `rx.equilibrium` cannot evaluate it."
        )

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
    reads_p: ClassVar[bool] = False
    row_fields: ClassVar[dict[str, int]] = {"logits": 1}
    vocab_field: ClassVar[str | None] = "logits"
    logits: Float[Array, "*batch vocab"]

    def __init__(self, logits: Float[ArrayLike, "*batch vocab"]):
        if not isinstance(logits, jax.Array):  # (a JAX array is kept: no dispatch)
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



class Payoff(AbstractScore):
    """State-dependent score `z = A p`: a game played against the current distribution.

    Under the replicator (R) at `T = 1` this is the replicator dynamics of evolutionary
    game theory, `ṗ_i = p_i ((Ap)_i - <p, Ap>)`. The field is a (Shahshahani) gradient
    flow iff `P A P` is symmetric (`P = I - 11ᵀ/V`); its antisymmetric part makes loops,
    e.g. rock-paper-scissors (THEORY §4, "Loops").

    **Arguments:**

    - `A`: payoff matrix of shape `(vocab, vocab)`, or `(*batch, vocab, vocab)` for one
        per batch row. `z_i = Σ_j A_ij p_j`.

    **Raises:**

    `ValueError` now if `A` is not a (batch of) square matrix; NaN or infinite entries are
    reported by `solve` (on device, with the batch index).
    """

    row_fields: ClassVar[dict[str, int]] = {"A": 2}
    vocab_field: ClassVar[str | None] = "A"
    A: Float[Array, "*a_batch vocab vocab"]

    # `_vocab`: the square shape is checked by `__init__`, with its own message.
    def __init__(self, A: Float[ArrayLike, "*a_batch vocab _vocab"]):
        shape = np.shape(A)
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ValueError(
                "`A` must be a square payoff matrix of shape (*batch, vocab, vocab); "
                f"received shape {shape}."
            )
        self.A = _as_float(A)

    def __call__(self, t, log_p, aux):
        del t, aux
        return self.A.astype(log_p.dtype) @ jnp.exp(log_p)

    @property
    def vocab_size(self):
        return self.A.shape[-1]

    def check(self):
        return eqx.tree_at(lambda s: s.A, self, _check_finite(self.A, "A", 2))


class LowRankPayoff(AbstractScore):
    """State-dependent score `z = U (Wᵀ p)`: the payoff matrix `A = U Wᵀ` of rank `r`,
    never formed (memory and work `O(V r)`, so it runs at vocabulary scale).

    **Arguments:**

    - `U`, `W`: arrays of shape `(*batch, vocab, r)` (the same `vocab` and `r`; their
        batch shapes broadcast together).

    **Raises:**

    `ValueError` now if the shapes of `U` and `W` do not match; NaN or infinite entries
    are reported by `solve` (on device, with the batch index).
    """

    row_fields: ClassVar[dict[str, int]] = {"U": 2, "W": 2}
    vocab_field: ClassVar[str | None] = "U"
    U: Float[Array, "*u_batch vocab rank"]
    W: Float[Array, "*w_batch vocab rank"]

    # `_vocab`, `_rank`: matching shapes are checked by `__init__`, with its own message.
    def __init__(
        self,
        U: Float[ArrayLike, "*u_batch vocab rank"],
        W: Float[ArrayLike, "*w_batch _vocab _rank"],
    ):
        for name, x in (("U", U), ("W", W)):
            if np.ndim(x) < 2:
                raise ValueError(
                    f"`{name}` must have shape (*batch, vocab, rank); received shape "
                    f"{np.shape(x)}."
                )
        if np.shape(U)[-2:] != np.shape(W)[-2:]:
            raise ValueError(
                "`U` and `W` must have the same trailing shape (vocab, rank); received "
                f"{np.shape(U)} and {np.shape(W)}."
            )
        self.U = _as_float(U)
        self.W = _as_float(W)
        self.guard = None

    # A zero per row that carries the run-time checks of `U` and `W` (`None` until
    # `check`). Attaching a check to `U` itself would make XLA copy it (the checked
    # array is a new buffer): at vocabulary scale that doubles the memory of the term.
    guard: Float[Array, "*guard_batch"] | None

    def __call__(self, t, log_p, aux):
        del t, aux
        p = jnp.exp(log_p)
        z = self.U.astype(p.dtype) @ (p @ self.W.astype(p.dtype))
        return z if self.guard is None else z + self.guard.astype(z.dtype)

    @property
    def vocab_size(self):
        return self.U.shape[-2]

    def check(self):
        bad_U = jnp.any(~jnp.isfinite(self.U), axis=(-2, -1))
        bad_W = jnp.any(~jnp.isfinite(self.W), axis=(-2, -1))
        guard = jnp.zeros(bad_U.shape, self.U.dtype)
        guard = error_if_rows(guard, bad_U, "`U` contains NaN or inf at batch index {index}.")
        guard = error_if_rows(guard, bad_W, "`W` contains NaN or inf at batch index {index}.")
        return eqx.tree_at(lambda s: s.guard, self, guard, is_leaf=lambda x: x is None)


class AbstractMemoryScore(AbstractScore):
    """Base class of the terms that depend on a memory `c` of the path (THEORY §4).

    - `tau=None`: cumulative fluid counts, `ċ = p`, starting from `memory0` (default 0):
        `c` is the expected number of times each token has been emitted so far.
    - finite `tau`: a fading memory of `stages` stages, `ċ₁ = (p - c₁)/τ`,
        `ċₖ = (cₖ₋₁ - cₖ)/τ`; the term reads the last stage. Every stage starts at
        `memory0`, by default the start distribution `p(t0)` (a memory that has always
        seen the start). Each stage is a low-pass filter of time constant `τ`, so the
        chain is a delay of mean `stages·τ`.

    The memory is the term's auxiliary state: `(vocab,)` for cumulative counts,
    `(stages, vocab)` for a fading memory (in `Trajectory.aux`). Subclasses turn it into a
    score with `score_of_memory`.
    """

    reads_p: ClassVar[bool] = False
    tau: Float[Array, "*tau_batch"] | None
    memory0: Float[Array, "*memory_batch vocab"] | None
    stages: int = eqx.field(static=True)

    @abc.abstractmethod
    def score_of_memory(
        self, memory: Float[Array, " vocab"]
    ) -> Float[Array, " vocab"]:
        """The score of one context given the memory it reads (the last stage)."""

    def __call__(self, t, log_p, aux):
        del t, log_p
        return self.score_of_memory(aux if self.tau is None else aux[-1])

    def init_aux(self, log_p0):
        start = jnp.exp(log_p0) if self.memory0 is None else self.memory0
        if self.tau is None:
            if self.memory0 is None:
                return jnp.zeros_like(log_p0)
            return self.memory0.astype(log_p0.dtype)
        start = start.astype(log_p0.dtype)
        return jnp.broadcast_to(start, (self.stages,) + start.shape)

    def aux_rate(self, t, log_p, aux):
        del t
        p = jnp.exp(log_p)
        if self.tau is None:
            return p
        upstream = jnp.concatenate([p[None], aux[:-1]], axis=0)
        return (upstream - aux) / self.tau.astype(aux.dtype)

    def rest_aux(self, log_p):
        """Every stage of a fading memory equal to `p` (the rest of `ċ₁ = (p - c₁)/τ`,
        `ċₖ = (cₖ₋₁ - cₖ)/τ`), whatever `memory0`.

        **Raises:**

        `ValueError` for cumulative counts (`tau=None`): `ċ = p` grows without bound,
        so the flow has no rest point.
        """
        if self.tau is None:
            raise ValueError(
                f"`{type(self).__name__}` with cumulative counts (`tau=None`) has no rest "
                "point: its counts grow without bound (ċ = p). Give it a fading memory "
                "(a finite `tau`) to look for equilibria."
            )
        p = jnp.exp(log_p)
        return jnp.broadcast_to(p, (self.stages,) + p.shape)

    @property
    def vocab_size(self):
        return None if self.memory0 is None else self.memory0.shape[-1]

    def check_memory(self) -> "AbstractMemoryScore":
        """This term with the run-time checks of `tau` and `memory0` attached."""
        tau, memory0 = self.tau, self.memory0
        if tau is not None:
            tau = check_interval(tau, "tau", 0, np.inf, True, True)
        if memory0 is not None:
            ok = in_interval(jnp, memory0, 0, np.inf, False, True)
            memory0 = error_if_rows(
                memory0,
                ~jnp.all(ok, axis=-1),
                "`memory0` must be finite and >= 0; it is not at batch index {index}.",
            )
        return eqx.tree_at(
            lambda s: (s.tau, s.memory0),
            self,
            (tau, memory0),
            is_leaf=lambda x: x is None,
        )


def _memory_options(tau, stages, memory0):
    """Checked `tau` and `memory0` (host values now) and `stages`."""
    if not isinstance(stages, int | np.integer) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"`stages` must be an int >= 1; received {stages!r}.")
    if tau is None and stages != 1:
        raise ValueError(
            f"`stages={stages}` needs a finite `tau` (a fading memory); cumulative "
            "counts (`tau=None`) have a single stage."
        )
    if tau is not None:
        check_host_interval(tau, "tau", 0, np.inf, True, True)
        tau = _as_float(tau)
    if memory0 is not None:
        if np.ndim(memory0) < 1:
            raise ValueError(
                "`memory0` must have shape (*batch, vocab); received a scalar."
            )
        check_host_interval(memory0, "memory0", 0, np.inf, False, True)
        memory0 = _as_float(memory0)
    return tau, int(stages), memory0


_MEMORY_ARGS = """
    - `tau`: `None` (default) for cumulative counts `ċ = p`; else the time constant
        `τ > 0` of a fading memory, a scalar or one per batch row.
    - `stages`: number of stages of the fading memory, an int `>= 1` (static); `1` with
        cumulative counts.
    - `memory0`: the memory at `t0`, shape `(*batch, vocab)`, entries finite and `>= 0`
        (every stage starts there). Default: `0` for cumulative counts, the start
        distribution for a fading memory.
"""

_MEMORY_RAISES = """
    **Raises:**

    `ValueError` now for a bad `stages`, and for host values out of range (naming the
    argument); device or traced values out of range are reported by `solve` on device,
    naming the argument and the batch index.
"""


class FrequencyPenalty(AbstractMemoryScore):
    """History-dependent score `z = -alpha * c`, `c` a memory of the path.

    The fluid limit of the frequency penalty of language-model decoding (THEORY §4): with
    `tau=None`, `c` are the cumulative counts `ċ = p`, `c(0) = 0`, and under the
    replicator the flow is Hamiltonian (`frequency_penalty_hamiltonian` is conserved):
    loops never damp. With a finite `tau` the counts fade (see `AbstractMemoryScore`);
    with two stages and `s = 0` the uniform point loses stability at
    `alpha_c = 2 V T / tau`, oscillating with period `2π tau`; one stage only damps.

    **Arguments:**

    - `alpha`: penalty strength `>= 0`, a scalar or one per batch row.
    """

    __doc__ = (__doc__ or "").rstrip() + _MEMORY_ARGS + _MEMORY_RAISES

    row_fields: ClassVar[dict[str, int]] = {"alpha": 0, "tau": 0, "memory0": 1}
    vocab_field: ClassVar[str | None] = "memory0"
    alpha: Float[Array, "*alpha_batch"]

    def __init__(
        self,
        alpha: Float[ArrayLike, "*alpha_batch"],
        tau: Float[ArrayLike, "*tau_batch"] | None = None,
        stages: int = 1,
        memory0: Float[ArrayLike, "*memory_batch vocab"] | None = None,
    ):
        check_host_interval(alpha, "alpha", 0, np.inf, False, True)
        self.alpha = jnp.asarray(alpha)
        self.tau, self.stages, self.memory0 = _memory_options(tau, stages, memory0)

    def check(self):
        alpha = check_interval(self.alpha, "alpha", 0, np.inf, False, True)
        return eqx.tree_at(lambda s: s.alpha, self, alpha).check_memory()

    def score_of_memory(self, memory):
        return -self.alpha.astype(memory.dtype) * memory


def presence(memory: Array, sharpness: Array) -> Array:
    """The smooth presence indicator `φ(c) = 1 - exp(-sharpness·c)` of a memory `c >= 0`:
    0 at `c = 0`, increasing, tending to the hard indicator `1[c > 0]` as
    `sharpness → ∞` (at fixed `c > 0` the gap is `exp(-sharpness·c)`)."""
    return -jnp.expm1(-sharpness.astype(memory.dtype) * memory)


class PresencePenalty(AbstractMemoryScore):
    """History-dependent score `z = -alpha * φ(c)`: a penalty on tokens already present.

    The fluid form of the presence penalty of language-model decoding, which subtracts
    `alpha` from every token emitted at least once. Here `c` is a memory of the path
    (THEORY §4; see `AbstractMemoryScore`) and `φ(c) = 1 - exp(-sharpness·c)` a smooth
    presence indicator, which tends to `1[c > 0]` as `sharpness → ∞`.

    **Arguments:**

    - `alpha`: penalty strength `>= 0`, a scalar or one per batch row.
    - `sharpness`: `> 0` and finite, a scalar or one per batch row: how little memory
        counts as present (`φ = 1 - 1/e` at `c = 1/sharpness`).
    """

    __doc__ = (__doc__ or "").rstrip() + _MEMORY_ARGS + _MEMORY_RAISES

    row_fields: ClassVar[dict[str, int]] = {
        "alpha": 0,
        "sharpness": 0,
        "tau": 0,
        "memory0": 1,
    }
    vocab_field: ClassVar[str | None] = "memory0"
    alpha: Float[Array, "*alpha_batch"]
    sharpness: Float[Array, "*sharpness_batch"]

    def __init__(
        self,
        alpha: Float[ArrayLike, "*alpha_batch"],
        sharpness: Float[ArrayLike, "*sharpness_batch"],
        tau: Float[ArrayLike, "*tau_batch"] | None = None,
        stages: int = 1,
        memory0: Float[ArrayLike, "*memory_batch vocab"] | None = None,
    ):
        check_host_interval(alpha, "alpha", 0, np.inf, False, True)
        check_host_interval(sharpness, "sharpness", 0, np.inf, True, True)
        self.alpha = jnp.asarray(alpha)
        self.sharpness = _as_float(sharpness)
        self.tau, self.stages, self.memory0 = _memory_options(tau, stages, memory0)

    def check(self):
        alpha = check_interval(self.alpha, "alpha", 0, np.inf, False, True)
        sharpness = check_interval(self.sharpness, "sharpness", 0, np.inf, True, True)
        out = eqx.tree_at(lambda s: (s.alpha, s.sharpness), self, (alpha, sharpness))
        return out.check_memory()

    def score_of_memory(self, memory):
        return -self.alpha.astype(memory.dtype) * presence(memory, self.sharpness)


class RepetitionPenalty(AbstractMemoryScore):
    """The multiplicative repetition penalty of transformers, weighted by the smooth
    presence of a memory of the path, written as an additive score term.

    transformers' `repetition_penalty` replaces the logit `s_i` of every token already in
    the context by `r(s_i)`: `s_i / penalty` if `s_i > 0`, `s_i · penalty` otherwise.
    This term adds `φ(c_i) (r(s_i) - s_i)` (with `φ` the presence indicator of
    `PresencePenalty`), so that `Logits(s) + RepetitionPenalty(..., logits=s)` scores
    `s_i` where the memory is empty and `r(s_i)` where it is present; with a hard 0/1
    memory and a large `sharpness` it is exactly transformers' processed logits.

    The penalty is relative to logits, and a score term sees only its own parameters, so
    the term holds a copy of them (`logits`, keyword-only): give it the same array as the
    `Logits` term. It adds nothing to masked (`-inf`) tokens.

    **Arguments:**

    - `penalty`: `> 0` and finite (`1` is no penalty; transformers uses `> 1`), a scalar
        or one per batch row.
    - `sharpness`: as in `PresencePenalty`.
    - `logits`: the logits the penalty rescales, shape `(*batch, vocab)`.
    """

    __doc__ = (__doc__ or "").rstrip() + _MEMORY_ARGS + _MEMORY_RAISES

    row_fields: ClassVar[dict[str, int]] = {
        "penalty": 0,
        "sharpness": 0,
        "logits": 1,
        "tau": 0,
        "memory0": 1,
    }
    vocab_field: ClassVar[str | None] = "logits"
    penalty: Float[Array, "*penalty_batch"]
    sharpness: Float[Array, "*sharpness_batch"]
    logits: Float[Array, "*logits_batch vocab"]

    def __init__(
        self,
        penalty: Float[ArrayLike, "*penalty_batch"],
        sharpness: Float[ArrayLike, "*sharpness_batch"],
        tau: Float[ArrayLike, "*tau_batch"] | None = None,
        stages: int = 1,
        memory0: Float[ArrayLike, "*memory_batch vocab"] | None = None,
        *,
        logits: Float[ArrayLike, "*logits_batch vocab"],
    ):
        check_host_interval(penalty, "penalty", 0, np.inf, True, True)
        check_host_interval(sharpness, "sharpness", 0, np.inf, True, True)
        if np.ndim(logits) < 1:
            raise ValueError("`logits` must have shape (*batch, vocab); received a scalar.")
        self.penalty = _as_float(penalty)
        self.sharpness = _as_float(sharpness)
        self.logits = _as_float(logits)
        self.tau, self.stages, self.memory0 = _memory_options(tau, stages, memory0)
        if self.memory0 is not None and self.memory0.shape[-1] != self.logits.shape[-1]:
            raise ValueError(
                f"`memory0` must have shape (*batch, {self.logits.shape[-1]}) to match "
                f"`logits`; received shape {self.memory0.shape}."
            )

    @property
    def vocab_size(self):
        return self.logits.shape[-1]

    def check(self):
        penalty = check_interval(self.penalty, "penalty", 0, np.inf, True, True)
        sharpness = check_interval(self.sharpness, "sharpness", 0, np.inf, True, True)
        logits = error_if_rows(
            self.logits,
            jnp.any(jnp.isnan(self.logits) | (self.logits == jnp.inf), axis=-1),
            "`logits` of `RepetitionPenalty` contains NaN or +inf at batch index "
            "{index}.",
        )
        out = eqx.tree_at(
            lambda s: (s.penalty, s.sharpness, s.logits),
            self,
            (penalty, sharpness, logits),
        )
        return out.check_memory()

    def score_of_memory(self, memory):
        s = self.logits.astype(memory.dtype)
        penalty = self.penalty.astype(memory.dtype)
        # Masked tokens get 0 (not nan from -inf - -inf), before any arithmetic so that
        # gradients stay finite too.
        s = jnp.where(s == -jnp.inf, jnp.zeros((), s.dtype), s)
        shift = jnp.where(s > 0, s / penalty, s * penalty) - s
        return presence(memory, self.sharpness) * shift


def _as_float(x) -> Array:
    """`x` as an array, integers promoted to the float dtype replicax computes in."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(compute_dtype(x.dtype))
    return x


def _check_finite(x: Array, name: str, core: int) -> Array:
    """Run-time error naming the batch row where `x` (with `core` trailing axes) has a
    NaN or infinite entry."""
    axes = tuple(range(x.ndim - core, x.ndim))
    return error_if_rows(
        x,
        jnp.any(~jnp.isfinite(x), axis=axes),
        f"`{name}` contains NaN or inf at batch index {{index}}.",
    )


class ScoreSum(AbstractScore):
    """The sum of several score terms (made with `+`); its history is a tuple."""

    terms: tuple[AbstractScore, ...]

    @property
    def is_constant(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return all(term.is_constant for term in self.terms)

    @property
    def reads_p(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return any(term.reads_p for term in self.terms)

    def __call__(self, t, log_p, aux):
        # Terms may hold parameters of other dtypes (float32 logits, a float64 payoff):
        # the sum is taken in the state's dtype.
        zs = [
            term(t, log_p, a).astype(log_p.dtype)
            for term, a in zip(self.terms, aux, strict=True)
        ]
        return sum(zs[1:], zs[0])

    def init_aux(self, log_p0):
        return tuple(term.init_aux(log_p0) for term in self.terms)

    def aux_rate(self, t, log_p, aux):
        return tuple(
            term.aux_rate(t, log_p, a) for term, a in zip(self.terms, aux, strict=True)
        )

    def rest_aux(self, log_p):
        return tuple(term.rest_aux(log_p) for term in self.terms)

    @property
    def vocab_size(self):
        sizes = {term.vocab_size for term in self.terms} - {None}
        if len(sizes) > 1:
            which = ", ".join(
                f"`{term.vocab_field}` of {type(term).__name__} has {term.vocab_size}"
                for term in self.terms
                if term.vocab_size is not None
            )
            raise ValueError(f"Score terms disagree on the vocabulary size: {which}.")
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
