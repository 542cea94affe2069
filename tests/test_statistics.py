"""`rx.path_statistics`: the one-read fast path of `rx.Exact` against the same function
evaluated on the saved `log p` (the generic `SaveAt(fn=...)` route), values and
gradients, and the memory it saves (from XLA's own buffer assignment, not timings)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replicax as rx

# float64 throughout: both routes compute the same quantities in a different order, so
# they agree to rounding.
VALUE_TOL = 1e-12
GRAD_TOL = 1e-10  # relative to the largest entry of the generic route's gradient
VOCAB = 200


def _generic(t, log_p, flow):
    # Not `rx.path_statistics` itself: `solve` evaluates it on log p at each time.
    return rx.path_statistics(t, log_p, flow)


def _problem(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, VOCAB)) * 3
    logits[:, :4] = -np.inf  # masked tokens
    logits[0, 10] = logits[0, 11] = 9.0  # tied at the top
    y0 = rng.dirichlet(np.ones(VOCAB), size=3)
    return jnp.asarray(logits), jnp.asarray(y0)


CASES = [
    # flow, start given, support, kernel (the gradient test runs (E) with a start)
    (rx.Replicator, False, None, "auto"),
    (rx.Replicator, True, rx.TopP(0.9), "pallas"),
]


def _solve(flow_cls, logits, temperature, y0, support, kernel, fn, ts):
    return rx.solve(
        flow_cls(logits, temperature),
        t1=ts[-1],
        y0=y0,
        support=support,
        saveat=rx.SaveAt(ts=ts, fn=fn),
        method=rx.Exact(kernel=kernel),
    ).observables


@pytest.mark.parametrize("flow_cls, with_y0, support, kernel", CASES)
def test_fast_path_equals_generic(flow_cls, with_y0, support, kernel):
    logits, y0 = _problem(0)
    y0 = y0 if with_y0 else None
    ts = jnp.array([0.0, 0.01, 0.5, 2.0, 40.0])

    @jax.jit
    def both(logits, y0):
        return [
            _solve(flow_cls, logits, 0.8, y0, support, kernel, fn, ts)
            for fn in (rx.path_statistics, _generic)
        ]

    fast, generic = both(logits, y0)
    assert isinstance(fast, rx.PathStatistics)
    for name in ("entropy", "top_prob", "mean_score"):
        out, ref = getattr(fast, name), getattr(generic, name)
        assert out.shape == ref.shape == (3, 5)
        np.testing.assert_allclose(out, ref, rtol=0, atol=VALUE_TOL, err_msg=name)
    # Independent of both routes: at t0 the start itself, uniform on the face (or y0).
    p0 = (
        np.isfinite(np.asarray(logits))
        / np.sum(np.isfinite(np.asarray(logits)), -1)[:, None]
        if y0 is None
        else None
    )
    if p0 is not None and support is None:
        h0 = -np.sum(np.where(p0 > 0, p0 * np.log(np.where(p0 > 0, p0, 1)), 0), -1)
        np.testing.assert_allclose(fast.entropy[:, 0], h0, rtol=0, atol=VALUE_TOL)
        z = np.where(np.isfinite(np.asarray(logits)), np.asarray(logits), 0)
        np.testing.assert_allclose(
            fast.mean_score[:, 0], np.sum(p0 * z, -1), rtol=0, atol=VALUE_TOL
        )


def test_values_and_gradients_equal_generic():
    flow_cls, support, kernel = rx.EntropicReplicator, rx.TopK(30), "auto"
    logits, y0 = _problem(1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 4)))

    def loss(fn, logits, temperature, y0, ts):
        stats = _solve(flow_cls, logits, temperature, y0, support, kernel, fn, ts)
        fields = (stats.entropy, stats.top_prob, stats.mean_score)
        return sum(jnp.sum(w * f) for w, f in zip(weights, fields, strict=True))

    args = (logits, jnp.asarray(0.7), y0, jnp.array([0.1, 0.6, 1.5, 3.0]))
    value_and_grad = jax.jit(
        jax.value_and_grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0
    )
    fast, generic = (
        value_and_grad(rx.path_statistics, *args),
        value_and_grad(_generic, *args),
    )
    np.testing.assert_allclose(fast[0], generic[0], rtol=VALUE_TOL)
    for out, ref in zip(
        jax.tree.leaves(fast[1]), jax.tree.leaves(generic[1]), strict=True
    ):
        out, ref = np.asarray(out), np.asarray(ref)
        finite = np.isfinite(ref)
        np.testing.assert_array_equal(np.isfinite(out), finite)
        scale = np.max(np.abs(ref[finite]))
        np.testing.assert_allclose(
            out[finite], ref[finite], rtol=0, atol=GRAD_TOL * scale
        )
        assert scale > 0


def test_gradient_memory_does_not_grow_with_times():
    """XLA's buffer assignment for `jax.grad` through 64 saved times: the fast path
    needs a few `(batch, vocab)` buffers (anything kept per time would be 64 of them).
    The generic route (`lax.map` of the same function on `log p`) plans about 280."""
    batch, vocab, times = 4, 4096, 64
    logits = jnp.zeros((batch, vocab), jnp.float32)
    ts = jnp.linspace(0.1, 3.0, times, dtype=jnp.float32)

    def loss(fn, logits):
        stats = rx.solve(
            rx.Replicator(logits, 0.7), t1=ts[-1], saveat=rx.SaveAt(ts=ts, fn=fn)
        ).observables
        return jnp.sum(stats.entropy)

    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
        analysis = compiled.lower(fn, logits).compile().memory_analysis()
        return analysis.temp_size_in_bytes

    row_block = batch * vocab * 4
    fast = temp_bytes(rx.path_statistics)
    assert fast <= 12 * row_block, fast / row_block


def test_needs_a_constant_score():
    flow = rx.EntropicReplicator(
        rx.Logits(jnp.zeros(8)) + rx.FrequencyPenalty(0.5, tau=1.0), 1.0
    )
    with pytest.raises(TypeError, match="constant score"):
        rx.solve(
            flow, t1=1.0, saveat=rx.SaveAt(ts=jnp.array([0.5]), fn=rx.path_statistics)
        )


def test_statistics_of_a_log_p_array():
    # As a plain function of log p (any leading shape), against numpy.
    log_p = jnp.log(jnp.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]]))
    flow = rx.Replicator(
        jnp.array([[1.0, 2.0, 3.0, -jnp.inf], [0.0, 1.0, 2.0, 3.0]]), 1.0
    )
    stats = rx.path_statistics(jnp.zeros(()), log_p, flow)
    p = np.exp(np.asarray(log_p))
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
    np.testing.assert_allclose(stats.entropy, h, rtol=1e-15)
    np.testing.assert_allclose(stats.top_prob, [0.5, 0.4], rtol=1e-15)
    np.testing.assert_allclose(stats.mean_score, [1.75, 2.0], rtol=1e-15)
