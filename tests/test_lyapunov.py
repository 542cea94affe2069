"""`rx.lyapunov_exponents` against references computed here without replicax: the
eigenvalues of the tangent Jacobian at a stable node, the zero exponent of a limit cycle
(burn-in and period from scipy), THEORY §5's closed forms for constant logits, and the
flow map's Jacobian by central finite differences of scipy solves (QR of it, its
determinant and singular values).

Compiles are the cost here (each distinct flow, batch shape or static option is one),
so the tests share them: one (E)-payoff problem of V = 3 in one context serves the node,
the cycle, the flow-map and the no-recompile tests.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.special

import replicax as rx
from replicax import _lyapunov

# Shared static options (one compile per problem structure).
INTERVALS = 200
TIGHT = dict(rtol=1e-11, atol=1e-11)
LOOSE = dict(rtol=1e-9, atol=1e-9)

# Cyclic rock-paper-scissors, w < l: a limit cycle under (E) below T_c = (l - w)/6.
L_RPS, W_RPS = 2.0, 1.0
A_RPS = np.array([[0, -L_RPS, W_RPS], [W_RPS, 0, -L_RPS], [-L_RPS, W_RPS, 0]])
T_C = (L_RPS - W_RPS) / 6

# A payoff with a stable interior rest point of (E) at T = 0.5 (found below) whose
# tangent Jacobian has distinct real eigenvalues (about -0.51 and -1.02).
A_NODE = np.array([[1.0, 0.5, -0.3], [0.2, 0.4, 0.1], [-0.5, 0.3, 0.2]])
T_NODE = 0.5


# --------------------------------------------------------------------------------------
# References, in numpy/scipy only


LOGITS = jnp.array([1.0, 0.3, -0.5, 0.2, 0.0, 2.0])
Y0 = jnp.array([0.1, 0.2, 0.3, 0.15, 0.05, 0.2])


def _softmax(x):
    return scipy.special.softmax(x)


def _payoff_field(A, T):
    """(E) with `z = A p` in log space, not centred: `θ̇ = A softmax(θ)/T - θ`."""
    return lambda t, theta: A @ _softmax(theta) / T - theta


def _helmert(p0):
    """The documented fixed frame: Helmert vectors over the tokens by decreasing `p0`
    (columns of a `(V, V - 1)` matrix)."""
    V = len(p0)
    order = np.argsort(-p0, kind="stable")
    basis = np.zeros((V, V - 1))
    for j in range(V - 1):
        scale = 1 / np.sqrt((j + 1) * (j + 2))
        basis[order[: j + 1], j] = scale
        basis[order[j + 1], j] = -(j + 1) * scale
    return basis


def _flow_map_jacobian(field, x0, t1, h=1e-5):
    """Central finite differences of scipy's flow map `x0 -> x(t1)` (DOP853, rtol
    1e-12): error about `h²` plus `1e-12/h`, so about 1e-7 relative."""

    def flow(x):
        out = scipy.integrate.solve_ivp(
            field, (0, t1), x, method="DOP853", rtol=1e-12, atol=1e-13
        )
        assert out.success
        return out.y[:, -1]

    cols = [(flow(x0 + h * e) - flow(x0 - h * e)) / (2 * h) for e in np.eye(len(x0))]
    return np.stack(cols, axis=1)


def _rps_on_cycle():
    """A point on the RPS cycle (on the section `θ_0 = θ_1`, rising) and the period,
    from a scipy burn-in (the cycle attracts like e^{-0.69 t}: 45 time units leave
    e^{-30})."""
    section = lambda t, th: th[0] - th[1]  # noqa: E731
    section.direction = 1
    out = scipy.integrate.solve_ivp(
        _payoff_field(A_RPS, 0.5 * T_C),
        (0, 45),
        np.log([0.5, 0.3, 0.2]),
        method="DOP853",
        rtol=1e-11,
        atol=1e-11,
        events=section,
    )
    times, points = out.t_events[0], out.y_events[0]
    periods = np.diff(times)[-4:]
    assert np.ptp(periods) < 1e-8 * periods[0]  # settled on the cycle
    theta = points[-1]
    return theta - scipy.special.logsumexp(theta), float(np.mean(periods))


def _payoff_flow(A, T):
    return rx.EntropicReplicator(rx.Payoff(jnp.asarray(A)), T)


def _run(flow, **kwargs):
    kwargs = dict(TIGHT, intervals=INTERVALS) | kwargs
    return rx.lyapunov_exponents(flow, **kwargs)


# --------------------------------------------------------------------------------------
# 1. Stable node: the exponents are the eigenvalues of the tangent Jacobian


def test_stable_node_exponents_are_jacobian_eigenvalues():
    # The finite-time error is `log(c)/t`, `c` of order 1 (the initial frame's
    # components on the eigenvectors; measured about 0.45/t here): t1 = 1500 puts it
    # below 1e-3 / 3. The solver's tolerance (1e-9) adds far less.
    tol, t1 = 1e-3, 1500.0
    f = _payoff_field(A_NODE, T_NODE)
    theta = scipy.optimize.fsolve(lambda th: f(0, th), np.zeros(3), xtol=1e-14)
    theta = theta - scipy.special.logsumexp(theta)
    # The tangent Jacobian by central differences of the field, restricted to the
    # mean-zero subspace (orthonormal basis B): Bᵀ J B.
    h = 1e-6
    J = np.stack(
        [(f(0, theta + h * e) - f(0, theta - h * e)) / (2 * h) for e in np.eye(3)], 1
    )
    B = _helmert(_softmax(theta))
    eig = np.linalg.eigvals(B.T @ J @ B)
    assert np.max(np.abs(eig.imag)) == 0 and np.min(eig.real) < np.max(eig.real) - 0.3
    assert np.max(eig.real) < 0  # a stable node

    out = _run(_payoff_flow(A_NODE, T_NODE), t1=t1, log_y0=jnp.asarray(theta), **LOOSE)
    assert out.exponents.shape == (2,)
    np.testing.assert_allclose(out.exponents, np.sort(eig.real)[::-1], atol=tol, rtol=0)
    assert out.result == rx.RESULTS.successful
    np.testing.assert_allclose(out.log_p, theta, atol=1e-8)  # it stays at the node


# --------------------------------------------------------------------------------------
# 2. Limit cycle: one exponent 0, the other negative


def test_rps_limit_cycle_has_a_zero_exponent():
    # The exponent along the loop converges like log(c)/t, c the size of the initial
    # frame's first vector on the loop's direction in the (far from orthogonal) Floquet
    # basis (about e^2.2 here): 300 whole periods (t ≈ 460) put it near 5e-3.
    tol_zero = 1e-2
    theta, period = _rps_on_cycle()
    flow = _payoff_flow(A_RPS, 0.5 * T_C)
    out = _run(flow, t1=300 * period, log_y0=jnp.asarray(theta), **LOOSE)
    largest, other = np.asarray(out.exponents)
    assert abs(largest) <= tol_zero, largest
    assert other < -tol_zero, other
    # Back where it started after whole periods.
    np.testing.assert_allclose(out.log_p, theta, atol=1e-6)


# --------------------------------------------------------------------------------------
# 3. Constant logits: THEORY §5's closed forms, with and without a face


def test_constant_logits_replicator():
    # (R): S = I in log coordinates (THEORY §5, ∂p(t)/∂log p₀ = G(p(t))): every
    # exponent is 0, up to rounding (the frame does not move).
    tol = 1e-8
    # Row 0 on the full vocabulary (5 directions), row 1 on the face of the top 3 (2;
    # with `k=None` the other 3 are reported as -inf).
    out = _run(
        rx.Replicator(LOGITS, 0.7),
        t1=3.0,
        y0=Y0,
        support=rx.TopK(jnp.array([6, 3])),
        intervals=5,
    )
    assert out.exponents.shape == (2, 5)
    np.testing.assert_allclose(out.exponents[0], 0, atol=tol, rtol=0)
    np.testing.assert_allclose(out.exponents[1, :2], 0, atol=tol, rtol=0)
    assert bool(jnp.all(out.exponents[1, 2:] == -jnp.inf))
    # The path is THEORY §1's closed form on each row's face (y0 I-projected onto it).
    s, q0 = np.asarray(LOGITS), np.asarray(Y0)
    for row, face in enumerate((np.ones(6, bool), s >= np.sort(s)[-3])):
        x = np.where(face, np.log(q0) + 3.0 / 0.7 * s, -np.inf)
        x = x - scipy.special.logsumexp(x)
        np.testing.assert_allclose(out.log_p[row], x, atol=1e-9)


def test_constant_scores_entropic():
    # (E): S = e^{-t} I in log coordinates (THEORY §5, ∂p(t)/∂log p₀ = e^{-t} G(p(t))):
    # every exponent is -1. The constant scores are given as a payoff `A = s 1ᵀ`
    # (`A p = s` on the simplex, so `Dz G = s (G 1)ᵀ = 0`): the same problem structure
    # as the payoff tests, which spares a compile. A zero in the start is a face.
    tol = 1e-8
    s, T, t1 = np.array([1.0, -0.5, 0.3]), 0.7, 3.0
    flow = _payoff_flow(np.outer(s, np.ones(3)), T)
    for p0, expected in (([0.2, 0.5, 0.3], [-1, -1]), ([0.4, 0.0, 0.6], [-1, -np.inf])):
        with np.errstate(divide="ignore"):
            log_p0 = np.log(p0)
        out = _run(flow, t1=t1, log_y0=jnp.asarray(log_p0))
        np.testing.assert_allclose(out.exponents, expected, atol=tol, rtol=0)
        x = np.exp(-t1) * log_p0 - np.expm1(-t1) * s / T
        np.testing.assert_allclose(out.log_p, x - scipy.special.logsumexp(x), atol=1e-9)


# --------------------------------------------------------------------------------------
# 4. The flow map's Jacobian: QR of it, its determinant, its singular values


def _check_against_flow_map(exponents, M, t1, tol, fixed_frame=True):
    """`exponents` (all of them) against the tangent flow map `M` written in the fixed
    frame's coordinates (`fixed_frame=False`: the run started from another frame, so
    only what does not depend on it is checked)."""
    if fixed_frame:
        # Exact for the QR method whatever the intervals: the frames multiply,
        # M Q0 = Q R with Q0 = I in these coordinates.
        log_r = np.log(np.abs(np.diag(np.linalg.qr(M)[1]))) / t1
        np.testing.assert_allclose(exponents, np.sort(log_r)[::-1], atol=tol, rtol=0)
    # The sum is the log-volume growth, log|det M| / t (any frame).
    np.testing.assert_allclose(
        np.sum(exponents), np.log(abs(np.linalg.det(M))) / t1, atol=tol, rtol=0
    )
    # Weyl: the diagonal of a triangular R is log-majorised by its singular values,
    # which are at most those of M: partial sums of exponents <= those of log σ / t.
    log_sigma = np.log(np.linalg.svd(M, compute_uv=False)) / t1
    assert np.all(np.cumsum(exponents) <= np.cumsum(log_sigma) + tol)
    # The largest singular value is an independent estimate of the largest exponent;
    # at finite time they differ by O(1/t) (here the frame's first vector is not the
    # top singular vector), so only the bound above is exact.
    assert exponents[0] <= log_sigma[0] + tol


def test_flow_map_jacobian_payoff():
    # Finite differences give M to about 1e-7 relative; the solver's rtol is 1e-11.
    tol, t1 = 1e-6, 2.0
    theta0 = np.log(np.array([0.5, 0.3, 0.2]))
    flow = _payoff_flow(A_RPS, 0.5 * T_C)
    out = _run(flow, t1=t1, log_y0=jnp.asarray(theta0))
    B = _helmert(np.exp(theta0))
    M = B.T @ _flow_map_jacobian(_payoff_field(A_RPS, 0.5 * T_C), theta0, t1) @ B
    _check_against_flow_map(np.asarray(out.exponents), M, t1, tol)


# (E) with logits and a fading frequency penalty (one stage), two contexts: the state is
# (θ, c), the tangent space 2 + 3 directions (the history kept whole).
S_HIST = np.array([1.0, -0.5, 0.3])
ALPHAS, TAU, T_HIST = np.array([1.5, 0.5]), 0.7, 0.6
P0_HIST = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])


def _history_flow(alphas):
    penalty = rx.FrequencyPenalty(jnp.asarray(alphas), TAU)
    return rx.EntropicReplicator(rx.Logits(jnp.asarray(S_HIST)) + penalty, T_HIST)


def test_flow_map_jacobian_with_history():
    tol, t1 = 1e-6, 1.5
    out = _run(_history_flow(ALPHAS), t1=t1, y0=jnp.asarray(P0_HIST))
    # A random initial frame (same compile: the frame is chosen on device): the
    # determinant and the singular-value bounds hold for every frame; the exponents
    # themselves move by O(1/t) at this short horizon.
    out_key = _run(
        _history_flow(ALPHAS), t1=t1, y0=jnp.asarray(P0_HIST), key=jax.random.key(0)
    )
    assert out.exponents.shape == (2, 5)
    for row, (alpha, p0) in enumerate(zip(ALPHAS, P0_HIST, strict=True)):

        def field(t, x, alpha=alpha):
            theta, c = x[:3], x[3:]
            return np.concatenate(
                [(S_HIST - alpha * c) / T_HIST - theta, (_softmax(theta) - c) / TAU]
            )

        x0 = np.concatenate([np.log(p0), p0])  # the memory starts at p0
        frame = np.zeros((6, 5))
        frame[:3, :2] = _helmert(p0)
        frame[3:, 2:] = np.eye(3)
        M = frame.T @ _flow_map_jacobian(field, x0, t1) @ frame
        _check_against_flow_map(np.asarray(out.exponents[row]), M, t1, tol)
        exponents = np.asarray(out_key.exponents[row])
        _check_against_flow_map(exponents, M, t1, tol, fixed_frame=False)


# --------------------------------------------------------------------------------------
# 5. Batch, errors, compiles


def test_batch_equals_loop():
    # Each row alone: its parameters and start repeated over a batch of the same shape
    # (so that no other row is seen, and no compile is added), against the batch.
    t1 = 1.5
    batch = _run(_history_flow(ALPHAS), t1=t1, y0=jnp.asarray(P0_HIST))
    for i in range(2):
        alone = _run(
            _history_flow(np.repeat(ALPHAS[i], 2)),
            t1=t1,
            y0=jnp.asarray(np.repeat(P0_HIST[i : i + 1], 2, axis=0)),
        )
        for field in ("exponents", "log_p"):
            np.testing.assert_allclose(
                getattr(batch, field)[i], getattr(alone, field)[0], rtol=1e-12, atol=0
            )
        assert batch.stats["num_steps"][i] == alone.stats["num_steps"][0]


def test_no_recompile_when_values_change():
    theta0 = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    _run(_payoff_flow(A_RPS, 0.5 * T_C), t1=2.0, log_y0=theta0)
    before = eqx.debug.get_num_traces(_lyapunov._lyapunov_rows)
    _run(
        _payoff_flow(A_RPS, 0.3 * T_C),
        t1=1.0,
        log_y0=jnp.log(jnp.array([0.2, 0.3, 0.5])),
    )
    _run(_payoff_flow(2 * A_RPS, 0.7), t1=0.5, t0=0.1, log_y0=theta0)
    assert eqx.debug.get_num_traces(_lyapunov._lyapunov_rows) == before


def test_bad_inputs():
    flow = rx.Replicator(jnp.array([1.0, 0.0, -1.0]), 1.0)
    with pytest.raises(ValueError, match="`k` must be at most .* 2"):
        rx.lyapunov_exponents(flow, t1=1.0, k=3)
    with pytest.raises(ValueError, match="`k` must be an int"):
        rx.lyapunov_exponents(flow, t1=1.0, k=0)
    with pytest.raises(ValueError, match="`t1` must be > `t0`"):
        rx.lyapunov_exponents(flow, t1=1.0, t0=2.0)
    with pytest.raises(ValueError, match="`t1` must be > `t0`"):
        rx.lyapunov_exponents(flow, t1=1.0, t0=1.0)
    with pytest.raises(ValueError, match="`intervals` must be an int >= 1"):
        rx.lyapunov_exponents(flow, t1=1.0, intervals=0)
    with pytest.raises(ValueError, match="give `k`"):
        rx.lyapunov_exponents(rx.Replicator(jnp.zeros(300)), t1=1.0)
    # (jaxtyping's check of the annotation answers first under the tests)
    with pytest.raises(TypeError, match="key"):
        rx.lyapunov_exponents(flow, t1=1.0, key=0)
    # A face that leaves fewer directions than `k`, at run time with the batch index
    # (the compile of the (R) constant-logits test, where `k=None` pads instead).
    with pytest.raises(Exception, match=r"`k=5` is more than .* batch index \(1,\)"):
        _run(
            rx.Replicator(LOGITS, 0.7),
            t1=3.0,
            y0=Y0,
            support=rx.TopK(jnp.array([6, 3])),
            k=5,
            intervals=5,
        )
