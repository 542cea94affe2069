"""`solve`: the one entry point that runs a flow for a batch of contexts.

The work is split in three layers (diffrax `_integrate.py`, equinox `nn/_linear.py`):

1. `solve` (not jitted): checks what can be checked now, turns Python floats into arrays
   (so that new values do not recompile), broadcasts every leaf of the flow to the batch
   shape and flattens the batch to rows.
2. `_solve_rows` (`eqx.filter_jit`): `jax.vmap` of the single-context solver over rows,
   plus the run-time checks of traced inputs.
3. `_solve_one`: one context, exact (closed form) or diffrax.
"""

import math
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._misc import as_numpy, compute_dtype, error_if_rows, is_concrete
from ._saveat import SaveAt
from ._scores import FaceMask, Logits
from ._support import AbstractSupport, Mask, as_supports, face_of_row
from ._solution import RESULTS, Trajectory


# Tolerance on `|Σ y0 - 1|` (or `|logsumexp log_y0|`) per dtype.
_Y0_TOLERANCE = {4: 1e-4, 8: 1e-9}


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
    method: Literal["auto", "exact", "ode"] = "auto",
    solver: diffrax.AbstractSolver | None = None,
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    rtol: RealScalarLike = 1e-6,
    atol: RealScalarLike = 1e-6,
    dt0: RealScalarLike | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    max_steps: int | None = 4096,
    throw: bool = True,
    progress_meter: diffrax.AbstractProgressMeter | None = None,
) -> Trajectory:
    """Runs `flow` from `t0` to `t1` for every context of the batch.

    The state is the log-probability vector (THEORY §6): normalisation is exact by
    construction and tokens never underflow to a spurious zero.

    **Arguments:**

    - `flow`: a `Replicator` or `EntropicReplicator`. Leading dimensions of its logits,
        temperature and of `y0` broadcast together to the batch shape.
    - `t1`, `t0`: final and initial times (`t1 >= t0`). Dynamic.
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
        I-projected onto the face).
    - `temperature_first`: evaluate the supports on `logits / T` (default, the order of
        transformers' generation: temperature warper first) or on the raw logits. Top-k
        and masks do not depend on it; top-p, min-p, typical, epsilon and eta do.
    - `method`: `"exact"` uses the closed forms of THEORY §1 (constant scores only);
        `"ode"` integrates with diffrax; `"auto"` (default) picks `"exact"` when the
        score is constant and no `solver` or `stepsize_controller` was given.
    - `solver`: any diffrax ODE solver for the `"ode"` path; default `diffrax.Tsit5()`.
    - `stepsize_controller`: a diffrax step-size controller; default
        `diffrax.PIDController(rtol=rtol, atol=atol)`. Python floats inside it are made
        dynamic.
    - `rtol`, `atol`: tolerances of the default controller, on `log p`. Dynamic.
    - `dt0`: initial step for diffrax (`None`: chosen by the controller).
    - `adjoint`: a diffrax adjoint; default `diffrax.RecursiveCheckpointAdjoint()`.
    - `max_steps`: step budget of the diffrax path (static).
    - `throw`: raise if diffrax fails; with `False`, failures are reported per row in
        `Trajectory.result` (and the rows' outputs are not meaningful).
    - `progress_meter`: a diffrax progress meter.

    **Returns:**

    A `Trajectory`: `log_p` of shape `(*batch, times, vocab)`, or `observables` when
    `SaveAt(fn=...)` is used.

    **Raises:**

    `ValueError` / `TypeError` for bad arguments known when `solve` is called (naming the
    argument and, for values, the batch index); `equinox.EquinoxRuntimeError` (or the XLA
    runtime error wrapping it under `jax.jit`) for bad traced values, with the same
    message.
    """
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "`flow` must be a replicax flow (`Replicator` or `EntropicReplicator`); "
            f"received {type(flow).__name__}."
        )
    if saveat is None:
        saveat = SaveAt(t1=True)
    elif not isinstance(saveat, SaveAt):
        raise TypeError(
            f"`saveat` must be a `replicax.SaveAt`; received {type(saveat).__name__}."
        )
    if method not in ("auto", "exact", "ode"):
        raise ValueError(
            f"`method` must be 'auto', 'exact' or 'ode'; received {method!r}."
        )
    if method == "exact" and not flow.score.is_constant:
        raise ValueError(
            "`method='exact'` needs a constant score (e.g. `Logits` alone); this score "
            "depends on the state or history, so use `method='ode'` or 'auto'."
        )
    if method == "exact" and (solver is not None or stepsize_controller is not None):
        raise ValueError(
            "`method='exact'` uses no ODE solver; do not pass `solver` or "
            "`stepsize_controller`."
        )
    exact = method == "exact" or (
        method == "auto"
        and flow.score.is_constant
        and solver is None
        and stepsize_controller is None
    )

    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    dtype = rows.dtype
    t0, t1, saveat = prepare_times(t0, t1, saveat, dtype)

    if exact:
        ode = None
    else:
        if solver is None:
            solver = diffrax.Tsit5()
        if stepsize_controller is None:
            stepsize_controller = diffrax.PIDController(
                rtol=_as_scalar(rtol, "rtol", dtype), atol=_as_scalar(atol, "atol", dtype)
            )
        else:
            stepsize_controller = _floats_to_arrays(stepsize_controller, dtype)
        ode = _OdeOptions(
            solver=solver,
            controller=stepsize_controller,
            dt0=None if dt0 is None else _as_scalar(dt0, "dt0", dtype),
            adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
            max_steps=max_steps,
            throw=throw,
            progress_meter=(
                diffrax.NoProgressMeter() if progress_meter is None else progress_meter
            ),
        )

    out = _solve_rows(rows, t0, t1, saveat, ode)
    ts_out, log_p, observables, aux, stats, result = out
    unflatten = rows.unflatten
    return Trajectory(
        ts=ts_out,
        log_p=None if log_p is None else unflatten(log_p),
        observables=None if observables is None else jtu.tree_map(unflatten, observables),
        aux=None if aux is None else jtu.tree_map(unflatten, aux),
        stats={k: unflatten(v) for k, v in stats.items()},
        result=jtu.tree_map(unflatten, result),
        method="exact" if exact else "ode",
    )


