"""Quantities computed along a path (THEORY §5).

Functions of `log_p` work on any leading shape (the vocabulary is the last axis) and can be
used inside `SaveAt(fn=...)`. Functions of a flow (`speed`, `time_to`, `target_log_p`,
`limit_log_p`) broadcast the flow's batch against their other arguments.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow, Replicator
from ._rows import prepare_rows, score_face, vmap_rows, with_auto_axes
from ._support import TopP
from ._time_to import check_eps


def _p_and_safe_log(log_p):
    # Double `where`: off the support log_p = -inf and p log p must be 0 with a finite
    # gradient (THEORY §6.4).
    alive = log_p > -jnp.inf
    safe = jnp.where(alive, log_p, 0)
    return jnp.where(alive, jnp.exp(safe), 0), safe, alive


def entropy(log_p: Float[Array, "*batch vocab"]) -> Float[Array, "*batch"]:
    """Shannon entropy `H(p) = -Σ p_i log p_i` (nats), with `0 log 0 = 0`."""
    p, safe, _ = _p_and_safe_log(log_p)
    # Rounding can leave a tiny negative for a near-vertex; entropy is >= 0.
    return jnp.maximum(-jnp.sum(p * safe, axis=-1), 0)


def kl(
    log_p: Float[Array, "*p_batch vocab"], log_q: Float[Array, "*q_batch vocab"]
) -> Float[Array, "..."]:
    """Kullback–Leibler divergence `KL(p ‖ q) = Σ p_i (log p_i - log q_i)`.

    `+inf` where `p` puts mass on a token that `q` does not. For the other direction swap
    the arguments: `kl(log_q, log_p)` is `KL(q ‖ p)`.
    """
    p, safe_p, alive = _p_and_safe_log(log_p)
    q_alive = log_q > -jnp.inf
    safe_q = jnp.where(q_alive, log_q, 0)
    terms = jnp.where(alive, p * (safe_p - safe_q), 0)
    out = jnp.maximum(jnp.sum(terms, axis=-1), 0)  # >= 0 up to rounding
    impossible = jnp.any(alive & ~q_alive, axis=-1)
    return jnp.where(impossible, jnp.inf, out)


def free_energy(
    log_p: Float[Array, "*batch vocab"],
    logits: Float[ArrayLike, "*logits_batch vocab"],
    temperature: Float[ArrayLike, "*temperature_batch"] | float,
) -> Float[Array, "*batch"]:
    """Free energy `F_T(p) = <p, s> + T H(p)` (THEORY §1).

    Maximised by `softmax(s/T)`, where it equals `T logsumexp(s/T)`; non-decreasing along
    the entropic replicator. Masked logits (`-inf`) count only where `p` is zero.
    """
    logits = jnp.broadcast_to(jnp.asarray(logits, log_p.dtype), log_p.shape)
    temperature = jnp.broadcast_to(
        jnp.asarray(temperature, log_p.dtype), log_p.shape[:-1]
    )
    p, _, alive = _p_and_safe_log(log_p)
    s = jnp.where(alive, logits, 0)
    return jnp.sum(p * s, axis=-1) + temperature * entropy(log_p)


def fisher_rao_distance(
    log_p: Float[Array, "*p_batch vocab"], log_q: Float[Array, "*q_batch vocab"]
) -> Float[Array, "..."]:
    """Fisher–Rao (Shahshahani) geodesic distance `2 arccos Σ √(p_i q_i)`, in `[0, π]`.

    Computed as `4 atan2(‖√p - √q‖, ‖√p + √q‖)`, which equals the above but keeps full
    relative accuracy for nearby points (where `arccos` near 1 loses half the digits).
    """
    u = jnp.exp(jnp.where(log_p > -jnp.inf, 0.5 * log_p, -jnp.inf))
    v = jnp.exp(jnp.where(log_q > -jnp.inf, 0.5 * log_q, -jnp.inf))
    return 4 * jnp.arctan2(_safe_norm(u - v), _safe_norm(u + v))


def _safe_norm(x):
    # The norm has no gradient at 0 (p = q): double `where` keeps it finite (optax).
    sq = jnp.sum(x**2, axis=-1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1)), 0)


def arc_length(
    log_p: Float[Array, "*batch times vocab"],
) -> Float[Array, "*batch"]:
    """Fisher–Rao length of a saved path: the sum of geodesic distances between
    consecutive saved points (converges to `∫ ‖ṗ‖ dt` as the saved grid is refined).

    For `V = 2` from uniform to a vertex the exact length is `π/2` (THEORY §5).
    """
    steps = fisher_rao_distance(log_p[..., 1:, :], log_p[..., :-1, :])
    return jnp.sum(steps, axis=-1)


def top_k_mass(log_p: Float[Array, "*batch vocab"], k: int) -> Float[Array, "*batch"]:
    """Total probability of the `k` most likely tokens (`k` is static)."""
    if not isinstance(k, int) or k < 1 or k > log_p.shape[-1]:
        raise ValueError(
            f"`k` must be an int in [1, vocab={log_p.shape[-1]}]; received {k!r}."
        )
    top, _ = jax.lax.top_k(log_p, k)
    return jnp.sum(jnp.exp(top), axis=-1)


def argmax(log_p: Float[Array, "*batch vocab"]) -> Int[Array, "*batch"]:
    """The most likely token (the first one on ties)."""
    return jnp.argmax(log_p, axis=-1)


# One compile per function and structure: un-jitted, a vmapped closed form dispatches many
# small operations one by one.
_map_rows = eqx.filter_jit(vmap_rows)


def speed(
    flow: AbstractFlow,
    log_p: Float[ArrayLike, "*p_batch vocab"],
    t: RealScalarLike = 0.0,
    aux: PyTree = None,
) -> Float[Array, "*out_batch"]:
    """Shahshahani (Fisher–Rao) speed `‖ṗ‖ = sqrt(Σ ṗ_i² / p_i) = sd_p(θ̇)` of `flow` at
    the state `log_p` (and history `aux`, for scores that have one).

    Along (R) with constant scores this is `sd_p(s)/T`.
    """
    log_p = jnp.asarray(log_p)
    t = jnp.asarray(t, log_p.dtype)
    if aux is not None:
        if log_p.ndim != 1:
            raise ValueError("`aux` is only supported for a single context; use jax.vmap.")
        face = (log_p > -jnp.inf) & score_face(flow.score, log_p.shape)
        return _speed_at(flow, jnp.where(face, log_p, -jnp.inf), face, t, aux)
    return _map_rows(_speed_one, prepare_rows(flow, log_y0=log_p), t)


def _speed_one(row, t):
    log_p = row.log_p0()
    return _speed_at(row.flow, log_p, row.face, t, row.flow.score.init_aux(log_p))


def _speed_at(flow, log_p, face, t, aux):
    rate = flow.log_rate(t, log_p, aux, face)
    return jnp.sqrt(jnp.sum(jnp.where(face, jnp.exp(log_p) * rate**2, 0)))


def target_log_p(
    flow: AbstractFlow, *, support=None, temperature_first: bool = True
) -> Float[Array, "*out_batch vocab"]:
    """`log softmax(s/T)` on the support (and on the face of `support`, as in `solve`):
    the rest point of (E) and the point (R) passes at `t = 1` from uniform. With a face
    this is the distribution transformers samples from after its warpers."""
    _need_constant(flow, "target_log_p")
    rows = prepare_rows(flow, support=support, temperature_first=temperature_first)
    return _map_rows(_target_one, rows)


def _target_one(row):
    s = row.centred_scores() / row.flow.temperature.astype(row.dtype)
    return jax.nn.log_softmax(jnp.where(row.face, s, -jnp.inf))


def limit_log_p(
    flow: AbstractFlow,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    *,
    support=None,
    temperature_first: bool = True,
) -> Float[Array, "*out_batch vocab"]:
    """`lim_{t→∞} log p(t)` for constant scores (THEORY §1): the argmax set of `s`
    weighted by `p₀` for (R); `softmax(s/T)` on the support of `p₀` for (E). `support`
    and `temperature_first` as in `solve`."""
    _need_constant(flow, "limit_log_p")
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    return _map_rows(_limit_one, rows)


def _limit_one(row):
    return row.flow.limit_log_p(row.log_p0(), row.scores(), row.face)


def _need_constant(flow, name):
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"`flow` must be a replicax flow; received {type(flow).__name__}.")
    if not flow.score.is_constant:
        raise ValueError(f"`{name}` needs a constant score (closed forms only).")


def face(
    flow: AbstractFlow, support, *, temperature_first: bool = True
) -> Bool[Array, "*out_batch vocab"]:
    """The face (tokens kept) that `support` leaves for each context of `flow`, as `solve`
    uses it: `True` where transformers' warpers would leave a finite logit."""
    rows = prepare_rows(flow, support=support, temperature_first=temperature_first)
    return _map_rows(_face_one, rows)


