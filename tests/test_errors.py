"""Bad input gets a clear error naming the argument (DESIGN "Bad input")."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx

from .helpers import closed_form_log_p, FLOWS


RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def _logits(batch=3, vocab=5):
    return jnp.arange(batch * vocab, dtype=jnp.float32).reshape(batch, vocab) / 7.0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nan_or_inf_logits(bad):
    # Checked on device by every entry point (never copied to the host to be checked).
    logits = _logits().reshape(1, 3, 5).at[0, 2, 1].set(bad)
    flow = rx.Replicator(logits, 1.0)
    with pytest.raises(RUNTIME_ERRORS, match=r"`logits` contains NaN or \+inf at batch index \(0, 2\)"):
        rx.solve(flow, t1=1.0)
    with pytest.raises(RUNTIME_ERRORS, match=r"`logits` contains NaN or \+inf"):
        rx.time_to(flow, 1e-3)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nan_or_inf_logits_under_jit(bad):
    logits = _logits().at[1, 1].set(bad)

    @jax.jit
    def run(logits):
        return rx.solve(rx.Replicator(logits, 1.0), t1=1.0).log_p

    with pytest.raises(RUNTIME_ERRORS, match=r"`logits` contains NaN or \+inf at batch index \(1,\)"):
        jax.block_until_ready(run(logits))
    run(_logits())  # good input still runs


def test_nan_logits_under_vmap():
    logits = _logits().at[2, 0].set(jnp.nan)
    run = jax.vmap(lambda s: rx.solve(rx.EntropicReplicator(s, 1.0), t1=1.0).log_p)
    with pytest.raises(RUNTIME_ERRORS, match=r"`logits` contains NaN or \+inf"):
        jax.block_until_ready(run(logits))


def test_all_masked_row():
    logits = _logits().at[1].set(-jnp.inf)
    with pytest.raises(RUNTIME_ERRORS, match=r"all -inf at batch index \(1,\)"):
        rx.solve(rx.EntropicReplicator(logits, 1.0), t1=1.0)
    run = jax.jit(lambda s: rx.solve(rx.Replicator(s, 1.0), t1=1.0).log_p)
    with pytest.raises(RUNTIME_ERRORS, match=r"`logits` is all -inf at batch index \(1,\)"):
        jax.block_until_ready(run(logits))


def test_masked_tokens_are_legitimate():
    logits = _logits().at[:, :2].set(-jnp.inf)
    for flow_cls in FLOWS:
        sol = rx.solve(flow_cls(logits, 0.5), t1=3.0)
        assert jnp.all(jnp.isfinite(sol.log_p[..., 2:]))
        assert jnp.all(sol.log_p[..., :2] == -jnp.inf)
        np.testing.assert_allclose(jnp.sum(jnp.exp(sol.log_p), -1), 1, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, jnp.nan, jnp.inf])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="`temperature` must be finite and > 0"):
        rx.Replicator(_logits(), temperature)
    run = jax.jit(lambda T: rx.solve(rx.Replicator(_logits(), T), t1=1.0).log_p)
    with pytest.raises(RUNTIME_ERRORS, match="`temperature` must be finite and > 0"):
        jax.block_until_ready(run(jnp.asarray(temperature, jnp.float32)))


def test_bad_temperature_row_named():
    temperature = jnp.array([1.0, 0.5, -0.1], jnp.float32)
    run = jax.jit(lambda T: rx.solve(rx.Replicator(_logits(), T), t1=1.0).log_p)
    with pytest.raises(RUNTIME_ERRORS, match=r"at batch index \(2,\)"):
        jax.block_until_ready(run(temperature))


@pytest.mark.parametrize(
    "y0, match",
    [
        (jnp.array([0.5, 0.6, -0.1, 0.0, 0.0]), "`y0` has a negative or NaN entry"),
        (jnp.array([0.5, jnp.nan, 0.5, 0.0, 0.0]), "`y0` has a negative or NaN entry"),
        (jnp.array([0.5, 0.2, 0.2, 0.0, 0.0]), "`y0` must sum to 1"),
    ],
)
def test_bad_y0(y0, match):
    flow = rx.Replicator(_logits(2), 1.0)
    y0 = jnp.stack([jnp.full(5, 0.2), y0]).astype(jnp.float32)
    with pytest.raises(RUNTIME_ERRORS, match=match + r".*batch index \(1,\)"):
        rx.solve(flow, t1=1.0, y0=y0)
    run = jax.jit(lambda y: rx.solve(rx.Replicator(_logits(2), 1.0), t1=1.0, y0=y).log_p)
    with pytest.raises(RUNTIME_ERRORS, match=match + r".*batch index \(1,\)"):
        jax.block_until_ready(run(y0))


def test_bad_log_y0():
    flow = rx.EntropicReplicator(_logits(1), 1.0)
    with pytest.raises(RUNTIME_ERRORS, match=r"`log_y0` has a NaN or \+inf entry"):
        rx.solve(flow, t1=1.0, log_y0=jnp.array([[0.0, jnp.inf, 0.0, 0.0, 0.0]]))
    with pytest.raises(RUNTIME_ERRORS, match=r"`log_y0` must be normalised"):
        rx.solve(flow, t1=1.0, log_y0=jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="at most one of `y0` and `log_y0`"):
        rx.solve(flow, t1=1.0, y0=jnp.full(5, 0.2), log_y0=jnp.full(5, -np.log(5)))


def test_y0_shape_mismatch():
    flow = rx.Replicator(_logits(3, 5), 1.0)
    with pytest.raises(ValueError, match=r"`y0` must have shape \(\*batch, 5\).*received shape \(3, 4\)"):
        rx.solve(flow, t1=1.0, y0=jnp.full((3, 4), 0.25))
    with pytest.raises(ValueError, match="do not broadcast"):
        rx.solve(flow, t1=1.0, y0=jnp.full((2, 5), 0.2))


def test_y0_with_no_mass_on_allowed_tokens():
    logits = jnp.array([0.0, 1.0, -jnp.inf])
    y0 = jnp.array([0.0, 0.0, 1.0])
    run = jax.jit(lambda y: rx.solve(rx.Replicator(logits, 1.0), t1=1.0, y0=y).log_p)
    with pytest.raises(RUNTIME_ERRORS, match="`y0` puts no mass on any token"):
        jax.block_until_ready(run(y0))


def test_bad_times():
    flow = rx.Replicator(_logits(), 1.0)
    with pytest.raises(ValueError, match="`t1` must be >= `t0`"):
        rx.solve(flow, t0=1.0, t1=0.5)
    with pytest.raises(ValueError, match=r"`SaveAt\(ts=...\)` must be finite, non-decreasing"):
        rx.solve(flow, t1=1.0, saveat=rx.SaveAt(ts=jnp.array([0.0, 2.0])))
    with pytest.raises(ValueError, match="`t1` must be finite"):
        rx.solve(flow, t1=jnp.nan)
    run = jax.jit(lambda t1: rx.solve(flow, t1=t1).log_p)
    with pytest.raises(RUNTIME_ERRORS, match="`t1` must be >= `t0`"):
        jax.block_until_ready(run(jnp.asarray(-1.0, jnp.float32)))


def test_bad_options():
    flow = rx.Replicator(_logits(), 1.0)
    # Under the tests' run-time type checking, jaxtyping (a TypeError) may speak first;
    # without it, replicax's own message does. Either names the argument.
    with pytest.raises(TypeError, match="flow"):
        rx.solve(_logits(), t1=1.0)
    with pytest.raises((TypeError, ValueError), match="method"):
        rx.solve(flow, t1=1.0, method="rk4")
    state = rx.Replicator(rx.Logits(_logits()) + rx.SelfReinforcement(1.0), 1.0)
    with pytest.raises(ValueError, match="`method='exact'` needs a constant score"):
        rx.solve(state, t1=1.0, method="exact")
    with pytest.raises(ValueError, match="Cannot tell the vocabulary size"):
        rx.solve(rx.Replicator(rx.SelfReinforcement(1.0), 1.0), t1=1.0)
    with pytest.raises(ValueError, match="`alpha`"):
        rx.FrequencyPenalty(-1.0)
    with pytest.raises(ValueError, match="`eps` must be finite and > 0"):
        rx.time_to(flow, 0.0)
    with pytest.raises(ValueError, match="`step_size`"):
        rx.multiplicative_weights(flow, -0.1, 3)
    with pytest.raises(ValueError, match="`k` must be an int"):
        rx.top_k_mass(jnp.zeros(5), 6)
    with pytest.raises((TypeError, ValueError), match="ts"):
        rx.SaveAt(ts=jnp.zeros((2, 2)))


# Half-precision logits are computed in float32; the answer is checked against the
# longdouble closed form at the half-precision values. Exact path: a few float32 ulps of
# log p. ODE path: the default controller (rtol = atol = 1e-6 on log p) over t = 1.
HALF_EXACT_TOL = 1e-6
HALF_ODE_TOL = 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_logits_computed_in_float32(dtype):
    logits = _logits().astype(dtype)
    temperature = 0.7
    # Every bfloat16 / float16 value is a float32 value, and the temperature replicax
    # uses is the float32 one.
    expected = closed_form_log_p(
        False, np.asarray(logits, np.float32), np.float32(temperature), [1.0]
    )
    for method, tol in (("exact", HALF_EXACT_TOL), ("ode", HALF_ODE_TOL)):
        sol = rx.solve(rx.Replicator(logits, temperature), t1=1.0, method=method)
        assert sol.method == method
        assert sol.log_p.dtype == jnp.float32
        np.testing.assert_allclose(
            np.asarray(sol.log_p, np.longdouble), expected, rtol=0, atol=tol
        )
