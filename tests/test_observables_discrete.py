"""Observables (THEORY §5), time_to, and the discrete maps (THEORY §2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
import scipy.special
import scipy.stats

from .helpers import FLOWS, random_logits, random_simplex, softmax64


def test_entropy_and_kl_match_scipy(getkey):
    p = np.array(random_simplex(getkey(), (4, 30)))
    q = np.asarray(random_simplex(getkey(), (4, 30)))
    p[0, :3] = 0
    p[0] /= p[0].sum()
    log_p, log_q = jnp.log(p), jnp.log(q)
    np.testing.assert_allclose(rx.entropy(log_p), scipy.stats.entropy(p, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(rx.kl(log_p, log_q), scipy.stats.entropy(p, q, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(rx.kl(log_q, log_p)[1:], scipy.stats.entropy(q, p, axis=-1)[1:], rtol=1e-12)
    assert rx.kl(log_q, log_p)[0] == jnp.inf  # q has mass where p has none


def test_fisher_rao_and_arc_length():
    # V = 2 from uniform to a vertex: length π/2 (THEORY §5).
    logits = jnp.array([0.0, 1.0])
    ts = jnp.linspace(0.0, 60.0, 20001)
    sol = rx.solve(rx.Replicator(logits, 1.0), t1=60.0, saveat=rx.SaveAt(ts=ts))
    # The path is not quite at the vertex at t = 60: p₁ = e^{-60}/(1 + e^{-60}).
    assert float(rx.arc_length(sol.log_p)) == pytest.approx(np.pi / 2, abs=1e-9)
    vertex = jnp.log(jnp.array([0.0, 1.0]))
    uniform = jnp.log(jnp.array([0.5, 0.5]))
    assert float(rx.fisher_rao_distance(uniform, vertex)) == pytest.approx(np.pi / 2, abs=1e-12)
    assert float(rx.fisher_rao_distance(uniform, uniform)) == 0.0
    g = jax.grad(lambda x: rx.fisher_rao_distance(x, uniform))(uniform)
    assert jnp.all(jnp.isfinite(g))


def test_speed_is_score_spread_along_replicator(getkey):
    # Along (R) with constant scores the Shahshahani speed is sd_p(s)/T.
    logits = random_logits(getkey(), (3, 40))
    temperature = 0.6
    flow = rx.Replicator(logits, temperature)
    log_p = rx.solve(flow, t1=0.7).log_p[:, 0]
    p = np.exp(np.asarray(log_p))
    s = np.asarray(logits)
    mean = np.sum(p * s, -1, keepdims=True)
    expected = np.sqrt(np.sum(p * (s - mean) ** 2, -1)) / temperature
    np.testing.assert_allclose(rx.speed(flow, log_p), expected, rtol=1e-12)
    # The integrated speed equals the arc length of the saved path.
    ts = jnp.linspace(0.0, 3.0, 3001)
    sol = rx.solve(flow, t1=3.0, saveat=rx.SaveAt(ts=ts, fn=lambda t, lp, f: rx.speed(f, lp)))
    speed_integral = jax.scipy.integrate.trapezoid(
        sol.observables, jnp.broadcast_to(ts, sol.observables.shape), axis=-1
    )
    path = rx.solve(flow, t1=3.0, saveat=rx.SaveAt(ts=ts)).log_p
    np.testing.assert_allclose(rx.arc_length(path), speed_integral, rtol=1e-5)


def test_entropy_rate_along_replicator(getkey):
    # dH/dt = -(t/T²) Var_p(s) from uniform (THEORY §5).
    logits = random_logits(getkey(), (30,))
    temperature, t, h = 0.8, 1.1, 1e-5
    flow = rx.Replicator(logits, temperature)
    sol = rx.solve(flow, t1=t + h, saveat=rx.SaveAt(ts=jnp.array([t - h, t, t + h])))
    H = rx.entropy(sol.log_p)
    p = np.exp(np.asarray(sol.log_p[1]))
    s = np.asarray(logits)
    var = np.sum(p * s**2) - np.sum(p * s) ** 2
    assert float((H[2] - H[0]) / (2 * h)) == pytest.approx(-(t / temperature**2) * var, rel=1e-6)


def test_top_k_mass_and_argmax():
    log_p = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25], [0.25, 0.25, 0.25, 0.25]]))
    np.testing.assert_allclose(rx.top_k_mass(log_p, 2), [0.75, 0.5], rtol=1e-12)
    np.testing.assert_array_equal(rx.argmax(log_p), [1, 0])


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("eps", [1e-2, 1e-4, 1e-8])
def test_time_to_exact_and_bound(getkey, flow_cls, eps):
    logits = random_logits(getkey(), (3, 25))
    y0 = random_simplex(getkey(), (3, 25))
    temperature = 0.7
    flow = flow_cls(logits, temperature)
    t = rx.time_to(flow, eps, y0=y0)
    bound = rx.time_to(flow, eps, y0=y0, bound=True)
    assert jnp.all(t <= bound + 1e-9)
    assert jnp.all(t > 0)
    for row in range(3):
        sol = rx.solve(
            flow_cls(logits[row], temperature),
            t1=float(t[row]),
            y0=y0[row],
            saveat=rx.SaveAt(ts=jnp.array([0.999 * float(t[row])]), t1=True),
        )
        if flow_cls is rx.Replicator:
            winner = int(jnp.argmax(logits[row]))
            gaps = 1 - jnp.exp(sol.log_p[:, winner])
        else:
            target = jnp.log(softmax64(np.asarray(logits[row]) / temperature))
            gaps = rx.kl(sol.log_p, jnp.broadcast_to(target, sol.log_p.shape))
        assert float(gaps[1]) == pytest.approx(eps, rel=1e-6)
        assert float(gaps[0]) > eps


# One jitted program per flow gives the gradient and the values the finite differences
# need (rather than the un-jitted gradient's programs and a second one for the values).
@functools.partial(jax.jit, static_argnums=0)
def _time_to_value_and_grad(flow_cls, logits):
    return jax.value_and_grad(lambda s: rx.time_to(flow_cls(s, 0.9), 1e-3))(logits)


def test_time_to_gradient_is_implicit(getkey):
    logits = random_logits(getkey(), (8,))
    for flow_cls in FLOWS:
        f = functools.partial(_time_to_value_and_grad, flow_cls)
        grad = f(logits)[1]
        h = 1e-6
        eye = jnp.eye(8, dtype=logits.dtype)
        fd = jnp.stack(
            [(f(logits + h * e)[0] - f(logits - h * e)[0]) / (2 * h) for e in eye]
        )
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)


def test_time_to_is_zero_when_already_there():
    logits = jnp.array([0.0, 1.0, 2.0])
    target = softmax64(logits / 0.5)
    assert float(rx.time_to(rx.EntropicReplicator(logits, 0.5), 1e-6, y0=target)) == 0.0
    assert float(rx.time_to(rx.Replicator(logits, 0.5), 1e-3, y0=jnp.array([0.0, 0.0, 1.0]))) == 0.0


def test_multiplicative_weights_is_the_replicator_time_map(getkey):
    logits = random_logits(getkey(), (3, 20))
    y0 = random_simplex(getkey(), (3, 20))
    flow = rx.Replicator(logits, 0.7)
    eta = 0.37
    path = rx.multiplicative_weights(flow, eta, 10, y0=y0)
    assert path.shape == (3, 11, 20)
    sol = rx.solve(flow, t1=10 * eta, y0=y0, saveat=rx.SaveAt(ts=eta * jnp.arange(11.0)))
    np.testing.assert_allclose(path, sol.log_p, atol=1e-11)


def test_entropic_mirror_map(getkey):
    logits = random_logits(getkey(), (2, 15))
    y0 = random_simplex(getkey(), (2, 15))
    temperature = 1.2
    flow = rx.EntropicReplicator(logits, temperature)
    target = np.log(softmax64(np.asarray(logits) / temperature))
    # η < 1 is the exact time-h map of (E) with η = 1 - e^{-h}.
    h = 0.3
    path = rx.entropic_mirror_map(flow, -np.expm1(-h), 8, y0=y0)
    sol = rx.solve(flow, t1=8 * h, y0=y0, saveat=rx.SaveAt(ts=h * jnp.arange(9.0)))
    np.testing.assert_allclose(path, sol.log_p, atol=1e-11)
    # η = 1: one step to the target.
    np.testing.assert_allclose(rx.entropic_mirror_map(flow, 1.0, 1, y0=y0)[:, 1], target, atol=1e-12)
    # 1 < η < 2: converges while oscillating; η > 2: does not converge.
    osc = rx.entropic_mirror_map(flow, 1.5, 60, y0=y0)
    np.testing.assert_allclose(osc[:, -1], target, atol=1e-10)
    d = np.asarray(osc[0, 1:6, 0]) - target[0, 0]
    assert np.all(d[:-1] * d[1:] < 0)  # sign flips every step
    far = rx.entropic_mirror_map(flow, 2.5, 30, y0=y0)
    assert float(jnp.max(jnp.abs(far[:, -1] - target))) > 1.0


def test_euler_in_probability_space_leaves_the_simplex():
    # THEORY §2: why replicax works in log space. Euler on p leaves the simplex when
    # η ≥ T/(<p,s> - min s); the log-space maps never do.
    logits = jnp.array([0.0, 5.0, 10.0])
    p = jnp.full(3, 1 / 3)
    eta, temperature = 1.0, 1.0
    euler = p * (1 + eta * (logits - p @ logits) / temperature)
    assert jnp.any(euler < 0)
    mw = jnp.exp(rx.multiplicative_weights(rx.Replicator(logits, temperature), eta, 1))
    assert jnp.all(mw >= 0)
    np.testing.assert_allclose(jnp.sum(mw, -1), 1, atol=1e-15)


def test_discrete_maps_with_history(getkey):
    # With a history-dependent score multiplicative weights is exponential Euler: first
    # order, converging to the ODE path as η → 0.
    logits = random_logits(getkey(), (5,), scale=1.0)
    flow = rx.Replicator(rx.Logits(logits) + rx.FrequencyPenalty(0.5), 1.0)
    ref = rx.solve(flow, t1=2.0, rtol=1e-11, atol=1e-11).log_p[0]
    errors = []
    for n in (50, 100, 200):
        path = rx.multiplicative_weights(flow, 2.0 / n, n)
        errors.append(float(jnp.max(jnp.abs(jnp.exp(path[-1]) - jnp.exp(ref)))))
    slope = np.log(errors[0] / errors[2]) / np.log(4)
    assert slope == pytest.approx(1.0, abs=0.15)
