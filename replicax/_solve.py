"""`solve`: the one entry point that runs a flow for a batch of contexts.

`solve` prepares the rows (`_rows.py`), hands each to the method (`_methods/`) inside one
`jit`, and stacks what the method returns into a `Trajectory`. It calls nothing else: a
new way of solving is a new method, not a new branch here.
"""

from typing import Any, Literal

import diffrax
import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Float

from ._custom_types import RealScalarLike
from ._dispatch import cached_call, has_tracer
from ._flows import AbstractFlow
from ._methods import AbstractMethod, Exact, ODE
from ._rows import (
    check_saveat_fn,
    prepare_rows,
    prepare_time_values,
    prepare_times,
    Rows,
    saved_times,
)
from ._saveat import SaveAt
from ._solution import Trajectory


# The default `saveat` (built once: a module is immutable, and building one costs).
_SAVE_T1 = SaveAt(t1=True)


def solve(
    flow: AbstractFlow,
    *,
    t1: RealScalarLike,
    t0: RealScalarLike = 0.0,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    saveat: SaveAt | None = None,
    support: Any = None,
    temperature_first: bool = True,
    method: AbstractMethod | Literal["auto", "exact", "ode"] = "auto",
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    rtol: RealScalarLike | None = None,
    atol: RealScalarLike | None = None,
    dt0: RealScalarLike | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    max_steps: int | None = None,
    throw: bool | None = None,
    shared_steps: bool | None = None,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
) -> Trajectory:
    """Runs `flow` from `t0` to `t1` for every context of the batch.

    The state is the log-probability vector (THEORY §6): normalisation is exact by
    construction and tokens never underflow to a spurious zero.

    **Arguments:**

    - `flow`: a flow (`Replicator`, `EntropicReplicator`, or your own `AbstractFlow`).
        Leading dimensions of its parameters and of `y0` broadcast together to the batch
        shape.
    - `t1`, `t0`: final and initial times (`t1 >= t0`), finite. Dynamic.
    - `y0`: initial distribution, shape `(*batch, vocab)` or `(vocab,)`; entries must be
        `>= 0` and sum to 1 (within 1e-4 in float32, 1e-9 in float64). Zeros mean the flow
        runs on the face of the other tokens. Default: uniform on the tokens whose logits
        are not `-inf`.
    - `log_y0`: the same given as log-probabilities (`-inf` allowed, NaN and `+inf`
        not). Give at most one of `y0`, `log_y0`.
    - `saveat`: a `SaveAt`; default `SaveAt(t1=True)`.
    - `support`: a face (`TopK`, `TopP`, `MinP`, `Typical`, `Epsilon`, `Eta`, `Mask`,
        `Full`) or a list of them applied in order, as transformers' warpers are. The face
        is evaluated once, on the constant logits, and the flow runs on it (THEORY §3):
        tokens off it get `log p = -inf` at every time, including `t0` (the start is
        I-projected onto the face). With `method=rx.Switched()` the rule is re-evaluated
        along the path instead.
    - `temperature_first`: evaluate the supports on `logits / T` (default, the order of
        transformers' generation: temperature warper first) or on the raw logits. Top-k
        and masks do not depend on it; top-p, min-p, typical, epsilon and eta do.
    - `method`: a method object: `rx.Exact()` (the closed forms of THEORY §1, constant
        scores only), `rx.ODE(...)` (diffrax, any score), `rx.Switched(...)` (a threshold
        face re-evaluated along the path). The strings `"exact"` and `"ode"` stand for
        `rx.Exact()` and `rx.ODE(...)`; `"auto"` (default) picks `rx.Exact()` when the
        score is constant and no option of the ODE path below was given, else `rx.ODE`.
    - `solver`, `stepsize_controller`, `rtol`, `atol`, `dt0`, `adjoint`, `max_steps`,
        `throw`, `shared_steps`, `progress_meter`: shorthand for
        `method=rx.ODE(solver=..., ...)` (see `rx.ODE` for each); giving any of them
        selects the ODE path under `"auto"`, and they are refused with `method="exact"`
        or a method object.

    **Returns:**

    A `Trajectory`: `log_p` of shape `(*batch, times, vocab)`, or `observables` when
    `SaveAt(fn=...)` is used.

    **Per-call cost:** a direct call prepares its arguments in Python once per
    *structure* (shapes, dtypes, kinds of score terms and supports, method, `saveat`);
    later calls that differ only in values dispatch the compiled program directly, as a
    decoding loop needs (`replicax bench` measures this overhead). Inside your own
    `jax.jit` nothing is paid per call. Calls with ODE options or a method object holding
    values (e.g. `rx.ODE(rtol=...)`) prepare on every call; wrap them in `jax.jit` in a
    loop.

    **Raises:**

    `ValueError` / `TypeError` for bad arguments known when `solve` is called (naming the
    argument and, for values, the batch index); `equinox.EquinoxRuntimeError` (or the XLA
    runtime error wrapping it under `jax.jit`) for bad traced values, with the same
    message.
    """
    if saveat is None:
        saveat = _SAVE_T1
    elif not isinstance(saveat, SaveAt):
        raise TypeError(
            f"`saveat` must be a `replicax.SaveAt`; received {type(saveat).__name__}."
        )
    given = dict(
        solver=solver,
        stepsize_controller=stepsize_controller,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        adjoint=adjoint,
        max_steps=max_steps,
        throw=throw,
        shared_steps=shared_steps,
        progress_meter=progress_meter,
    )
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        cached = _solve_cached(
            flow, t0, t1, y0, log_y0, saveat, support, temperature_first, method
        )
        if cached is not None:
            return cached
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    method = _as_method(method, flow, given)
    t0, t1, saveat = prepare_times(t0, t1, saveat, rows.dtype)
    return _solve_prepared(rows, method, t0, t1, saveat)


