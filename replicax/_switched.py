"""Switched flows: a top-p / min-p / epsilon face re-evaluated along the path (THEORY §3).

`solve` evaluates a face once, on the logits, and runs the flow on it: every guarantee of
THEORY §1 then holds with `V -> |S|`. A decoder that instead re-applies its truncation, at
every time `t`, to the distribution the flow has reached gives a switched system: a token
leaves the face when the rule, applied to `p̃(t)` (the flow on the whole simplex), drops
it, and it never returns (its probability is zero from then on). Because restriction
commutes with the flows (restrict-then-flow = flow-then-restrict), the switched path is
`p̃(t)` I-projected onto the current face `S(t)`; the guarantees hold on each segment
between switches, not across them.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, Int

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._saveat import SaveAt
from ._solution import RESULTS
from ._solve import _as_scalar, prepare_rows, prepare_times, readout, saved_times
from ._support import AbstractSupport, Epsilon, MinP, TopP


class SwitchedTrajectory(eqx.Module):
    """The path of a switched flow for a batch of contexts.

    **Fields:**

    - `ts`: the saved times, shape `(times,)`.
    - `log_p`: shape `(*batch, times, vocab)`; at a switching time, the value after the
        switch.
    - `switch_ts`: shape `(*batch, max_switches)`: the times at which tokens left the face,
        in order, `+inf` after the last one.
    - `face_size`: shape `(*batch, max_switches + 1)`: the size of the face at the start
        and after each switch (`0` after the last one).
    - `num_switches`: shape `(*batch,)`.
    - `removed_at`: shape `(*batch, vocab)`: when each token left the face (`t0` for tokens
        off the initial face, `+inf` for tokens that never left).
    - `result`: a `RESULTS` per row; `RESULTS.max_steps_reached` also when more than
        `max_switches` switches would be needed.
    """

    ts: Float[Array, " times"]
    log_p: Float[Array, "*batch times vocab"]
    switch_ts: Float[Array, "*batch switches"]
    face_size: Int[Array, "*batch switches_plus_one"]
    num_switches: Int[Array, "*batch"]
    removed_at: Float[Array, "*batch vocab"]
    result: RESULTS


def _token_margins(rule: AbstractSupport, log_p, scores, alive):
    """Per token: positive while `rule`, applied to the distribution `exp(log_p)` (on the
    tokens `alive`), keeps it; the rule drops it once its margin is <= 0.

    Top-p uses transformers' arithmetic: tokens sorted by probability, ascending (ties
    broken by the logits, which is the order at `t0 + 0` from a uniform start), and a token
    goes when the cumulative mass up to it is `<= 1 - top_p`."""
    vocab = log_p.shape[-1]
    p = jnp.where(alive, jnp.exp(log_p), 0)
    if isinstance(rule, TopP):
        order = jnp.lexsort((scores, jnp.where(alive, log_p, -jnp.inf)))
        cumulative = jnp.cumsum(p[order])
        margin_sorted = cumulative - rule.tail_mass.astype(p.dtype)
        protected = jnp.arange(vocab) >= vocab - rule.min_tokens_to_keep
        margin_sorted = jnp.where(protected, jnp.inf, margin_sorted)
        return jnp.zeros_like(p).at[order].set(margin_sorted)
    if isinstance(rule, MinP):
        margin = p - rule.min_p.astype(p.dtype) * jnp.max(p)
    else:  # Epsilon
        margin = p - rule.epsilon.astype(p.dtype)
    k = min(rule.min_tokens_to_keep, vocab)
    _, top = jax.lax.top_k(p, k)
    return margin.at[top].set(jnp.inf)


def _margin(rule, log_p, scores, alive, face):
    """The smallest margin over the current face: the event function."""
    return jnp.min(jnp.where(face, _token_margins(rule, log_p, scores, alive), jnp.inf))


def solve_switched(
    flow: AbstractFlow,
    *,
    t1: RealScalarLike,
    support: TopP | MinP | Epsilon,
    t0: RealScalarLike = 0.0,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    saveat: SaveAt | None = None,
    temperature_first: bool = True,
    rtol: RealScalarLike | None = None,
    atol: RealScalarLike | None = None,
    max_switches: int = 64,
    max_steps: int = 4096,
) -> SwitchedTrajectory:
    """Runs `flow` with the face of `support` re-evaluated along the path.

    The face at `t0` is the one `solve` would use (the rule applied to the logits, after
    the temperature when `temperature_first`). At every later time the rule is applied to
    `p̃(t)`, the flow's distribution on the whole simplex (for (R) from uniform,
    `softmax(t s/T)`: the model's distribution at temperature `T/t`); a token of the face
    leaves as soon as the rule drops it, and never returns. diffrax locates each switching
    time as a terminating event of the ODE for `p̃` (the root of the smallest margin over
    the face, refined by Newton's method on the dense solution). The returned path is
    `p̃(t)` I-projected onto the face at `t` (right-continuous at the switches).

    **What is exact and what is not.** The path between switches is the closed form; the
    switching times are accurate to the tolerances `rtol`, `atol` (default `1e-9` in
    float64, `1e-6` in float32). From a uniform start, (E) never switches (its `p̃(t)` is
    the softmax at temperature `T/(1 - e^{-t}) >= T`, whose top-p set contains the initial
    face), so its fixed-face guarantees survive; (R) never switches before `t = 1`, where
    its `p̃` passes `softmax(s/T)`, switches after it and ends on the argmax set: past
    `t = 1` the fixed-face path of `solve` is not what a re-evaluating decoder sees. Only constant scores are
    supported, and the result is not differentiable (the loop over switches is a
    `while_loop`): for gradients use `solve` with a fixed face.

    **Arguments:**

    - `flow`: a flow with constant scores.
    - `t1`, `t0`, `y0`, `log_y0`, `saveat`, `temperature_first`: as in `solve`.
    - `support`: `TopP`, `MinP` or `Epsilon`, the rule re-evaluated along the path.
    - `rtol`, `atol`: tolerances of the event search and of the ODE used to find it.
    - `max_switches`: the most switches per row (static).
    - `max_steps`: step budget of each ODE segment (static).

    **Returns:**

    A `SwitchedTrajectory`.
    """
    if not isinstance(support, TopP | MinP | Epsilon) or type(support).__name__ == "Eta":
        raise TypeError(
            "`support` of `solve_switched` must be `TopP`, `MinP` or `Epsilon` (the rules "
            f"re-evaluated along the path); received {type(support).__name__}."
        )
    if not flow.score.is_constant:
        raise ValueError("`solve_switched` needs a constant score (e.g. `Logits`).")
    if not isinstance(max_switches, int) or max_switches < 1:
        raise ValueError(f"`max_switches` must be an int >= 1; received {max_switches!r}.")
    if saveat is None:
        saveat = SaveAt(t1=True)
    if saveat.fn is not None:
        raise ValueError("`solve_switched` saves `log_p`; `SaveAt(fn=...)` is not supported.")
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    dtype = rows.dtype
    tight = 1e-9 if dtype.itemsize == 8 else 1e-6
    t0, t1, saveat = prepare_times(t0, t1, saveat, dtype)
    rtol = _as_scalar(tight if rtol is None else rtol, "rtol", dtype)
    atol = _as_scalar(tight if atol is None else atol, "atol", dtype)
    return _switched_rows(rows, t0, t1, saveat, rtol, atol, max_switches, max_steps)


@eqx.filter_jit
def _switched_rows(rows, t0, t1, saveat, rtol, atol, max_switches, max_steps):
    flow, log_p0 = rows.flat()
    (rule,) = rows.flat_supports()
    save_ts = saved_times(t0, t1, saveat)

    def one(flow_row, log_p0_row, rule_row):
        return _switched_one(
            flow_row, log_p0_row, rule_row, rows.vocab_size, t0, t1, save_ts,
            rtol, atol, max_switches, max_steps,
        )

    if log_p0 is None:
        out = jax.vmap(lambda f, r: one(f, None, r))(flow, rule)
    else:
        out = jax.vmap(one)(flow, log_p0, rule)
    log_p, switch_ts, face_size, num, removed_at, result = out
    return SwitchedTrajectory(
        ts=save_ts,
        log_p=rows.unflatten(log_p),
        switch_ts=rows.unflatten(switch_ts),
        face_size=rows.unflatten(face_size),
        num_switches=rows.unflatten(num),
        removed_at=rows.unflatten(removed_at),
        result=jax.tree_util.tree_map(rows.unflatten, result),
    )


def _switched_one(
    flow, log_p0, rule, vocab_size, t0, t1, save_ts, rtol, atol, max_switches, max_steps
):
    dtype = t0.dtype
    # The face `solve` uses (rule on the logits) is the start; `alive` is the support of
    # the unrestricted flow p̃ (tokens not masked by the logits nor zero in y0).
    face0 = flow.score.support()
    scores = flow.score.constant_value().astype(dtype)
    base = flow.score.constant_logits() > -jnp.inf  # logits' own mask, without the face
    if log_p0 is None:
        alive = base
        theta0 = jnp.zeros(vocab_size, dtype)
    else:
        alive = base & (log_p0 > -jnp.inf)
        theta0 = jnp.where(alive, log_p0, 0)
    face0 = face0 & alive
    theta0 = jnp.where(alive, readout(theta0, alive), 0)
    aux = flow.score.init_aux(readout(theta0, alive))

    def full_log_p(t):  # p̃(t), the flow on the whole simplex (closed form)
        return readout(flow.closed_form(t - t0, theta0, scores), alive)

    def next_switch(tk, face):
        """The next time the smallest margin over `face` reaches 0 (an event), or t1."""

        def vector_field(t, y, args):
            del args
            return flow.log_rate(t, readout(y, alive), aux, alive)

        def cond_fn(t, y, args, **kwargs):
            del t, args, kwargs
            return _margin(rule, readout(y, alive), scores, alive, face)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            tk,
            t1,
            None,
            jnp.where(alive, full_log_p(tk), 0),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            event=diffrax.Event(
                cond_fn, root_finder=optx.Newton(rtol=rtol, atol=atol), direction=False
            ),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=max_steps,
            throw=False,
        )
        seg = RESULTS.promote(sol.result)
        hit = seg == RESULTS.event_occurred
        ok = hit | (seg == RESULTS.successful)
        return sol.ts[-1], hit, RESULTS.where(ok, RESULTS.successful, seg)

    def body(carry):
        tk, face, n, removed_at, switch_ts, sizes, done, result = carry
        tau, hit, seg_result = next_switch(tk, face)
        log_p_tau = full_log_p(tau)
        margins = jnp.where(face, _token_margins(rule, log_p_tau, scores, alive), jnp.inf)
        # The token that triggered the event goes even if rounding left its margin a hair
        # above 0; so does any other the rule drops at `tau`.
        leaving = face & ((margins <= 0) | (jnp.arange(vocab_size) == jnp.argmin(margins)))
        leaving = leaving & hit
        new_face = face & ~leaving
        removed_at = jnp.where(leaving, tau, removed_at)
        switch_ts = jnp.where(hit, switch_ts.at[n].set(tau), switch_ts)
        size = jnp.sum(new_face, dtype=jnp.int32)
        sizes = jnp.where(hit, sizes.at[n + 1].set(size), sizes)
        result = RESULTS.where(seg_result == RESULTS.successful, result, seg_result)
        return (
            jnp.where(hit, tau, tk),
            new_face,
            n + hit.astype(n.dtype),
            removed_at,
            switch_ts,
            sizes,
            done | ~hit | (seg_result != RESULTS.successful),
            result,
        )

    def cond(carry):
        _, _, n, _, _, _, done, _ = carry
        return ~done & (n < max_switches)

    carry = (
        t0,
        face0,
        jnp.zeros((), jnp.int32),
        jnp.where(face0, jnp.inf, t0).astype(dtype),
        jnp.full(max_switches, jnp.inf, dtype),
        jnp.zeros(max_switches + 1, jnp.int32).at[0].set(jnp.sum(face0, dtype=jnp.int32)),
        jnp.zeros((), bool),
        RESULTS.successful,
    )
    _, _, n, removed_at, switch_ts, sizes, done, result = jax.lax.while_loop(
        cond, body, carry
    )
    result = RESULTS.where(done, result, RESULTS.max_steps_reached)

    def saved_at(t):
        face = removed_at > t
        return readout(jnp.where(face, full_log_p(t), 0), face)

    return jax.vmap(saved_at)(save_ts), switch_ts, sizes, n, removed_at, result
