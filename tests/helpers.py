"""Shared test helpers: references no one here wrote (scipy), tolerances, problem zoo."""

import jax
import jax.numpy as jnp
import numpy as np
import replicax as rx
import scipy.integrate
import scipy.special


FLOWS = (rx.Replicator, rx.EntropicReplicator)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    same = jax.tree_util.tree_map(
        lambda a, b: np.allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol), x, y
    )
    return all(jax.tree_util.tree_leaves(same))


def scipy_replicator(logits, temperature, p0, ts, entropic, rtol=1e-11, atol=1e-14):
    """The flow integrated in probability space by scipy (LSODA/DOP853), float64.

    This is the field of THEORY §1 as written on the simplex, independent of replicax's
    log-space formulation and closed forms.
    """
    s = np.asarray(logits, np.float64)
    p0 = np.asarray(p0, np.float64)
    T = float(temperature)

    def field(t, p):
        if entropic:
            g = s / T - np.log(np.maximum(p, 1e-300))
        else:
            g = s / T
        return p * (g - p @ g)

    out = scipy.integrate.solve_ivp(
        field,
        (0.0, float(ts[-1])),
        p0,
        t_eval=np.asarray(ts, np.float64),
        method="DOP853",
        rtol=rtol,
        atol=atol,
    )
    assert out.success, out.message
    return out.y.T  # (times, vocab)


def softmax64(x, axis=-1):
    return scipy.special.softmax(np.asarray(x, np.float64), axis=axis)


def random_logits(key, shape, scale=3.0, dtype=jnp.float64):
    return scale * jax.random.normal(key, shape, dtype)


def random_simplex(key, shape, dtype=jnp.float64):
    return jax.random.dirichlet(key, jnp.ones(shape[-1], dtype), shape[:-1], dtype)


def closed_form_log_p(entropic, logits, temperature, ts, y0=None):
    """`log p(t)` of THEORY §1's closed forms in `np.longdouble`, outside replicax.

    (R) `softmax(log p₀ + t s/T)`, (E) `softmax(e^{-t} log p₀ + (1 - e^{-t}) s/T)`, from
    the exact values of the inputs (every float32 / float64 is a longdouble). Computed
    stably: the scores are centred by their maximum on the support before they are
    multiplied by the time coefficient, so that tied maxima give exactly 0 whatever the
    coefficient, and a token whose exponent underflows gets probability 0, never NaN.

    **Arguments:** `logits` `(*batch, vocab)` (`-inf` masks a token); `temperature`
    broadcastable to `(*batch,)`; `ts` `(times,)`; `y0` `(*batch, vocab)` or `None`
    (uniform on the unmasked tokens). Zeros of `y0` are a face, and `y0` is
    renormalised on the support, as replicax does with a start that sums to 1 only
    within rounding.

    **Returns:** `log p` of shape `(*batch, times, vocab)`, `-inf` off the support.
    """
    ld = np.longdouble
    s = np.asarray(logits).astype(ld)
    temperature = np.asarray(temperature).astype(ld)
    temperature = np.broadcast_to(temperature, s.shape[:-1])[..., None, None]
    t = np.asarray(ts).astype(ld)[:, None]
    support = s > -np.inf
    if y0 is not None:
        y0 = np.broadcast_to(np.asarray(y0).astype(ld), s.shape)
        support = support & (y0 > 0)
    else:
        y0 = np.ones(s.shape, ld)
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        y0 = np.where(support, y0, 0)
        total = np.sum(y0, -1, keepdims=True)
        log_p0 = np.log(np.where(support, y0, 1)) - np.log(total)
        top = np.max(np.where(support, s, -np.inf), -1, keepdims=True)
        centred = np.where(support, s - top, 0)  # exactly 0 on tied maxima
        if entropic:
            decay, coefficient = np.exp(-t), -np.expm1(-t) / temperature
        else:
            decay, coefficient = np.ones_like(t), t / temperature
        x = decay * log_p0[..., None, :] + coefficient * centred[..., None, :]
        x = np.where(support[..., None, :], x, -np.inf)
        x = x - np.max(x, -1, keepdims=True)
        return x - np.log(np.sum(np.exp(x), -1, keepdims=True))