# ----------------------------------------------------------------------------------------
# Preparing rows (shared with `time_to` and the discrete maps)


class Rows(eqx.Module):
    """A flow and its start, with the batch shape they broadcast to.

    Built outside `jit` from shapes alone (no value is read, so nothing waits for the
    device); `flat()` is called inside `jit`: it broadcasts every leaf to the batch shape,
    flattens the batch to rows and adds the run-time checks of the values.
    """

    flow: AbstractFlow  # as given
    start: Float[Array, "*start_batch vocab"] | None  # y0 or log_y0, as given
    supports: tuple[AbstractSupport, ...]
    start_name: str | None = eqx.field(static=True)
    batch_shape: tuple[int, ...] = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    temperature_first: bool = eqx.field(static=True, default=True)

    @property
    def num_rows(self) -> int:
        return math.prod(self.batch_shape)

    def flat(self) -> tuple[AbstractFlow, Float[Array, "rows vocab"] | None]:
        batch_shape = self.batch_shape
        flow = self.flow
        score = flow.score.broadcast_batch(batch_shape)
        temperature = jnp.broadcast_to(flow.temperature, batch_shape)
        flow = eqx.tree_at(lambda f: (f.score, f.temperature), flow, (score, temperature))
        flow = self.flatten(check_flow_values(flow))
        if self.supports:
            flow = _restrict_to_face(flow, self.flat_supports(), self.temperature_first)
        if self.start is None:
            return flow, None
        start = self.start.astype(self.dtype)
        log_p0 = jnp.log(start) if self.start_name == "y0" else start
        log_p0 = jnp.broadcast_to(log_p0, batch_shape + (self.vocab_size,))
        log_p0 = check_start(
            log_p0, self.start_name, _Y0_TOLERANCE[self.dtype.itemsize], batch_shape
        )
        return flow, log_p0.reshape(self.num_rows, self.vocab_size)

    def flatten(self, tree):
        """Every array leaf of `tree` (leading shape `batch_shape`) as `(rows, ...)`."""
        n, k = self.num_rows, len(self.batch_shape)
        return jtu.tree_map(
            lambda x: x.reshape((n,) + x.shape[k:]) if eqx.is_array(x) else x, tree
        )

    def flat_supports(self) -> tuple[AbstractSupport, ...]:
        """The supports, broadcast to the batch, checked, one parameter set per row."""
        return tuple(
            self.flatten(s.broadcast_batch(self.batch_shape).check())
            for s in self.supports
        )

    def broadcast(self, x: ArrayLike) -> Array:
        """An extra per-row argument (e.g. `eps`) as one value per row."""
        return jnp.broadcast_to(x, self.batch_shape).reshape(self.num_rows)

    def unflatten(self, x: Array) -> Array:
        return x.reshape(self.batch_shape + x.shape[1:])


