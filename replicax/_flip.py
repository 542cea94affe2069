"""Flip margins: the smallest logit perturbation that changes the token a flow ends on.

For one context, let `k` be the argmax of `p(t1)` and, for a rival token `j`,

    g_j(δ) = log p_j(t1; s + δ) - log p_k(t1; s + δ)

(`δ` added to the constant part of the score, i.e. a `Logits(δ)` term), negative at
`δ = 0`. The flip margin is the distance from `0` to the nearest point of `{g_j = 0}`,
minimised over the rivals. It is found by projecting onto the boundary linearised at the
current point (the DeepFool / Gauss–Newton step): the point of the hyperplane
`g(δ) + ∇g(δ)·(δ' - δ) = 0` of least norm, which is

    L2:  δ' = ((∇g·δ - g) / ‖∇g‖₂²) ∇g,      L∞:  δ' = ((∇g·δ - g) / ‖∇g‖₁) sign(∇g),

followed by a landing on the true boundary along the ray `a δ'`, `a > 0` (a bracketed
root find of `a -> g(a δ')`). Each iterate therefore lies on the boundary, and a fixed
point is a boundary point whose normal points at the origin (L2) or whose tangent plane
is nearest to the origin there (L∞): the first-order condition of the nearest flip.
The landing is what makes the iteration robust for bistable flows, whose `g` jumps
across the boundary (its slope there grows like `e^{λ t1}`), where a plain linearised
step overshoots into the other basin and back.

For constant logits `g_j = θ_j(t1) - θ_k(t1)` is linear in `δ` (the normaliser cancels):
the first projection is exact and the second only confirms it.
"""

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._methods import ODE, AbstractMethod, Exact
from ._rows import (
    Row,
    as_scalar,
    check_scalar,
    prepare_rows,
    prepare_times,
    vmap_rows,
    with_auto_axes,
)
from ._saveat import SaveAt
from ._scores import Logits
from ._solution import RESULTS

# Doublings of the ray before a landing gives up: 2^60 times the linearised distance.
_MAX_EXPANSIONS = 60
# Secant (Illinois) steps of one landing; each at least halves the bracket's weight, and
# a sharp boundary needs about as many as bisection would (50 in float64).
_MAX_LANDING_STEPS = 128
# The landing stops when the bracket on `a` is this many epsilons of the dtype wide (or
# `|g|` is this many epsilons of its own scale).
_LANDING_ULPS = 16
# Components of ∇g below this many epsilons of its largest are rounding (exactly zero in
# theory, e.g. for tokens other than `j`, `k` under constant logits): L∞ leaves them
# unperturbed instead of moving them by the full margin.
_SIGN_ULPS = 64


class FlipMargin(eqx.Module):
    """What `flip_margin` returns, one entry per context.

    **Fields:**

    - `margin`: shape `(*batch,)`: the norm of `perturbation` (`inf` when the face has a
        single token, so nothing can flip).
    - `perturbation`: shape `(*batch, vocab)`: the smallest perturbation of the logits
        found, on the boundary between `token` and `rival` (`0` off the face).
    - `token`: shape `(*batch,)`: the token the flow ends on, the argmax of `p(t1)`.
    - `rival`: shape `(*batch,)`: the token the perturbation flips to (`-1` if none).
    - `rival_tokens`: shape `(*batch, rivals)`: the rivals tried, most probable at `t1`
        first (`-1` where the face has fewer tokens).
    - `rival_margins`: shape `(*batch, rivals)`: the margin to each of them (`inf` for
        `-1`): the tokens most easily promoted, for a sensitivity report.
    - `converged`: shape `(*batch,)`: every rival's iteration met its tolerance.
    - `num_steps`: shape `(*batch,)`: the most projections any rival took.
    - `result`: a `RESULTS` per context: `successful`, `nonlinear_max_steps_reached`
        (the projections did not settle within `max_steps`), `nonlinear_divergence` (no
        flip along the projected direction: the gradient vanished or the ray never
        crossed the boundary), or the failure of the solve itself.
    """

    margin: Float[Array, "*batch"]
    perturbation: Float[Array, "*batch vocab"]
    token: Int[Array, "*batch"]
    rival: Int[Array, "*batch"]
    rival_tokens: Int[Array, "*batch rivals"]
    rival_margins: Float[Array, "*batch rivals"]
    converged: Bool[Array, "*batch"]
    num_steps: Int[Array, "*batch"]
    result: RESULTS


