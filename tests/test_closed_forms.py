"""Closed forms of (R) and (E) against scipy, and the identities of THEORY §1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx

from .helpers import (
    closed_form_log_p,
    FLOWS,
    random_logits,
    random_simplex,
    scipy_replicator,
    softmax64,
)


# scipy at rtol 1e-11 in float64; the closed form is exact, so the gap is scipy's error.
SCIPY_TOL = 1e-9
# Against the longdouble closed forms: a few ulps of a probability per dtype.
F32_TOL = 1e-6
F64_TOL = 1e-14
# Two closed forms of one curve, both in longdouble (eps 1.1e-19).
LONGDOUBLE_TOL = 1e-17


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("vocab", [2, 7, 64])
@pytest.mark.parametrize("start", ["uniform", "dirichlet"])
def test_closed_form_matches_scipy(getkey, flow_cls, temperature, vocab, start):
    logits = random_logits(getkey(), (vocab,), scale=2.0)
    ts = jnp.linspace(0.0, 3.0, 7)
    if start == "uniform":
        y0, p0 = None, np.full(vocab, 1.0 / vocab)
    else:
        y0 = random_simplex(getkey(), (vocab,))
        p0 = np.asarray(y0)
    sol = rx.solve(
        flow_cls(logits, temperature), t1=ts[-1], y0=y0, saveat=rx.SaveAt(ts=ts)
    )
    expected = scipy_replicator(
        logits, temperature, p0, ts, entropic=flow_cls is rx.EntropicReplicator
    )
    assert sol.log_p.dtype == jnp.float64
    assert sol.method == "exact"
    np.testing.assert_allclose(np.exp(sol.log_p), expected, rtol=0, atol=SCIPY_TOL)


def test_closed_form_batched_matches_rows(getkey):
    logits = random_logits(getkey(), (2, 3, 16))
    temperature = jnp.array([0.5, 2.0])[:, None]
    ts = jnp.linspace(0.0, 2.0, 5)
    sol = rx.solve(rx.Replicator(logits, temperature), t1=2.0, saveat=rx.SaveAt(ts=ts))
    assert sol.log_p.shape == (2, 3, 5, 16)
    for i in range(2):
        for j in range(3):
            p0 = np.full(16, 1 / 16)
            ref = scipy_replicator(logits[i, j], temperature[i, 0], p0, ts, False)
            np.testing.assert_allclose(np.exp(sol.log_p[i, j]), ref, atol=SCIPY_TOL)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 4.0])
def test_temperature_is_time_for_replicator(getkey, temperature):
    # p_T(t) = p_1(t/T): both sides against softmax(t s/T) in longdouble, so that a
    # shared mistake cannot cancel. float32: the scores are centred before scaling, so
    # the error of a probability is a few ulps of it (F32_TOL).
    logits = random_logits(getkey(), (4, 1000), dtype=jnp.float32)
    ts = jnp.linspace(0.0, 3.0, 11, dtype=jnp.float32)
    hot = rx.solve(
        rx.Replicator(logits, temperature), t1=3.0, saveat=rx.SaveAt(ts=ts)
    )
    cold = rx.solve(
        rx.Replicator(logits, 1.0),
        t1=3.0 / temperature,
        saveat=rx.SaveAt(ts=ts / temperature),
    )
    assert hot.log_p.dtype == jnp.float32
    assert cold.log_p.dtype == jnp.float32
    # The temperature replicax uses is the float32 one.
    expected = np.exp(
        closed_form_log_p(False, logits, np.float32(temperature), np.asarray(ts))
    )
    for sol in (hot, cold):
        err = np.max(np.abs(np.exp(np.asarray(sol.log_p, np.longdouble)) - expected))
        assert err <= F32_TOL
    gap = jnp.max(jnp.abs(jnp.exp(hot.log_p) - jnp.exp(cold.log_p)))
    assert gap <= 2 * F32_TOL


def test_temperature_is_not_time_for_entropic(getkey):
    # The rescaling identity is a property of (R) only: (E) breaks it visibly.
    logits = random_logits(getkey(), (50,))
    ts = jnp.linspace(0.0, 3.0, 4)
    a = rx.solve(rx.EntropicReplicator(logits, 0.5), t1=3.0, saveat=rx.SaveAt(ts=ts))
    b = rx.solve(
        rx.EntropicReplicator(logits, 1.0), t1=6.0, saveat=rx.SaveAt(ts=2 * ts)
    )
    assert jnp.max(jnp.abs(jnp.exp(a.log_p) - jnp.exp(b.log_p))) > 1e-2


@pytest.mark.parametrize("temperature", [0.4, 1.0, 3.0])
def test_replicator_passes_softmax_at_one_then_argmax(getkey, temperature):
    logits = random_logits(getkey(), (3, 40))
    flow = rx.Replicator(logits, temperature)
    sol = rx.solve(flow, t1=400.0, saveat=rx.SaveAt(ts=jnp.array([1.0]), t1=True))
    target = softmax64(np.asarray(logits) / temperature)
    np.testing.assert_allclose(np.exp(sol.log_p[:, 0]), target, atol=1e-14)
    # t -> ∞: the argmax vertex, not the softmax.
    onehot = np.eye(40)[np.argmax(np.asarray(logits), -1)]
    np.testing.assert_allclose(np.exp(sol.log_p[:, 1]), onehot, atol=1e-10)
    np.testing.assert_allclose(np.exp(rx.limit_log_p(flow)), onehot, atol=0)


def test_replicator_limit_with_ties_keeps_start_weights():
    logits = jnp.array([1.0, 3.0, 3.0, -jnp.inf, 0.0])
    y0 = jnp.array([0.1, 0.2, 0.6, 0.0, 0.1])
    flow = rx.Replicator(logits, 0.7)
    expected = np.array([0.0, 0.25, 0.75, 0.0, 0.0])
    np.testing.assert_allclose(np.exp(rx.limit_log_p(flow, y0=y0)), expected, atol=1e-15)
    sol = rx.solve(flow, t1=200.0, y0=y0)
    np.testing.assert_allclose(np.exp(sol.log_p[0]), expected, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.4, 1.0, 3.0])
def test_entropic_tends_to_softmax(getkey, temperature):
    logits = random_logits(getkey(), (3, 40))
    y0 = random_simplex(getkey(), (3, 40))
    flow = rx.EntropicReplicator(logits, temperature)
    sol = rx.solve(flow, t1=60.0, y0=y0)
    target = softmax64(np.asarray(logits) / temperature)
    np.testing.assert_allclose(np.exp(sol.log_p[:, 0]), target, atol=1e-12)
    np.testing.assert_allclose(np.exp(rx.limit_log_p(flow, y0=y0)), target, atol=1e-15)
    np.testing.assert_allclose(np.exp(rx.target_log_p(flow)), target, atol=1e-15)


def test_entropic_and_replicator_share_the_curve_from_uniform(getkey):
    # From uniform, (E) at time t sits where (R) is at time 1 - e^{-t}: both against
    # softmax((1 - e^{-t}) s/T) computed in longdouble.
    logits = random_logits(getkey(), (30,))
    temperature = 0.8
    ts = jnp.array([0.1, 0.5, 2.0, 5.0])
    e = rx.solve(
        rx.EntropicReplicator(logits, temperature), t1=5.0, saveat=rx.SaveAt(ts=ts)
    )
    r = rx.solve(
        rx.Replicator(logits, temperature), t1=1.0, saveat=rx.SaveAt(ts=-jnp.expm1(-ts))
    )
    tau = -np.expm1(-np.asarray(ts).astype(np.longdouble))
    expected = np.exp(closed_form_log_p(False, logits, temperature, tau))
    # The two closed forms are one curve (a check of the reference itself).
    np.testing.assert_allclose(
        np.exp(closed_form_log_p(True, logits, temperature, ts)),
        expected,
        rtol=0,
        atol=LONGDOUBLE_TOL,
    )
    for sol in (e, r):
        err = np.max(np.abs(np.exp(np.asarray(sol.log_p, np.longdouble)) - expected))
        assert err <= F64_TOL


def test_free_energy_along_entropic_is_non_decreasing(getkey):
    logits = random_logits(getkey(), (4, 100))
    y0 = random_simplex(getkey(), (4, 100))
    temperature = 0.6
    ts = jnp.linspace(0.0, 10.0, 200)
    sol = rx.solve(
        rx.EntropicReplicator(logits, temperature), t1=10.0, y0=y0, saveat=rx.SaveAt(ts=ts)
    )
    free = rx.free_energy(sol.log_p, logits[:, None, :], temperature)
    assert jnp.all(jnp.diff(free, axis=-1) >= -1e-12)
    top = temperature * jax.scipy.special.logsumexp(logits / temperature, axis=-1)
    np.testing.assert_allclose(free[:, -1], top, atol=1e-10)


def test_free_energy_along_replicator_rises_then_falls():
    # THEORY §1: V = 2, s = (0, 1), T = 1, uniform start: maximum ln(1 + e) at t = 1.
    logits = jnp.array([0.0, 1.0])
    ts = jnp.linspace(0.0, 4.0, 401)
    sol = rx.solve(rx.Replicator(logits, 1.0), t1=4.0, saveat=rx.SaveAt(ts=ts))
    free = rx.free_energy(sol.log_p, logits, 1.0)
    k = int(jnp.argmax(free))
    assert float(ts[k]) == pytest.approx(1.0, abs=1e-12)
    assert float(free[k]) == pytest.approx(np.log1p(np.e), abs=1e-12)
    assert jnp.all(jnp.diff(free[: k + 1]) > 0)
    assert jnp.all(jnp.diff(free[k:]) < 0)


def test_free_energy_gap_is_kl(getkey):
    logits = random_logits(getkey(), (20,))
    log_p = jnp.log(random_simplex(getkey(), (20,)))
    temperature = 0.9
    target = rx.target_log_p(rx.EntropicReplicator(logits, temperature))
    gap = rx.free_energy(target, logits, temperature) - rx.free_energy(
        log_p, logits, temperature
    )
    assert float(gap) == pytest.approx(float(temperature * rx.kl(log_p, target)), abs=1e-12)