def _restrict_to_face(flow, supports, temperature_first):
    """Add the face the supports leave (one per row) to the flow's score as `-inf`s."""

    def face(flow_row, supports_row):
        logits = flow_row.score.constant_logits()
        return face_of_row(logits, flow_row.temperature, supports_row, temperature_first)

    mask = jax.vmap(face)(flow, supports)
    mask = error_if_rows(
        mask,
        ~jnp.any(mask & _support_rows(flow, mask.shape), axis=-1),
        "`support` leaves no token at (flattened) row {index}.",
    )
    return eqx.tree_at(lambda f: f.score, flow, flow.score + FaceMask(mask))


def _support_rows(flow, shape):
    support = jax.vmap(lambda f: f.score.support())(flow)
    return jnp.ones(shape, bool) if support is None else support


def prepare_rows(
    flow: AbstractFlow,
    *,
    y0: ArrayLike | None = None,
    log_y0: ArrayLike | None = None,
    support=None,
    temperature_first: bool = True,
    extra_batch_shapes: tuple[tuple[int, ...], ...] = (),
) -> Rows:
    """Check the shapes of a flow, its start and its supports, and find their common
    batch shape."""
    if y0 is not None and log_y0 is not None:
        raise ValueError("Give at most one of `y0` and `log_y0`.")
    supports = as_supports(support)
    if supports and flow.score.constant_logits() is None:
        raise ValueError(
            "`support` is evaluated on the constant logits of the score, and this score "
            "has none: add a `Logits` term."
        )
    score = flow.score
    vocab_size = score.vocab_size

    float_leaves = [
        x
        for x in jtu.tree_leaves(flow)
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    start_name = "y0" if y0 is not None else ("log_y0" if log_y0 is not None else None)
    start = y0 if y0 is not None else log_y0
    if start is not None:
        start = jnp.asarray(start)
        if start.ndim == 0:
            raise ValueError(
                f"`{start_name}` must have shape (*batch, vocab); received a scalar."
            )
        if vocab_size is None:
            vocab_size = start.shape[-1]
        elif start.shape[-1] != vocab_size:
            raise ValueError(
                f"`{start_name}` must have shape (*batch, {vocab_size}) to match the "
                f"logits; received shape {start.shape}."
            )
        float_leaves.append(start)
    if vocab_size is None:
        raise ValueError(
            "Cannot tell the vocabulary size: the score has no `Logits` term, so give "
            "`y0` or `log_y0`."
        )
    # Python floats (temperature=0.7) are weakly typed and must not decide the dtype.
    strong = [x for x in float_leaves if not getattr(x, "weak_type", False)]
    itemsize = max([4] + [compute_dtype(x.dtype).itemsize for x in strong or float_leaves])
    dtype = jnp.dtype(jnp.float64 if itemsize == 8 else jnp.float32)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        dtype = jnp.dtype(jnp.float32)

    try:
        batch_shape = jnp.broadcast_shapes(
            score.batch_shape,
            flow.temperature.shape,
            () if start is None else start.shape[:-1],
            *(s.batch_shape for s in supports),
            *extra_batch_shapes,
        )
    except ValueError:
        raise ValueError(
            "The batch shapes do not broadcast together: score "
            f"{score.batch_shape}, temperature {flow.temperature.shape}, "
            f"{start_name} {None if start is None else start.shape[:-1]}."
        ) from None
    for s in supports:
        if isinstance(s, Mask) and s.mask.shape[-1] != vocab_size:
            raise ValueError(
                f"`Mask` must have shape (*batch, {vocab_size}); received shape "
                f"{s.mask.shape}."
            )
    return Rows(
        flow,
        start,
        supports,
        start_name,
        tuple(batch_shape),
        vocab_size,
        dtype,
        temperature_first,
    )


def check_start(log_p0, name, tol, batch_shape):
    """Run-time errors for a start that is not a distribution, naming the batch index."""
    if name == "y0":
        bad_value = jnp.any(jnp.isnan(log_p0), axis=-1)
        value_msg = "`y0` has a negative or NaN entry at batch index {index}."
    else:
        bad_value = jnp.any(jnp.isnan(log_p0) | (log_p0 == jnp.inf), axis=-1)
        value_msg = "`log_y0` has a NaN or +inf entry at batch index {index}."
    total = jnp.sum(jnp.exp(jnp.where(jnp.isnan(log_p0), -jnp.inf, log_p0)), axis=-1)
    bad_sum = ~bad_value & ~(jnp.abs(total - 1) <= tol)
    what = "sum to 1" if name == "y0" else "be normalised (logsumexp 0)"
    sum_msg = f"`{name}` must {what} within {tol:g}; it does not at batch index {{index}}."
    log_p0 = error_if_rows(log_p0, bad_value, value_msg)
    return error_if_rows(log_p0, bad_sum, sum_msg)


def check_flow_values(flow: AbstractFlow) -> AbstractFlow:
    """Run-time checks of logits and temperatures (leaves broadcast to `batch_shape`).

    These are checks on device (`eqx.error_if`): nothing is copied to the host, and a
    bad row is named by its batch index."""
    temperature = flow.temperature
    temperature = error_if_rows(
        temperature,
        ~(jnp.isfinite(temperature) & (temperature > 0)),
        "`temperature` must be finite and > 0; it is not at batch index {index}.",
    )

    def check_logits(term):
        if not isinstance(term, Logits):
            return term
        logits = term.logits
        logits = error_if_rows(
            logits,
            jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1),
            "`logits` contains NaN or +inf at batch index {index}. Use -inf to mask "
            "a token.",
        )
        logits = error_if_rows(
            logits,
            jnp.all(logits == -jnp.inf, axis=-1),
            "`logits` is all -inf at batch index {index}: no token is left.",
        )
        return eqx.tree_at(lambda t: t.logits, term, logits)

    score = jtu.tree_map(
        check_logits, flow.score, is_leaf=lambda x: isinstance(x, Logits)
    )
    return eqx.tree_at(lambda f: (f.score, f.temperature), flow, (score, temperature))