def flip_margin(
    flow: AbstractFlow,
    *,
    t1: RealScalarLike,
    t0: RealScalarLike = 0.0,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    support: Any = None,
    temperature_first: bool = True,
    norm: str = "l2",
    rivals: int = 3,
    method: AbstractMethod | str = "auto",
    max_steps: int = 16,
    rtol: RealScalarLike | None = None,
    atol: RealScalarLike | None = None,
    throw: bool = True,
) -> FlipMargin:
    """The smallest perturbation of the logits that changes the token the flow ends on.

    Per context: `k = argmax p(t1)`, "the token the flow ends on", and the perturbation
    `δ` of least norm, added to the logits (a `Logits(δ)` term added to the score), that
    makes another token `j` the argmax at `t1`. With constant logits this is the
    decoding margin of the flow at `t1`; under state-dependent scores and a large `t1`,
    `k` is the attractor the flow is locked onto and the margin is the distance to the
    edge of its basin (THEORY §4, "Brittle attractors"): the brittleness of a lock-in.

    For each context the `rivals` most probable other tokens at `t1` are tried (in
    parallel), each by projections onto the linearised boundary `g_j = 0`,
    `g_j = log p_j(t1) - log p_k(t1)`, landed exactly on the boundary along the
    projected direction by a bracketed secant root find; the margin is the smallest over
    the rivals. Gradients `∇g_j` come from `jax.grad` through the context's solve (the
    closed form, or diffrax on the ODE path).

    With constant logits `g_j` is linear, the first projection is exact and (from
    uniform) the margin is half the gap between the two top logits in L∞ and the gap
    over `√2` in L2, whatever `t1` and `T`.

    **Arguments:**

    - `flow`: a flow; its batch, start, `support` and `temperature_first` as in `solve`.
    - `t1`, `t0`: the horizon (`t1 > t0` for a meaningful margin). Dynamic.
    - `y0`, `log_y0`: the start, as in `solve` (default uniform on the face).
    - `support`, `temperature_first`: a face, as in `solve`. The perturbation lives on
        the face (tokens off it cannot become the argmax; masked logits stay masked),
        and the face is evaluated once on the *unperturbed* logits: a
        temperature-dependent support (top-p, min-p, ...) does not move with `δ`.
    - `norm`: `"l2"` or `"linf"`: the norm of `δ` that is minimised.
    - `rivals`: how many of the most probable other tokens to try, an int in
        `[1, vocab - 1]` (static). The margin is the smallest over these; a nearer flip
        to a less probable token is possible in principle under state-dependent scores.
    - `method`: how each context is solved: `rx.Exact()` (constant scores),
        `rx.ODE(...)` (any score; set its `rtol`, `atol` there), or `"auto"` (default:
        `Exact` for constant scores, else `ODE()`), `"exact"`, `"ode"`. The path must be
        differentiable (not `rx.Switched`). `∇g` is one pullback through the solve (the
        ODE's `adjoint`); with `rx.ODE(adjoint=diffrax.ForwardMode())` it is pushed
        forward instead, one tangent per token: for small vocabularies that is cheaper
        to compile and to run.
    - `max_steps`: the most projections per rival (each one gradient and one landing).
        Convergence is judged between successive boundary points, so it takes at least
        two. Dynamic: changing it does not recompile.
    - `rtol`, `atol`: stop when successive boundary points differ by at most
        `atol + rtol ‖δ‖` (in `norm`). Default `1e-8` in float64, `1e-4` in float32.
        Dynamic.
    - `throw`: raise when a context does not converge; with `False` it is reported in
        `converged` and `result`.

    **Returns:**

    A `FlipMargin`. The margin is not differentiable (it is the value of an argmin
    computed by iteration).

    **Raises:**

    `ValueError` / `TypeError` for a bad `norm`, `rivals`, `max_steps`, `method` or
    `throw`, and for bad arguments as `solve` raises them; with `throw=True` an
    `equinox.EquinoxRuntimeError` when a context does not converge.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"`norm` must be 'l2' or 'linf'; received {norm!r}.")
    if not isinstance(throw, bool):
        raise TypeError(f"`throw` must be a bool; received {throw!r}.")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an int >= 1; received {max_steps!r}.")
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    vocab = rows.vocab_size
    if (
        not isinstance(rivals, int)
        or isinstance(rivals, bool)
        or not 1 <= rivals <= vocab - 1
    ):
        raise ValueError(
            f"`rivals` must be an int in [1, vocab - 1] = [1, {vocab - 1}] (the number "
            f"of other tokens to try); received {rivals!r}."
        )
    method = _as_method(method, flow)
    saveat = SaveAt(t1=True)
    t0, t1, saveat = prepare_times(t0, t1, saveat, rows.dtype)
    method = method.prepare(rows, saveat)
    default = 1e-8 if rows.dtype.itemsize == 8 else 1e-4
    tols = []
    for value, name in ((rtol, "rtol"), (atol, "atol")):
        value = as_scalar(default if value is None else value, name, rows.dtype)
        tols.append(check_scalar(value, name, positive=True))
    options = dict(
        linf=jnp.asarray(norm == "linf"),
        max_steps=jnp.asarray(max_steps, jnp.int32),
        rtol=tols[0],
        atol=tols[1],
        throw=jnp.asarray(throw),
    )
    # A forward-mode adjoint cannot be pulled back through: take ∇g by pushing forward
    # one tangent per token instead.
    forward = isinstance(getattr(method, "adjoint", None), diffrax.ForwardMode)
    # On a mesh of explicit axes, run with them made `Auto` (as the ODE path).
    return with_auto_axes(_flip_rows, rows, method, t0, t1, options, rivals, forward)


def _as_method(method, flow: AbstractFlow) -> AbstractMethod:
    if isinstance(method, AbstractMethod):
        if method.name == "switched":
            raise ValueError(
                "`method=rx.Switched()` re-evaluates the face along the path and is "
                "not differentiable; `flip_margin` needs `rx.Exact()` or `rx.ODE(...)`."
            )
        return method
    if method not in ("auto", "exact", "ode"):
        raise ValueError(
            "`method` must be a method object (`rx.Exact()`, `rx.ODE(...)`) or 'auto', "
            f"'exact', 'ode'; received {method!r}."
        )
    if method == "exact" or (method == "auto" and flow.score.is_constant):
        return Exact()
    return ODE()


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _flip_rows(rows, method, t0, t1, options, rivals, forward) -> FlipMargin:
    return vmap_rows(
        lambda row: _flip_row(row, method, t0, t1, options, rivals, forward), rows
    )


def _norm(x, linf):
    return jnp.where(linf, jnp.max(jnp.abs(x)), jnp.sqrt(jnp.sum(x**2)))


def _flip_row(row: Row, method, t0, t1, options, rivals: int, forward: bool):
    face, dtype = row.face, row.dtype
    saveat = SaveAt(t1=True)

    def end_log_p(delta):
        """`log p(t1)` with `Logits(δ)` added to the score (on the face only)."""
        delta = jnp.where(face, delta, 0)
        moved = eqx.tree_at(lambda r: r.flow.score, row, row.flow.score + Logits(delta))
        sol = method.solve_row(moved, t0, t1, t1[None], saveat)
        return sol.log_p[-1], sol.result

    search = jax.vmap(
        lambda lane: _nearest_flip(
            end_log_p, lane, face, dtype, options, rivals, forward
        )
    )(jnp.arange(rivals))
    valid = search.valid
    linf = options["linf"]
    norms = jax.vmap(lambda d: _norm(d, linf))(search.delta)
    margins = jnp.where(valid, norms, jnp.inf)
    tokens = jnp.where(valid, search.rival, -1)
    steps = jnp.where(valid, search.n, 0)
    converged = search.converged | ~valid
    best = jnp.argmin(margins)
    converged_all = jnp.all(converged)
    # The first failure among the rivals, if any.
    result = RESULTS.successful
    for i in range(rivals):
        ith = jax.tree_util.tree_map(lambda x, i=i: x[i], search.result)
        result = RESULTS.where(result == RESULTS.successful, ith, result)
    failed = result != RESULTS.successful
    margin = result.error_if(margins[best], failed & options["throw"])
    return FlipMargin(
        margin=margin,
        perturbation=jnp.where(valid[best], search.delta[best], 0),
        token=search.token[0],
        rival=tokens[best],
        rival_tokens=tokens,
        rival_margins=margins,
        converged=converged_all & ~failed,
        num_steps=jnp.max(steps),
        result=result,
    )


class _Search(eqx.Module):
    """The state of one rival's search (see `_nearest_flip`)."""

    token: Array  # k, the argmax at t1 (set by the first evaluation, at δ = 0)
    rival: Array  # j, this lane's rival (the same)
    valid: Array  # j is on the face
    g0: Array  # g at δ = 0
    g_scale: Array  # the size of the log-probabilities, for the rounding level of g
    target: Array  # the projected point: the ray `a target` is being landed on
    a: Array  # the point evaluated next is `a target`
    lo: Array  # the bracket on `a`: g(lo target) < 0 <= g(hi target)
    g_lo: Array
    hi: Array
    g_hi: Array
    grad_hi: Array  # ∇g at `hi target`
    grad_last: Array  # the gradient of the last projection
    bracketed: Array  # the ray has crossed the boundary
    side: Array  # which end the last secant point replaced (Illinois)
    tries: Array  # evaluations spent on this ray
    delta: Array  # the last boundary point (0 before the first)
    n: Array  # projections made
    started: Array  # the first evaluation (at δ = 0) is done
    done: Array
    converged: Array
    result: RESULTS


