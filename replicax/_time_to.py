"""Time for a flow with constant scores to come within `eps` of where it ends (THEORY §1).

One context at a time: `log_p0` is normalised with `-inf` off `support`, `scores` are
finite on `support`, `temperature` and `eps` are scalars. Batching is `jax.vmap`.

The exact time is the root of a decreasing function of `t`, the log of the distance
still to go. Both distances are written so that they keep full relative accuracy
however small they are, which is what lets the root be found for any `eps` down to
`smallest_eps(dtype)`:

- (R), `1 - p_K(t)`: with the scores measured from the top, `θ_i(t) = log p₀_i - t g_i/T`
    (`g_i >= 0` the gap to the top score), the winners' log-mass stays `log p₀(K)` and the
    losers' log-mass `λ(t)` is a log-sum-exp, so `log(1 - p_K) = -softplus(log p₀(K) - λ)`
    with no difference of nearby numbers.
- (E), `KL(p(t) ‖ π)`: with `d = log p₀ - log π` centred (`Σ π d = 0`), `a = e^{-t}` and
    `x = a d`, the closed form is `p(t) = π e^x / (1 + m)`, `m = Σ π ψ(x)`,
    `ψ(x) = e^x - 1 - x`, and `KL = Σ π x expm1(x) / (1 + m) - log1p(m)`. Both sums are of
    non-negative terms, and the difference loses at most a factor of about two. Writing
    `ψ(x) = x² q(x)` and `x expm1(x) = x² r(x)` takes the factor `a²` out of both sums,
    `M = Σ π d² q(x) = m/a²` and `A = Σ π d² r(x)`, so that
    `log KL = -2t + log M + log((A/M)/(1 + m) - log1p(m)/m)` is formed without ever
    storing `KL` (which would underflow long before `eps` does). The rounding left in the centring of `d` changes
    `KL` only at second order, because the formula is the exact KL for any centred `x`
    and its first-order sensitivity to a shift of `x` vanishes.

The root is bracketed by `[0, bound]`, the closed-form bound of THEORY §1, and found by
`optimistix.Bisection`; its gradient comes from the implicit function theorem
(`optimistix.ImplicitAdjoint`), so it does not depend on the bisection steps.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float

from ._misc import as_numpy, error_if_rows, is_concrete


def smallest_eps(dtype) -> float:
    """The smallest `eps` that `time_to` resolves in `dtype`: the smallest normal number.

    Below it `log(eps)` itself is no longer accurate (subnormals carry fewer digits, and
    many backends flush them to zero), while the distances above are accurate down to
    it: the log-space forms never store the distance itself.
    """
    return float(jnp.finfo(dtype).tiny)


def check_eps(
    eps: Float[ArrayLike, "..."], dtype, batch_shape: tuple[int, ...]
) -> Float[Array, "..."]:
    """`eps` in `dtype`, refused when not finite or below `smallest_eps(dtype)`: now for
    host values and small concrete device arrays, on device otherwise (naming the batch
    row), so that no large device array waits to be copied to the host."""
    tiny = smallest_eps(dtype)
    need = (
        f"`eps` must be finite and > 0, and at least {tiny:.4g} (the smallest normal "
        f"{jnp.dtype(dtype).name}; `time_to` cannot resolve a smaller distance)"
    )
    host = isinstance(eps, int | float | np.ndarray | np.number | list | tuple)
    now = host or (is_concrete(eps) and np.size(eps) <= 4096)
    if now:
        values = as_numpy(np.asarray(eps) if host else eps).astype(np.float64)
        ok = np.isfinite(values) & (values >= tiny)
        if not np.all(ok):
            raise ValueError(f"{need}; received {values[~ok].reshape(-1)[0]}.")
    eps = jnp.asarray(eps).astype(dtype)
    if now:
        return eps
    eps = jnp.broadcast_to(eps, batch_shape)
    return error_if_rows(
        eps,
        ~(jnp.isfinite(eps) & (eps >= tiny)),
        need + "; it is not at batch index {index}.",
    )


def replicator_time_to(
    temperature: Float[ArrayLike, ""],
    log_p0: Float[Array, " vocab"],
    scores: Float[Array, " vocab"],
    support: Bool[Array, " vocab"],
    eps: Float[ArrayLike, ""],
    *,
    bound: bool,
) -> Float[Array, ""]:
    """First time at which the replicator (R) has `1 - p_K(t) <= eps`, `K` the argmax set
    of `scores` on `support` (THEORY §1); `0` if it holds at `t = 0`, as it always does
    for a support of one token.

    With `bound=True`, the closed-form upper bound
    `(T/Δ) log((1 - p₀(K)) / (p₀(K) eps))` instead, `Δ` the gap between the top score
    and the next one.
    """
    dtype = scores.dtype
    temperature = jnp.asarray(temperature).astype(dtype)
    log_eps = jnp.log(jnp.asarray(eps).astype(dtype))
    safe_scores = jnp.where(support, scores, 0)
    top = jnp.max(jnp.where(support, scores, -jnp.inf))
    winners = support & (scores == top)
    losers = support & ~winners
    has_losers = jnp.any(losers)
    lp0 = jnp.where(support, log_p0, 0)
    # Measured from the top score, gaps are exact differences of stored scores: the
    # absolute level of the scores (a gauge) never enters.
    gaps = jnp.where(losers, top - safe_scores, 0)
    log_winners = _masked_lse(lp0, winners)
    smallest_gap = jnp.min(jnp.where(losers, gaps, jnp.inf))
    smallest_gap = jnp.where(has_losers, smallest_gap, 1)
    log_ratio0 = _masked_lse(lp0, losers) - log_winners
    t_bound = (temperature / smallest_gap) * (log_ratio0 - log_eps)
    t_bound = jnp.where(has_losers, jnp.maximum(t_bound, 0), 0)
    if bound:
        return t_bound

    # |d log_gap / dt| <= (largest gap) / T.
    rate = jnp.where(has_losers, jnp.max(gaps) / temperature, 1)
    params = (lp0, gaps, temperature, log_winners, losers)
    return _first_time_below(_log_gap, params, log_eps, t_bound, rate)


def _log_gap(t, params):
    """`log(1 - p_K(t))` along (R); `-inf` without losers."""
    lp0, gaps, temperature, log_winners, losers = params
    log_losers = _masked_lse(lp0 - (t / temperature) * gaps, losers)
    return -jax.nn.softplus(log_winners - log_losers)


def entropic_time_to(
    temperature: Float[ArrayLike, ""],
    log_p0: Float[Array, " vocab"],
    scores: Float[Array, " vocab"],
    support: Bool[Array, " vocab"],
    eps: Float[ArrayLike, ""],
    *,
    bound: bool,
) -> Float[Array, ""]:
    """First time at which the entropic replicator (E) has `KL(p(t) ‖ π) <= eps`,
    `π = softmax(scores/T)` on `support` (THEORY §1); `0` if it holds at `t = 0`.

    With `bound=True`, the closed-form upper bound `½ log(R² / (8 eps))` instead,
    `R = range(log p₀ - s/T)` on the support (from `KL <= e^{-2t} R²/8`).
    """
    dtype = scores.dtype
    temperature = jnp.asarray(temperature).astype(dtype)
    log_eps = jnp.log(jnp.asarray(eps).astype(dtype))
    s = jnp.where(support, jnp.where(support, scores, 0) / temperature, -jnp.inf)
    log_pi = jnp.where(support, jax.nn.log_softmax(s), 0)
    pi = jnp.where(support, jnp.exp(log_pi), 0)
    u = jnp.where(support, log_p0, 0) - log_pi
    d = jnp.where(support, u - jnp.sum(pi * u), 0)
    spread = jnp.max(jnp.where(support, d, -jnp.inf)) - jnp.min(
        jnp.where(support, d, jnp.inf)
    )
    has_spread = spread > 0
    log_spread = jnp.log(jnp.where(has_spread, spread, 1))
    t_bound = log_spread - 0.5 * math.log(8) - 0.5 * log_eps
    t_bound = jnp.where(has_spread, jnp.maximum(t_bound, 0), 0)
    if bound:
        return t_bound
    return _first_time_below(_log_kl, (log_pi, d, support), log_eps, t_bound, 2.0)


def _log_kl(t, params):
    """`log KL(p(t) ‖ π)` for `p(t) ∝ π e^{e^{-t} d}` (`d` centred); `-inf` when
    `p(t) = π` (all `d` zero)."""
    log_pi, d, support = params
    active = support & (d != 0)
    has_any = jnp.any(active)
    safe_d = jnp.where(active, d, 1)
    x = jnp.exp(-t) * safe_d
    base = log_pi + 2 * jnp.log(jnp.abs(safe_d))
    # M = Σ π d² q(x) = m / a², A = Σ π d² r(x) = (Σ π x expm1(x)) / a².
    log_q, log_r = _log_q_and_r(x)
    log_big_m = _masked_lse(base + log_q, active)
    log_big_a = _masked_lse(base + log_r, active)
    ratio = jnp.exp(jnp.where(has_any, log_big_a - log_big_m, 0))  # A / M, about 2
    log_m = jnp.where(has_any, log_big_m - 2 * t, 0)
    # m <= 1: KL / m = A/M / (1 + m) - log1p(m)/m, of order one; log KL = log m + log
    # of it, which never forms the (possibly underflowing) KL.
    m = jnp.exp(jnp.minimum(log_m, 0))
    per_m = ratio / (1 + m) - _log1p_over(m)
    tiny = jnp.finfo(x.dtype).tiny
    small = log_m + jnp.log(jnp.maximum(per_m, tiny))
    # m > 1 (far from π): KL = (A/M) m/(1+m) - log1p(m), with m kept in log form.
    log_m_big = jnp.maximum(log_m, 0)
    kl_big = ratio * jax.nn.sigmoid(log_m_big) - jax.nn.softplus(log_m_big)
    large = jnp.log(jnp.maximum(kl_big, tiny))
    return jnp.where(has_any, jnp.where(log_m <= 0, small, large), -jnp.inf)


_LOG1P_SERIES_BELOW = 1e-2


def _log1p_over(m):
    """`log1p(m) / m` for `0 <= m <= 1`; a series for small `m`, whose derivative, unlike
    that of the quotient, does not divide by `m²` (which underflows)."""
    near = m < _LOG1P_SERIES_BELOW
    mn = jnp.where(near, m, 0)
    target = float(jnp.finfo(m.dtype).eps) / 4
    n = 1
    while _LOG1P_SERIES_BELOW**n / (n + 1) >= target:
        n += 1
    series = jnp.zeros_like(m)
    for k in reversed(range(n)):
        series = series * (-mn) + 1 / (k + 1)
    mf = jnp.where(near, 1, m)
    return jnp.where(near, series, jnp.log1p(mf) / mf)


def _series_terms(dtype, shift):
    # Number of terms of Σ x^k / (k + shift)! on |x| <= 1 for a truncation error below a
    # quarter of the dtype's epsilon relative to the first term.
    target = float(jnp.finfo(dtype).eps) / 4
    n = 1
    while math.factorial(shift) / math.factorial(n + shift) >= target:
        n += 1
    return n


def _log_q_and_r(x):
    """`log q(x)` and `log r(x)`, `q(x) = ψ(x)/x²` and `r(x) = expm1(x)/x = 1 + x q(x)`,
    accurate for every `x`: a series near 0 (where `ψ(x) = e^x - 1 - x` cancels), and
    forms that neither cancel much nor overflow elsewhere."""
    near = jnp.abs(x) <= 1
    xn = jnp.where(near, x, 0)
    q = jnp.zeros_like(x)  # Σ_k x^k / (k + 2)!, Horner
    for k in reversed(range(_series_terms(x.dtype, 2))):
        q = q * xn + 1 / math.factorial(k + 2)
    log_q_near = jnp.log(q)
    log_r_near = jnp.log1p(xn * q)  # x q >= -1/e here
    # x > 1: ψ(x) = e^x (1 - (1 + x) e^{-x}), expm1(x) = e^x (-expm1(-x)).
    xa = jnp.where(x > 1, x, 2)
    log_q_above = xa + jnp.log1p(-(1 + xa) * jnp.exp(-xa)) - 2 * jnp.log(xa)
    log_r_above = xa + jnp.log(-jnp.expm1(-xa)) - jnp.log(xa)
    # x < -1: ψ(x) = |x| - (1 - e^{-|x|}) >= 0.36 |x|, little cancellation.
    xb = jnp.where(x < -1, x, -2)
    log_q_below = jnp.log(jnp.expm1(xb) - xb) - 2 * jnp.log(-xb)
    log_r_below = jnp.log(jnp.expm1(xb) / xb)
    above = x > 1
    log_q = jnp.where(near, log_q_near, jnp.where(above, log_q_above, log_q_below))
    log_r = jnp.where(near, log_r_near, jnp.where(above, log_r_above, log_r_below))
    return log_q, log_r


def _masked_lse(x, mask):
    """`log Σ_{mask} e^x`; `-inf` for an empty mask, with a zero (not NaN) gradient."""
    x = jnp.where(mask, x, -jnp.inf)
    # The shift cancels exactly; without the stop_gradient it would only add a
    # subgradient of `max` that sums to zero.
    shift = jax.lax.stop_gradient(jnp.max(x))
    shift = jnp.where(jnp.isfinite(shift), shift, 0)
    total = jnp.sum(jnp.where(mask, jnp.exp(x - shift), 0))
    nonempty = total > 0
    return jnp.where(nonempty, shift + jnp.log(jnp.where(nonempty, total, 1)), -jnp.inf)


# The bisection stops when the bracket is below TOL (1 + t) and the scaled residual
# below TOL, TOL = _TOL_ULPS epsilons of the dtype. A residual held above TOL by
# rounding would only run the bisection to _MAX_STEPS, by which the bracket is one
# ulp wide: the answer is then as good as the dtype allows, so this is not an error.
_TOL_ULPS = 16
_MAX_STEPS = 256


def _first_time_below(log_distance, params, log_eps, t_bound, rate):
    """Smallest `t` in `[0, t_bound]` with `log_distance(t, params) <= log_eps`, for a
    decreasing `log_distance` that is below `log_eps` at `t_bound`; `0` if already at
    `t = 0`. Gradients w.r.t. `params` and `log_eps` by the implicit function theorem."""
    dtype = t_bound.dtype
    zero = jnp.zeros((), dtype)
    already = log_distance(zero, params) <= log_eps
    # The residual is divided by a bound on the slope times the time scale, so that one
    # tolerance fits both stopping tests at every `t`. Only its sign and the root
    # matter, so the scale carries no gradient.
    scale = jax.lax.stop_gradient(rate * jnp.maximum(t_bound, 1))

    def residual(t, args):
        params, log_eps, already = args
        value = (log_distance(t, params) - log_eps) / scale
        return jnp.where(already, -t, value)

    upper = jax.lax.stop_gradient(jnp.where(already, zero, t_bound))
    tol = _TOL_ULPS * float(jnp.finfo(dtype).eps)
    # flip=True: the residual goes from positive at 0 to non-positive at `upper`.
    solver = optx.Bisection(rtol=tol, atol=tol, flip=True)
    sol = optx.root_find(
        residual,
        solver,
        0.5 * upper,
        (params, log_eps, already),
        options=dict(lower=zero, upper=upper),
        max_steps=_MAX_STEPS,
        throw=False,
    )
    return jnp.where(already, zero, sol.value)
