"""What `solve` returns."""

import diffrax
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree


class RESULTS(diffrax.RESULTS):  # pyright: ignore[reportGeneralTypeIssues]
    """Outcome of a solve, one per batch row. Extends `diffrax.RESULTS`.

    `RESULTS.successful` for every exact (closed-form) solve. On the diffrax path,
    e.g. `RESULTS.max_steps_reached`, whose message says to increase `max_steps`.
    `rx.equilibrium` reports `RESULTS.rest_point_not_found` for a root find that failed.
    """

    rest_point_not_found = (
        "The search for a rest point (`rx.equilibrium`) did not converge. Try another "
        "start (`y0`), a larger `max_steps` or looser `rtol`/`atol` in `rx.RestPoint`; "
        "the flow may have no rest point near this start (a limit cycle, or a path "
        "that tends to the boundary of the simplex)."
    )


class Trajectory(eqx.Module):
    """The saved path of the next-token distribution for a batch of contexts.

    **Fields:**

    - `ts`: the saved times, shape `(times,)`.
    - `log_p`: log-probabilities, shape `(*batch, times, vocab)`; `-inf` off the support.
        `None` when `SaveAt(fn=...)` was used.
    - `observables`: the output of `SaveAt(fn=...)`, each leaf of shape
        `(*batch, times, ...)`; `None` otherwise.
    - `aux`: the auxiliary (history) state at the saved times, leaves of shape
        `(*batch, times, ...)`; `None` when the score has no history or `fn` was used.
    - `stats`: `num_steps`, `num_accepted_steps`, `num_rejected_steps` per row (all zero
        on the exact path).
    - `result`: a `RESULTS` per batch row.
    - `method`: the name of the method that ran (`"exact"`, `"ode"`, `"switched"`).
    - `info`: what only that method knows, with leaves of shape `(*batch, ...)`: for
        `Switched`, a `Switches` (the switching times and face sizes); `None` otherwise.
    """

    ts: Float[Array, " times"]
    log_p: Float[Array, "*batch times vocab"] | None
    observables: PyTree | None
    aux: PyTree | None
    stats: dict[str, Int[Array, "*batch"]]
    result: RESULTS
    method: str = eqx.field(static=True)
    info: PyTree | None = None

    @property
    def p(self) -> Float[Array, "*batch times vocab"]:
        """Probabilities, `exp(log_p)` (computed on access; not stored)."""
        if self.log_p is None:
            raise ValueError("This trajectory saved observables only (SaveAt(fn=...)).")
        return jnp.exp(self.log_p)
