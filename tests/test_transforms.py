"""jit, vmap and grad compose with solve; new values of floats do not recompile."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
from replicax import _solve

from .helpers import closed_form_log_p, FLOWS, random_logits, random_simplex


METHODS = ("exact", "ode")
GRAD_FD_TOL = 1e-6  # central differences at h = 1e-6 in float64
# jit and eager run the same float64 operations, fused or not: a few ulps apart.
JIT_EAGER_TOL = 1e-13
# Probabilities against the longdouble closed form: float64 round-off (exact path); the
# default controller's rtol = atol = 1e-6 on log p (ODE path).
CLOSED_FORM_TOL = {"exact": 1e-14, "ode": 1e-5}


def _loss(flow_cls, method, temperature=0.8, t1=1.5):
    def loss(logits):
        sol = rx.solve(
            flow_cls(logits, temperature),
            t1=t1,
            method=rx.Exact() if method == "exact" else rx.ODE(rtol=1e-11, atol=1e-11),
            saveat=rx.SaveAt(ts=jnp.array([0.5, 1.0, t1])),
        )
        weights = jnp.arange(sol.log_p.shape[-1], dtype=sol.log_p.dtype)
        weights = jnp.broadcast_to(weights, sol.log_p.shape)
        return jnp.sum(jnp.exp(sol.log_p) * weights) + jnp.sum(rx.entropy(sol.log_p))

    return loss


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("method", METHODS)
def test_jit_equals_eager(getkey, flow_cls, method):
    # Eager is replicax with jit switched off (every primitive dispatched on its own,
    # including diffrax's loop); the longdouble closed form is a reference outside JAX.
    logits = random_logits(getkey(), (3, 9))
    # Eager diffrax dispatches every operation of every step: a shorter ODE horizon.
    temperature, t1 = 0.7, (2.0 if method == "exact" else 0.5)
    with jax.disable_jit():
        eager = rx.solve(flow_cls(logits, temperature), t1=t1, method=method).log_p
    jitted = jax.jit(
        lambda s, T, t1: rx.solve(flow_cls(s, T), t1=t1, method=method).log_p
    )(logits, temperature, t1)
    np.testing.assert_allclose(eager, jitted, rtol=0, atol=JIT_EAGER_TOL)
    expected = np.exp(
        closed_form_log_p(
            flow_cls is rx.EntropicReplicator, logits, temperature, [t1]
        )
    )
    for log_p in (eager, jitted):
        np.testing.assert_allclose(
            np.exp(np.asarray(log_p, np.longdouble)),
            expected,
            rtol=0,
            atol=CLOSED_FORM_TOL[method],
        )


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("method", METHODS)
def test_vmap_equals_loop_and_batch(getkey, flow_cls, method):
    logits = random_logits(getkey(), (4, 7))
    temperature = jnp.array([0.3, 0.7, 1.0, 2.0])
    y0 = random_simplex(getkey(), (4, 7))

    def one(s, T, y):
        return rx.solve(flow_cls(s, T), t1=1.0, y0=y, method=method).log_p

    vmapped = jax.vmap(one)(logits, temperature, y0)
    looped = jnp.stack([one(logits[i], temperature[i], y0[i]) for i in range(4)])
    batched = rx.solve(
        flow_cls(logits, temperature), t1=1.0, y0=y0, method=method
    ).log_p
    np.testing.assert_allclose(vmapped, looped, atol=1e-12)
    np.testing.assert_allclose(batched, looped, atol=1e-12)


# The ODE path's derivatives, with respect to every parameter and with every score
# term, are checked against finite differences in tests/test_gradients.py.
@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("method", ["exact"])
def test_grad_matches_finite_differences(getkey, flow_cls, method):
    logits = random_logits(getkey(), (6,), scale=1.0)
    # One compiled program gives the gradient and the values for the differences.
    value_and_grad = jax.jit(jax.value_and_grad(_loss(flow_cls, method)))
    loss = lambda s: value_and_grad(s)[0]
    grad = value_and_grad(logits)[1]
    h = 1e-6
    eye = jnp.eye(6, dtype=logits.dtype)
    fd = jnp.stack([(loss(logits + h * e) - loss(logits - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(grad, fd, atol=GRAD_FD_TOL, rtol=GRAD_FD_TOL)


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_trajectory_sensitivity_closed_form(getkey, flow_cls):
    # THEORY §5: ∂p(t)/∂s = c(t) G(p(t)), G = diag p - p pᵀ, c = t/T (R), (1-e^{-t})/T (E).
    logits = random_logits(getkey(), (5,))
    temperature, t = 0.7, 1.3

    def p_of(s):
        return jnp.exp(rx.solve(flow_cls(s, temperature), t1=t).log_p[0])

    jac = jax.jacobian(p_of)(logits)
    p = p_of(logits)
    c = t / temperature if flow_cls is rx.Replicator else -np.expm1(-t) / temperature
    expected = c * (jnp.diag(p) - jnp.outer(p, p))
    np.testing.assert_allclose(jac, expected, atol=1e-12)


def test_grad_with_masked_tokens_is_finite(getkey):
    logits = random_logits(getkey(), (2, 6)).at[0, :3].set(-jnp.inf).at[1, :5].set(-jnp.inf)
    # (R) on the exact path, (E) on both: each ODE gradient is a compile of its own.
    # Jitted, each gradient is one program (un-jitted, `jax.grad` compiles the forward,
    # linearised and transposed parts of the solve separately).
    for flow_cls, method in (
        (rx.Replicator, "exact"),
        (rx.EntropicReplicator, "exact"),
        (rx.EntropicReplicator, "ode"),
    ):
        grad = jax.jit(
            jax.grad(
                lambda s: jnp.sum(
                    rx.entropy(rx.solve(flow_cls(s, 1.0), t1=1.0, method=method).log_p)
                )
            )
        )(logits)
        assert jnp.all(jnp.isfinite(grad))
        assert jnp.all(grad[0, :3] == 0) and jnp.all(grad[1, :5] == 0)


def test_grad_wrt_temperature_and_y0(getkey):
    logits = random_logits(getkey(), (5,))
    y0 = random_simplex(getkey(), (5,))

    def entropy(T, y):
        return rx.entropy(rx.solve(rx.Replicator(logits, T), t1=1.0, y0=y).log_p[0])

    # One compiled program gives the gradient and the values for the differences.
    value_and_grad = jax.jit(jax.value_and_grad(entropy, argnums=(0, 1)))
    loss = lambda T, y: value_and_grad(T, y)[0]
    dT, dy = value_and_grad(0.9, y0)[1]
    h = 1e-6
    fd = (loss(0.9 + h, y0) - loss(0.9 - h, y0)) / (2 * h)
    assert float(dT) == pytest.approx(float(fd), rel=1e-6)
    # y0 lives on the simplex, so only derivatives along directions that keep Σ y0 = 1
    # mean anything: e_i - 1/V, which span the tangent space. Central differences in
    # float64 at h = 1e-6, far below the smallest y0 entry (so y0 ± h v stays positive,
    # and Σ stays 1 within rounding).
    vocab = y0.shape[-1]
    directions = jnp.eye(vocab, dtype=y0.dtype) - 1 / vocab
    assert float(jnp.min(y0)) > 1e3 * h
    fd = jnp.stack(
        [(loss(0.9, y0 + h * v) - loss(0.9, y0 - h * v)) / (2 * h) for v in directions]
    )
    np.testing.assert_allclose(directions @ dy, fd, rtol=GRAD_FD_TOL, atol=GRAD_FD_TOL)


def test_no_recompile_when_values_change(getkey):
    logits = random_logits(getkey(), (2, 8))
    y0 = random_simplex(getkey(), (2, 8))
    ts = jnp.linspace(0.0, 1.0, 4)
    # Method objects with new float values (tolerances) must not recompile either.
    methods = {
        "exact": (rx.Exact(), rx.Exact()),
        "ode": (rx.ODE(rtol=1e-6, atol=1e-6), rx.ODE(rtol=1e-8, atol=1e-9)),
    }
    for method in METHODS:
        first, second = methods[method]
        for flow_cls in FLOWS:
            kwargs = dict(method=first, saveat=rx.SaveAt(ts=ts))
            rx.solve(flow_cls(logits, 0.7), t1=1.0, y0=y0, **kwargs)
            before = eqx.debug.get_num_traces(_solve._solve_rows)
            rx.solve(flow_cls(logits, 0.9), t1=1.0, y0=y0, **kwargs)
            rx.solve(flow_cls(logits, 0.9), t1=2.5, y0=y0, **kwargs)
            rx.solve(
                flow_cls(2 * logits, 1.3),
                t1=2.5,
                y0=y0[::-1],
                method=second,
                saveat=rx.SaveAt(ts=ts * 2),
            )
            assert eqx.debug.get_num_traces(_solve._solve_rows) == before


def test_user_jit_does_not_retrace(getkey):
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(logits, temperature, t1, y0):
        return rx.solve(rx.EntropicReplicator(logits, temperature), t1=t1, y0=y0).log_p

    logits = random_logits(getkey(), (3, 8))
    for T, t1 in ((0.5, 1.0), (0.9, 3.0), (2.0, 0.1)):
        run(logits, jnp.asarray(T), jnp.asarray(t1), random_simplex(getkey(), (3, 8)))


def test_saveat_fn_keeps_only_observables(getkey):
    logits = random_logits(getkey(), (3, 50))
    ts = jnp.linspace(0.0, 2.0, 6)

    def fn(t, log_p, flow):
        return {"entropy": rx.entropy(log_p), "kl": rx.kl(log_p, rx.target_log_p(flow))}

    for method in METHODS:
        flow = rx.EntropicReplicator(logits, 0.8)
        sol = rx.solve(flow, t1=2.0, saveat=rx.SaveAt(ts=ts, fn=fn), method=method)
        full = rx.solve(flow, t1=2.0, saveat=rx.SaveAt(ts=ts), method=method)
        assert sol.log_p is None
        assert sol.observables["entropy"].shape == (3, 6)
        np.testing.assert_allclose(sol.observables["entropy"], rx.entropy(full.log_p), atol=1e-10)
        target = rx.target_log_p(flow)[:, None, :]
        np.testing.assert_allclose(
            sol.observables["kl"], rx.kl(full.log_p, target), atol=1e-10
        )


def test_saveat_t0_t1_order(getkey):
    logits = random_logits(getkey(), (4,))
    sol = rx.solve(
        rx.Replicator(logits, 1.0),
        t0=0.5,
        t1=2.0,
        saveat=rx.SaveAt(t0=True, ts=jnp.array([1.0]), t1=True),
    )
    np.testing.assert_allclose(sol.ts, [0.5, 1.0, 2.0])
    np.testing.assert_allclose(jnp.exp(sol.log_p[0]), jnp.full(4, 0.25), atol=1e-15)