def _nearest_flip(end_log_p, lane, face, dtype, options, rivals, forward) -> _Search:
    """For the rival of rank `lane + 1` at `t1`: the boundary point `{g = 0}` nearest
    to `0`, by projections onto the linearised boundary, each landed on the boundary
    along its ray `a δ'`, `a > 0`, by doubling `a` from `1` until `g >= 0` and then
    closing the bracket with the Illinois variant of false position (superlinear on
    smooth boundaries, never worse than halving the bracket's weight on sharp ones).

    Every evaluation is one solve and one pullback (`jax.vjp` of `log p(t1)` with the
    cotangent `e_j - e_k`; with `forward`, one tangent per token instead), so the
    gradient at a landing point is already there for the next projection. The first
    evaluation, at `δ = 0`, picks `k` and `j`. One loop and one differentiated solve
    per rival keep the compiled program small on the ODE path.
    """
    rtol, atol, max_steps = options["rtol"], options["atol"], options["max_steps"]
    linf = options["linf"]
    eps = float(jnp.finfo(dtype).eps)
    a_tol = _LANDING_ULPS * eps
    zero = jnp.zeros(face.shape, dtype)
    int0 = jnp.zeros((), jnp.int32)
    false = jnp.zeros((), bool)
    zero_s = jnp.zeros((), dtype)
    one = jnp.ones((), dtype)

    def project(delta, value, grad):
        """The point of least norm of `value + grad·(δ' - delta) = 0`."""
        grad = jnp.where(face, grad, 0)
        top = jnp.max(jnp.abs(grad))
        kept = jnp.abs(grad) > _SIGN_ULPS * eps * top
        w = jnp.where(linf, jnp.where(kept, jnp.sign(grad), 0), grad)
        l1 = jnp.sum(jnp.where(kept, jnp.abs(grad), 0))
        denom = jnp.where(linf, l1, jnp.sum(grad**2))
        c = jnp.dot(grad, delta) - value
        usable = (denom > 0) & jnp.isfinite(denom) & jnp.isfinite(c)
        return jnp.where(usable, c / jnp.where(usable, denom, 1), 0) * w, usable

    def body(s: _Search) -> _Search:
        point = s.a * s.target
        if forward:
            basis = jnp.eye(face.shape[0], dtype=dtype)
            log_p, jac_t, solve_result = jax.vmap(
                lambda v: jax.jvp(end_log_p, (point,), (v,), has_aux=True),
                out_axes=(None, 0, None),
            )(basis)

            def pullback(cotangent):
                return (jac_t @ cotangent,)

        else:
            log_p, pullback, solve_result = jax.vjp(end_log_p, point, has_aux=True)
        # The first evaluation is at δ = 0: it fixes k, j, g(0) and the scale of g.
        _, top = jax.lax.top_k(jnp.where(face, log_p, -jnp.inf), rivals + 1)
        k = jnp.where(s.started, s.token, top[0]).astype(jnp.int32)
        rival = jnp.where(s.started, s.rival, top[lane + 1]).astype(jnp.int32)
        valid = jnp.where(s.started, s.valid, face[rival] & (rival != k))
        j = jnp.where(valid, rival, k)  # an invalid rival becomes k: g = 0, no work
        value = log_p[j] - log_p[k]
        vocab = face.shape[0]
        cotangent = jax.nn.one_hot(j, vocab, dtype=dtype) - jax.nn.one_hot(
            k, vocab, dtype=dtype
        )
        (grad,) = pullback(cotangent)
        g0 = jnp.where(s.started, s.g0, value)
        # The rounding of g is a few epsilons of the largest log-probability.
        size = 1 + jnp.max(jnp.where(face, jnp.abs(log_p), 0))
        g_scale = jnp.where(s.started, s.g_scale, size)
        g_tol = _LANDING_ULPS * eps * g_scale
        tie = ~s.started & (value >= 0)  # on (or past) the boundary at 0: margin 0

        solved = solve_result == RESULTS.successful
        expanding = s.started & ~s.bracketed
        closing = s.started & s.bracketed
        # Expanding: the first `a` with g >= 0 closes the far end of the bracket.
        crossed = expanding & (value >= 0)
        # Closing: the secant point replaces the end of its sign (Illinois halving of an
        # end kept twice in a row).
        up = value >= 0
        g_lo = jnp.where(closing & up & (s.side == 1), s.g_lo / 2, s.g_lo)
        g_hi = jnp.where(closing & ~up & (s.side == -1), s.g_hi / 2, s.g_hi)
        moves_hi = crossed | (closing & up)
        moves_lo = s.started & ~up
        lo = jnp.where(moves_lo, s.a, s.lo)
        g_lo = jnp.where(moves_lo, value, g_lo)
        hi = jnp.where(moves_hi, s.a, s.hi)
        g_hi = jnp.where(moves_hi, value, g_hi)
        grad_hi = jnp.where(moves_hi, grad, s.grad_hi)
        side = jnp.where(up, 1, -1).astype(jnp.int32)
        bracketed = s.bracketed | crossed
        tries = s.tries + 1
        hit = s.started & (jnp.abs(value) <= g_tol)
        tight = bracketed & ((hi - lo) <= a_tol * hi)
        landed = s.started & (hit | tight)
        # The new boundary point: the evaluated point when `|g|` is at its rounding
        # level (on either side), else the flipped end of the bracket.
        new = jnp.where(hit, s.a, hi) * s.target
        new_grad = jnp.where(hit, grad, grad_hi)
        new_value = jnp.where(hit, value, g_hi)
        step = _norm(new - s.delta, linf)
        settled = landed & (s.n >= 2) & (step <= atol + rtol * _norm(new, linf))
        out_of_steps = landed & ~settled & (s.n >= max_steps)
        lost = s.started & ~landed & jnp.where(
            bracketed, tries >= _MAX_LANDING_STEPS, tries >= _MAX_EXPANSIONS
        )
        # Project (from 0 at the start, else from the new boundary point).
        from_delta = jnp.where(s.started, new, s.delta)
        from_value = jnp.where(s.started, new_value, value)
        from_grad = jnp.where(s.started, new_grad, grad)
        target, usable = project(from_delta, from_value, from_grad)
        # Where the gradient at a boundary point is unusable (zero, or not finite), the
        # last usable one stands in for it: boundaries of constant scores are exact ties
        # of the top logits, where a derivative that loses the tie is easy to get wrong.
        fallback, usable_last = project(from_delta, from_value, s.grad_last)
        target = jnp.where(usable, target, fallback)
        from_grad = jnp.where(usable, from_grad, s.grad_last)
        usable = usable | (s.started & usable_last)
        reproject = (~s.started | landed) & ~settled & ~out_of_steps & ~tie
        # The next point to evaluate: the projected point, a doubled ray, or the secant
        # point of the bracket (bisection if the secant falls outside it).
        secant = hi - g_hi * (hi - lo) / (g_hi - g_lo)
        inside = (secant > lo) & (secant < hi) & jnp.isfinite(secant)
        midpoint = lo + (hi - lo) / 2
        next_a = jnp.where(bracketed, jnp.where(inside, secant, midpoint), 2 * s.a)
        result = RESULTS.where(solved, s.result, solve_result)
        result = RESULTS.where(
            (result == RESULTS.successful) & (lost | (reproject & ~usable)),
            RESULTS.nonlinear_divergence,
            result,
        )
        result = RESULTS.where(
            (result == RESULTS.successful) & out_of_steps,
            RESULTS.nonlinear_max_steps_reached,
            result,
        )
        failed = result != RESULTS.successful
        return _Search(
            token=k,
            rival=rival,
            valid=valid,
            g0=g0,
            g_scale=g_scale,
            target=jnp.where(reproject, target, s.target),
            a=jnp.where(reproject, one, next_a),
            lo=jnp.where(reproject, zero_s, lo),
            g_lo=jnp.where(reproject, g0, g_lo),
            hi=jnp.where(reproject, one, hi),
            g_hi=jnp.where(reproject, zero_s, g_hi),
            grad_hi=grad_hi,
            grad_last=jnp.where(reproject, from_grad, s.grad_last),
            bracketed=bracketed & ~reproject,
            side=jnp.where(reproject, int0, side),
            tries=jnp.where(reproject, int0, tries),
            delta=jnp.where(landed, new, s.delta),
            n=s.n + reproject.astype(jnp.int32),
            started=jnp.ones((), bool),
            done=tie | settled | out_of_steps | failed,
            converged=(tie | settled) & ~failed,
            result=result,
        )

    init = _Search(
        token=int0,
        rival=int0,
        valid=false,
        g0=zero_s,
        g_scale=one,
        target=zero,
        a=zero_s,
        lo=zero_s,
        g_lo=zero_s,
        hi=zero_s,
        g_hi=zero_s,
        grad_hi=zero,
        grad_last=zero,
        bracketed=false,
        side=int0,
        tries=int0,
        delta=zero,
        n=int0,
        started=false,
        done=false,
        converged=false,
        result=RESULTS.successful,
    )
    return jax.lax.while_loop(lambda s: ~s.done, body, init)


__all__ = ["FlipMargin", "flip_margin"]
