"""The base of the methods family and what a method returns for one context."""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Complex, Float, Int, PyTree

from .._flows import AbstractFlow
from .._misc import error_if_rows
from .._rows import Row, Rows, vmap_rows
from .._saveat import SaveAt
from .._solution import RESULTS


class RowSolution(eqx.Module):
    """What a method returns for one context (`solve` stacks them over the batch).

    **Fields:**

    - `log_p`: `(times, vocab)`, or `None` when `SaveAt(fn=...)` was used.
    - `observables`: the output of `SaveAt(fn=...)` at each saved time, or `None`.
    - `aux`: the history at the saved times, or `None`.
    - `stats`: integer counters (`num_steps`, ...).
    - `result`: a `RESULTS`.
    - `info`: what only this method knows (e.g. the switching times of `Switched`), or
        `None`.
    """

    log_p: Float[Array, "times vocab"] | None
    observables: PyTree | None
    aux: PyTree | None
    stats: dict[str, Int[Array, ""]]
    result: RESULTS
    info: PyTree | None = None


class RowEquilibrium(eqx.Module):
    """What a method returns for one context when asked for a rest point
    (`rx.equilibrium` stacks them over the batch into an `rx.Equilibrium`).

    **Fields:** as `rx.Equilibrium`, for one context.
    """

    log_p: Float[Array, " vocab"]
    stable: Bool[Array, ""]
    leading_eigenvalue: Complex[Array, ""]
    residual: Float[Array, ""]
    result: RESULTS
    num_steps: Int[Array, ""]


class AbstractMethod(eqx.Module):
    """Base class of the methods: how `solve` computes the path of one context.

    Subclasses implement `solve_row`; `prepare` (optional) checks, outside `jit`, that the
    method applies to the problem and turns its Python floats into arrays (so that new
    values do not recompile). Options that set shapes or control flow are static fields.

    A method that finds rest points instead of paths (`rx.RestPoint`, used by
    `rx.equilibrium`) implements `prepare_rest_point` and `rest_point_row`; the others
    refuse them.
    """

    # Short name, reported as `Trajectory.method`.
    name: eqx.AbstractClassVar[str]

    def prepare(self, rows: Rows, saveat: SaveAt) -> "AbstractMethod":
        """This method, checked against the problem and with its floats made arrays of
        `rows.dtype`. Raises `ValueError` / `TypeError` naming the argument."""
        del rows, saveat
        return self

    @abc.abstractmethod
    def solve_row(
        self,
        row: Row,
        t0: Float[Array, ""],
        t1: Float[Array, ""],
        save_ts: Float[Array, " times"],
        saveat: SaveAt,
    ) -> RowSolution:
        """The path of one context from `t0` to `t1`, saved at `save_ts` (as `saveat`
        asks: `log_p`, or only `saveat.fn` of it)."""

    def solve_rows(
        self,
        rows: Rows,
        t0: Float[Array, ""],
        t1: Float[Array, ""],
        save_ts: Float[Array, " times"],
        saveat: SaveAt,
    ) -> RowSolution:
        """The paths of every context of `rows`: a `RowSolution` whose leaves lead with
        the batch shape. By default `solve_row` mapped over the contexts; a method that
        couples them (one step size for the batch) overrides it."""
        return vmap_rows(lambda row: self.solve_row(row, t0, t1, save_ts, saveat), rows)

    def prepare_rest_point(self, rows: Rows) -> "AbstractMethod":
        """As `prepare`, for `rx.equilibrium`. Raises `TypeError` for a method that
        finds paths, not rest points."""
        del rows
        raise TypeError(
            f"`method={type(self).__name__}(...)` computes paths (for `rx.solve`), not "
            "rest points: give `rx.equilibrium` a method such as `rx.RestPoint()`."
        )

    def rest_point_row(self, row: Row) -> RowEquilibrium:
        """A rest point of the flow of one context, searched from its start."""
        del row
        raise NotImplementedError(
            f"{type(self).__name__} does not find rest points; use `rx.RestPoint()`."
        )


def no_steps() -> dict[str, Int[Array, ""]]:
    zero = jnp.zeros((), jnp.int32)
    return dict(num_steps=zero, num_accepted_steps=zero, num_rejected_steps=zero)


def save_along(
    log_p_at: Callable[[Float[Array, ""]], Float[Array, " vocab"]],
    save_ts: Float[Array, " times"],
    saveat: SaveAt,
    flow: AbstractFlow,
) -> tuple[Float[Array, "times vocab"] | None, PyTree | None]:
    """`(log_p, observables)` at the saved times from a function of time. With
    `saveat.fn` one time at a time (`lax.map`), so that only the observables are ever
    stored, never a `(times, vocab)` block per row."""
    if saveat.fn is None:
        return jax.vmap(log_p_at)(save_ts), None
    return None, jax.lax.map(lambda t: saveat.fn(t, log_p_at(t), flow), save_ts)


def error_if_failed(
    x: PyTree,
    result: RESULTS,
    what: str,
    whole_batch: bool = False,
    when: bool | Bool[Array, ""] = True,
):
    """Raise at run time (if `when`) where a row's solve failed (`result` neither
    successful nor an event), naming the batch index and, with the message of
    `RESULTS`, the kind of failure; `whole_batch`: the rows were solved together, so the
    failure is the batch's.

    Called on the whole batch's results, after the nested solvers ran with
    `throw=False`: their own checks would pass the whole state through a `cond` that
    XLA places on one device, gathering sharded arrays there."""
    okay = (result == RESULTS.successful) | (result == RESULTS.event_occurred)
    where = "at batch index {index}"
    if whole_batch:
        where = "for the whole batch (one step size)"
    messages = [f"{what} failed {where}: {m}" for m in RESULTS._index_to_message]
    return error_if_rows(x, ~okay & when, messages, kind=result._value)
