"""`fit`: choose a flow's parameters so that its saved observables match targets.

The loss is a function of the selected parameters through `solve`; its gradient runs
through the closed forms on the exact path and through diffrax on the ODE path (reverse
mode through the method's adjoint, or forward mode). The optimiser is L-BFGS with a
backtracking line search by default, or any optax transformation, run in a
`lax.while_loop` inside one `jit`.
"""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._methods import AbstractMethod
from ._misc import as_numpy, is_concrete
from ._rows import as_scalar, check_scalar, prepare_rows
from ._saveat import SaveAt
from ._solve import solve


class Fit(eqx.Module):
    """What `fit` found, and an honest report of how the optimisation went.

    **Fields:**

    - `flow`: the flow with the selected parameters replaced by their fitted values
        (in the dtype the flow is computed in).
    - `loss`: the loss at the fitted parameters.
    - `num_steps`: the number of optimiser steps taken.
    - `converged`: whether the gradient norm, in the optimised coordinates (the log of
        the parameters fitted with `positive=True`), fell below `tol` within
        `max_steps` steps. `False` also when the loss or its gradient became NaN or
        infinite, which stops the loop.
    - `grad_norm`: that gradient norm at the fitted parameters.
    - `losses`: the loss history, shape `(max_steps + 1,)`: entry `k` is the loss after
        `k` steps (entry 0 at the initial values), NaN after the last step taken.
    """

    flow: AbstractFlow
    loss: Float[Array, ""]
    num_steps: Int[Array, ""]
    converged: Bool[Array, ""]
    grad_norm: Float[Array, ""]
    losses: Float[Array, " steps_plus_one"]


def mean_squared_error(predicted: PyTree, target: PyTree) -> Float[Array, ""]:
    """The default loss of `fit`: the mean squared difference of each leaf, summed over
    the leaves. Entries where the target is `-inf` (tokens off the face, in a saved
    `log_p`) are left out of the mean."""

    def one(p, t):
        keep = t > -jnp.inf
        # Double `where`: the gradient at the left-out entries must be 0, not NaN.
        d = jnp.where(keep, p, 0) - jnp.where(keep, t, 0)
        count = jnp.maximum(jnp.sum(keep), 1).astype(d.dtype)
        return jnp.sum(d**2) / count

    terms = jtu.tree_leaves(jtu.tree_map(one, predicted, target))
    return sum(terms[1:], terms[0])


class _Slot:
    """Stands in for a selected parameter while its position among the flow's leaves
    is found."""

    def __init__(self, index: int):
        self.index = index