def _solve_prepared(
    rows: Rows, method: AbstractMethod, t0, t1, saveat: SaveAt
) -> Trajectory:
    """`solve` once the rows and times are prepared (times checked and made arrays)."""
    check_saveat_fn(saveat, rows, t0)
    method = method.prepare(rows, saveat)
    ts, out = _solve_rows(rows, method, t0, t1, saveat)
    return Trajectory(
        ts=ts,
        log_p=out.log_p,
        observables=out.observables,
        aux=out.aux,
        stats=out.stats,
        result=out.result,
        method=method.name,
        info=out.info,
    )


def _solve_cached(
    flow, t0, t1, y0, log_y0, saveat: SaveAt, support, temperature_first, method
) -> Trajectory | None:
    """`solve` through `cached_call` (the per-call overhead of a decoding loop), or
    `None` for calls it does not take: with tracers, with options of the ODE path, or
    with a method object that holds values (e.g. `rx.ODE(rtol=...)`)."""
    if not isinstance(flow, AbstractFlow) or has_tracer((t0, t1, saveat.ts)):
        return None
    if not isinstance(method, str) and jtu.tree_leaves(method):
        return None
    key = (saveat.t0, saveat.t1, saveat.ts is None, saveat.fn, temperature_first, method)
    args = (flow, y0, log_y0, support)

    def first_call():
        rows = prepare_rows(
            flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
        )
        _as_method(method, flow, {})
        return rows.dtype

    def host_args(dtype):
        return prepare_time_values(t0, t1, saveat.ts, dtype)

    return cached_call(_solve_body, args, key, first_call, host_args)


def _solve_body(key, args, t0, t1, ts) -> Trajectory:
    """`solve` from prepared times (traced once per structure by `cached_call`)."""
    save_t0, save_t1, _, fn, temperature_first, method = key
    flow, y0, log_y0, support = args
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    method = _as_method(method, flow, {})
    saveat = SaveAt(t0=save_t0, t1=save_t1, ts=ts, fn=fn)
    return _solve_prepared(rows, method, t0, t1, saveat)


def _as_method(method, flow: AbstractFlow, given: dict[str, Any]) -> AbstractMethod:
    """The method object that `method` (a string or an object) and the ODE shorthand
    keyword arguments stand for."""
    if isinstance(method, AbstractMethod):
        if given:
            raise ValueError(
                f"{', '.join(f'`{k}`' for k in given)} configure the ODE path; with a "
                "method object, give them to it (e.g. `rx.ODE(rtol=...)`)."
            )
        return method
    if method not in ("auto", "exact", "ode"):
        raise ValueError(
            "`method` must be a method object (`rx.Exact()`, `rx.ODE(...)`, "
            f"`rx.Switched(...)`) or 'auto', 'exact', 'ode'; received {method!r}."
        )
    if method == "exact":
        if given:
            raise ValueError(
                "`method='exact'` uses no ODE solver; do not pass "
                f"{', '.join(f'`{k}`' for k in given)}."
            )
        return Exact()
    if method == "auto" and not given and flow.score.is_constant:
        return Exact()
    return ODE(**given)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _solve_rows(rows: Rows, method: AbstractMethod, t0, t1, saveat: SaveAt):
    save_ts = saved_times(t0, t1, saveat)
    out = method.solve_rows(rows, t0, t1, save_ts, saveat)
    return save_ts, out
