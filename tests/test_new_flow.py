"""A third flow, defined here and nowhere else, runs through every entry point.

`KappaReplicator` is (E) with a decay rate `kappa` other than 1: `θ̇ = z/T - κ θ`. For
constant scores its closed form is `θ(t) = e^{-κt} log p₀ + (1 - e^{-κt}) s/(κT)`, its
limit `softmax(s/(κT))`, and its exact time-`h` map the mirror step with
`η = 1 - e^{-κh}` and rate `z/(κT)`. Nothing outside this file knows about it: `solve`,
`time_to` and the discrete maps only call the flow's own methods.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
import scipy.special

from .helpers import random_logits, random_simplex


# float64 closed forms against float64 evaluations of the same formulas.
CLOSED_TOL = 1e-12
# The ODE path at rtol = atol = 1e-10 on log p.
ODE_TOL = 1e-8
# time_to finds its root to float64 bisection accuracy.
TIME_TO_RTOL = 1e-6


class KappaReplicator(rx.AbstractFlow):
    kappa: float = eqx.field(static=True)

    def __init__(self, score, temperature=1.0, kappa=2.0):
        super().__init__(score, temperature)
        self.kappa = kappa

    def _effective_temperature(self, dtype):
        return self.kappa * self.temperature.astype(dtype)

    def log_rate(self, t, log_p, aux, face):
        z = self.score(t, log_p, aux)
        rate = z / self.temperature.astype(log_p.dtype) - self.kappa * jnp.where(
            face, log_p, 0
        )
        rate = jnp.where(face, rate, 0)
        return jnp.where(face, rate - jnp.sum(jnp.exp(log_p) * rate), 0)

    def closed_form(self, dt, log_p0, centred_scores, face):
        decay = jnp.exp(-self.kappa * dt)
        coefficient = -jnp.expm1(-self.kappa * dt) / self._effective_temperature(dt.dtype)
        x = coefficient * centred_scores
        if log_p0 is not None:
            x = x + decay * jnp.where(face, log_p0, 0)
        return self.readout(x, face)

    def limit_log_p(self, log_p0, scores, face):
        alive = face & (log_p0 > -jnp.inf)
        s = scores / self._effective_temperature(scores.dtype)
        return self.readout(jnp.where(alive, s, 0), alive)

    def time_to(self, log_p0, scores, face, eps, *, bound=False):
        # θ_κ(t) at temperature T is (E)'s θ(κt) at temperature κT.
        entropic = rx.EntropicReplicator(self.score, self.kappa * self.temperature)
        return entropic.time_to(log_p0, scores, face, eps, bound=bound) / self.kappa

    def discrete_step(self, theta, rate, step_size):
        return (1 - step_size) * theta + step_size * rate / self.kappa


def _closed_form_np(logits, temperature, kappa, p0, t):
    theta = np.exp(-kappa * t) * np.log(p0) + (-np.expm1(-kappa * t)) * logits / (
        kappa * temperature
    )
    return scipy.special.softmax(theta, axis=-1)


KAPPA = 2.5
T = 0.8


def test_solve_exact_and_ode(getkey):
    logits = random_logits(getkey(), (3, 12))
    y0 = random_simplex(getkey(), (3, 12))
    flow = KappaReplicator(logits, T, KAPPA)
    ts = jnp.array([0.0, 0.1, 0.7, 2.0])
    exact = rx.solve(flow, t1=2.0, y0=y0, saveat=rx.SaveAt(ts=ts))
    assert exact.method == "exact"
    ode = rx.solve(flow, t1=2.0, y0=y0, saveat=rx.SaveAt(ts=ts), method=rx.ODE(rtol=1e-10, atol=1e-10))
    for i, t in enumerate(np.asarray(ts)):
        expected = _closed_form_np(np.asarray(logits), T, KAPPA, np.asarray(y0), t)
        np.testing.assert_allclose(np.exp(exact.log_p[:, i]), expected, atol=CLOSED_TOL)
        np.testing.assert_allclose(np.exp(ode.log_p[:, i]), expected, atol=ODE_TOL)
    # From uniform the closed form goes through the same method.
    uniform = rx.solve(flow, t1=0.7)
    expected = _closed_form_np(np.asarray(logits), T, KAPPA, np.full((3, 12), 1 / 12), 0.7)
    np.testing.assert_allclose(np.exp(uniform.log_p[:, 0]), expected, atol=CLOSED_TOL)


def test_limit_and_time_to(getkey):
    logits = random_logits(getkey(), (2, 9))
    flow = KappaReplicator(logits, T, KAPPA)
    target = scipy.special.softmax(np.asarray(logits) / (KAPPA * T), axis=-1)
    np.testing.assert_allclose(np.exp(rx.limit_log_p(flow)), target, atol=CLOSED_TOL)
    eps = 1e-4
    t_star = np.asarray(rx.time_to(flow, eps))
    t_bound = np.asarray(rx.time_to(flow, eps, bound=True))
    assert np.all(t_star <= t_bound)
    for row in range(2):
        p = _closed_form_np(np.asarray(logits[row]), T, KAPPA, np.full(9, 1 / 9), t_star[row])
        kl = np.sum(p * (np.log(p) - np.log(target[row])))
        assert kl == pytest.approx(eps, rel=TIME_TO_RTOL)


def test_discrete_map_is_exact_time_h_map(getkey):
    logits = random_logits(getkey(), (2, 7))
    y0 = random_simplex(getkey(), (2, 7))
    flow = KappaReplicator(logits, T, KAPPA)
    h = 0.3
    path = rx.discrete_map(flow, -np.expm1(-KAPPA * h), 5, y0=y0)
    for k in range(6):
        expected = _closed_form_np(np.asarray(logits), T, KAPPA, np.asarray(y0), k * h)
        np.testing.assert_allclose(np.exp(path[:, k]), expected, atol=CLOSED_TOL)