def fit(
    flow: AbstractFlow,
    where: Callable[[AbstractFlow], Any],
    target: PyTree[Float[ArrayLike, "..."]],
    *,
    saveat: SaveAt,
    t1: RealScalarLike,
    t0: RealScalarLike = 0.0,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    support: Any = None,
    temperature_first: bool = True,
    method: AbstractMethod | Literal["auto", "exact", "ode"] = "auto",
    loss: Callable[[PyTree, PyTree], Float[Array, ""]] | None = None,
    positive: bool | Sequence[bool] = True,
    optimizer: optax.GradientTransformation | None = None,
    max_steps: int = 200,
    tol: RealScalarLike = 1e-8,
    gradient: Literal["reverse", "forward"] = "reverse",
) -> Fit:
    """Fits parameters of `flow` (temperature, score strengths, memory time constants,
    ...) so that what `solve` saves matches `target`.

    The loss `loss(predicted, target)`, with `predicted` the saved observables
    (`solve(flow, saveat=saveat, ...).observables`, or `.log_p` when `saveat` has no
    `fn`), is minimised over the parameters that `where` selects. Its gradient is exact
    through the closed forms for constant scores (THEORY §1 and §5: the sensitivities of
    the path) and goes through diffrax's adjoint on the ODE path.

    **Arguments:**

    - `flow`: the flow at the initial values of the parameters to fit (the other
        parameters stay fixed). It may carry a batch of contexts, as for `solve`: the
        loss then covers the whole batch, and a parameter with one value per context
        is fitted per context (one optimisation, one compile).
    - `where`: `where(flow)` returns the parameters to fit, one array or a tuple of
        arrays of the flow, as for `equinox.tree_at`: e.g.
        `lambda f: (f.temperature, f.score.terms[1].alpha)`. Each may have a batch
        shape (one value per context).
    - `target`: a PyTree of arrays with the structure and shapes of `predicted`: one
        leaf of shape `(*batch, times, ...)` per leaf of `saveat.fn`'s output, or the
        `(*batch, times, vocab)` log-probabilities. Dynamic: new values do not
        recompile. NaN and `+inf` are refused.
    - `saveat`: a `SaveAt` with the times to compare at and, usually, an `fn` giving
        the observables (e.g. `lambda t, lp, f: rx.entropy(lp)`). Functions are static:
        define `fn` once, outside a loop over fits, or every fit compiles anew.
    - `t1`, `t0`, `y0`, `log_y0`, `support`, `temperature_first`, `method`: passed to
        `solve` (see there); `method="auto"` takes the closed form for constant scores.
        Options of the ODE path go in `method=rx.ODE(rtol=..., atol=...)`.
    - `loss`: `loss(predicted, target) -> scalar`; default: the mean squared error of
        each leaf, summed over the leaves (entries where the target is `-inf` left out).
    - `positive`: optimise in log space, so that the parameter stays `> 0`
        (temperature, penalty strengths, `tau`); `False` for a signed parameter (e.g.
        `SelfReinforcement`'s `beta`). One bool for all, or one per selected array.
    - `optimizer`: `None` (default): L-BFGS (optax's `scale_by_lbfgs`) with a
        backtracking line search that evaluates the loss once per pass of the loop,
        which converges in a few tens of steps on smooth low-dimensional fits and
        compiles the solve once. Or any `optax.GradientTransformation`: one update per
        step, e.g. `optax.adam(1e-2)` (slow but steady), or `optax.lbfgs()` (its zoom
        line search gets the loss through `optax.value_and_grad_from_state`; it
        compiles the solve three times, which on the ODE path triples the compile
        time). Reuse one object across fits: its functions are static, and a new one
        compiles anew.
    - `max_steps`: the step budget, an int `>= 1` (static; it sizes `losses`).
    - `gradient`: how the loss is differentiated. `"reverse"` (default): reverse mode,
        through the ODE method's `adjoint`. `"forward"`: one forward-mode pass per
        fitted scalar (`jax.jacfwd`), with no tape; cheaper to run and to compile when
        few scalars are fitted (a temperature and a penalty), costly for many (fitting
        logits). On the ODE path it needs `diffrax.ForwardMode()` as the adjoint:
        `method="auto"` / `"ode"` get it, a method object must carry it
        (`rx.ODE(adjoint=diffrax.ForwardMode())`).
    - `tol`: stop when the gradient norm in the optimised coordinates is below `tol`
        (absolute: scale it with your loss). Dynamic.

    **Returns:**

    A `Fit`: the fitted `flow`, the final `loss`, `num_steps`, `converged`,
    `grad_norm` and the `losses` history.

    **Raises:**

    `TypeError` / `ValueError` naming the argument for: a `where` that does not select
    arrays of the flow, a `positive` of the wrong length or an initial value `<= 0`
    under `positive=True`, a `target` whose structure or shapes differ from what is
    saved (at trace time), a NaN or `+inf` in `target`, a bad `max_steps`, `tol` or
    `optimizer`; and whatever `solve` raises for its own arguments.

    **Recipe** (fitting the temperature and a frequency penalty to entropies observed
    along a path):

    ```python
    import replicax as rx

    def entropy(t, log_p, flow):
        return rx.entropy(log_p)

    saveat = rx.SaveAt(ts=ts, fn=entropy)           # ts: the observation times
    guess = rx.EntropicReplicator(
        rx.Logits(logits) + rx.FrequencyPenalty(0.5, tau=1.0), temperature=1.0
    )
    out = rx.fit(
        guess,
        lambda f: (f.temperature, f.score.terms[1].alpha),
        observed_entropies,                         # shape (len(ts),)
        saveat=saveat,
        t1=ts[-1],
        method=rx.ODE(rtol=1e-8, atol=1e-8),
    )
    assert out.converged
    temperature, alpha = out.flow.temperature, out.flow.score.terms[1].alpha
    ```

    Entropies at several times along the path, not only at the end, are what separate
    the two: the temperature sets where the path ends, the penalty how it gets there.
    Check `out.converged` (and `out.losses`) before trusting the values.
    """
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "`flow` must be a replicax flow (e.g. `Replicator` or "
            f"`EntropicReplicator`); received {type(flow).__name__}."
        )
    if not isinstance(saveat, SaveAt):
        raise TypeError(
            f"`saveat` must be a `replicax.SaveAt`; received {type(saveat).__name__}."
        )
    if not callable(where):
        raise TypeError(f"`where` must be callable; received {type(where).__name__}.")
    if loss is not None and not callable(loss):
        raise TypeError(f"`loss` must be callable; received {type(loss).__name__}.")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an int >= 1; received {max_steps!r}.")
    if gradient not in ("reverse", "forward"):
        raise ValueError(
            f"`gradient` must be 'reverse' or 'forward'; received {gradient!r}."
        )
    if optimizer is not None and not isinstance(
        optimizer, optax.GradientTransformation
    ):
        raise TypeError(
            "`optimizer` must be an `optax.GradientTransformation` (e.g. "
            "`optax.lbfgs()`, `optax.adam(1e-2)`); received "
            f"{type(optimizer).__name__}."
        )
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    dtype = rows.dtype
    positions, values = _select(flow, where)
    positive = _positive_flags(positive, len(values))
    for i, (x, pos) in enumerate(zip(values, positive, strict=True)):
        if pos and is_concrete(x) and not np.all(as_numpy(x) > 0):
            raise ValueError(
                f"`positive=True` fits element {i} of `where(flow)` in log space, so "
                f"its initial value must be > 0; received {x}. Start from a positive "
                "value, or give `positive=False` for a signed parameter."
            )
    # The selected parameters as strongly typed arrays of the compute dtype, so that a
    # new initial value (a Python float, a numpy scalar) does not compile anew.
    leaves, treedef = jtu.tree_flatten(flow)
    for pos, x in zip(positions, values, strict=True):
        leaves[pos] = jnp.asarray(x).astype(dtype)
    flow = jtu.tree_unflatten(treedef, leaves)
    target = _check_target(target, dtype)
    t0 = as_scalar(t0, "t0", dtype)
    t1 = as_scalar(t1, "t1", dtype)
    tol = check_scalar(as_scalar(tol, "tol", dtype), "tol", positive=True)
    solve_options = dict(
        t0=t0,
        t1=t1,
        y0=None if y0 is None else jnp.asarray(y0),
        log_y0=None if log_y0 is None else jnp.asarray(log_y0),
        saveat=saveat,
        support=support,
        temperature_first=temperature_first,
        method=method,
    )
    if (
        gradient == "forward"
        and isinstance(method, str)
        and method != "exact"
        and not (method == "auto" and flow.score.is_constant)
    ):
        # diffrax differentiates its loop in forward mode only with this adjoint.
        solve_options["adjoint"] = diffrax.ForwardMode()
    return _fit(
        flow,
        tuple(positions),
        tuple(positive),
        target,
        solve_options,
        mean_squared_error if loss is None else loss,
        optimizer,
        max_steps,
        tol,
        dtype,
        gradient,
    )


