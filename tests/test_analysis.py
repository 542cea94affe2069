"""The analysis tools of THEORY §4: curl, detect_cycle, basins, rps_product.

Every threshold here is a closed form of THEORY §4, reproduced by one batched solve per
sweep (per-row parameters, one compile). Sizes are small (V <= 3 for dynamics) and
horizons short enough for the whole file to run in well under a minute on a CPU.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replicax as rx
from replicax import _analysis, _solve


def _rps(l, w):
    """Generalised rock-paper-scissors of THEORY §4."""
    return np.array([[0.0, -l, w], [w, 0.0, -l], [-l, w, 0.0]])


def _traces(fn):
    return eqx.debug.get_num_traces(fn)


# ----------------------------------------------------------------------------------------
# (1) Hopf bifurcation of RPS under (E), and (6) the sweep is one solve


def test_hopf_temperature_and_period_from_one_sweep():
    # Replicax's (E) is θ̇ = Ap/T - θ: the unscaled field of THEORY §4 divided by T. The
    # centre's eigenvalues are therefore ((l - w)/6 - T ± i ω₀)/T with ω₀ = (l + w)√3/6:
    # the Hopf temperature T_c = (l - w)/6 is unchanged and the linearised period at
    # onset is 2π T_c / ω₀ in replicax's time.
    PERIOD_RTOL = (
        0.05  # the acceptance tolerance (the cycle at 0.95 T_c is not at onset)
    )
    pairs = [(1.0, 0.4), (2.0, 0.5)]
    factors = [1.05, 0.95]
    A, T, onset_period = [], [], []
    for l, w in pairs:
        Tc, omega = (l - w) / 6, (l + w) * np.sqrt(3) / 6
        for f in factors:
            A.append(_rps(l, w))
            T.append(f * Tc)
            onset_period.append(2 * np.pi * Tc / omega)
    flow = rx.EntropicReplicator(rx.Payoff(jnp.asarray(np.stack(A))), jnp.asarray(T))
    # Away from the centre, so that the cycle is reached from outside within the
    # first half (transverse rate ~0.1) and the spiral decays visibly in the second.
    y0 = jnp.array([0.5, 0.3, 0.2])
    ts = jnp.linspace(0.0, 300.0, 6001)
    method = rx.ODE(rtol=1e-8, atol=1e-8, max_steps=20_000)

    before = _traces(_solve._solve_rows)
    sol = rx.solve(flow, t1=300.0, y0=y0, saveat=rx.SaveAt(ts=ts), method=method)
    assert _traces(_solve._solve_rows) - before <= 1  # the four rows: one compile
    found = rx.detect_cycle(sol)

    is_cycle = np.asarray(found.is_cycle).reshape(2, 2)
    np.testing.assert_array_equal(is_cycle, [[False, True], [False, True]])
    assert not np.any(found.converged)
    period = np.asarray(found.period).reshape(2, 2)[:, 1]
    expected = np.asarray(onset_period).reshape(2, 2)[:, 1]
    np.testing.assert_allclose(period, expected, rtol=PERIOD_RTOL)
    # Above T_c the path spirals in: its amplitude decays between the halves.
    assert np.all(np.asarray(found.amplitude_ratio).reshape(2, 2)[:, 0] < 0.5)

    # A second sweep with other temperatures reuses the compiled solve.
    before = _traces(_solve._solve_rows)
    flow2 = rx.EntropicReplicator(flow.score, 1.1 * jnp.asarray(T))
    # (New times do not recompile either: a short run suffices.)
    rx.solve(flow2, t1=3.0, y0=y0, saveat=rx.SaveAt(ts=ts / 100), method=method)
    assert _traces(_solve._solve_rows) == before


# ----------------------------------------------------------------------------------------
# (5) detect_cycle: closed orbits near the boundary, spirals, heteroclinic cycles


def test_detect_cycle_replicator_rps_orbits():
    PRODUCT_RTOL = 1e-6  # p₁p₂p₃ along a closed orbit, ODE at rtol 1e-9 in log space
    # (R) at T = 1: w = l closed orbits (here close to the boundary: p_min ~ 1e-4, a
    # long period), w > l a slow spiral into the centre, w < l a heteroclinic cycle
    # whose passes lengthen.
    A = jnp.asarray(np.stack([_rps(1.0, 1.0), _rps(1.0, 1.05), _rps(1.0, 0.9)]))
    flow = rx.Replicator(rx.Payoff(A), 1.0)
    y0 = jnp.array([[0.9998, 1e-4, 1e-4], [0.6, 0.25, 0.15], [0.6, 0.25, 0.15]])
    ts = jnp.linspace(0.0, 400.0, 4001)
    sol = rx.solve(
        flow,
        t1=400.0,
        y0=y0,
        saveat=rx.SaveAt(ts=ts),
        method=rx.ODE(rtol=1e-9, atol=1e-9, max_steps=50_000),
    )
    found = rx.detect_cycle(sol)
    np.testing.assert_array_equal(found.is_cycle, [True, False, False])
    np.testing.assert_array_equal(found.converged, [False, False, False])
    # The closed orbit: a large amplitude in p, p₁p₂p₃ conserved.
    assert found.amplitude[0] > 0.4
    product = rx.rps_product(sol.log_p[0])
    np.testing.assert_allclose(product, product[0], rtol=PRODUCT_RTOL)
    # The spiral decays (slowly: Re λ = (l - w)/6 ≈ -0.008).
    assert found.amplitude_ratio[1] < 1 - 0.05


def test_detect_cycle_rest_point_and_errors():
    flow = rx.EntropicReplicator(jnp.array([0.0, 1.0, 2.0]), 1.0)
    sol = rx.solve(flow, t1=60.0, saveat=rx.SaveAt(ts=jnp.linspace(0.0, 60.0, 121)))
    found = rx.detect_cycle(sol)
    assert bool(found.converged) and not bool(found.is_cycle)
    # Under a user's `jit`, with traced tolerances: the same answer.
    jitted = jax.jit(lambda s, atol: rx.detect_cycle(s, atol=atol))(sol, 1e-6)
    assert bool(jitted.converged) and not bool(jitted.is_cycle)
    with pytest.raises(ValueError, match="`window`"):
        rx.detect_cycle(sol, window=1.5)
    with pytest.raises(ValueError, match="at least 16"):
        rx.detect_cycle(sol, window=0.1)
    with pytest.raises(ValueError, match="`min_periods`"):
        rx.detect_cycle(sol, min_periods=0)
    with pytest.raises(ValueError, match="`period_rtol`"):
        rx.detect_cycle(sol, period_rtol=-1.0)
    with pytest.raises(TypeError, match="sol"):
        rx.detect_cycle(sol.log_p)
    # As `solve` returns it with `SaveAt(fn=...)`: observables only.
    observed = eqx.tree_at(lambda s: s.log_p, sol, None)
    with pytest.raises(TypeError, match="`log_p`"):
        rx.detect_cycle(observed)


# ----------------------------------------------------------------------------------------
# (2) the saddle of self-reinforcement under (R), (3) the fold under (E)


def test_lock_in_saddle_separates_basins():
    SADDLE_ATOL = 1e-3  # acceptance tolerance; the grid resolves it to 2.5e-4
    beta = jnp.array([2.0, 3.0])
    delta = jnp.array([0.5, 0.3])
    saddle = (1 + delta / beta) / 2  # x* = (1 + δ/β)/2, THEORY §4
    # A grid of x = p₁ around x*, never on it: half a step off.
    step = 5e-4
    offsets = step * (jnp.arange(-10.0, 10.0) + 0.5)
    x = saddle[:, None] + offsets[None, :]
    y0 = jnp.stack([x, 1 - x], axis=-1)
    logits = jnp.stack([jnp.zeros(2), delta], axis=-1)[:, None, :]
    flow = rx.Replicator(rx.Logits(logits) + rx.SelfReinforcement(beta[:, None]), 1.0)
    found = rx.basins(flow, y0, t1=60.0, method=rx.ODE(rtol=1e-10, atol=1e-10))
    assert np.all(found.settled)
    assert jnp.all(found.result == rx.RESULTS.successful)
    for row in range(2):
        wrong = np.asarray(found.token[row]) == 0  # locked onto token 1 (s favours 2)
        # One switch, from the right token below x* to the wrong one above it.
        assert np.all(np.diff(wrong.astype(int)) >= 0) and wrong[-1] and not wrong[0]
        first_wrong = int(np.argmax(wrong))
        boundary = float((x[row, first_wrong - 1] + x[row, first_wrong]) / 2)
        assert abs(boundary - float(saddle[row])) <= SADDLE_ATOL


def test_entropic_fold_of_the_wrong_attractor():
    FOLD_ATOL = 1e-3  # acceptance tolerance; the grid step is 2.5e-4
    T, beta = 0.25, 1.0
    u_f = np.sqrt(1 - 2 * T / beta)
    delta_fold = beta * u_f - 2 * T * np.arctanh(u_f)  # THEORY §4
    step = 2.5e-4
    deltas = delta_fold + step * (np.arange(-12, 12) + 0.5)
    logits = jnp.stack([jnp.zeros(deltas.size), jnp.asarray(deltas)], axis=-1)
    flow = rx.EntropicReplicator(rx.Logits(logits) + rx.SelfReinforcement(beta), T)
    # From next to the wrong vertex: it stays on the wrong attractor iff that exists.
    found = rx.basins(
        flow,
        jnp.array([0.999, 0.001]),
        t1=400.0,
        method=rx.ODE(rtol=1e-10, atol=1e-10, max_steps=20_000),
    )
    wrong = np.asarray(found.token) == 0
    assert wrong[0] and not wrong[-1]
    assert np.all(np.diff(wrong.astype(int)) <= 0)  # one switch
    first_right = int(np.argmin(wrong))
    fold = (deltas[first_right - 1] + deltas[first_right]) / 2
    assert abs(fold - delta_fold) <= FOLD_ATOL
    # Hysteresis: from the right vertex the same δ just below the fold end right.
    back = rx.basins(
        flow,
        jnp.array([0.001, 0.999]),
        t1=400.0,
        method=rx.ODE(rtol=1e-10, atol=1e-10, max_steps=20_000),
    )
    assert np.all(np.asarray(back.token)[first_right - 4 : first_right] == 1)


def test_basins_errors():
    flow = rx.Replicator(rx.Logits(jnp.zeros(2)) + rx.SelfReinforcement(1.0), 1.0)
    with pytest.raises(ValueError, match="`last`"):
        rx.basins(flow, jnp.array([0.4, 0.6]), t1=1.0, last=1.0)
    with pytest.raises(ValueError, match="`atol`"):
        rx.basins(flow, jnp.array([0.4, 0.6]), t1=1.0, atol=-1.0)


# ----------------------------------------------------------------------------------------
# (4) curl


def _relative_antisymmetric(A):
    V = A.shape[-1]
    P = np.eye(V) - np.ones((V, V)) / V
    M = P @ A @ P
    return np.linalg.norm((M - M.T) / 2) / np.linalg.norm(M)


def test_curl_zero_for_gradient_fields(getkey):
    CURL_ATOL = 1e-12
    V = 6
    S = jax.random.normal(getkey(), (V, V))
    S = S + S.T
    a, b = jax.random.normal(getkey(), (2, V))
    A = S + a[:, None] + b[None, :]  # S + a1ᵀ + 1bᵀ
    ones = jnp.ones(V)
    assert not np.allclose(A, A.T)
    log_p = jax.nn.log_softmax(jax.random.normal(getkey(), (4, V)))
    # Logits and self-reinforcement (Dz = βI) are gradient terms too. One flow suffices:
    # the curl depends on the score only.
    score = rx.Logits(ones) + rx.Payoff(A) + rx.SelfReinforcement(2.0)
    value = rx.curl(rx.EntropicReplicator(score, 0.7), log_p)
    assert value.shape == (4,)
    assert np.all(np.asarray(value) <= CURL_ATOL)
    # The same matrix with an antisymmetric part added is not a gradient field.
    K = jax.random.normal(getkey(), (V, V))
    bent = rx.curl(
        rx.EntropicReplicator(
            rx.Logits(ones) + rx.Payoff(A + K - K.T) + rx.SelfReinforcement(2.0), 0.7
        ),
        log_p,
    )
    assert np.all(np.asarray(bent) > 0.1)
    # Constant logits: M = 0, reported as 0 (not NaN).
    assert float(rx.curl(rx.Replicator(ones, 1.0), log_p[0])) == 0.0


def test_curl_matches_the_antisymmetric_part(getkey):
    EXACT_RTOL = 1e-10  # float64; two routes to the same Frobenius norms at V = 512
    ESTIMATE_RTOL = 0.1  # acceptance tolerance; typically ~1% with 32 probes at V = 512
    V = 512
    A = jax.random.normal(getkey(), (2, V, V))  # one payoff per row
    log_p = jax.nn.log_softmax(jax.random.normal(getkey(), (2, V)))
    flow = rx.Replicator(rx.Payoff(A), 1.0)
    exact = rx.curl(flow, log_p, method="exact")
    expected = [_relative_antisymmetric(np.asarray(a)) for a in A]
    np.testing.assert_allclose(exact, expected, rtol=EXACT_RTOL)
    estimate = rx.curl(flow, log_p, method="estimate", key=getkey())
    np.testing.assert_allclose(estimate, exact, rtol=ESTIMATE_RTOL)


def test_curl_on_a_face_and_with_history():
    # Off the face the score is ignored: the curl is that of the kept 3 x 3 block. Row 0
    # is cyclic RPS with w = l, purely antisymmetric on the tangent space (curl 1).
    A = np.stack([_rps(1.0, 1.0), _rps(1.0, 0.5)])
    A = jnp.asarray(np.pad(A, ((0, 0), (0, 1), (0, 1)), constant_values=3.0))
    log_p = jnp.log(jnp.array([0.2, 0.3, 0.5, 0.0]))
    value = rx.curl(rx.Replicator(rx.Payoff(A), 1.0), log_p)
    expected = [1.0, _relative_antisymmetric(_rps(1.0, 0.5))]
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    # A history-only score (cumulative counts) has Dz = 0 in p: curl 0, with `aux`.
    flow = rx.Replicator(rx.Logits(jnp.zeros(3)) + rx.FrequencyPenalty(0.5), 1.0)
    counts = (None, jnp.array([[1.0, 2.0, 0.5], [0.0, 0.1, 0.2]]))
    log_p = jnp.log(jnp.full((2, 3), 1 / 3))
    np.testing.assert_array_equal(rx.curl(flow, log_p, counts), [0.0, 0.0])


def test_curl_errors_and_no_recompile(getkey):
    flow = rx.Replicator(rx.Payoff(jnp.asarray(_rps(1.0, 0.5))), 1.0)
    log_p = jnp.log(jnp.array([0.25, 0.25, 0.5]))
    with pytest.raises(ValueError, match="`method`"):
        rx.curl(flow, log_p, method="hutchinson")
    with pytest.raises(ValueError, match="`key`"):
        rx.curl(flow, log_p, method="estimate")
    with pytest.raises(ValueError, match="`num_probes`"):
        rx.curl(flow, log_p, method="estimate", key=getkey(), num_probes=0)
    with pytest.raises(ValueError, match="`aux`"):
        rx.curl(flow, jnp.stack([log_p, log_p]), jnp.zeros((3, 3)))
    rx.curl(flow, log_p)
    before = _traces(_analysis._curl_rows)
    flow2 = rx.Replicator(rx.Payoff(jnp.asarray(_rps(2.0, 0.1))), 0.5)
    rx.curl(flow2, jnp.log(jnp.array([0.2, 0.3, 0.5])), t=1.0)
    assert _traces(_analysis._curl_rows) == before


def test_fading_memory_threshold_at_vocabulary_fifty():
    # THEORY §4: a two-stage fading memory `z = -alpha c2` at the uniform point (s = 0)
    # is stable iff alpha < alpha_c = 2 V T / tau; a single stage only damps. One batch:
    # the rows share the score `FrequencyPenalty(two stages) + FrequencyPenalty(one
    # stage)` and switch one of them off with alpha = 0 (one compile). The linearisation
    # depends on alpha / (V T) only, so V = 50 behaves as V = 3 does in examples/loops.py
    # (where the threshold is measured to 0.12%); here the verdicts bracket alpha_c to 3%.
    V, T, tau = 50, 0.5, 1.0
    alpha_c = 2 * V * T / tau
    two = np.array([0.97, 1.03, 0.0, 0.0]) * alpha_c
    one = np.array([0.0, 0.0, 2.0, 10.0]) * alpha_c
    score = rx.FrequencyPenalty(jnp.asarray(two), tau=tau, stages=2) + rx.FrequencyPenalty(
        jnp.asarray(one), tau=tau
    )
    flow = rx.Replicator(rx.Logits(jnp.zeros((4, V))) + score, T)
    bump = 1e-3 * np.cos(2 * np.pi * np.arange(V) / V)
    y0 = jnp.asarray(np.broadcast_to((1 + bump) / np.sum(1 + bump), (4, V)))
    ts = jnp.linspace(0.0, 240.0, 2401)
    sol = rx.solve(
        flow, t1=240.0, y0=y0, saveat=rx.SaveAt(ts=ts), method=rx.ODE(rtol=1e-9, atol=1e-12)
    )
    cycles = rx.detect_cycle(sol)
    ratio = np.asarray(cycles.amplitude_ratio)
    # Below the threshold the oscillation decays, above it it grows.
    assert ratio[0] < 1 < ratio[1], ratio
    # One stage: no sustained oscillation at any strength (its linearisation
    # `λ(1 + τλ) + α/(VT) = 0` has roots with negative real part for every α; they are
    # complex for large α, so the decay may ring, but it decays).
    assert not np.any(np.asarray(cycles.is_cycle[2:]))
    assert np.all(np.asarray(cycles.converged[2:])), ratio
    dev = np.asarray(jnp.exp(sol.log_p[2:, -1, :])) - 1 / V
    assert np.all(np.abs(dev) < 1e-6)
