"""Time for a flow with constant scores to come within `eps` of its limit (one context).

The flows call these from their `time_to` methods (THEORY §1, last row of the table)."""

import jax
import jax.numpy as jnp


_BISECTION_STEPS = 80


def _kl(log_p, log_q, support):
    # Double `where`: -inf off the support must give neither NaN values nor NaN gradients.
    lp, lq = jnp.where(support, log_p, 0), jnp.where(support, log_q, 0)
    p = jnp.where(support, jnp.exp(lp), 0)
    return jnp.maximum(jnp.sum(p * (lp - lq)), 0)


def _masked_lse(x, mask):
    x = jnp.where(mask, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(x))
    m = jnp.where(jnp.isfinite(m), m, 0)
    return m + jnp.log(jnp.sum(jnp.where(mask, jnp.exp(x - m), 0)))


def replicator_time_to(temperature, log_p0, scores, support, eps, *, bound):
    """Time for (R) to reach `1 - p(K) <= eps`, `K` the argmax set (one context)."""
    top = jnp.max(jnp.where(support, scores, -jnp.inf))
    winners = support & (scores == top)
    losers = support & ~winners
    lp0 = jnp.where(support, log_p0, 0)
    s = scores / temperature

    def log_gap(t):  # log(1 - p_K(t))
        theta = lp0 + t * s
        return _masked_lse(theta, losers) - _masked_lse(theta, support)

    log_loser0 = _masked_lse(lp0, losers)
    log_winner0 = _masked_lse(lp0, winners)
    second = jnp.max(jnp.where(losers, scores, -jnp.inf))
    delta = jnp.where(jnp.any(losers), top - second, 1)
    t_bound = (temperature / delta) * (log_loser0 - log_winner0 - jnp.log(eps))
    t_bound = jnp.where(jnp.any(losers), jnp.maximum(t_bound, 0), 0)
    if bound:
        return t_bound
    return _monotone_root(log_gap, jnp.log(eps), t_bound)


def entropic_time_to(temperature, log_p0, scores, support, eps, *, bound):
    """Time for (E) to reach `KL(p(t) ‖ softmax(s/T)) <= eps` (one context)."""
    lp0 = jnp.where(support, log_p0, 0)
    s = jnp.where(support, scores / temperature, 0)
    log_target = jnp.where(support, s - _masked_lse(s, support), -jnp.inf)
    diff = jnp.where(support, lp0 - s, 0)
    r = jnp.max(jnp.where(support, diff, -jnp.inf)) - jnp.min(
        jnp.where(support, diff, jnp.inf)
    )
    r2 = jnp.maximum(r**2, jnp.finfo(scores.dtype).tiny)
    t_bound = jnp.maximum(0.5 * jnp.log(r2 / (8 * eps)), 0)
    if bound:
        return t_bound

    def log_kl(t):
        theta = jnp.exp(-t) * lp0 + (-jnp.expm1(-t)) * s
        log_p = jnp.where(support, theta - _masked_lse(theta, support), -jnp.inf)
        return jnp.log(jnp.maximum(_kl(log_p, log_target, support), jnp.finfo(s.dtype).tiny))

    return _monotone_root(log_kl, jnp.log(eps), t_bound)


def _monotone_root(g, level, hi):
    """Smallest `t` in `[0, hi]` with `g(t) <= level` for a non-increasing `g`, and
    `g(hi) <= level`. Bisection for the value; one Newton step (with the bracket held
    constant) gives the implicit-function gradient `-∂g/∂θ / g'(t)`."""
    hi = jax.lax.stop_gradient(hi)
    level_c = jax.lax.stop_gradient(level)
    g_c = lambda t: jax.lax.stop_gradient(g(t))  # noqa: E731

    def body(_, bracket):
        lo, up = bracket
        mid = 0.5 * (lo + up)
        below = g_c(mid) <= level_c
        return jnp.where(below, lo, mid), jnp.where(below, mid, up)

    zero = jnp.zeros_like(hi)
    lo, up = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (zero, hi))
    t_star = jax.lax.stop_gradient(up)
    already = g_c(zero) <= level_c
    slope = jax.grad(g)(t_star)
    safe_slope = jnp.where(slope < 0, slope, -1)
    newton = t_star - (g(t_star) - level) / safe_slope
    # Keep the bisection value and take only the gradient of the Newton step.
    t = t_star + (newton - jax.lax.stop_gradient(newton))
    return jnp.where(already, zero, t)