def _select(flow: AbstractFlow, where) -> tuple[list[int], list[Array]]:
    """The positions among `jtu.tree_leaves(flow)` of the arrays `where` selects, and
    those arrays."""
    try:
        nodes = where(flow)
    except Exception as error:  # noqa: BLE001 - re-raised naming the argument
        raise TypeError(
            f"`where(flow)` failed with {type(error).__name__}: {error}"
        ) from error
    single = not isinstance(nodes, tuple | list)
    nodes = [nodes] if single else list(nodes)
    if not nodes:
        raise ValueError("`where` must select at least one array of the flow.")
    for i, x in enumerate(nodes):
        if not eqx.is_array(x) or not (
            jnp.issubdtype(x.dtype, jnp.floating)
            or jnp.issubdtype(x.dtype, jnp.integer)
        ):
            what = f"an array of {x.dtype}" if eqx.is_array(x) else type(x).__name__
            raise TypeError(
                f"`where` must select real arrays of the flow (e.g. "
                f"`lambda f: f.temperature`); element {i} of `where(flow)` is {what}."
            )
    slots = [_Slot(i) for i in range(len(nodes))]
    try:
        marked = eqx.tree_at(where, flow, slots[0] if single else slots)
    except Exception as error:  # noqa: BLE001 - re-raised naming the argument
        raise ValueError(
            "`where` must select arrays that are leaves of the flow (as for "
            f"`equinox.tree_at`); replacing them failed with {type(error).__name__}: "
            f"{error}"
        ) from error
    leaves = jtu.tree_leaves(marked)
    if jtu.tree_structure(marked) != jtu.tree_structure(flow):
        raise ValueError("`where` must select leaves of the flow, not subtrees.")
    where_slot = {x.index: j for j, x in enumerate(leaves) if isinstance(x, _Slot)}
    if len(where_slot) != len(nodes):
        raise ValueError("`where` selects the same array of the flow more than once.")
    return [where_slot[i] for i in range(len(nodes))], nodes


