"""The fused trajectory kernels (`replicax/_kernels/trajectory.py`) against the jnp
reference and against the closed-form path of `rx.solve`.

Off a GPU the Pallas kernels run in Pallas's interpreter: what is checked here is the
algorithm (chunked online logsumexp, masked blocks, padded times, -inf handling, the
custom JVP), not the Triton lowering, which only a GPU can compile. Sizes are kept small
(V = 300, 5 saved times, 3 rows) because the interpreter is slow to compile.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replicax as rx
from replicax._kernels import affine_moments, affine_trajectory

# log p compared entrywise relative to max(1, |log p|): entries near -300 carry an
# absolute rounding of ~3e-5 in float32 whichever way the normaliser is summed (online
# over blocks here, in one reduction in XLA), so an absolute 1e-6 would test rounding.
TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
# Gradients relative to the largest entry of the reference gradient.
GRAD_TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
# Not a multiple of any block size used below, and padded times (5 -> 8).
VOCAB = 300
BLOCK_V = 64


def _assert_log_p_close(out, ref, tol):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape
    finite = np.isfinite(ref)
    # Off the face (-inf) exactly where the reference is; never NaN or +inf.
    np.testing.assert_array_equal(np.isfinite(out), finite)
    assert np.all(out[~finite] == -np.inf)
    out, ref = out[finite], ref[finite]
    error = np.abs(out - ref) / np.maximum(1, np.abs(ref))
    assert error.max() <= tol, error.max()


def _problem(rng, dtype, rows=3):
    """Centred scores on a random face with masked tokens, a start on that face, and
    coefficients including t = t0 (`a = 0, b = 1`) and an overflowed `a = inf`."""
    logits = rng.normal(size=(rows, VOCAB)) * 4
    face = rng.random((rows, VOCAB)) > 0.3
    face[:, :5] = False  # masked logits
    face[:, 5] = True
    logits[:, 6] = logits[:, 7] = 10.0  # ties at the maximum
    face[:, 6:8] = True
    top = np.max(np.where(face, logits, -np.inf), axis=-1, keepdims=True)
    s = np.where(face, logits - top, 0)
    x = np.where(face, rng.normal(size=(rows, VOCAB)), -np.inf)
    x = x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
    a = np.tile([0.0, 0.05, 1.0, 30.0, np.inf], (rows, 1))
    b = np.tile([1.0, 0.9, 0.5, 0.0, 1.0], (rows, 1))
    cast = lambda y: jnp.asarray(y, dtype)
    return cast(x), cast(s), jnp.asarray(face), cast(a), cast(b)


def test_pallas_equals_jnp_reference():
    # From a given start (the uniform start, which skips `x`, is checked against the
    # default path of `rx.solve` below), with arbitrary `b` and an overflowed `a`.
    x, s, face, a, b = _problem(np.random.default_rng(0), jnp.float32)

    @jax.jit
    def both(x, s, face, a, b):
        return [
            affine_trajectory(
                x, s, face, a, b, kernel=kernel, interpret=True, block_v=BLOCK_V
            )
            for kernel in ("jnp", "pallas")
        ]

    ref, out = both(x, s, face, a, b)
    assert out.dtype == jnp.float32
    _assert_log_p_close(out, ref, TOL[jnp.float32])
    # A distribution at every time (a normaliser per time, not one per row).
    np.testing.assert_allclose(jnp.sum(jnp.exp(out), axis=-1), 1, atol=1e-5)


def test_pallas_moments_equal_jnp_reference():
    """`affine_moments` (the one-read statistics of `rx.path_statistics`): the Pallas
    normaliser kernel with its two extra sums against the jnp reference, from a given
    start and from a uniform one, including `a = 0` and an overflowed `a = inf`. (The
    jnp reference itself is checked against `rx.path_statistics` on `log p` in
    tests/test_statistics.py.)"""
    x, s, face, a, b = _problem(np.random.default_rng(3), jnp.float32)

    @jax.jit
    def both(x, s, face, a, b):
        return [
            affine_moments(
                start, s, face, a, b, kernel=kernel, interpret=True, block_v=BLOCK_V
            )
            for start in (x, None)
            for kernel in ("jnp", "pallas")
        ]

    outs = both(x, s, face, a, b)
    for ref, out in (outs[:2], outs[2:]):
        for name, r, o in zip(("top", "lse", "entropy", "mean_s"), ref, out, strict=True):
            assert o.shape == r.shape == a.shape and o.dtype == jnp.float32
            assert np.all(np.isfinite(np.asarray(o))), name
            error = np.abs(np.asarray(o, np.float64) - np.asarray(r, np.float64))
            assert np.max(error / np.maximum(1, np.abs(np.asarray(r)))) <= TOL[
                jnp.float32
            ], name
    # a = inf from a uniform start: uniform on the tokens at the maximum of `s`.
    num_top = np.sum(np.asarray(face) & (np.asarray(s) == 0), axis=-1)
    for out in outs[2:]:
        np.testing.assert_allclose(out[2][:, -1], np.log(num_top), atol=1e-6)

    # The backward kernel (one read of (x, s), one write of their cotangents) against
    # the jnp scan, for a loss that weights all four outputs at every time.
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(4,) + a.shape), a.dtype)

    def loss(kernel, x, s, a, b):
        out = affine_moments(
            x, s, face, a, b, kernel=kernel, interpret=True, block_v=BLOCK_V
        )
        return sum(jnp.sum(w * y) for w, y in zip(weights, out, strict=True))

    grads = jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)
    for start, argnums in ((x, (0, 1, 2, 3)), (None, (1, 2, 3))):
        ref_grads = grads("jnp", start, s, a, b)
        out_grads = grads("pallas", start, s, a, b)
        for i in argnums:
            assert np.all(np.isfinite(np.asarray(out_grads[i])))
        _assert_grads_close(
            [out_grads[i] for i in argnums],
            [ref_grads[i] for i in argnums],
            GRAD_TOL[jnp.float32],
        )


@functools.cache
def _solve_fn(flow_cls, uniform, kernel):
    """`(log p, gradients)` of `rx.solve` through the given kernel; the loss weights
    every finite log p, so its gradient reaches every token of the face and the
    temperature."""

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def fn(logits, temperature, y0, weights):
        def loss(logits, temperature):
            traj = rx.solve(
                flow_cls(logits, temperature),
                t1=2.0,
                y0=None if uniform else y0,
                saveat=rx.SaveAt(t0=True, ts=jnp.array([0.1, 0.5, 1.0]), t1=True),
                support=rx.TopK(40),
                method=rx.Exact(kernel=kernel, block_v=BLOCK_V),
            )
            log_p = traj.log_p
            return jnp.sum(jnp.where(jnp.isfinite(log_p), weights * log_p, 0)), log_p

        (_, log_p), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            logits, temperature
        )
        return log_p, grads

    return fn


# Both flows, both starts and both dtypes, each flow meeting each start and dtype once.
@pytest.mark.parametrize(
    "flow_cls, uniform, dtype",
    [
        (rx.Replicator, True, jnp.float64),
        (rx.Replicator, False, jnp.float32),
        (rx.EntropicReplicator, True, jnp.float32),
        (rx.EntropicReplicator, False, jnp.float64),
    ],
)
def test_solve_pallas_equals_default_path(flow_cls, uniform, dtype):
    args = _solve_problem(dtype)
    ref, ref_grads = _solve_fn(flow_cls, uniform, "auto")(*args)
    pallas = _solve_fn(flow_cls, uniform, "pallas")
    out, grads = pallas(*args)
    assert out.dtype == dtype
    _assert_log_p_close(out, ref, TOL[dtype])
    _assert_grads_close(grads, ref_grads, GRAD_TOL[dtype])
    # New values of the temperature do not recompile (the kernel choice is static).
    pallas(args[0], args[1] * 2, *args[2:])


def test_solve_jnp_kernel_equals_default_path():
    # The jnp reference as a method: the same expression as `flow.closed_form`, with
    # every time's normaliser from one reduction; equal to rounding, gradients included.
    # (The default path of this problem was compiled by the test above.)
    args = _solve_problem(jnp.float64)
    ref, ref_grads = _solve_fn(rx.EntropicReplicator, False, "auto")(*args)
    out, grads = _solve_fn(rx.EntropicReplicator, False, "jnp")(*args)
    _assert_log_p_close(out, ref, TOL[jnp.float64])
    _assert_grads_close(grads, ref_grads, GRAD_TOL[jnp.float64])


def _solve_problem(dtype):
    rng = np.random.default_rng(1)
    rows = 3
    logits = rng.normal(size=(rows, VOCAB)) * 3
    logits[:, :4] = -np.inf
    logits[:, 10] = logits[:, 11] = 9.0  # tied maximum: both keep their derivative
    y0 = rng.random((rows, VOCAB))
    y0[:, 20:30] = 0.0  # a start that is not on every token
    y0 = y0 / y0.sum(axis=-1, keepdims=True)
    weights = rng.normal(size=(rows, 5, VOCAB))
    return [jnp.asarray(v, dtype) for v in (logits, [0.7, 1.3, 2.0], y0, weights)]


def _assert_grads_close(grads, ref_grads, tol):
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == g_ref.dtype
        scale = np.max(np.abs(np.asarray(g_ref)))
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=tol * scale)


class _NoAffineReplicator(rx.Replicator):
    def closed_form_coefficients(self, dt):
        del dt
        return None


def test_bad_kernel():
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        rx.Exact(kernel="triton")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="`block_v` must be a power of two"):
        rx.Exact(kernel="pallas", block_v=100)
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        affine_trajectory(
            None,
            jnp.zeros(4),
            jnp.ones(4, bool),
            jnp.zeros(2),
            jnp.ones(2),
            kernel="cuda",  # pyright: ignore[reportArgumentType]
        )
    with pytest.raises(ValueError, match="closed_form_coefficients"):
        rx.solve(
            _NoAffineReplicator(jnp.zeros(4)), t1=1.0, method=rx.Exact(kernel="pallas")
        )


def test_kernels_lower_with_triton():
    """The Pallas kernels (forward, and under `vmap` and `grad` as `rx.solve` uses them)
    lower to Triton calls for a CUDA GPU, from this CPU host: every load, store and
    operation is one the Triton lowering accepts (power-of-two blocks, masks). Compiling
    the Triton IR to GPU code needs a GPU and is not checked here."""
    x, s, face, a, b = _problem(np.random.default_rng(2), jnp.float32)

    def loss(x, s, a, b):
        one = functools.partial(affine_trajectory, kernel="pallas")
        log_p = jax.vmap(one)(x, s, face, a, b)
        return jnp.sum(jnp.where(jnp.isfinite(log_p), log_p, 0))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    lowered = jax.jit(grad).trace(x, s, a, b).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    # The two kernels, and no interpreter loop: the backward pass is plain jnp.
    assert text.count("xla.gpu.triton") == 2
    assert "stablehlo.while" not in text

    # The one-read statistics and their gradient: one kernel forward, one backward,
    # and no loop over the times.
    def moments(x, s, a, b):
        one = functools.partial(affine_moments, kernel="pallas")
        return sum(jnp.sum(y) for y in jax.vmap(one)(x, s, face, a, b))

    grad = jax.grad(moments, argnums=(0, 1, 2, 3))
    lowered = jax.jit(grad).trace(x, s, a, b).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("xla.gpu.triton") == 2
    assert "stablehlo.while" not in text