def _face_one(row):
    return row.face


def discarded_mass(
    log_p: Float[Array, "*batch vocab"], face_mask: Bool[ArrayLike, "*face_batch vocab"]
) -> Float[Array, "*batch"]:
    """Mass a truncation to `face_mask` throws away, `1 - p(S)` (THEORY §3)."""
    face_mask = jnp.broadcast_to(jnp.asarray(face_mask), log_p.shape)
    kept = jnp.sum(jnp.where(face_mask, jnp.exp(log_p), 0), axis=-1)
    return jnp.clip(1 - kept, 0, 1)


def projection_cost(
    log_p: Float[Array, "*batch vocab"], face_mask: Bool[ArrayLike, "*face_batch vocab"]
) -> Float[Array, "*batch"]:
    """Cost of restricting `p` to the face, `KL(p|_S ‖ p) = -log p(S)` (THEORY §3): the
    I-projection onto the face."""
    face_mask = jnp.broadcast_to(jnp.asarray(face_mask), log_p.shape)
    kept = jax.nn.logsumexp(jnp.where(face_mask, log_p, -jnp.inf), axis=-1)
    return jnp.maximum(-kept, 0)


def nucleus_size(
    logits: Float[ArrayLike, "*batch vocab"],
    temperatures: Float[ArrayLike, " temperatures"],
    top_p: float | Float[ArrayLike, ""],
    *,
    min_tokens_to_keep: int = 1,
) -> Int[Array, "*batch temperatures"]:
    """Number of tokens in the top-p set of `softmax(logits / T)` for each temperature
    (transformers' rule): the face of `TopP` grows with `T` (THEORY §3)."""
    logits = jnp.asarray(logits)
    temperatures = jnp.asarray(temperatures, logits.dtype)
    top_p_support = TopP(top_p, min_tokens_to_keep=min_tokens_to_keep)

    def count(T):
        flow = Replicator(logits, T)
        return jnp.sum(face(flow, top_p_support), axis=-1)

    return jnp.stack([count(T) for T in temperatures], axis=-1)


