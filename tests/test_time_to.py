"""`time_to`: accuracy down to the smallest resolvable `eps`, monotonicity in `eps`,
float32 against float64, the closed-form bounds, implicit gradients, and refusals.

The reference is computed here in numpy's long double, from the definitions of THEORY §1
(`1 - p_K(t)` by direct summation; `KL(p(t) ‖ π)` by direct summation while it is not
small, and from the cumulants of `d = log p₀ - log π` under `π` once it is), with its own
bisection: it shares nothing with replicax's formulas.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx

from .helpers import FLOWS, random_logits, random_simplex


# float32 against float64 (the contract of `time_to`'s docstring).
RTOL_F32 = 1e-3
# float64 against the long-double reference: the bisection stops at 16 ulps of t, and
# the distance is accurate to a few ulps.
RTOL_F64 = 1e-10
# Implicit gradient against central differences with relative step FD_STEP (float64).
FD_STEP = 1e-6
RTOL_GRAD = 1e-5
VOCAB = 20
GRID = 64
TEMPERATURE = 0.7
RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


def _eps_grid(dtype):
    """`1` down to the smallest `eps` resolvable in `dtype`, both ends included; the same
    length for both dtypes, so that every test reuses one compiled `time_to`."""
    return np.geomspace(1.0, float(jnp.finfo(dtype).tiny), GRID)


def _problem(getkey, vocab=VOCAB):
    logits = np.array(random_logits(getkey(), (vocab,)))
    logits[3] = -np.inf  # a masked token: the formulas hold on the face
    y0 = np.asarray(random_simplex(getkey(), (vocab,)))
    return logits, y0


def _flow(flow_cls, logits, dtype):
    return flow_cls(jnp.asarray(logits, dtype), TEMPERATURE)


def _time_to(flow_cls, logits, y0, eps, dtype, **kwargs):
    flow = _flow(flow_cls, logits, dtype)
    out = rx.time_to(flow, jnp.asarray(eps, dtype), y0=jnp.asarray(y0, dtype), **kwargs)
    return np.asarray(out, np.float64)


# ----------------------------------------------------------------------------------------
# Long-double reference

_CUMULANTS = 12


def _ld_lse(x, axis=-1):
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def _reference_log_distance(flow_cls, logits, y0, temperature=TEMPERATURE):
    """`t -> log(distance at t)` in long double, for `t` of any shape."""
    ld = np.longdouble
    alive = np.isfinite(logits) & (y0 > 0)
    s = np.asarray(logits[alive], ld) / ld(temperature)
    log_p0 = np.log(np.asarray(y0[alive], ld))
    log_p0 = log_p0 - _ld_lse(log_p0)
    if flow_cls is rx.Replicator:
        losers = s < np.max(s)

        def log_distance(t):
            theta = log_p0 + np.asarray(t, ld)[..., None] * s
            return _ld_lse(np.where(losers, theta, -np.inf)) - _ld_lse(theta)

        return log_distance
    log_pi = s - _ld_lse(s)
    pi = np.exp(log_pi)
    d = log_p0 - log_pi
    d = d - np.sum(pi * d)
    # Cumulants of d under π from its moments (d is centred, so raw = central).
    mu = [np.sum(pi * d**k) for k in range(_CUMULANTS + 1)]
    kappa = [ld(0)] * (_CUMULANTS + 1)
    for n in range(1, _CUMULANTS + 1):
        kappa[n] = mu[n] - sum(
            math.comb(n - 1, k - 1) * kappa[k] * mu[n - k] for k in range(1, n)
        )

    def log_distance(t):
        a = np.exp(-np.asarray(t, ld))[..., None]
        x = a * d
        log_p = log_pi + x - _ld_lse(log_pi + x)[..., None]
        direct = np.sum(np.exp(log_p) * (log_p - log_pi), axis=-1)
        # KL(a) = a K'(a) - K(a) = Σ_n (n - 1) κ_n a^n / n!, K the cumulant generating
        # function of d under π: exact to long double once a |d| < 1e-2, where the
        # direct sum would lose digits to rounding of log p.
        a = a[..., 0]
        series = sum(
            (n - 1) * kappa[n] * a**n / ld(math.factorial(n))
            for n in range(2, _CUMULANTS + 1)
        )
        small = a * np.max(np.abs(d)) < 1e-2
        return np.log(np.where(small, series, direct))

    return log_distance


def _reference_time_to(flow_cls, logits, y0, eps):
    log_distance = _reference_log_distance(flow_cls, logits, y0)
    log_eps = np.log(np.asarray(eps, np.longdouble))
    lo = np.zeros_like(log_eps)
    hi = np.full_like(log_eps, 1.0)
    while np.any(log_distance(hi) > log_eps):
        hi = np.where(log_distance(hi) > log_eps, 2 * hi, hi)
    for _ in range(120):
        mid = (lo + hi) / 2
        above = log_distance(mid) > log_eps
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where(log_distance(np.zeros_like(hi)) <= log_eps, 0, hi).astype(np.float64)


# ----------------------------------------------------------------------------------------
# Accuracy and monotonicity


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_monotone_in_eps_down_to_the_smallest(getkey, flow_cls, dtype):
    logits, y0 = _problem(getkey)
    eps = _eps_grid(dtype)
    t = _time_to(flow_cls, logits, y0, eps, dtype)
    assert np.all(np.isfinite(t))
    assert np.all(np.diff(t) >= 0)
    # Strictly increasing once the start is no longer within eps.
    positive = t[:-1] > 0
    assert np.all(np.diff(t)[positive] > 0)
    assert t[-1] > 0


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_float64_matches_long_double_reference(getkey, flow_cls):
    logits, y0 = _problem(getkey)
    eps = _eps_grid(jnp.float64)
    t = _time_to(flow_cls, logits, y0, eps, jnp.float64)
    reference = _reference_time_to(flow_cls, logits, y0, eps)
    np.testing.assert_allclose(t, reference, rtol=RTOL_F64, atol=0)


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_float32_matches_float64(getkey, flow_cls):
    logits, y0 = _problem(getkey)
    eps = _eps_grid(jnp.float32)
    t32 = _time_to(flow_cls, logits, y0, eps, jnp.float32)
    t64 = _time_to(flow_cls, logits, y0, eps, jnp.float64)
    np.testing.assert_allclose(t32, t64, rtol=RTOL_F32, atol=0)


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_bound_is_above_the_exact_time(getkey, flow_cls, dtype):
    logits, y0 = _problem(getkey)
    eps = _eps_grid(dtype)
    t = _time_to(flow_cls, logits, y0, eps, dtype)
    bound = _time_to(flow_cls, logits, y0, eps, dtype, bound=True)
    reference = _reference_time_to(flow_cls, logits, y0, eps)
    assert np.all(bound >= t)
    assert np.all(bound >= reference * (1 - RTOL_F64))


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_zero_when_already_within_eps(getkey, flow_cls):
    logits, y0 = _problem(getkey)
    reference = _reference_log_distance(flow_cls, logits, y0)
    start = float(np.exp(reference(0.0)))
    # Rows: a face of one token; a start on one token; eps just above and just below
    # the distance at t = 0.
    one_token = np.full(VOCAB, -np.inf)
    one_token[5] = 1.0
    logits = np.stack([one_token, logits, logits, logits])
    y0 = np.stack([np.full(VOCAB, 1 / VOCAB), np.eye(VOCAB)[7], y0, y0])
    eps = np.array([1e-300, 1e-300, 1.001 * start, 0.999 * start])

    def loss(logits):
        t = rx.time_to(flow_cls(logits, TEMPERATURE), eps, y0=y0)
        return jnp.sum(t), t

    # One compiled program gives the times and the gradient of their sum.
    (_, t), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(logits))
    t, grad = np.asarray(t), np.asarray(grad)
    np.testing.assert_array_equal(t[:3], 0.0)
    assert t[3] > 0
    finite = np.isfinite(logits)
    np.testing.assert_array_equal(grad[:3][finite[:3]], 0.0)
    assert np.all(np.isfinite(grad[3][finite[3]]))
    assert np.any(grad[3] != 0)


# ----------------------------------------------------------------------------------------
# Gradients


def _time_to_loss(flow_cls, logits, temperature, log_eps, start):
    flow = flow_cls(logits, temperature)
    return rx.time_to(flow, jnp.exp(log_eps), log_y0=jax.nn.log_softmax(start))


# One compiled program per flow, shared by both values of eps, gives the gradients and
# the values the finite differences need.
_time_to_value_and_grad = jax.jit(
    jax.value_and_grad(_time_to_loss, argnums=(1, 2, 3, 4)), static_argnums=0
)


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("eps", [1e-3, 1e-200])
def test_implicit_gradient_matches_finite_differences(getkey, flow_cls, eps):
    logits = random_logits(getkey(), (7,), scale=2.0)
    start = random_logits(getkey(), (7,), scale=1.0)
    # Strongly typed scalars: the perturbed ones below are, and a change of weak type
    # would compile again.
    scalars = (jnp.asarray(0.8, jnp.float64), jnp.log(jnp.asarray(eps, jnp.float64)))
    args = (logits, *scalars, start)
    f = lambda *a: _time_to_value_and_grad(flow_cls, *a)[0]
    grads = _time_to_value_and_grad(flow_cls, *args)[1]
    for i, (x, grad) in enumerate(zip(args, grads)):
        h = FD_STEP * max(1.0, float(jnp.max(jnp.abs(x))))
        fd = []
        for e in np.eye(x.size).reshape((x.size,) + x.shape):
            plus = list(args)
            minus = list(args)
            plus[i] = x + h * e
            minus[i] = x - h * e
            fd.append((f(*plus) - f(*minus)) / (2 * h))
        fd = np.reshape(fd, x.shape)
        np.testing.assert_allclose(grad, fd, rtol=RTOL_GRAD, atol=RTOL_GRAD * np.max(np.abs(fd)))


# ----------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_refuses_unresolvable_eps_eagerly(dtype):
    flow = _flow(rx.EntropicReplicator, np.arange(4.0), dtype)
    tiny = float(jnp.finfo(dtype).tiny)
    for bad in [0.0, -1e-3, np.nan, np.inf, tiny / 2]:
        with pytest.raises(ValueError, match="`eps` must be finite and > 0, and at least"):
            rx.time_to(flow, bad)
    with pytest.raises(ValueError, match=r"smallest normal .*received -1"):
        rx.time_to(flow, np.array([1e-3, -1.0]))
    # Host arrays are checked now whatever their size; so are small device arrays.
    with pytest.raises(ValueError, match=r"smallest normal .*received 0"):
        rx.time_to(flow, np.full(10_000, 0.0))
    with pytest.raises(ValueError, match=r"smallest normal .*received nan"):
        rx.time_to(flow, jnp.array([1e-3, jnp.nan], dtype))


# The device check does not depend on the flow: one flow each for jit and vmap.


def test_refuses_unresolvable_eps_under_jit():
    flow = _flow(rx.Replicator, np.arange(4.0), jnp.float32)
    run = jax.jit(lambda eps: rx.time_to(flow, eps))
    assert np.all(np.isfinite(run(jnp.array([1e-3, 1.2e-38], jnp.float32))))
    for bad in [0.0, 1e-39, -1.0, np.nan, np.inf]:
        eps = jnp.array([1e-3, bad, 1e-6], jnp.float32)
        with pytest.raises(
            RUNTIME_ERRORS, match=r"`eps` must be finite .* at batch index \(1,\)"
        ):
            jax.block_until_ready(run(eps))


def test_refuses_unresolvable_eps_under_vmap():
    flow = _flow(rx.EntropicReplicator, np.arange(4.0), jnp.float64)
    run = jax.vmap(lambda eps: rx.time_to(flow, eps))
    assert np.all(np.isfinite(run(jnp.array([1e-3, 2.3e-308]))))
    with pytest.raises(RUNTIME_ERRORS, match=r"`eps` must be finite and > 0, and at least"):
        jax.block_until_ready(run(jnp.array([1e-3, 1e-310])))
