"""The ODE method: the flow integrated in log space with diffrax (any score)."""

from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._custom_types import RealScalarLike
from .._rows import (
    as_scalar,
    check_scalar,
    floats_to_arrays,
    on_rows,
    Row,
    Rows,
    with_auto_axes,
)
from .._saveat import SaveAt
from .._solution import RESULTS
from .base import AbstractMethod, error_if_failed, RowSolution


# Checkpoints of the default adjoint: gradient memory ~2.7× the forward solve's
# (benchmarks/adjoints.py)
DEFAULT_CHECKPOINTS = 4


def check_max_steps(max_steps, name: str = "max_steps", allow_none: bool = True):
    if max_steps is None and allow_none:
        return
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(
            f"`{name}` must be an int >= 1"
            + (" or None" if allow_none else "")
            + f"; received {max_steps!r}."
        )


def tolerances(rtol, atol, dtype, default) -> tuple[Array, Array]:
    """`rtol`, `atol` as arrays of `dtype`, checked (finite, > 0; on device if traced)."""
    out = []
    for value, name in ((rtol, "rtol"), (atol, "atol")):
        value = as_scalar(default if value is None else value, name, dtype)
        out.append(check_scalar(value, name, positive=True))
    return out[0], out[1]


class ODE(AbstractMethod):
    """Integrate the flow with diffrax, in log space (THEORY §6.1): the state is the
    log-weights `θ` (and the score's history, if any), `log p` is read out with the
    flow's `readout`. Works for every score; the only method for state- or
    history-dependent ones.

    **Arguments** (diffrax's own objects and names):

    - `solver`: a diffrax ODE solver; default `diffrax.Tsit5()`.
    - `stepsize_controller`: a diffrax step-size controller; default
        `diffrax.PIDController(rtol=rtol, atol=atol)`. Python floats inside it are made
        dynamic.
    - `rtol`, `atol`: tolerances of the default controller, on `log p` (default `1e-6`).
        Dynamic. Give them to your own controller instead when you pass one.
    - `dt0`: initial step (`None`: chosen by the controller; needed by a constant step).
    - `adjoint`: how `jax.grad` differentiates the solve; a diffrax adjoint. Default
        `diffrax.RecursiveCheckpointAdjoint(checkpoints=4)`: the exact derivative of the
        discrete solve, keeping 4 checkpoints of the state whatever the number of steps,
        so the gradient's memory is about 2.7× the forward solve's and does not grow with
        the steps (diffrax's own default keeps about `√(2 max_steps)`, 90 at the default
        `max_steps`: 19× the forward memory). The price is recomputation: with `c`
        checkpoints and `n` steps each step is recomputed about `r` times, where
        `binom(c + r, c) ≥ n` (6 times for 128 steps). Pass more checkpoints when memory
        allows. `diffrax.BacksolveAdjoint()` keeps no checkpoints (2.4× the forward
        memory) and solves the adjoint equation backwards: accurate to the solver's
        tolerance, not exact. For (R), whose log-space flow does not contract, the
        backward solve is as stable as the forward one; (E) contracts forwards
        (`θ̇ = z/T - θ`), so its state reconstructed backwards gains errors like
        `e^{t1 - t0}` (measured: 2.4e-6 relative at `t1 = 8` in float32; use it for
        (E) only over horizons of a few units). It cannot be used with
        `SaveAt(fn=...)`. `benchmarks/adjoints.py` measures the choices side by side.
    - `max_steps`: step budget per context (static); per batch with `shared_steps`.
    - `throw`: raise if the solver fails, naming the first failed batch index and the
        kind of failure; with `False`, failures are reported per row in
        `Trajectory.result` (and those rows' outputs are not meaningful).
    - `shared_steps`: integrate the whole batch as one state with one step size
        (static; default `False`: each context steps on its own, as `jax.vmap` of
        `diffrax.diffeqsolve` does). A step is accepted only if every context's error
        passes the controller (its norm is taken per context and the largest decides),
        so each context is at least as accurate as alone. It is faster for a batch:
        a `vmap`ped solve runs as many iterations as its slowest context anyway, and
        each iteration also selects, context by context, which state to keep
        (`benchmarks/README.md`: 1.2–1.4× at 8 contexts of 32,000 tokens on a CPU, and a
        shorter compile). The price: a context that needs short steps shortens them
        for all, `stats` hold the batch's counts, and with `throw=False` a failure is
        reported for every context. Supported controllers: `PIDController`,
        `ClipStepSizeController` around one, and constant steps.
    - `progress_meter`: a diffrax progress meter (e.g. `diffrax.TqdmProgressMeter()`).
    """

    name: ClassVar[str] = "ode"
    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    rtol: RealScalarLike | None = None
    atol: RealScalarLike | None = None
    dt0: RealScalarLike | None = None
    adjoint: diffrax.AbstractAdjoint = diffrax.RecursiveCheckpointAdjoint(
        checkpoints=DEFAULT_CHECKPOINTS
    )
    max_steps: int | None = eqx.field(static=True, default=4096)
    throw: bool = eqx.field(static=True, default=True)
    shared_steps: bool = eqx.field(static=True, default=False)
    progress_meter: diffrax.AbstractProgressMeter = diffrax.NoProgressMeter()

    def __check_init__(self):
        check_max_steps(self.max_steps)
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                "`solver` must be a diffrax solver (e.g. `diffrax.Tsit5()`); received "
                f"{type(self.solver).__name__}."
            )
        if self.stepsize_controller is not None and not isinstance(
            self.stepsize_controller, diffrax.AbstractStepSizeController
        ):
            raise TypeError(
                "`stepsize_controller` must be a diffrax step-size controller; received "
                f"{type(self.stepsize_controller).__name__}."
            )
        if not isinstance(self.shared_steps, bool):
            raise TypeError(
                f"`shared_steps` must be a bool; received {self.shared_steps!r}."
            )
        if self.shared_steps:
            _worst_row_norm(self.stepsize_controller)  # raises if it does not apply
        if self.stepsize_controller is not None and (
            self.rtol is not None or self.atol is not None
        ):
            raise ValueError(
                "`rtol` and `atol` configure the default step-size controller; with your "
                "own `stepsize_controller`, give them to it instead."
            )

    def prepare(self, rows: Rows, saveat: SaveAt) -> "ODE":
        if saveat.fn is not None and isinstance(self.adjoint, diffrax.BacksolveAdjoint):
            raise ValueError(
                "`adjoint=diffrax.BacksolveAdjoint()` cannot differentiate through "
                "`SaveAt(fn=...)`: save `log_p` and compute the observables from it, or "
                "use the default adjoint."
            )
        dtype = rows.dtype
        if self.stepsize_controller is None:
            rtol, atol = tolerances(self.rtol, self.atol, dtype, 1e-6)
            controller = diffrax.PIDController(rtol=rtol, atol=atol)
        else:
            rtol = atol = None
            controller = floats_to_arrays(self.stepsize_controller, dtype)
        dt0 = self.dt0
        if dt0 is not None:
            dt0 = check_scalar(as_scalar(dt0, "dt0", dtype), "dt0", positive=True)
        return eqx.tree_at(
            lambda m: (m.stepsize_controller, m.rtol, m.atol, m.dt0),
            self,
            (controller, rtol, atol, dt0),
            is_leaf=lambda x: x is None,
        )

    def solve_row(self, row: Row, t0, t1, save_ts, saveat) -> RowSolution:
        del save_ts
        return self._solve(row, t0, t1, saveat, batched=False)

    def solve_rows(self, rows: Rows, t0, t1, save_ts, saveat) -> RowSolution:
        # On a mesh of explicit axes the solve runs with them made `Auto`
        # (`with_auto_axes`); diffrax itself never throws (its check would pass the
        # whole solution through a `cond` that XLA places on one device, gathering
        # sharded arrays there): failures are raised here, from a scalar flag.
        def solve(rows, method, t0, t1, save_ts, saveat):
            if method.shared_steps:
                out = on_rows(
                    lambda row: method._solve(row, t0, t1, saveat, batched=True), rows
                )
            else:
                out = AbstractMethod.solve_rows(method, rows, t0, t1, save_ts, saveat)
            if method.throw:
                what = "The ODE solve"
                out = error_if_failed(out, out.result, what, method.shared_steps)
            return out

        return with_auto_axes(solve, rows, self, t0, t1, save_ts, saveat)

    def _solve(self, row: Row, t0, t1, saveat: SaveAt, batched: bool) -> RowSolution:
        """One `diffeqsolve`: of one context, or (`batched`, for `shared_steps`) of all
        of them as one state with a leading axis of rows; each function of one context
        below is then `vmap`ped over the rows (`lift`)."""
        lift = jax.vmap if batched else (lambda f: f)
        flow, face = row.flow, row.face

        def start(row):
            theta0 = row.theta0()
            return theta0, row.flow.score.init_aux(row.flow.readout(theta0, row.face))

        theta0, aux0 = lift(start)(row)
        has_aux = len(jtu.tree_leaves(aux0)) > 0
        fn = saveat.fn

        # The flow and face reach the vector field through `args`, not a closure:
        # adjoints that differentiate with respect to `args` (`BacksolveAdjoint`) see
        # the flow's parameters, and nothing traced is closed over.
        def vector_field(t, y, args):
            def one(flow, face, theta, aux):
                return flow.state_rate(t, theta, aux, face)

            theta, aux = y if has_aux else (y, aux0)
            rate, aux_rate = lift(one)(*args, theta, aux)
            return (rate, aux_rate) if has_aux else rate

        # Without `fn` the raw state is saved and read out afterwards: the same work, and
        # it lets adjoints that cannot save through a function (`BacksolveAdjoint`) run.
        def save_fn(t, y, args):
            def one(flow, face, theta):
                return fn(t, flow.readout(theta, face), flow)

            return lift(one)(*args, y[0] if has_aux else y)

        controller = self.stepsize_controller
        if batched:
            controller = _worst_row_norm(controller)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            self.solver,
            t0,
            t1,
            self.dt0,
            (theta0, aux0) if has_aux else theta0,
            args=(flow, face),
            saveat=diffrax.SaveAt(
                t0=saveat.t0,
                t1=saveat.t1,
                ts=saveat.ts,
                **({} if fn is None else dict(fn=save_fn)),
            ),
            stepsize_controller=controller,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
            throw=False,
            progress_meter=self.progress_meter,
        )
        stats = {
            k: jnp.asarray(sol.stats[k], jnp.int32)
            for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")
        }
        result = RESULTS.promote(sol.result)
        ys = sol.ys
        if batched:
            # diffrax saves `(times, rows, ...)`; one count and one result for all rows.
            ys = jtu.tree_map(lambda x: jnp.moveaxis(x, 0, 1), ys)
            rows = face.shape[0]
            stats, result = jtu.tree_map(
                lambda x: jnp.broadcast_to(x, (rows,)), (stats, result)
            )

        def per_row(flow, face, ys, stats, result):
            if fn is not None:
                return RowSolution(None, ys, None, stats, result)
            theta, aux = ys if has_aux else (ys, None)
            log_p = jax.vmap(flow.readout, in_axes=(0, None))(theta, face)
            return RowSolution(log_p, None, aux, stats, result)

        return lift(per_row)(flow, face, ys, stats, result)


