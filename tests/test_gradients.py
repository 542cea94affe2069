"""Derivatives through `solve` against central finite differences (issue: memory-lean
gradients): with respect to the logits, the temperature, `y0`, `t1` and every score
parameter, both flows, both paths, with and without a face, with every score term.

Each case takes the gradient of one scalar loss with respect to everything at once and
checks it leaf by leaf: along the gradient's own direction (so the derivative checked is
`|g|`, never zero by accident) and along a random direction. On the ODE path the steps
are constant, so the solve is a smooth function of every parameter and `jax.grad` and
the finite differences differentiate the same discrete map (the adjoint is the
library's default, memory-lean one).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import replicax as rx

from .helpers import FLOWS, random_logits, random_simplex


# Central differences in float64: truncation ~ h² |f'''|, rounding ~ 1e-16 |f| / h.
FD_STEP = 1e-5
FD_RTOL = 1e-6
VOCAB = 8
T1 = 1.3
# Not a divisor of T1: the last step is a fraction of DT0, so moving t1 moves its length
# smoothly instead of adding or removing a step.
DT0 = T1 / 23.5


def _score(key, s, half):
    """The score terms of the library, with parameters of moderate size: half 0 or 1 of
    them (with the logits), so that the two ODE cases below cover every term between
    them at half the compile time each."""
    k = jax.random.split(key, 4)
    A = 0.5 * jax.random.normal(k[0], (VOCAB, VOCAB), jnp.float64)
    U = 0.5 * jax.random.normal(k[1], (VOCAB, 2), jnp.float64)
    W = 0.5 * jax.random.normal(k[2], (VOCAB, 2), jnp.float64)
    if half == 0:
        return (
            rx.Logits(s)
            + rx.SelfReinforcement(0.6)
            + rx.Payoff(A)
            + rx.FrequencyPenalty(0.4)
            + rx.PresencePenalty(0.5, 2.0, tau=0.9)
        )
    return (
        rx.Logits(s)
        + rx.LowRankPayoff(U, W)
        + rx.FrequencyPenalty(0.3, tau=0.7, stages=2)
        + rx.RepetitionPenalty(1.3, 3.0, tau=0.8, logits=s)
    )


# The parameters each half of the score terms must have had checked (besides the
# temperature, `y0` = "[1]" and `t1` = "[2]").
_HALF_NAMES = (
    (".beta", ".A", ".alpha", ".sharpness", ".tau"),
    (".U", ".W", ".alpha", ".tau", ".penalty", ".sharpness"),
)


def _loss_fn(method, support, weights):
    def loss(params):
        flow, y0, t1 = params
        sol = rx.solve(
            flow,
            t1=t1,
            y0=y0,
            support=support,
            saveat=rx.SaveAt(ts=jnp.stack([t1 / 2]), t1=True),
            method=method,
        )
        return jnp.sum(weights * jnp.exp(sol.log_p))

    return loss


def _leaf_names(tree):
    paths, _ = jtu.tree_flatten_with_path(tree)
    return [jtu.keystr(path) for path, _ in paths]


def _perturb(params, index, v, h):
    """`params` with `h v` added to its float leaf number `index`."""
    leaves, treedef = jtu.tree_flatten(params)
    leaves = list(leaves)
    leaves[index] = leaves[index] + h * v
    return jtu.tree_unflatten(treedef, leaves)


def _tangent(y0, v, face):
    """`v` made a direction that keeps `y0` on the simplex and on the face."""
    v = jnp.where(face & (y0 > 0), v, 0)
    n = jnp.sum(face & (y0 > 0)).astype(v.dtype)
    return jnp.where(face & (y0 > 0), v - jnp.sum(v) / n, 0)


def _check(loss, params, key, face):
    # Strongly typed leaves: a weakly typed one (made from a Python float) would become
    # strongly typed when perturbed, and recompile the loss for every parameter.
    params = jtu.tree_map(
        lambda x: jnp.asarray(np.asarray(x)) if eqx.is_inexact_array(x) else x, params
    )
    # The finite differences read the value from the same compiled program as the
    # gradient: one compile per case instead of two (the loss alone would be a second).
    value_and_grad = eqx.filter_jit(jax.value_and_grad(loss))
    loss_jit = lambda params: value_and_grad(params)[0]
    _, grad = value_and_grad(params)
    leaves = jtu.tree_leaves(params)
    grads = jtu.tree_leaves(grad)
    names = _leaf_names(params)
    y0_index = len(jtu.tree_leaves(params[0]))
    assert len(grads) == len(leaves)
    checked = []
    for i, (x, g, name) in enumerate(zip(leaves, grads, names, strict=True)):
        key, sub = jax.random.split(key)
        random = jax.random.normal(sub, jnp.shape(x), jnp.float64)
        if i == y0_index:
            g = _tangent(x, g, face)
            random = _tangent(x, random, face)
        norm = jnp.sqrt(jnp.sum(g**2))
        assert float(norm) > 0, f"zero gradient for {name}"
        for v in (g / norm, random):
            fd = (
                loss_jit(_perturb(params, i, v, FD_STEP))
                - loss_jit(_perturb(params, i, v, -FD_STEP))
            ) / (2 * FD_STEP)
            ad = jnp.sum(g * v)
            scale = max(abs(float(fd)), float(norm) * float(jnp.sqrt(jnp.sum(v**2))))
            assert abs(float(ad - fd)) <= FD_RTOL * scale, (name, float(ad), float(fd))
        checked.append(name)
    return checked


# Each case compiles a gradient through half of the score terms at once (the costliest
# compiles of the suite), so the two flows share the two faces and the two halves of the
# terms between them.
@pytest.mark.parametrize(
    "flow_cls, support, half",
    [(rx.Replicator, None, 0), (rx.EntropicReplicator, rx.TopK(5), 1)],
    ids=["R-full", "E-topk"],
)
def test_ode_path_every_parameter(getkey, flow_cls, support, half):
    s = random_logits(getkey(), (VOCAB,), scale=1.0)
    y0 = random_simplex(getkey(), (VOCAB,))
    flow = flow_cls(_score(getkey(), s, half), jnp.asarray(0.9))
    weights = jax.random.normal(getkey(), (2, VOCAB), jnp.float64)
    # Heun (two stages) rather than Tsit5 (seven): the same discrete-adjoint machinery
    # at a fraction of the compile time.
    method = rx.ODE(
        solver=diffrax.Heun(), stepsize_controller=diffrax.ConstantStepSize(), dt0=DT0
    )
    face = rx.face(flow_cls(s, 0.9), support)
    params = (flow, y0, jnp.asarray(T1))
    checked = _check(_loss_fn(method, support, weights), params, getkey(), face)
    # Every float parameter of every term of this half, the temperature, y0 and t1 were
    # checked.
    for name in ("temperature", "[1]", "[2]") + _HALF_NAMES[half]:
        assert any(name in c for c in checked), (name, checked)


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("support", [None, rx.TopK(5)], ids=["full", "topk"])
def test_exact_path_every_parameter(getkey, flow_cls, support):
    s = random_logits(getkey(), (VOCAB,), scale=1.0)
    y0 = random_simplex(getkey(), (VOCAB,))
    flow = flow_cls(s, jnp.asarray(0.9))
    weights = jax.random.normal(getkey(), (2, VOCAB), jnp.float64)
    face = rx.face(flow, support)
    params = (flow, y0, jnp.asarray(T1))
    checked = _check(_loss_fn(rx.Exact(), support, weights), params, getkey(), face)
    assert len(checked) == 4  # logits, temperature, y0, t1


def test_backsolve_adjoint_on_the_replicator(getkey):
    """`diffrax.BacksolveAdjoint` (constant memory, a continuous adjoint) agrees with the
    default adjoint on (R) to the tolerance of the solves; it refuses `SaveAt(fn=...)`."""
    s = random_logits(getkey(), (2, VOCAB), scale=1.0)
    flow = rx.Replicator(rx.Logits(s) + rx.SelfReinforcement(0.5), 0.9)
    weights = jax.random.normal(getkey(), (2, VOCAB), jnp.float64)

    def loss(logits, adjoint):
        f = eqx.tree_at(lambda f: f.score.terms[0].logits, flow, logits)
        method = rx.ODE(solver=diffrax.Dopri5(), rtol=1e-11, atol=1e-11, adjoint=adjoint)
        sol = rx.solve(f, t1=T1, method=method)
        return jnp.sum(weights * jnp.exp(sol.log_p[:, -1]))

    # Jitted: one program per adjoint, instead of the separate forward, linearised and
    # transposed programs of an un-jitted `jax.grad`.
    grad = eqx.filter_jit(jax.grad(loss))
    default = grad(s, diffrax.RecursiveCheckpointAdjoint())
    backsolve = grad(s, diffrax.BacksolveAdjoint())
    np.testing.assert_allclose(backsolve, default, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        rx.solve(
            flow,
            t1=T1,
            saveat=rx.SaveAt(t1=True, fn=lambda t, log_p, f: log_p[0]),
            adjoint=diffrax.BacksolveAdjoint(),
        )


def test_default_adjoint_memory_does_not_grow_with_max_steps(getkey):
    """The default adjoint keeps a fixed number of checkpoints: the memory XLA plans for
    the gradient is the same whether the solve may take 256 steps or 16,384."""
    s = random_logits(getkey(), (2, 64), scale=1.0)

    def temp_bytes(max_steps):
        def loss(logits):
            flow = rx.EntropicReplicator(logits, 0.7)
            sol = rx.solve(flow, t1=2.0, max_steps=max_steps, solver=diffrax.Euler(),
                           dt0=0.1, stepsize_controller=diffrax.ConstantStepSize())
            return jnp.sum(rx.entropy(sol.log_p))

        compiled = jax.jit(jax.grad(loss)).lower(s).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(256), temp_bytes(16384)
    assert large <= 1.05 * small, (small, large)
