"""Tools that tell a user what a state-dependent flow does (THEORY §4): whether its field
is conservative (`curl`), whether a path loops or settles (`detect_cycle`), where a batch
of starts ends (`basins`), and the conserved quantity of cyclic rock-paper-scissors
(`rps_product`).

Every function here is written for one context and mapped over the batch; a sweep over
temperatures or score parameters is one batch (one `solve`, one compile), not a loop.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._observables import fisher_rao_distance
from ._rows import as_scalar, check_scalar, prepare_rows, with_auto_axes
from ._saveat import SaveAt
from ._solution import RESULTS, Trajectory
from ._solve import solve

# Above this vocabulary size `curl(method="auto")` estimates instead of forming the
# V x V Jacobian (V jvps; 1024² float64 entries are 8 MB per context).
_EXACT_MAX_VOCAB = 1024


# ----------------------------------------------------------------------------------------
# curl


def curl(
    flow: AbstractFlow,
    log_p: Float[ArrayLike, "*p_batch vocab"],
    aux: PyTree = None,
    *,
    t: RealScalarLike = 0.0,
    method: str = "auto",
    key: PRNGKeyArray | None = None,
    num_probes: int = 32,
) -> Float[Array, "*out_batch"]:
    """How far the field of `flow` is from a gradient field at the state `log_p`
    (THEORY §4, "Conservative or not").

    With `P = I - 11ᵀ/n` the projection onto the tangent space of the face (the `n`
    tokens where `log_p > -inf`) and `Dz` the Jacobian of the score with respect to `p`
    (the score is evaluated at `log p`, so `Dz = ∂z/∂p` through `p = exp(log p)`), let
    `M = P·Dz·P`. The flow (either (R) or (E): the entropy term of (E) and the
    temperature do not change the antisymmetric part) is a Shahshahani gradient flow near
    `p` iff `M` is symmetric. This returns

        curl = ‖(M - Mᵀ)/2‖_F / ‖M‖_F  ∈ [0, 1],

    `0` for a gradient flow (and where `M = 0`, e.g. constant logits or a score that
    depends only on a history), `1` for a purely antisymmetric `M` (cyclic
    rock-paper-scissors). For `z = s + A p` it is the relative norm of
    `(PAP - (PAP)ᵀ)/2`, whatever `p`.

    **Arguments:**

    - `flow`: a flow; only its score matters.
    - `log_p`: the state, shape `(*batch, vocab)` (normalised; `-inf` off the face).
        Its batch broadcasts against the flow's per-row parameters.
    - `aux`: the score's history at that state, a PyTree whose leaves have leading shape
        `batch` (or any shape for a single context); `None`: the score's initial history
        `score.init_aux(log_p)`.
    - `t`: time at which the score is evaluated.
    - `method`: `"exact"` forms `Dz` with `jax.jacfwd` (`V` forward passes);
        `"estimate"` never forms it: with `num_probes` Rademacher vectors `v` on the face,
        `‖K‖_F² ≈ mean ‖K v‖²` (Hutchinson) for `K = (M - Mᵀ)/2` and for `M`, where `M v`
        is one `jvp` and `Mᵀ v` one `vjp` of the score; the ratio of the two means (the
        same probes in both, which cancels much of their noise) gives the estimate.
        Its relative error shrinks like `1/sqrt(num_probes · V)` for a dense random
        `Dz`. `"auto"` (default): exact up to `V = 1024`, estimate above.
    - `key`: a JAX PRNG key, required by the estimate (split over the batch).
    - `num_probes`: number of probe vectors of the estimate (a static int >= 1).

    **Returns:**

    The curl of each context, shape `batch` (that of `log_p` and the flow together).

    **Raises:**

    `ValueError` for an unknown `method`, a missing `key` when estimating, a bad
    `num_probes`, or an `aux` whose leaves do not lead with the batch shape; the checks
    of `log_p` and of the flow's values are those of `solve`.
    """
    if method not in ("auto", "exact", "estimate"):
        raise ValueError(
            f"`method` must be 'auto', 'exact' or 'estimate'; received {method!r}."
        )
    if (
        not isinstance(num_probes, int)
        or isinstance(num_probes, bool)
        or num_probes < 1
    ):
        raise ValueError(f"`num_probes` must be an int >= 1; received {num_probes!r}.")
    rows = prepare_rows(flow, log_y0=log_p)
    if method == "auto":
        method = "exact" if rows.vocab_size <= _EXACT_MAX_VOCAB else "estimate"
    if method == "estimate":
        if key is None:
            raise ValueError("`method='estimate'` needs a PRNG `key` (jax.random.key).")
        keys = jax.random.split(key, rows.num_rows)
    else:
        keys = None
    t = as_scalar(t, "t", rows.dtype)
    if aux is not None:
        aux = _aux_rows(aux, rows)
    # On a mesh of explicit axes, run with them made `Auto` (as the ODE path).
    return with_auto_axes(_curl_rows, rows, t, aux, keys, method, num_probes)


def _aux_rows(aux, rows):
    """`aux` with every leaf flattened to one entry per row."""
    batch = rows.batch_shape

    def flat(x):
        x = jnp.asarray(x)
        if x.shape[: len(batch)] != batch:
            raise ValueError(
                f"`aux` leaves must have leading shape {batch} (the batch shape); "
                f"received a leaf of shape {x.shape}."
            )
        return x.reshape((rows.num_rows,) + x.shape[len(batch) :])

    if not batch:
        return jtu.tree_map(lambda x: jnp.asarray(x)[None], aux)
    return jtu.tree_map(flat, aux)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _curl_rows(rows, t, aux, keys, method, num_probes):
    row = rows.flat()

    def one(row, aux, key):
        log_p = row.log_p0()
        if aux is None:
            aux = row.flow.score.init_aux(log_p)
        if method == "exact":
            return _curl_exact(row.flow.score, t, log_p, aux, row.face)
        return _curl_estimate(row.flow.score, t, log_p, aux, row.face, key, num_probes)

    in_axes = (0, None if aux is None else 0, None if keys is None else 0)
    out = jax.vmap(one, in_axes=in_axes)(row, aux, keys)
    return rows.unflatten(out)


def _score_of_p(score, t, aux, face):
    """`p -> z(t, log p, aux)` on the face (`0` off it); `log` only where `p > 0`."""

    def z(p):
        log_p = jnp.where(face, jnp.log(jnp.where(face, p, 1)), -jnp.inf)
        return jnp.where(face, score(t, log_p, aux), 0)

    return z


def _centre(v, face):
    """`P v`: `v` minus its mean over the face, `0` off it."""
    v = jnp.where(face, v, 0)
    n = jnp.sum(face)
    return jnp.where(face, v - jnp.sum(v) / n.astype(v.dtype), 0)


def _ratio(k2, m2):
    # sqrt(k2/m2) with 0 where M = 0; double `where` keeps the gradient finite there.
    ok = m2 > 0
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, k2, 0) / jnp.where(ok, m2, 1)), 0)


def _curl_exact(score, t, log_p, aux, face):
    p = jnp.where(face, jnp.exp(log_p), 0)
    jac = jax.jacfwd(_score_of_p(score, t, aux, face))(p)
    jac = jnp.where(face[:, None] & face[None, :], jac, 0)
    m = jax.vmap(lambda col: _centre(col, face), in_axes=1, out_axes=1)(jac)
    m = jax.vmap(lambda r: _centre(r, face))(m)
    k = (m - m.T) / 2
    return _ratio(jnp.sum(k**2), jnp.sum(m**2))


def _curl_estimate(score, t, log_p, aux, face, key, num_probes):
    p = jnp.where(face, jnp.exp(log_p), 0)
    z, pullback = jax.vjp(_score_of_p(score, t, aux, face), p)
    _, push = jax.linearize(_score_of_p(score, t, aux, face), p)
    signs = jax.random.rademacher(key, (num_probes,) + p.shape, dtype=p.dtype)
    probes = jnp.where(face, signs, 0)

    def norms(v):
        u = _centre(v, face)
        mv = _centre(push(u), face)
        mtv = _centre(pullback(u.astype(z.dtype))[0], face)
        kv = (mv - mtv) / 2
        return jnp.sum(kv**2), jnp.sum(mv**2)

    k2, m2 = jax.vmap(norms)(probes)
    return _ratio(jnp.mean(k2), jnp.mean(m2))


# ----------------------------------------------------------------------------------------
# detect_cycle


class Cycles(eqx.Module):
    """What `detect_cycle` found, one entry per context.

    **Fields:**

    - `is_cycle`: the path oscillates with a stable amplitude and a stable period over
        the analysed window (a limit cycle or a closed orbit).
    - `converged`: the path is at rest over the second half of the window (every `log p`
        moves by at most `atol`).
    - `period`: the mean time between successive upward crossings of the window mean by
        the most oscillating `log p_k`; NaN with fewer than two crossings. Meaningful as
        a cycle period where `is_cycle`; for a decaying spiral it is the spiral's period.
    - `amplitude`: half the peak-to-peak range of `p` over the second half of the
        window, the maximum over tokens.
    - `amplitude_ratio`: the largest half-range of `log p` over the second half of the
        window divided by that over the first half: `< 1` decaying (a spiral into a rest
        point), `≈ 1` a cycle, `> 1` growing.
    """

    is_cycle: Bool[Array, "*batch"]
    converged: Bool[Array, "*batch"]
    period: Float[Array, "*batch"]
    amplitude: Float[Array, "*batch"]
    amplitude_ratio: Float[Array, "*batch"]


def detect_cycle(
    sol: Trajectory,
    *,
    window: float = 0.5,
    atol: RealScalarLike = 1e-6,
    amplitude_rtol: RealScalarLike = 0.05,
    period_rtol: RealScalarLike = 0.05,
    min_periods: int = 3,
) -> Cycles:
    """Whether each context of a saved path loops, settles, or neither (THEORY §4).

    The analysis uses the last `window` fraction of the saved times, in `log p` (so that
    an orbit that comes close to the boundary, where `p` barely moves but `log p` swings
    widely, is seen at its true size), and splits it into two halves:

    1. **converged** if every `log p_i` stays within `atol` of its midpoint over the
        second half. A path that tends to the boundary (lock-in under (R), where the
        losing `log p_i` fall without bound) has not converged in this sense, however
        still `p` looks: use `basins` for lock-in. This is what keeps a long dwell near
        a vertex on a cycle from passing for a rest point;
    2. the **amplitude ratio** is the largest half-range of `log p` over the second half
        over that of the first: a spiral into a rest point decays (ratio well below 1),
        however slowly it turns;
    3. the **period** comes from the token whose `log p` swings most in the second half:
        the times where it crosses its window mean upwards (linearly interpolated
        between saved points) are successive periods apart.

    A context `is_cycle` when it has not converged, its amplitude ratio is within
    `amplitude_rtol` of 1, it completes at least `min_periods` periods in the window,
    the longest and shortest of them differ by at most `period_rtol` of their mean, and
    the last crossing is less than 1.5 periods from the end. A heteroclinic orbit whose
    passes lengthen, or a path still growing onto a cycle, is therefore not (yet) a
    cycle. Save densely enough (tens of points per period) and long enough (several
    periods in each half, after the transient) for these tests to mean something.

    **Arguments:**

    - `sol`: a `Trajectory` with `log_p` saved (not `SaveAt(fn=...)`), at least 16 times.
    - `window`: the fraction of the saved times analysed, in `(0, 1]` (static).
    - `atol`: the convergence tolerance on `log p`.
    - `amplitude_rtol`, `period_rtol`: the tolerances on amplitude decay and period
        spread above.
    - `min_periods`: the fewest whole periods in the window to call a cycle (an int
        >= 1).

    **Returns:**

    A `Cycles` with fields of shape `batch`.

    **Raises:**

    `TypeError` if `sol` is not a `Trajectory` or saved no `log_p`; `ValueError` for a
    `window` outside `(0, 1]`, a window of fewer than 16 saved times, negative or
    non-finite tolerances, or a bad `min_periods`.
    """
    if not isinstance(sol, Trajectory):
        raise TypeError(
            f"`sol` must be a replicax Trajectory; received {type(sol).__name__}."
        )
    if sol.log_p is None:
        raise TypeError(
            "`sol` saved observables only (SaveAt(fn=...)); `detect_cycle` needs `log_p`."
        )
    if not isinstance(window, int | float) or not 0 < window <= 1:
        raise ValueError(f"`window` must be a number in (0, 1]; received {window!r}.")
    if (
        not isinstance(min_periods, int)
        or isinstance(min_periods, bool)
        or min_periods < 1
    ):
        raise ValueError(
            f"`min_periods` must be an int >= 1; received {min_periods!r}."
        )
    num_times = sol.ts.shape[0]
    size = int(round(window * num_times))
    if size < 16:
        raise ValueError(
            f"`window` keeps {size} of the {num_times} saved times; `detect_cycle` needs "
            "at least 16 (save more times or widen the window)."
        )
    dtype = sol.log_p.dtype
    tols = []
    named = (
        (atol, "atol"),
        (amplitude_rtol, "amplitude_rtol"),
        (period_rtol, "period_rtol"),
    )
    for value, name in named:
        value = as_scalar(value, name, dtype)
        tols.append(check_scalar(value, name, positive=True, allow_zero=True))
    return _detect_cycle(sol.ts, sol.log_p, size, min_periods, *tols)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _detect_cycle(ts, log_p, size, min_periods, atol, amplitude_rtol, period_rtol):
    batch = log_p.shape[:-2]
    vocab = log_p.shape[-1]
    x = log_p[..., -size:, :].reshape((-1, size, vocab))
    times = ts[-size:]

    def one(x):
        alive = jnp.all(x > -jnp.inf, axis=0)
        x = jnp.where(alive, x, 0)
        half = size // 2
        first, second = x[:half], x[half:]
        r1 = (jnp.max(first, axis=0) - jnp.min(first, axis=0)) / 2
        r2 = (jnp.max(second, axis=0) - jnp.min(second, axis=0)) / 2
        a1, a2 = jnp.max(r1), jnp.max(r2)
        converged = a2 <= atol
        ratio = jnp.where(a1 > 0, a2 / jnp.where(a1 > 0, a1, 1), 1)
        steady = jnp.abs(ratio - 1) <= amplitude_rtol

        y = x[:, jnp.argmax(r2)]
        level = jnp.mean(y)
        lo, hi = y[:-1], y[1:]
        up = (lo < level) & (hi >= level)
        gap = jnp.where(up, hi - lo, 1)
        crossing = times[:-1] + (level - lo) / gap * (times[1:] - times[:-1])
        count = jnp.sum(up)
        (index,) = jnp.nonzero(up, size=size - 1, fill_value=0)
        when = crossing[index]
        last = when[jnp.maximum(count - 1, 0)]
        laps = count - 1
        span = (last - when[0]) / jnp.maximum(laps, 1).astype(times.dtype)
        period = jnp.where(laps >= 1, span, jnp.nan)
        spans = when[1:] - when[:-1]
        valid = jnp.arange(size - 2) < laps
        spread = jnp.max(jnp.where(valid, spans, -jnp.inf)) - jnp.min(
            jnp.where(valid, spans, jnp.inf)
        )
        regular = (laps >= min_periods) & (spread <= period_rtol * period)
        recent = times[-1] - last <= 1.5 * period
        is_cycle = ~converged & steady & regular & recent

        p = jnp.where(alive, jnp.exp(second), 0)
        amplitude = jnp.max((jnp.max(p, axis=0) - jnp.min(p, axis=0)) / 2)
        return Cycles(is_cycle, converged, period, amplitude, ratio)

    out = jax.vmap(one)(x)
    return jtu.tree_map(lambda a: a.reshape(batch), out)


# ----------------------------------------------------------------------------------------
# basins


class Basins(eqx.Module):
    """Where each start of `basins` ends.

    **Fields:**

    - `token`: the most likely token at `t1` (the attractor label; the first on ties).
    - `settled`: whether the path has come to rest: the Fisher–Rao distance moved over
        the last stretch is at most `atol`.
    - `moved`: that distance.
    - `log_p`: the final state, shape `(*batch, vocab)`.
    - `result`: the solver's `RESULTS` per row.
    """

    token: Int[Array, "*batch"]
    settled: Bool[Array, "*batch"]
    moved: Float[Array, "*batch"]
    log_p: Float[Array, "*batch vocab"]
    result: RESULTS


def basins(
    flow: AbstractFlow,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    *,
    t1: RealScalarLike,
    t0: RealScalarLike = 0.0,
    last: float = 0.1,
    atol: RealScalarLike = 1e-3,
    support=None,
    method="auto",
) -> Basins:
    """Where each of a batch of starts ends: the token it locks onto and whether it got
    there (THEORY §4, brittle attractors). One `solve` for the whole batch, so a grid of
    starts and of score parameters (one per row) compiles once.

    **Arguments:**

    - `flow`: a flow; its per-row parameters broadcast against the starts.
    - `y0`, `log_y0`: the starts, shape `(*batch, vocab)` (as in `solve`).
    - `t1`, `t0`: the time span (`t1 > t0`).
    - `last`: the fraction of `[t0, t1]` at the end over which settling is judged, in
        `(0, 1)`: a start has settled when `p` moves at most `atol` (Fisher–Rao distance)
        between `t1 - last (t1 - t0)` and `t1`. Starts next to a saddle or a fold leave
        slowly and are reported as not settled, not misassigned silently.
    - `atol`: that tolerance.
    - `support`, `method`: as in `solve` (e.g. `rx.ODE(rtol=1e-8, atol=1e-8)`).

    **Returns:**

    A `Basins` with fields of shape `batch`.

    **Raises:**

    `ValueError` for `last` outside `(0, 1)` or a negative `atol`, and whatever `solve`
    raises for the flow, the starts and the times.
    """
    if not isinstance(last, int | float) or not 0 < last < 1:
        raise ValueError(f"`last` must be a number in (0, 1); received {last!r}.")
    atol = as_scalar(atol, "atol", jnp.result_type(float))
    atol = check_scalar(atol, "atol", positive=True, allow_zero=True)
    # Integer times would make `t_mid` an integer: compute in the default float dtype.
    t0 = jnp.asarray(t0, jnp.result_type(float))
    t1 = jnp.asarray(t1, jnp.result_type(float))
    t_mid = t1 - last * (t1 - t0)
    sol = solve(
        flow,
        t0=t0,
        t1=t1,
        y0=y0,
        log_y0=log_y0,
        saveat=SaveAt(ts=t_mid[None], t1=True),
        support=support,
        method=method,
    )
    atol = atol.astype(sol.log_p.dtype)
    return _basins_out(sol.log_p, sol.result, atol)


@eqx.filter_jit
def _basins_out(log_p, result, atol):
    before, after = log_p[..., 0, :], log_p[..., 1, :]
    moved = fisher_rao_distance(before, after)
    return Basins(jnp.argmax(after, axis=-1), moved <= atol, moved, after, result)


# ----------------------------------------------------------------------------------------
# Conserved quantities


def rps_product(log_p: Float[ArrayLike, "*batch vocab"]) -> Float[Array, "*batch"]:
    """`Π_i p_i`, conserved by the replicator (R) for cyclic rock-paper-scissors with
    `w = l` (THEORY §4).

    More generally, under (R) with `z = A p`, `d/dt Σ_i log p_i = (1ᵀA p - V pᵀA p)/T`,
    which vanishes whenever `A` is antisymmetric with zero column sums (every cyclic
    zero-sum game): orbits are closed curves on which this product is constant.

    **Arguments:**

    - `log_p`: log-probabilities, shape `(*batch, vocab)`.

    **Returns:**

    The product of the probabilities, shape `batch` (`0` on the boundary).
    """
    return jnp.exp(jnp.sum(jnp.asarray(log_p), axis=-1))


__all__ = ["Basins", "Cycles", "basins", "curl", "detect_cycle", "rps_product"]
