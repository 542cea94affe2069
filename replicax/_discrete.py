"""Discrete-time maps of THEORY §2, iterated with `lax.scan`.

- Multiplicative weights `p_{k+1} ∝ p_k e^{η z/T}`: for constant scores, exactly the
  time-`η` map of the replicator (R); otherwise its exponential-Euler step.
- Entropic mirror map `p_{k+1} ∝ p_k^{1-η} e^{η z/T}`: converges to `softmax(s/T)` iff
  `0 < η < 2` (in one step at `η = 1`, oscillating for `1 < η < 2`); for `η < 1` it is
  the exact time-`h` map of (E) with `η = 1 - e^{-h}`.

Both work in log space, so no step ever leaves the simplex (unlike Euler in `p`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._misc import as_numpy, is_concrete
from ._solve import prepare_rows, readout, row_support


def _iterate(flow, step_size, num_steps, y0, log_y0, decay: bool, name: str):
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"`flow` must be a replicax flow; received {type(flow).__name__}.")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"`num_steps` must be an int >= 0; received {num_steps!r}.")
    rows = prepare_rows(flow, y0=y0, log_y0=log_y0)
    eta = jnp.asarray(step_size, rows.dtype)
    if eta.ndim != 0:
        raise ValueError(f"`step_size` must be a scalar; received shape {eta.shape}.")
    if is_concrete(eta) and not (np.isfinite(as_numpy(eta)) & (as_numpy(eta) > 0)):
        raise ValueError(f"`step_size` of {name} must be finite and > 0; received {eta}.")
    return _scan_rows(rows, eta, num_steps, decay)


@eqx.filter_jit
def _scan_rows(rows, eta, num_steps, decay):
    flow, log_p0 = rows.flat()
    vocab_size = rows.vocab_size

    def one(f, lp0):
        support, theta0 = row_support(f, lp0, vocab_size, eta.dtype)
        log_p = readout(theta0, support)
        aux = f.score.init_aux(log_p)
        temperature = f.temperature.astype(eta.dtype)

        def step(carry, k):
            log_p, aux = carry
            t = k * eta
            z = jnp.where(support, f.score(t, log_p, aux), 0) / temperature
            theta = jnp.where(support, log_p, 0)
            theta = (1 - eta) * theta + eta * z if decay else theta + eta * z
            rate = f.score.aux_rate(t, log_p, aux)
            aux = jax.tree_util.tree_map(lambda a, r: a + eta * r, aux, rate)
            new = readout(theta, support)
            return (new, aux), new

        ks = jnp.arange(num_steps, dtype=eta.dtype)
        _, path = jax.lax.scan(step, (log_p, aux), ks)
        return jnp.concatenate([log_p[None], path], axis=0)

    if log_p0 is None:
        return rows.unflatten(jax.vmap(lambda f: one(f, None))(flow))
    return rows.unflatten(jax.vmap(one)(flow, log_p0))


def multiplicative_weights(
    flow: AbstractFlow,
    step_size: RealScalarLike,
    num_steps: int,
    *,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
) -> Float[Array, "*out_batch steps vocab"]:
    """Multiplicative weights `log p_{k+1} = log p_k + η z_k/T` (renormalised).

    **Arguments:**

    - `flow`: supplies the score `z` and the temperature `T` (its kind is not used).
    - `step_size`: `η > 0` (dynamic).
    - `num_steps`: number of steps (static).
    - `y0`, `log_y0`: start, as in `solve` (default uniform).

    **Returns:**

    `log_p` of shape `(*batch, num_steps + 1, vocab)`, the start included. For constant
    scores, entry `k` equals the replicator's `log p(k η)` exactly.
    """
    return _iterate(flow, step_size, num_steps, y0, log_y0, False, "multiplicative_weights")


def entropic_mirror_map(
    flow: AbstractFlow,
    step_size: RealScalarLike,
    num_steps: int,
    *,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
) -> Float[Array, "*out_batch steps vocab"]:
    """Entropic mirror step `log p_{k+1} = (1 - η) log p_k + η z_k/T` (renormalised).

    Arguments and return as `multiplicative_weights`. For constant scores and `η < 1`,
    entry `k` equals the entropic replicator's `log p(k h)` with `h = -log(1 - η)`.
    """
    return _iterate(flow, step_size, num_steps, y0, log_y0, True, "entropic_mirror_map")
