"""Per-call overhead and recompilation (issue: GPU performance and scale, items 3 and the
no-recompile acceptance line).

A direct `rx.solve` is traced once per structure of its arguments (`_dispatch.py`); these
tests check that such cached calls give what the same call gives inside the user's `jit`,
raise what a direct call raises, and that no entry point compiles anything new when only
values change. Timings are measured by `replicax bench`, never asserted here.
"""

import contextlib

import equinox as eqx
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

import replicax as rx
from replicax import _dispatch

from .helpers import random_logits, random_simplex


# The compile events JAX reports: lowering to MLIR and the backend's compile.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


# Rounding differences between two compiles of the same float64 program.
SAME_PROGRAM_TOL = 1e-13


@contextlib.contextmanager
def count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        del duration, kwargs
        if event in COMPILE_EVENTS:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_cached_call_equals_call_inside_jit(getkey):
    logits = random_logits(getkey(), (3, 40))
    y0 = random_simplex(getkey(), (3, 40))
    ts = jnp.linspace(0.0, 2.0, 5)
    cases = (
        (rx.Replicator, dict()),
        (rx.EntropicReplicator, dict(y0=y0)),
        (rx.Replicator, dict(support=rx.TopK(7))),
    )
    for flow_cls, kwargs in cases:

        def run(s, T, kwargs=kwargs, flow_cls=flow_cls):
            return rx.solve(flow_cls(s, T), t1=2.0, saveat=rx.SaveAt(ts=ts), **kwargs)

        direct = run(logits, 0.7)
        direct_again = run(2 * logits, 0.9)  # from the cache
        for a, s, T in ((direct, logits, 0.7), (direct_again, 2 * logits, 0.9)):
            jitted = jax.jit(run)(s, T)
            assert a.method == jitted.method == "exact"
            # The same program but for `ts`, a constant inside the user's `jit`.
            np.testing.assert_allclose(
                np.asarray(a.log_p), np.asarray(jitted.log_p), rtol=0, atol=SAME_PROGRAM_TOL
            )
        np.testing.assert_array_equal(np.asarray(direct.ts), np.asarray(ts))


def test_cached_call_raises_what_a_direct_call_raises(getkey):
    logits = random_logits(getkey(), (2, 16))
    flow = rx.Replicator(logits, 0.7)
    rx.solve(flow, t1=1.0)
    # The same structure, now from the cache: times are checked on the host.
    with pytest.raises(ValueError, match="`t1` must be >= `t0`"):
        rx.solve(flow, t1=-1.0)
    with pytest.raises(ValueError, match="`t1` must be finite"):
        rx.solve(flow, t1=float("nan"))
    with pytest.raises(ValueError, match="must be finite, non-decreasing"):
        rx.solve(flow, t1=1.0, saveat=rx.SaveAt(ts=jnp.asarray([0.5, 0.2])))
    # Values are checked on device, as on the direct path.
    bad = logits.at[1, 3].set(jnp.nan)
    with pytest.raises(eqx.EquinoxRuntimeError, match="`logits` contains NaN or \\+inf"):
        rx.solve(rx.Replicator(bad, 0.7), t1=1.0)
    with pytest.raises(eqx.EquinoxRuntimeError, match="`temperature` must be finite and > 0"):
        rx.solve(rx.Replicator(logits, jnp.asarray([0.7, -1.0])), t1=1.0)
    # A new shape retraces, and its shape errors are raised as on the direct path.
    with pytest.raises(ValueError, match="`y0` must have shape"):
        rx.solve(flow, t1=1.0, y0=jnp.ones((2, 5)) / 5)


def test_no_recompile_when_values_change(getkey):
    """Every listed entry point, called a second time with new values of the same
    shapes, compiles nothing (no lowering, no backend compile)."""
    logits = [random_logits(getkey(), (2, 12)) for _ in range(2)]
    y0 = [random_simplex(getkey(), (2, 12)) for _ in range(2)]
    ts = jnp.linspace(0.0, 1.0, 4)
    penalty = [0.3, 0.6]

    calls = {
        "solve exact": lambda i: rx.solve(
            rx.EntropicReplicator(logits[i], 0.5 + i), t1=1.0 + i, y0=y0[i],
            saveat=rx.SaveAt(ts=ts * (1 + i)),
        ),
        "solve top-p": lambda i: rx.solve(
            rx.Replicator(logits[i], 0.7), t1=2.0, support=rx.TopP(0.8 + 0.1 * i)
        ),
        "solve ode": lambda i: rx.solve(
            rx.Replicator(rx.Logits(logits[i]) + rx.FrequencyPenalty(penalty[i]), 0.7),
            t1=0.5 + i,
        ),
        "solve ode options": lambda i: rx.solve(
            rx.Replicator(rx.Logits(logits[i]) + rx.PresencePenalty(penalty[i], 4.0), 0.7),
            t1=0.5, rtol=1e-5 * (1 + i),
        ),
        "time_to": lambda i: rx.time_to(rx.Replicator(logits[i], 0.7), 1e-2 * (1 + i)),
        "limit_log_p": lambda i: rx.limit_log_p(rx.EntropicReplicator(logits[i], 1.0 + i)),
        "speed": lambda i: rx.speed(rx.Replicator(logits[i], 0.7), jnp.log(y0[i]), t=0.5 * i),
        "multiplicative_weights": lambda i: rx.multiplicative_weights(
            rx.Replicator(logits[i], 0.7), 0.1 * (1 + i), 3
        ),
    }
    for name, call in calls.items():
        jax.block_until_ready(call(0))
        with count_compiles() as events:
            jax.block_until_ready(call(1))
        assert not events, f"{name} compiled again: {events}"


def test_cache_is_bounded_and_skips_traced_calls(getkey, monkeypatch):
    logits = random_logits(getkey(), (2, 8))
    # Inside the user's transformations the arguments are tracers: no cache entry.
    before = len(_dispatch._cache)
    grad = jax.grad(lambda s: rx.solve(rx.Replicator(s, 0.7), t1=1.0).log_p[0, 0, 0])
    vmapped = jax.vmap(lambda s: rx.solve(rx.Replicator(s, 0.7), t1=1.0).log_p)
    assert np.all(np.isfinite(np.asarray(grad(logits))))
    assert vmapped(logits).shape == (2, 1, 8)
    assert len(_dispatch._cache) == before
    # Many structures (here: vocabulary sizes under one key) keep at most CACHE_SIZE.
    monkeypatch.setattr(_dispatch, "CACHE_SIZE", len(_dispatch._cache) + 3)
    for vocab in range(2, 10):
        flow = rx.Replicator(jnp.zeros((1, vocab)), 1.0)
        key = (True, (vocab,))
        out = _dispatch.cached_call(
            _identity_body, (flow, vocab * 1.0), key, lambda: None, lambda info: ()
        )
        assert out[1] == vocab
    assert len(_dispatch._cache) <= _dispatch.CACHE_SIZE


def _identity_body(key, args):
    del key
    return args