# ----------------------------------------------------------------------------------------
# The jitted core


class _OdeOptions(eqx.Module):
    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractStepSizeController
    dt0: Array | None
    adjoint: diffrax.AbstractAdjoint
    max_steps: int | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    progress_meter: diffrax.AbstractProgressMeter


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _solve_rows(rows: Rows, t0, t1, saveat: SaveAt, ode):
    flow, log_p0 = rows.flat()
    save_ts = saved_times(t0, t1, saveat)

    def one(flow_row, log_p0_row):
        return _solve_one(flow_row, log_p0_row, t0, t1, save_ts, saveat, ode)

    if log_p0 is None:
        out = jax.vmap(lambda f: one(f, None))(flow)
    else:
        out = jax.vmap(one)(flow, log_p0)
    return (save_ts,) + out


def saved_times(t0, t1, saveat: SaveAt) -> Float[Array, " times"]:
    parts = []
    if saveat.t0:
        parts.append(t0[None])
    if saveat.ts is not None:
        parts.append(saveat.ts)
    if saveat.t1:
        parts.append(t1[None])
    return jnp.concatenate(parts)


def row_support(flow_row: AbstractFlow, log_p0_row, vocab_size: int, dtype):
    """The face a row lives on, and its (normalised, finite-off-face) log start."""
    support = flow_row.score.support()
    if support is None:
        support = jnp.ones(vocab_size, bool)
    if log_p0_row is None:
        log_p0_row = jnp.zeros(vocab_size, dtype)
    else:
        support = support & (log_p0_row > -jnp.inf)
    log_p0_row = jnp.where(support, log_p0_row, -jnp.inf)
    log_p0_row = jax.nn.log_softmax(log_p0_row)
    return support, jnp.where(support, log_p0_row, 0)


def readout(theta, support):
    """`log p` from log-weights on a face (`-inf` off it)."""
    return jax.nn.log_softmax(jnp.where(support, theta, -jnp.inf))