def _positive_flags(positive, count: int) -> list[bool]:
    if isinstance(positive, bool):
        return [positive] * count
    if isinstance(positive, tuple | list) and all(
        isinstance(p, bool) for p in positive
    ):
        if len(positive) != count:
            raise ValueError(
                f"`positive` must be one bool, or one per array `where` selects "
                f"({count}); received {len(positive)}."
            )
        return list(positive)
    raise TypeError(
        f"`positive` must be a bool or a sequence of bools; received {positive!r}."
    )


def _check_target(target: PyTree, dtype) -> PyTree:
    leaves = jtu.tree_leaves(target)
    if not leaves:
        raise ValueError("`target` must contain at least one array.")
    out = []
    for x in leaves:
        if not eqx.is_array_like(x):
            raise TypeError(
                f"`target` must be a PyTree of arrays; it has a leaf of type "
                f"{type(x).__name__}."
            )
        x = jnp.asarray(x)
        if not (
            jnp.issubdtype(x.dtype, jnp.floating)
            or jnp.issubdtype(x.dtype, jnp.integer)
        ):
            raise TypeError(
                f"`target` must hold real numbers; received dtype {x.dtype}."
            )
        if is_concrete(x):
            host = as_numpy(x)
            if np.any(np.isnan(host) | (host == np.inf)):
                raise ValueError("`target` must not contain NaN or +inf.")
        out.append(x.astype(dtype))
    return jtu.tree_unflatten(jtu.tree_structure(target), out)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _fit(
    flow,
    positions,
    positive,
    target,
    solve_options,
    loss,
    optimizer,
    max_steps,
    tol,
    dtype,
    gradient,
):
    leaves, treedef = jtu.tree_flatten(flow)

    def to_flow(params):
        new = list(leaves)
        for pos, u, pos_flag in zip(positions, params, positive, strict=True):
            new[pos] = jnp.exp(u) if pos_flag else u
        return jtu.tree_unflatten(treedef, new)

    def predict(params):
        sol = solve(to_flow(params), **solve_options)
        return sol.log_p if solve_options["saveat"].fn is None else sol.observables

    def loss_fn(params):
        predicted = predict(params)
        _check_against(predicted, target)  # at trace time: shapes are static
        target_ = jtu.tree_map(lambda p, t: t.astype(p.dtype), predicted, target)
        value = loss(predicted, target_)
        value = jnp.asarray(value)
        if value.shape != ():
            raise ValueError(
                f"`loss` must return a scalar; it returned shape {value.shape}."
            )
        return value.astype(dtype)

    if gradient == "forward":
        loss_fn = _forward_gradient(loss_fn)

    # The optimised coordinates: the log of positive parameters, computed in `dtype`
    # (strongly typed, so that the loop carries the same types on every step).
    params = tuple(
        jnp.log(leaves[pos].astype(dtype)) if pos_flag else leaves[pos].astype(dtype)
        for pos, pos_flag in zip(positions, positive, strict=True)
    )
    if optimizer is None:
        out = _lbfgs_loop(loss_fn, params, max_steps, tol, dtype)
    else:
        out = _optax_loop(loss_fn, params, optimizer, max_steps, tol, dtype)
    params, step, losses, value, grad_norm, converged = out
    return Fit(
        flow=to_flow(params),
        loss=value,
        num_steps=step,
        converged=converged,
        grad_norm=grad_norm,
        losses=losses,
    )