def time_to(
    flow: AbstractFlow,
    eps: Float[ArrayLike, "*eps_batch"] | float,
    *,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    support=None,
    temperature_first: bool = True,
    bound: bool = False,
) -> Float[Array, "*out_batch"]:
    """Time for a flow with constant scores to come within `eps` of where it ends.

    What "within `eps`" means depends on the flow, because they end in different places
    (THEORY §1):

    - `Replicator`: `1 - p(K) <= eps`, where `K` is the argmax set of the logits (on the
        support of `p₀`). Closed-form bound: `t = (T/Δ) log((1 - p₀(K)) / (p₀(K) eps))`,
        `Δ` the gap between the top score and the next one.
    - `EntropicReplicator`: `KL(p(t) ‖ softmax(s/T)) <= eps`. Closed-form bound:
        `t = ½ log(R² / (8 eps))`, `R = range(log p₀ - s/T)` on the support.

    **Arguments:**

    - `flow`: a flow whose score is constant (`Logits`).
    - `eps`: threshold, a scalar or one per batch row, at least the smallest normal
        number of the computing dtype (`jnp.finfo(dtype).tiny`: `1.18e-38` in float32,
        `2.23e-308` in float64). The distances are computed in forms that keep full
        relative accuracy however small they get, so the time is accurate (float32 within
        `1e-3` of float64; about `1e-6` for moderate `s/T`, more where rounding the
        inputs to float32 already moves `log p₀ - s/T`) and increasing as `eps`
        decreases, all the way down to that value; below it `eps` has lost digits.
    - `y0`, `log_y0`: start as in `solve` (default uniform).
    - `support`, `temperature_first`: a face, as in `solve` (the formulas hold on it
        with `V -> |S|`).
    - `bound`: return the closed-form upper bound above instead of the exact time.

    **Returns:**

    Times of shape `(*batch,)`; `0` where the start is already within `eps` (always so
    on a face of one token). The exact time is the root of the log of the distance, a
    decreasing closed-form function, found by `optimistix.Bisection` between `0` and the
    bound; its gradient (w.r.t. logits, temperature, start and `eps`) comes from the
    implicit function theorem.

    **Raises:**

    `ValueError` now, or a run-time error naming the batch index under `jit` / `vmap`,
    when `eps` is NaN, infinite, or below the smallest normal number of the dtype.
    """
    _need_constant(flow, "time_to")
    rows = prepare_rows(
        flow,
        y0=y0,
        log_y0=log_y0,
        support=support,
        temperature_first=temperature_first,
        extra_batch_shapes=(jnp.shape(eps),),
    )
    eps = check_eps(eps, rows.dtype, rows.batch_shape)
    if not isinstance(bound, bool):
        raise TypeError(f"`bound` must be a bool; received {bound!r}.")
    return _time_to_rows(_time_to_bound_one if bound else _time_to_one, rows, eps)


@eqx.filter_jit
def _time_to_rows(fn, rows, eps):
    # Bisection (optimistix) per row: on a mesh of explicit axes, with them made `Auto`.
    return with_auto_axes(lambda rows, eps: vmap_rows(fn, rows, eps), rows, eps)


def _time_to_one(row, eps):
    return row.flow.time_to(row.log_p0(), row.scores(), row.face, eps, bound=False)


def _time_to_bound_one(row, eps):
    return row.flow.time_to(row.log_p0(), row.scores(), row.face, eps, bound=True)


__all__ = [
    "arc_length",
    "argmax",
    "entropy",
    "fisher_rao_distance",
    "free_energy",
    "kl",
    "limit_log_p",
    "speed",
    "target_log_p",
    "time_to",
    "top_k_mass",
]