def _solve_one(flow, log_p0, t0, t1, save_ts, saveat: SaveAt, ode):
    vocab_size = _row_vocab_size(flow, log_p0)
    dtype = t0.dtype
    support, theta0 = row_support(flow, log_p0, vocab_size, dtype)
    if log_p0 is not None:
        # y0 may put all its mass on tokens that the logits mask.
        theta0 = eqx.error_if(
            theta0,
            ~jnp.any(support),
            "`y0` puts no mass on any token allowed by the logits.",
        )
    fn = saveat.fn
    zero = jnp.zeros((), jnp.int32)

    if ode is None:
        scores = flow.score.constant_value().astype(dtype)
        if log_p0 is None:
            # From uniform, θ(t) = c(t) s with c >= 0, whose maximum on the face is
            # c(t) max s: known without a pass over the vocabulary, so each saved time
            # costs one reduction (the normaliser) and one write, and no (times, vocab)
            # intermediate is needed.
            top = jnp.max(jnp.where(support, scores, -jnp.inf))
            centred = jnp.where(support, scores - top, 0)

            def at(t):
                x = jnp.where(support, flow.coefficient(t - t0) * centred, -jnp.inf)
                log_p = x - jnp.log(jnp.sum(jnp.exp(x)))
                return log_p if fn is None else fn(t, log_p, flow)

        else:

            def at(t):
                theta = flow.closed_form(t - t0, theta0, scores)
                log_p = readout(theta, support)
                return log_p if fn is None else fn(t, log_p, flow)

        # With `fn`, one saved time at a time: only the observables are ever stored,
        # never a (times, vocab) block per row.
        saved = jax.vmap(at)(save_ts) if fn is None else jax.lax.map(at, save_ts)
        stats = dict(num_steps=zero, num_accepted_steps=zero, num_rejected_steps=zero)
        out_log_p, out_obs = (saved, None) if fn is None else (None, saved)
        return out_log_p, out_obs, None, stats, RESULTS.successful

    aux0 = flow.score.init_aux(readout(theta0, support))
    has_aux = len(jtu.tree_leaves(aux0)) > 0

    def vector_field(t, y, args):
        del args
        theta, aux = y if has_aux else (y, aux0)
        log_p = readout(theta, support)
        rate = flow.log_rate(t, log_p, aux, support)
        if has_aux:
            return rate, flow.score.aux_rate(t, log_p, aux)
        return rate

    def save_fn(t, y, args):
        del args
        theta, aux = y if has_aux else (y, aux0)
        log_p = readout(theta, support)
        if fn is not None:
            return fn(t, log_p, flow)
        return (log_p, aux) if has_aux else log_p

    y0 = (theta0, aux0) if has_aux else theta0
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        ode.solver,
        t0,
        t1,
        ode.dt0,
        y0,
        saveat=diffrax.SaveAt(
            t0=saveat.t0, t1=saveat.t1, ts=saveat.ts, fn=save_fn
        ),
        stepsize_controller=ode.controller,
        adjoint=ode.adjoint,
        max_steps=ode.max_steps,
        throw=ode.throw,
        progress_meter=ode.progress_meter,
    )
    stats = {
        k: jnp.asarray(sol.stats[k], jnp.int32)
        for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")
    }
    result = RESULTS.promote(sol.result)
    if fn is not None:
        return None, sol.ys, None, stats, result
    if has_aux:
        log_p, aux = sol.ys
        return log_p, None, aux, stats, result
    return sol.ys, None, None, stats, result


def _row_vocab_size(flow, log_p0):
    if flow.score.vocab_size is not None:
        return flow.score.vocab_size
    return log_p0.shape[-1]


# ----------------------------------------------------------------------------------------
# Small helpers


def _as_scalar(x, name: str, dtype) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; received shape {x.shape}.")
    if is_concrete(x) and not np.isfinite(as_numpy(x)):
        raise ValueError(f"`{name}` must be finite; received {x}.")
    return x.astype(dtype)


def prepare_times(t0, t1, saveat: SaveAt, dtype):
    """`t0`, `t1` and the saved times as arrays of `dtype` (dynamic), checked."""
    t0 = _as_scalar(t0, "t0", dtype)
    t1 = _as_scalar(t1, "t1", dtype)
    ts = None if saveat.ts is None else jnp.asarray(saveat.ts, dtype)
    t0, t1, ts = _check_times(t0, t1, ts)
    saveat = eqx.tree_at(lambda s: s.ts, saveat, ts, is_leaf=lambda x: x is None)
    return t0, t1, saveat


def _check_times(t0, t1, ts):
    concrete = all(is_concrete(x) for x in (t0, t1, ts) if x is not None)
    xp, conv = (np, as_numpy) if concrete else (jnp, lambda x: x)
    a0, a1 = conv(t0), conv(t1)
    bad_order = a1 < a0
    if ts is not None:
        a = conv(ts)
        bad_ts = xp.any(a < a0) | xp.any(a > a1) | xp.any(xp.diff(a) < 0)
        bad_ts = bad_ts | xp.any(~xp.isfinite(a))
    else:
        bad_ts = xp.asarray(False)
    msg_order = "`t1` must be >= `t0`."
    msg_ts = "`SaveAt(ts=...)` must be finite, non-decreasing and within [t0, t1]."
    if concrete:
        if bool(bad_order):
            raise ValueError(f"{msg_order} Received t0={t0}, t1={t1}.")
        if bool(bad_ts):
            raise ValueError(f"{msg_ts} Received ts={ts}, t0={t0}, t1={t1}.")
        return t0, t1, ts
    t1 = eqx.error_if(t1, bad_order, msg_order)
    if ts is not None:
        ts = eqx.error_if(ts, bad_ts, msg_ts)
    return t0, t1, ts


def _floats_to_arrays(tree: PyTree, dtype) -> PyTree:
    # A Python float under `eqx.filter_jit` is static: a new value would recompile.
    return jtu.tree_map(
        lambda x: jnp.asarray(x, dtype) if isinstance(x, float) else x, tree
    )