def _forward_gradient(fn):
    """`fn` whose reverse-mode derivative is computed in forward mode: every
    `jax.grad` of it (ours, or an optax line search's) runs `jax.jacfwd`, one tangent
    per scalar of the parameters, and keeps no tape."""

    def value_and_jacobian(params):
        def twice(p):
            value = fn(p)
            return value, value

        jac, value = jax.jacfwd(twice, has_aux=True)(params)
        return value, jac

    @jax.custom_vjp
    def wrapped(params):
        return fn(params)

    def fwd(params):
        value, jac = value_and_jacobian(params)
        return value, jac

    def bwd(jac, cotangent):
        return (jtu.tree_map(lambda j: cotangent.astype(j.dtype) * j, jac),)

    wrapped.defvjp(fwd, bwd)
    return wrapped


def _optax_loop(loss_fn, params, optimizer, max_steps, tol, dtype):
    """Minimise with a user's optax transformation: one update per pass."""
    optimizer = optax.with_extra_args_support(optimizer)
    with _optax_promotion():
        state = optimizer.init(params)
    if optax.tree.get(state, "value") is not None:
        # A line search keeps the loss and gradient at the point it accepts: reuse them
        # (computed afresh only on the first step, when the state holds none).
        value_and_grad = optax.value_and_grad_from_state(loss_fn)
    else:

        def value_and_grad(params, *, state):
            del state
            return jax.value_and_grad(loss_fn)(params)

    # Each pass evaluates the loss and gradient at the current parameters, then steps
    # unless they have converged or the budget is spent, so that the loss is
    # differentiated at one place in the program (plus the places where the
    # optimiser's own line search evaluates it).
    def body(carry):
        params, state, step, losses, _, _, _ = carry
        value, grad = value_and_grad(params, state=state)
        value = jnp.asarray(value).astype(dtype)
        grad = jtu.tree_map(lambda g: g.astype(dtype), grad)
        grad_norm = optax.tree.norm(grad).astype(dtype)
        losses = losses.at[step].set(value)
        going = (grad_norm >= tol) & jnp.isfinite(value) & (step < max_steps)

        def advance(params, state):
            with _optax_promotion():
                updates, state = optimizer.update(
                    grad, state, params, value=value, grad=grad, value_fn=loss_fn
                )
                params = optax.apply_updates(params, updates)
            return jtu.tree_map(lambda u: u.astype(dtype), params), state

        params, state = jax.lax.cond(
            going, advance, lambda params, state: (params, state), params, state
        )
        step = step + going.astype(step.dtype)
        return params, state, step, losses, value, grad_norm, going

    losses = jnp.full((max_steps + 1,), jnp.nan, dtype)
    nan = jnp.full((), jnp.nan, dtype)
    step = jnp.zeros((), jnp.int32)
    carry = (params, state, step, losses, nan, nan, jnp.array(True))
    params, _, step, losses, value, grad_norm, _ = jax.lax.while_loop(
        lambda carry: carry[-1], body, carry
    )
    return params, step, losses, value, grad_norm, grad_norm < tol


# Armijo's sufficient-decrease constant and the most halvings of a step.
_ARMIJO = 1e-4
_MAX_HALVINGS = 40


