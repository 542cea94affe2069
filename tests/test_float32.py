"""The entry points that run nested solvers (optimistix, lineax, diffrax, optax) with
JAX's 64-bit mode off, as most accelerator users run them, against the same call in
float64.

The rest of the suite runs with `jax_enable_x64` on, and float32 inputs there do not
take every float32 code path: lineax's and optimistix's internal scalars and breakdown
checks follow the mode, not the inputs' dtype (with x64 off, lineax's BiCGStab took a
negative scalar for a breakdown and every matrix-free Newton step of `rx.equilibrium`
failed; that case is in tests/test_equilibrium.py). Each case below runs once in float64
and once under `jax.enable_x64(False)` in float32, and must agree to a float32
tolerance relative to its largest value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import replicax as rx

# The float32 result against the float64 one, relative to the largest float64 entry:
# float32 rounding (~1e-7), grown by the nested solvers' iterations. Measured on the
# cases below: 1.7e-8 (L-BFGS fit) to 3.6e-6 (20 adam steps).
RTOL_FLOAT32 = 1e-5

_rng = np.random.default_rng(0)
LOGITS = 3.0 * _rng.standard_normal((2, 64))
STARTS = np.exp(_rng.standard_normal((2, 64)))
STARTS /= STARTS.sum(-1, keepdims=True)


def _penalised(s):
    score = rx.Logits(s) + rx.FrequencyPenalty(0.3, tau=1.0, stages=2)
    return rx.EntropicReplicator(score, 0.7)


def _time_to(s, y0):
    return rx.time_to(rx.EntropicReplicator(s, 0.7), eps=1e-2)


def _time_to_grad(s, y0):
    return jax.grad(lambda s: jnp.sum(_time_to(s, y0)))(s)


def _ode(s, y0):
    ts = jnp.linspace(0.0, 2.0, 5, dtype=s.dtype)
    return rx.solve(_penalised(s), y0=y0, t1=2.0, saveat=rx.SaveAt(ts=ts)).p


def _ode_shared_steps(s, y0):
    return rx.solve(_penalised(s), t1=2.0, shared_steps=True).p


def _flip_margin(s, y0):
    return rx.flip_margin(rx.EntropicReplicator(s, 0.7), t1=2.0).margin


def _statistics_grad(s, y0):
    ts = jnp.linspace(0.0, 2.0, 5, dtype=s.dtype)
    saveat = rx.SaveAt(ts=ts, fn=rx.path_statistics)

    def loss(s):
        flow = rx.Replicator(s, 0.7)
        out = rx.solve(flow, t1=2.0, saveat=saveat, support=rx.TopP(0.9))
        return jnp.sum(out.observables.entropy)

    return jax.grad(loss)(s)


def _entropy(t, log_p, flow):
    return rx.entropy(log_p)


def _entropies(dtype):
    return rx.SaveAt(ts=jnp.asarray([0.5, 1.0, 2.0], dtype), fn=_entropy)


def _fit(s, y0):
    # The temperature that gave these entropies, from 1.5 (L-BFGS, closed form).
    saveat = _entropies(s.dtype)
    target = rx.solve(rx.Replicator(s, 0.7), t1=2.0, saveat=saveat).observables
    out = rx.fit(
        rx.Replicator(s, 1.5), lambda f: f.temperature, target, saveat=saveat, t1=2.0
    )
    return out.flow.temperature


def _fit_adam(s, y0):
    saveat = _entropies(s.dtype)
    target = rx.solve(rx.Replicator(s, 0.7), t1=2.0, saveat=saveat).observables
    out = rx.fit(
        rx.Replicator(s, 1.5),
        lambda f: f.temperature,
        target,
        saveat=saveat,
        t1=2.0,
        optimizer=optax.adam(5e-2),
        max_steps=20,
    )
    return out.flow.temperature


CASES = {
    "time_to": _time_to,
    "time_to gradient": _time_to_grad,
    "ODE path": _ode,
    "ODE path, shared steps": _ode_shared_steps,
    "flip_margin": _flip_margin,
    "path_statistics gradient": _statistics_grad,
    "fit, L-BFGS": _fit,
    "fit, adam": _fit_adam,
}


@pytest.mark.parametrize("name", CASES)
def test_float32_without_x64_equals_float64(name):
    case = CASES[name]
    reference = np.asarray(case(jnp.asarray(LOGITS), jnp.asarray(STARTS)))
    with jax.enable_x64(False):
        got = case(jnp.asarray(LOGITS, jnp.float32), jnp.asarray(STARTS, jnp.float32))
        assert all(x.dtype != jnp.float64 for x in jax.tree.leaves(got))
        got = np.asarray(got, np.float64)
    assert reference.dtype == np.float64
    assert np.all(np.isfinite(reference)), name
    scale = np.max(np.abs(reference))
    np.testing.assert_allclose(got, reference, rtol=0, atol=RTOL_FLOAT32 * scale)
