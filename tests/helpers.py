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