def _lbfgs_loop(loss_fn, params, max_steps, tol, dtype):
    """L-BFGS (optax's `scale_by_lbfgs` for the direction) with a backtracking Armijo
    line search, written so that every pass of the loop evaluates the loss and its
    gradient once, at one trial point.

    `optax.lbfgs()` with its zoom line search evaluates the loss at three places in the
    program (the first gradient and the two branches of the zoom), and a solve on the
    ODE path compiles once per place: that triples the compile time of a fit, which
    dominates its cost at the sizes fits are made at. Here a pass either accepts the
    trial point (and asks L-BFGS for the next direction) or halves the step.
    """
    direction = optax.scale_by_lbfgs()
    with _optax_promotion():
        state0 = direction.init(params)
    zero = jtu.tree_map(jnp.zeros_like, params)
    value_and_grad = jax.value_and_grad(loss_fn)

    def body(carry):
        (x, f, g, d, alpha, state, step, losses, halvings, first, _, _) = carry
        y = jtu.tree_map(lambda a, b: a + alpha * b, x, d)
        fy, gy = value_and_grad(y)
        gy = jtu.tree_map(lambda v: v.astype(dtype), gy)
        slope = optax.tree.vdot(g, d).astype(dtype)
        accept = first | (jnp.isfinite(fy) & (fy <= f + _ARMIJO * alpha * slope))
        accept = accept & jnp.isfinite(fy) & jnp.isfinite(optax.tree.norm(gy))
        grad_norm = optax.tree.norm(gy).astype(dtype)
        step = step + (accept & ~first).astype(step.dtype)
        losses = jnp.where(accept, losses.at[step].set(fy), losses)
        converged = accept & (grad_norm < tol)
        halvings = jnp.where(accept, 0, halvings + 1)
        failed = (first & ~accept) | (halvings > _MAX_HALVINGS)
        going = ~converged & ~failed & ~(accept & (step >= max_steps))

        def new_direction(state):
            # Negative curvature along the step (possible without a Wolfe condition)
            # would make the L-BFGS metric indefinite: start its memory afresh there.
            curvature = optax.tree.vdot(optax.tree.sub(gy, g), optax.tree.sub(y, x))
            with _optax_promotion():
                state = jax.lax.cond(
                    first | (curvature > 0),
                    lambda s: s,
                    lambda s: direction.init(y),
                    state,
                )
                update, state = direction.update(gy, state, y)
            d = jtu.tree_map(lambda u: -u.astype(dtype), update)
            descent = optax.tree.vdot(gy, d) < 0
            d = jtu.tree_map(lambda u, v: jnp.where(descent, u, -v), d, gy)
            return d, state

        d_new, state = jax.lax.cond(
            accept & going, new_direction, lambda s: (d, s), state
        )
        x, f, g = jax.lax.cond(
            accept, lambda: (y, fy.astype(dtype), gy), lambda: (x, f, g)
        )
        alpha = jnp.where(accept, 1.0, alpha / 2).astype(dtype)
        return (
            x,
            f,
            g,
            d_new,
            alpha,
            state,
            step,
            losses,
            halvings,
            jnp.array(False),
            going,
            jnp.where(accept, grad_norm, carry[-1]),
        )

    nan = jnp.full((), jnp.nan, dtype)
    carry = (
        params,
        nan,
        zero,
        zero,
        jnp.zeros((), dtype),
        state0,
        jnp.zeros((), jnp.int32),
        jnp.full((max_steps + 1,), jnp.nan, dtype),
        jnp.zeros((), jnp.int32),
        jnp.array(True),
        jnp.array(True),
        nan,
    )
    out = jax.lax.while_loop(lambda carry: carry[-2], body, carry)
    x, f, _, _, _, _, step, losses, _, _, _, grad_norm = out
    return x, step, losses, f, grad_norm, grad_norm < tol


def _optax_promotion():
    # optax's L-BFGS adds int32 and int64 counters under x64, which strict dtype
    # promotion refuses; the choice is made when tracing, so this scopes it to the
    # optimiser's own arithmetic (and the losses its line search evaluates).
    return jax.numpy_dtype_promotion("standard")


def _check_against(predicted: PyTree, target: PyTree) -> None:
    """`ValueError` (at trace time) if `target` is not shaped like `predicted`."""
    want, got = jtu.tree_structure(predicted), jtu.tree_structure(target)
    if want != got:
        raise ValueError(
            "`target` must have the structure of the saved observables "
            f"({want}); received {got}."
        )
    for p, t in zip(jtu.tree_leaves(predicted), jtu.tree_leaves(target), strict=True):
        if p.shape != t.shape:
            raise ValueError(
                "`target` must have the shapes of the saved observables "
                f"({[x.shape for x in jtu.tree_leaves(predicted)]}); received "
                f"{[x.shape for x in jtu.tree_leaves(target)]}."
            )
