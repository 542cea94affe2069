"""Hypothesis properties over extreme logits: ±1e4, ties, -inf entries, V from 1 to 2^18."""

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
from hypothesis import assume, given, settings

from .helpers import FLOWS


# Mass tolerance per dtype (sum of V rounded probabilities).
MASS_TOL = {np.float32: 1e-5, np.float64: 1e-12}


@st.composite
def logits_rows(draw, dtype):
    vocab = draw(st.sampled_from([1, 2, 3, 8, 33]))
    finite = st.floats(-1e4, 1e4, width=32 if dtype == np.float32 else 64)
    # Few distinct values make ties likely; -inf masks tokens.
    pool = draw(st.lists(finite, min_size=1, max_size=4))
    values = draw(
        hnp.arrays(dtype, (2, vocab), elements=st.sampled_from(pool + [-np.inf]))
    )
    for row in values:  # keep at least one token per row
        if np.all(row == -np.inf):
            row[draw(st.integers(0, vocab - 1))] = pool[0]
    return values


TS = np.array([0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0])


@settings(max_examples=40, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flow_cls", FLOWS)
def test_on_simplex_finite_and_lyapunov(data, dtype, flow_cls):
    logits = data.draw(logits_rows(dtype))
    temperature = data.draw(st.sampled_from([0.05, 0.7, 3.0, 100.0]))
    flow = flow_cls(jnp.asarray(logits), temperature)
    sol = rx.solve(flow, t1=TS[-1], saveat=rx.SaveAt(ts=jnp.asarray(TS, dtype)))
    log_p = np.asarray(sol.log_p, np.float64)
    assert sol.log_p.dtype == dtype
    alive = logits > -np.inf
    # Finite where the mass is; exactly -inf (never NaN) on masked tokens.
    assert not np.any(np.isnan(log_p))
    assert np.all(np.isfinite(log_p[:, :, :][np.broadcast_to(alive[:, None], log_p.shape)]))
    assert np.all(log_p[np.broadcast_to(~alive[:, None], log_p.shape)] == -np.inf)
    p = np.exp(log_p)
    np.testing.assert_allclose(p.sum(-1), 1, atol=MASS_TOL[dtype])
    tol = MASS_TOL[dtype]
    if flow_cls is rx.Replicator:
        # Lyapunov: the mass on the argmax set never decreases.
        top = np.max(np.where(alive, logits, -np.inf), -1, keepdims=True)
        winners = alive & (logits == top)
        mass = np.sum(np.where(winners[:, None], p, 0), -1)
        assert np.all(np.diff(mass, axis=-1) >= -tol)
    else:
        # Lyapunov: KL(p(t) ‖ softmax(s/T)) never increases.
        target = np.asarray(rx.target_log_p(flow), np.float64)
        kl = np.asarray(rx.kl(jnp.asarray(log_p), jnp.asarray(target[:, None])))
        scale = 1 + np.max(np.abs(np.where(alive, logits, 0))) / temperature
        assert np.all(np.diff(kl, axis=-1) <= tol * scale)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("flow_cls", FLOWS)
def test_face_invariance(data, flow_cls):
    # A token with no initial mass never gets any, and flowing on the face equals
    # flowing with those tokens masked (THEORY §3), in float64.
    logits = data.draw(logits_rows(np.float64))
    vocab = logits.shape[-1]
    keep = data.draw(hnp.arrays(bool, (vocab,)))
    keep[data.draw(st.integers(0, vocab - 1))] = True
    y0 = np.where(keep, 1.0, 0.0)
    y0 = np.broadcast_to(y0 / y0.sum(), logits.shape)
    flow = flow_cls(jnp.asarray(logits), 0.9)
    ts = jnp.asarray(TS[:6])
    masked = jnp.where(jnp.asarray(keep), jnp.asarray(logits), -jnp.inf)
    # A face disjoint from the logits' support is an error (tested in test_errors).
    assume(np.all(np.any(np.asarray(masked) > -np.inf, axis=-1)))
    a = rx.solve(flow, t1=ts[-1], y0=jnp.asarray(y0), saveat=rx.SaveAt(ts=ts)).log_p
    b = rx.solve(flow_cls(masked, 0.9), t1=ts[-1], saveat=rx.SaveAt(ts=ts)).log_p
    assert np.all(np.asarray(a)[..., ~keep] == -np.inf)
    np.testing.assert_allclose(np.exp(a), np.exp(b), atol=1e-12)


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_vocab_two_to_the_eighteen(getkey, flow_cls):
    vocab = 2**18
    logits = 3 * jax.random.normal(getkey(), (2, vocab), jnp.float32)
    logits = logits.at[0, ::7].set(-jnp.inf)
    sol = rx.solve(flow_cls(logits, 0.7), t1=4.0, saveat=rx.SaveAt(ts=jnp.array([0.5, 4.0])))
    assert sol.log_p.shape == (2, 2, vocab)
    mass = np.sum(np.exp(np.asarray(sol.log_p, np.float64)), -1)
    np.testing.assert_allclose(mass, 1, atol=1e-5)
    assert np.all(np.asarray(sol.log_p[0, :, ::7]) == -np.inf)


@pytest.mark.parametrize("method", ["exact", "ode"])
@pytest.mark.parametrize("flow_cls", FLOWS)
def test_vocab_one(flow_cls, method):
    # One token: p = 1 at every time, from either start, on both paths.
    flow = flow_cls(jnp.array([[3.0]]), 0.5)
    ts = jnp.array([0.0, 0.5, 2.0])
    for y0 in (None, jnp.ones((1, 1))):
        sol = rx.solve(flow, t1=2.0, y0=y0, method=method, saveat=rx.SaveAt(ts=ts))
        assert sol.method == method
        np.testing.assert_array_equal(sol.log_p, jnp.zeros((1, 3, 1)))