class _WorstRowNorm(eqx.Module):
    """A controller's norm taken row by row over a state with a leading axis of rows,
    and the largest of them: a step passes only if it passes for every context."""

    norm: Callable[[PyTree], RealScalarLike]

    def __call__(self, y: PyTree) -> Array:
        return jnp.max(jax.vmap(self.norm)(y))


def _worst_row_norm(controller):
    """`controller` with its error norm taken per row (the worst row decides).
    `ValueError` for a controller whose error this cannot reach."""
    if isinstance(controller, diffrax.PIDController):
        return eqx.tree_at(lambda c: c.norm, controller, _WorstRowNorm(controller.norm))
    if isinstance(controller, diffrax.ClipStepSizeController):
        inner = _worst_row_norm(controller.controller)
        return eqx.tree_at(lambda c: c.controller, controller, inner)
    # `None`: the default PID controller, built by `prepare`. Constant steps and
    # `StepTo` read no error.
    if controller is None or isinstance(
        controller, (diffrax.ConstantStepSize, diffrax.StepTo)
    ):
        return controller
    raise ValueError(
        "`shared_steps=True` needs a step-size controller whose error it can take "
        "context by context: `diffrax.PIDController`, `diffrax.ClipStepSizeController` "
        "around one, `ConstantStepSize` or `StepTo`; received "
        f"{type(controller).__name__}."
    )
