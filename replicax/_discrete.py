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
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow, mirror_step, multiplicative_step
from ._misc import error_if_rows
from ._rows import as_scalar, check_scalar, prepare_rows, vmap_rows


def _iterate(flow, step_size, num_steps, y0, log_y0, step, name: str):
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"`flow` must be a replicax flow; received {type(flow).__name__}.")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 0:
        raise ValueError(f"`num_steps` must be an int >= 0; received {num_steps!r}.")
    rows = prepare_rows(flow, y0=y0, log_y0=log_y0)
    eta = as_scalar(step_size, "step_size", rows.dtype)
    eta = check_scalar(eta, f"step_size` of `{name}", positive=True)
    return _scan_rows(rows, eta, num_steps, step, name)


@eqx.filter_jit
def _scan_rows(rows, eta, num_steps, step, name):
    def one(row):
        f, face = row.flow, row.face
        log_p = row.log_p0()
        aux = f.score.init_aux(log_p)
        temperature = f.temperature.astype(eta.dtype)
        step_fn = f.discrete_step if step is None else step

        def body(carry, k):
            log_p, aux = carry
            t = k * eta
            z = f.score(t, log_p, aux).astype(eta.dtype)
            rate = jnp.where(face, z, 0) / temperature
            theta = step_fn(jnp.where(face, log_p, 0), rate, eta)
            aux_rate = f.score.aux_rate(t, log_p, aux)
            aux = jax.tree_util.tree_map(lambda a, r: a + eta * r, aux, aux_rate)
            new = f.readout(theta, face)
            return (new, aux), new

        ks = jnp.arange(num_steps, dtype=eta.dtype)
        _, path = jax.lax.scan(body, (log_p, aux), ks)
        return jnp.concatenate([log_p[None], path], axis=0)

    path = vmap_rows(one, rows)
    # The inputs were checked and every step is normalised: a NaN here means that the
    # log-weights overflowed, i.e. a step size too large for the map.
    return error_if_rows(
        path,
        jnp.any(jnp.isnan(path), axis=(-2, -1)),
        f"`step_size` is too large for `{name}`: its iterates overflowed at batch index "
        "{index}. The entropic mirror step diverges for step_size > 2; multiplicative "
        "weights overflow once step_size * |score| / temperature passes the largest "
        "float.",
    )


def discrete_map(
    flow: AbstractFlow,
    step_size: RealScalarLike,
    num_steps: int,
    *,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
) -> Float[Array, "*out_batch steps vocab"]:
    """The flow's own discrete-time map (`flow.discrete_step`), iterated: multiplicative
    weights for `Replicator`, the entropic mirror step for `EntropicReplicator`.

    Arguments and return as `multiplicative_weights`; history terms of the score advance
    by explicit Euler steps.
    """
    return _iterate(flow, step_size, num_steps, y0, log_y0, None, "discrete_map")


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
    return _iterate(
        flow, step_size, num_steps, y0, log_y0, multiplicative_step, "multiplicative_weights"
    )


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
    return _iterate(
        flow, step_size, num_steps, y0, log_y0, mirror_step, "entropic_mirror_map"
    )
