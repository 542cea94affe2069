"""`equilibrium`: rest points of a flow, with their stability (THEORY §4).

A thin entry point over the rest-point methods (`rx.RestPoint`): it prepares the rows as
`solve` does, hands each context to `method.rest_point_row` inside one `jit`, and stacks
the answers into an `Equilibrium`.
"""

from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, ArrayLike, Bool, Complex, Float, Int

from ._flows import AbstractFlow
from ._methods import AbstractMethod, RestPoint
from ._methods.base import error_if_failed
from ._rows import (
    Rows,
    explicit_batch_shards,
    map_rows_per_shard,
    prepare_rows,
    vmap_rows,
    with_auto_axes,
)
from ._solution import RESULTS


class Equilibrium(eqx.Module):
    """Rest points found by `rx.equilibrium`, one per context.

    **Fields:**

    - `log_p`: the rest point, shape `(*batch, vocab)` (`-inf` off the face).
    - `stable`: whether it is linearly stable: the leading eigenvalue of the tangent
        Jacobian has real part `< -stability_tol` (see `rx.RestPoint`). `False` where
        the search failed.
    - `leading_eigenvalue`: that eigenvalue (complex; of a conjugate pair the one with
        `Im >= 0`), in the flow's own time units; NaN where the search failed, `-inf`
        on a face of a single token without history.
    - `residual`: `max |θ̇|` on the face at `log_p` (the flow's centred log rate, the
        history at rest).
    - `result`: a `RESULTS` per context: `RESULTS.successful`, or
        `RESULTS.rest_point_not_found`, whose message says what to change.
    - `num_steps`: iterations of the root find.
    """

    log_p: Float[Array, "*batch vocab"]
    stable: Bool[Array, "*batch"]
    leading_eigenvalue: Complex[Array, "*batch"]
    residual: Float[Array, "*batch"]
    result: RESULTS
    num_steps: Int[Array, "*batch"]


def equilibrium(
    flow: AbstractFlow,
    *,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    support: Any = None,
    temperature_first: bool = True,
    method: AbstractMethod = RestPoint(),  # noqa: B008 - a frozen Module, never mutated
) -> Equilibrium:
    """Rest points of `flow`, one per context, each searched from that context's start,
    with a stability flag (THEORY §4).

    A rest point is a zero of the flow's centred log-space field with the history at
    rest (every stage of a fading memory equal to `p`). For the entropic replicator (E)
    these are exactly the quantal-response points `p = softmax(z(p)/T)`; for the
    replicator (R) (state-dependent scores) the points where the scores are equal on the
    face, such as the interior Nash point of a payoff. A flow may have several: give a
    batch of starts (`y0` of shape `(starts, vocab)` against a flow of batch `()`, or
    `(starts, 1, vocab)` against a flow of batch `(B,)`) to find them from many starts;
    each start ends at the rest point its root find converges to (not necessarily the
    one its path would reach). Gradients of `log_p` with respect to the flow's
    parameters (logits, temperature, score parameters) come from the implicit function
    theorem: they do not depend on the iterations.

    **Arguments:**

    - `flow`: a flow; its score may depend on the state and on a fading history
        (`tau` finite), not on cumulative counts (they have no rest point).
    - `y0`, `log_y0`: the starts of the search (as in `rx.solve`; default uniform on the
        face). Zeros put the rest point on the face of the other tokens (faces are
        invariant).
    - `support`, `temperature_first`: the face, as in `rx.solve`.
    - `method`: how to search, `rx.RestPoint(...)` (tolerances, `max_steps`, `throw`,
        the linear solver, the eigensolver).

    **Returns:**

    An `Equilibrium` with leading shape the batch shape of the flow and the starts.

    **Raises:**

    `ValueError` for a flow without isolated rest points (a constant score under (R):
    use `rx.limit_log_p`) or a score whose history has no rest (cumulative counts), and
    for bad arguments as `rx.solve`; `TypeError` for a method that does not find rest
    points. With `throw=True` (default) a failed search raises
    (`equinox.EquinoxRuntimeError`) with the message of
    `RESULTS.rest_point_not_found`.
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be a method object such as `rx.RestPoint()`; received "
            f"{type(method).__name__}."
        )
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    method = method.prepare_rest_point(rows)
    out = _equilibrium_rows(rows, method)
    return Equilibrium(
        log_p=out.log_p,
        stable=out.stable,
        leading_eigenvalue=out.leading_eigenvalue,
        residual=out.residual,
        result=out.result,
        num_steps=out.num_steps,
    )


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _equilibrium_rows(rows: Rows, method: AbstractMethod):
    # On a mesh of explicit axes the search runs with them made `Auto`, as the ODE
    # path does (`with_auto_axes`), and the contexts of each device one at a time:
    # see `map_rows_per_shard` for why (LAPACK's CPU kernels). With several CPU
    # devices the contexts are mapped one at a time whatever the sharding: inputs on a
    # mesh of `Auto` axes carry no sharding in their types under `jit`, and vmapped
    # they hung as explicitly sharded ones did (measured on 8 CPU devices: vocabulary
    # sharding, and batch sharding called eagerly).
    shards = explicit_batch_shards(rows)
    if shards is None and jax.default_backend() == "cpu" and jax.device_count() > 1:
        shards = 1

    def search(rows, method):
        if shards is None:
            out = vmap_rows(method.rest_point_row, rows)
        else:
            out = map_rows_per_shard(method.rest_point_row, rows, shards)
        # Failures are raised for the batch, naming the row (as `ODE.solve_rows`).
        throw = getattr(method, "throw", True)
        return error_if_failed(out, out.result, "`rx.equilibrium`", when=throw)

    return with_auto_axes(search, rows, method)
