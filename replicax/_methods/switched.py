"""The switched method: a threshold face re-evaluated along the path (THEORY §3).

`Exact` and `ODE` evaluate a face once, on the logits, and run the flow on it: every
guarantee of THEORY §1 then holds with `V -> |S|`. A decoder that instead re-applies its
truncation, at every time `t`, to the distribution the flow has reached gives a switched
system: a token leaves the face when the rule, applied to `p̃(t)` (the flow on the
unrestricted simplex), drops it, and it never returns (its probability is zero from then
on). Because restriction commutes with the flows (restrict-then-flow = flow-then-
restrict), the switched path is `p̃(t)` I-projected onto the current face `S(t)`; the
guarantees hold on each segment between switches, not across them.
"""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Float, Int

from .._custom_types import RealScalarLike
from .._rows import Row, Rows, with_auto_axes
from .._saveat import SaveAt
from .._solution import RESULTS
from .._support import AbstractThresholdSupport
from .base import AbstractMethod, error_if_failed, no_steps, RowSolution, save_along
from .ode import check_max_steps, tolerances


class Switches(eqx.Module):
    """Where the face of a `Switched` solve changed (`Trajectory.info`).

    **Fields:**

    - `switch_ts`: shape `(*batch, max_switches)`: the times at which tokens left the face,
        in order, `+inf` after the last one.
    - `face_size`: shape `(*batch, max_switches + 1)`: the size of the face at the start
        and after each switch (`0` after the last one).
    - `num_switches`: shape `(*batch,)`.
    - `removed_at`: shape `(*batch, vocab)`: when each token left the face (`t0` for tokens
        off the initial face, `+inf` for tokens that never left).
    """

    switch_ts: Float[Array, "*batch switches"]
    face_size: Int[Array, "*batch switches_plus_one"]
    num_switches: Int[Array, "*batch"]
    removed_at: Float[Array, "*batch vocab"]


class Switched(AbstractMethod):
    """The face of `support` re-evaluated along the path, for constant scores.

    Use it as `solve(flow, support=rx.TopP(0.9), method=rx.Switched())`: the support must
    be one threshold rule (`TopP`, `MinP`, `Epsilon`, `Eta`). The face at `t0` is the one
    `Exact` would use (the rule applied to the logits, after the temperature when
    `temperature_first`). At every later time the rule is applied to `p̃(t)`, the flow's
    distribution on the unrestricted simplex (for (R) from uniform, `softmax(t s/T)`: the
    model's distribution at temperature `T/t`); a token of the face leaves as soon as the
    rule drops it, and never returns. diffrax locates each switching time as a
    terminating event of the ODE for `p̃` (the root of the smallest margin over the face,
    refined by Newton's method on the dense solution). The saved path is `p̃(t)`
    I-projected onto the face at `t` (right-continuous at the switches), and
    `Trajectory.info` is a `Switches`.

    **What is exact and what is not.** The path between switches is the closed form; the
    switching times are accurate to `rtol`, `atol`. From a uniform start, (E) never
    switches under top-p (its `p̃(t)` is the softmax at temperature `T/(1 - e^{-t}) >= T`,
    whose nucleus contains the initial face), so its fixed-face guarantees survive; (R)
    never switches before `t = 1`, where its `p̃` passes `softmax(s/T)`, switches after
    it and ends on the argmax set. The result is not differentiable (the loop over
    switches is a `while_loop`): for gradients use a fixed face.

    **Arguments:**

    - `solver`: the diffrax solver of the event search; default `diffrax.Tsit5()`.
    - `rtol`, `atol`: tolerances of the event search and of its ODE (default `1e-9` in
        float64, `1e-6` in float32). Dynamic.
    - `max_switches`: the most switches per row (static).
    - `max_steps`: step budget of each segment between switches (static).
    - `throw`: raise if a row needs more than `max_switches` switches or a segment more
        than `max_steps` steps; with `False` such rows are marked in `Trajectory.result`
        (`RESULTS.max_steps_reached`).
    """

    name: ClassVar[str] = "switched"
    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    rtol: RealScalarLike | None = None
    atol: RealScalarLike | None = None
    max_switches: int = eqx.field(static=True, default=64)
    max_steps: int = eqx.field(static=True, default=4096)
    throw: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        check_max_steps(self.max_switches, "max_switches", allow_none=False)
        check_max_steps(self.max_steps, allow_none=False)
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(
                "`solver` must be a diffrax solver; received "
                f"{type(self.solver).__name__}."
            )

    def prepare(self, rows: Rows, saveat: SaveAt) -> "Switched":
        del saveat
        supports = rows.supports
        if len(supports) != 1 or not isinstance(supports[0], AbstractThresholdSupport):
            names = ", ".join(type(s).__name__ for s in supports) or "none"
            raise TypeError(
                "`method=rx.Switched()` re-evaluates one threshold rule along the path: "
                "give `support=` one `TopP`, `MinP`, `Epsilon` or `Eta`; received "
                f"{names}."
            )
        if not rows.flow.score.is_constant:
            raise ValueError(
                "`rx.Switched` needs a constant score (e.g. `Logits`); this score "
                "depends on the state or history."
            )
        tight = 1e-9 if rows.dtype.itemsize == 8 else 1e-6
        rtol, atol = tolerances(self.rtol, self.atol, rows.dtype, tight)
        return eqx.tree_at(lambda m: (m.rtol, m.atol), self, (rtol, atol),
                           is_leaf=lambda x: x is None)

    def solve_rows(self, rows: Rows, t0, t1, save_ts, saveat) -> RowSolution:
        # As `ODE.solve_rows`: on a mesh of explicit axes the solve runs with them made
        # `Auto` (`with_auto_axes`), and failures are raised for the batch, naming the
        # row.
        def solve(rows, method, t0, t1, save_ts, saveat):
            out = AbstractMethod.solve_rows(method, rows, t0, t1, save_ts, saveat)
            if method.throw:
                out = error_if_failed(out, out.result, "`rx.Switched`")
            return out

        return with_auto_axes(solve, rows, self, t0, t1, save_ts, saveat)

    def solve_row(self, row: Row, t0, t1, save_ts, saveat) -> RowSolution:
        flow, alive = row.flow, row.alive
        (rule,) = row.supports
        dtype = t0.dtype
        vocab = alive.shape[-1]
        scores = row.scores()
        centred = row.centred_scores(on=alive)
        log_p0 = None if row.uniform else row.log_p0(on=alive)
        aux = flow.score.init_aux(row.log_p0(on=alive))

        def full_log_p(t):  # p̃(t), the flow on the unrestricted simplex (closed form)
            return flow.closed_form(t - t0, log_p0, centred, alive)

        def margin(log_p, face):  # the smallest margin over the face: the event function
            margins = rule.margins(log_p, scores, alive)
            return jnp.min(jnp.where(face, margins, jnp.inf))

        def next_switch(tk, face):
            """The next time the smallest margin over `face` reaches 0, or `t1`."""

            def vector_field(t, y, args):
                del args
                return flow.log_rate(t, flow.readout(y, alive), aux, alive)

            def cond_fn(t, y, args, **kwargs):
                del t, args, kwargs
                value = margin(flow.readout(y, alive), face)
                # In JAX's default float dtype: diffrax pairs the event value with a
                # Python `0.0` in a `lax.cond`, which is float64 under x64 and must
                # match it there.
                return value.astype(jnp.result_type(float))

            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vector_field),
                self.solver,
                tk,
                t1,
                None,
                jnp.where(alive, full_log_p(tk), 0),
                stepsize_controller=diffrax.PIDController(rtol=self.rtol, atol=self.atol),
                event=diffrax.Event(
                    cond_fn,
                    root_finder=optx.Newton(rtol=self.rtol, atol=self.atol),
                    direction=False,
                ),
                saveat=diffrax.SaveAt(t1=True),
                max_steps=self.max_steps,
                throw=False,
            )
            seg = RESULTS.promote(sol.result)
            hit = seg == RESULTS.event_occurred
            ok = hit | (seg == RESULTS.successful)
            return sol.ts[-1], hit, RESULTS.where(ok, RESULTS.successful, seg)

        def body(carry):
            tk, face, n, removed_at, switch_ts, sizes, done, result = carry
            tau, hit, seg_result = next_switch(tk, face)
            margins = jnp.where(
                face, rule.margins(full_log_p(tau), scores, alive), jnp.inf
            )
            # The token that triggered the event goes even if rounding left its margin a
            # hair above 0; so does any other the rule drops at `tau`.
            leaving = face & (
                (margins <= 0) | (jnp.arange(vocab) == jnp.argmin(margins))
            )
            leaving = leaving & hit
            new_face = face & ~leaving
            size = jnp.sum(new_face, dtype=jnp.int32)
            return (
                jnp.where(hit, tau, tk),
                new_face,
                n + hit.astype(n.dtype),
                jnp.where(leaving, tau, removed_at),
                jnp.where(hit, switch_ts.at[n].set(tau), switch_ts),
                jnp.where(hit, sizes.at[n + 1].set(size), sizes),
                done | ~hit | (seg_result != RESULTS.successful),
                RESULTS.where(seg_result == RESULTS.successful, result, seg_result),
            )

        def cond(carry):
            _, _, n, _, _, _, done, _ = carry
            return ~done & (n < self.max_switches)

        face0 = row.face
        size0 = jnp.sum(face0, dtype=jnp.int32)
        carry = (
            t0,
            face0,
            jnp.zeros((), jnp.int32),
            jnp.where(face0, jnp.inf, t0).astype(dtype),
            jnp.full(self.max_switches, jnp.inf, dtype),
            jnp.zeros(self.max_switches + 1, jnp.int32).at[0].set(size0),
            jnp.zeros((), bool),
            RESULTS.successful,
        )
        _, _, n, removed_at, switch_ts, sizes, done, result = jax.lax.while_loop(
            cond, body, carry
        )
        result = RESULTS.where(done, result, RESULTS.max_steps_reached)

        def log_p_at(t):
            face = removed_at > t
            return flow.readout(jnp.where(face, full_log_p(t), 0), face)

        log_p, observables = save_along(log_p_at, save_ts, saveat, flow)
        info = Switches(switch_ts, sizes, n, removed_at)
        return RowSolution(log_p, observables, None, no_steps(), result, info)
