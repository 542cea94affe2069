"""`rx.equilibrium`: rest points of state-dependent flows, their stability and their
implicit gradients (THEORY §4).

Compilation dominates the cost of these tests, so most of them read one module-scoped
batch: a single score structure at `V = 3`,

    Logits(s) + SelfReinforcement(β) + Payoff(A) + FrequencyPenalty(α, τ, stages=2)

under (E), with every parameter given per row. Each problem of THEORY §4 is a set of
rows of that batch with the other terms switched off (`β = 0`, `A = 0`, `α = 0`; a third
token masked with `-inf` for the two-token fold). Switched-off terms change neither the
rest points nor their stability: with `α = 0` the memory does not feed back on the
state, so the Jacobian is block triangular and the memory only adds the eigenvalues
`-1/τ = -2`, left of every leading eigenvalue checked here. One `jax.jit` computes the
equilibria of all rows and the implicit gradient of a loss of the base row.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
import scipy.special

import replicax as rx
from replicax import _equilibrium

# Tolerances (float64).
FOLD_RTOL = 1e-10  # the fixed-point equation u = tanh((βu - δ)/2T)
EIG_ATOL = 1e-8  # eigenvalues of the RPS centre against THEORY's closed form
GRAD_RTOL = 1e-6  # implicit gradients against central differences
FD_STEP = 1e-5  # central differences: error ~ h² (1e-10) + eps/h (1e-11)
RESIDUAL_ATOL = 1e-12  # max |θ̇| at a converged rest point
ODE_ATOL = 1e-7  # a long ODE path against the rest point it converges to
SAME_POINT = 1e-6  # two equilibria closer than this in u = p₁ - p₂ are the same

VOCAB = 3
TAU = 0.5  # memory time constant of every row (eigenvalue -1/τ where α = 0)
BETA_FOLD, T_FOLD = 1.0, 0.25
U_FOLD = np.sqrt(1 - 2 * T_FOLD / BETA_FOLD)  # THEORY §4: u_f = sqrt(1 - 2T/β)
DELTA_FOLD = U_FOLD - 2 * T_FOLD * np.arctanh(U_FOLD)  # = 0.2664...
FOLD_DELTAS = (DELTA_FOLD - 1e-3, DELTA_FOLD + 1e-3)
FOLD_STARTS = np.linspace(0.02, 0.98, 9)  # p₁ of the starts
RPS_L, RPS_W = 1.0, 0.4
RPS_TC = (RPS_L - RPS_W) / 6  # THEORY §4: Hopf at T_c = (l - w)/6
RPS_TEMPERATURES = (0.8 * RPS_TC, 1.2 * RPS_TC)

# The base row of the gradient test: every term on, a unique, stable rest point.
BASE = dict(
    logits=np.array([0.3, -0.2, 0.5]),
    temperature=0.7,
    beta=0.4,
    A=0.3 * np.array([[0.2, -1.0, 0.5], [0.7, 0.1, -0.4], [-0.3, 0.6, -0.2]]),
    alpha=0.5,
    tau=0.8,
)
BASE_Y0 = np.array([0.5, 0.2, 0.3])
LOSS_WEIGHTS = np.array([1.0, -2.0, 0.5])  # loss = Σ_i w_i log p_i of the base row
GROUPS = ("logits", "temperature", "beta", "A", "alpha", "tau")


def _rps_matrix(l, w):
    return np.array([[0.0, -l, w], [w, 0.0, -l], [-l, w, 0.0]])


def _zoo_flow(params):
    score = (
        rx.Logits(params["logits"])
        + rx.SelfReinforcement(params["beta"])
        + rx.Payoff(params["A"])
        + rx.FrequencyPenalty(params["alpha"], tau=params["tau"], stages=2)
    )
    return rx.EntropicReplicator(score, params["temperature"])


def _zoo_rows():
    """Per-row parameters and starts: fold rows, RPS rows, then the base row and its
    central-difference neighbours (base ± h·d along one direction d per group)."""
    rows, starts, tags = [], [], []

    def add(tag, y0, **params):
        full = dict(
            logits=np.zeros(VOCAB), temperature=1.0, beta=0.0, A=np.zeros((3, 3)),
            alpha=0.0, tau=TAU,
        )
        full.update(params)
        rows.append(full)
        starts.append(np.asarray(y0, np.float64))
        tags.append(tag)

    for delta in FOLD_DELTAS:
        for p1 in FOLD_STARTS:
            add(
                ("fold", delta),
                [p1, 1 - p1, 0.0],
                logits=np.array([0.0, delta, -np.inf]),
                temperature=T_FOLD,
                beta=BETA_FOLD,
            )
    for temperature in RPS_TEMPERATURES:
        add(
            ("rps", temperature),
            [0.3, 0.33, 0.37],
            A=_rps_matrix(RPS_L, RPS_W),
            temperature=temperature,
        )
    directions = _directions()
    add(("base",), BASE_Y0, **BASE)
    for group in GROUPS:
        for sign in (1, -1):
            shifted = dict(BASE)
            shifted[group] = BASE[group] + sign * FD_STEP * directions[group]
            add(("fd", group, sign), BASE_Y0, **shifted)
    params = {
        k: np.stack([np.asarray(r[k], np.float64) for r in rows]) for k in rows[0]
    }
    return params, np.stack(starts), tags


def _directions():
    rng = np.random.default_rng(0)
    return {
        g: rng.standard_normal(np.shape(BASE[g])) if np.ndim(BASE[g]) else 1.0
        for g in GROUPS
    }


@jax.jit
def _zoo_run(params, y0, throw):
    base = jnp.arange(y0.shape[0]) == ZOO_BASE_INDEX

    def loss(params):
        eq = rx.equilibrium(
            _zoo_flow(params), y0=y0, method=rx.RestPoint(throw=throw)
        )
        finite = jnp.where(jnp.isfinite(eq.log_p), eq.log_p, 0)
        per_row = finite @ jnp.asarray(LOSS_WEIGHTS)
        return jnp.sum(jnp.where(base, per_row, 0)), (per_row, eq)

    return jax.grad(loss, has_aux=True)(params)


ZOO_PARAMS, ZOO_Y0, ZOO_TAGS = _zoo_rows()
ZOO_BASE_INDEX = ZOO_TAGS.index(("base",))


@pytest.fixture(scope="module")
def zoo():
    grads, (per_row, eq) = _zoo_run(ZOO_PARAMS, ZOO_Y0, jnp.asarray(False))
    return grads, np.asarray(per_row), eq


def _rows(tag_prefix):
    return [i for i, tag in enumerate(ZOO_TAGS) if tag[: len(tag_prefix)] == tag_prefix]


# --------------------------------------------------------------------------------------
# THEORY §4: the self-reinforcement fold under (E)


def test_fold_number_of_stable_equilibria(zoo):
    _, _, eq = zoo
    p = np.exp(np.asarray(eq.log_p))
    u = p[:, 0] - p[:, 1]
    counts = []
    for delta in FOLD_DELTAS:
        rows = _rows(("fold", delta))
        ok = np.asarray(eq.result == rx.RESULTS.successful)[rows]
        stable_u = sorted(u[rows][ok & np.asarray(eq.stable)[rows]])
        gaps = np.diff(stable_u)
        distinct = len(stable_u) - int(np.sum(gaps <= SAME_POINT))
        counts.append(distinct)
        # Every equilibrium found (stable or not) solves u = tanh((βu - δ)/(2T)).
        found = u[rows][ok]
        np.testing.assert_allclose(
            found,
            np.tanh((BETA_FOLD * found - delta) / (2 * T_FOLD)),
            rtol=0,
            atol=FOLD_RTOL,
        )
        assert np.all(p[rows][ok, 2] == 0)  # the masked token stays off
    # Below the fold: the right attractor (u < 0) and the wrong one (u > u_f) are both
    # stable; above it the wrong one has vanished.
    assert counts == [2, 1]


def test_fold_stability_matches_the_one_dimensional_slope(zoo):
    """On the face {1, 2}, u̇ has slope -(1 - (β/2T)(1 - u²)) at a rest point, times the
    factor 1 (θ-space and u-space Jacobians are similar): the leading eigenvalue."""
    _, _, eq = zoo
    rows = _rows(("fold",))
    ok = np.asarray(eq.result == rx.RESULTS.successful)[rows]
    u = np.exp(np.asarray(eq.log_p))[rows][ok] @ np.array([1.0, -1.0, 0.0])
    slope = -(1 - BETA_FOLD / (2 * T_FOLD) * (1 - u**2))
    lead = np.asarray(eq.leading_eigenvalue)[rows][ok]
    np.testing.assert_allclose(lead.real, slope, rtol=0, atol=EIG_ATOL)
    np.testing.assert_array_equal(np.asarray(eq.stable)[rows][ok], slope < 0)


# --------------------------------------------------------------------------------------
# THEORY §4: the rock-paper-scissors centre and its Hopf bifurcation under (E)


def test_rps_centre_hopf(zoo):
    """THEORY writes (E) unscaled, ṗ = p[(Ap - T log p) - mean], with eigenvalues
    (l-w)/6 - T ± i(l+w)√3/6 at the centre. replicax's (E) is θ̇ = z/T - θ, i.e.
    ṗ = p[(Ap/T - log p) - mean]: the same field divided by T. Its eigenvalues are
    those divided by T (the θ-space and p-space Jacobians are similar at a rest point),
    so the sign, and T_c = (l-w)/6, do not change."""
    _, _, eq = zoo
    for temperature, stable in zip(RPS_TEMPERATURES, (False, True), strict=True):
        (row,) = _rows(("rps", temperature))
        np.testing.assert_allclose(np.exp(np.asarray(eq.log_p)[row]), 1 / 3, atol=1e-12)
        expected = complex(
            ((RPS_L - RPS_W) / 6 - temperature) / temperature,
            (RPS_L + RPS_W) * np.sqrt(3) / 6 / temperature,
        )
        assert abs(complex(eq.leading_eigenvalue[row]) - expected) <= EIG_ATOL
        assert bool(eq.stable[row]) == stable


# --------------------------------------------------------------------------------------
# Implicit gradients


def test_implicit_gradients_match_central_differences(zoo):
    grads, per_row, eq = zoo
    assert bool((eq.result == rx.RESULTS.successful)[ZOO_BASE_INDEX])
    assert bool(eq.stable[ZOO_BASE_INDEX])
    directions = _directions()
    for group in GROUPS:
        (plus,) = _rows(("fd", group, 1))
        (minus,) = _rows(("fd", group, -1))
        fd = (per_row[plus] - per_row[minus]) / (2 * FD_STEP)
        gradient = np.asarray(grads[group][ZOO_BASE_INDEX])
        implicit = float(np.sum(gradient * directions[group]))
        if group == "tau":
            # At rest every memory stage equals p whatever τ: the rest point does not
            # depend on τ (only its stability does), and both derivatives vanish.
            assert implicit == 0 and abs(fd) <= 1e-12, (implicit, fd)
            continue
        assert abs(implicit - fd) <= GRAD_RTOL * abs(fd), (group, implicit, fd)


def _two_token_flow(logits, temperature=0.5):
    score = rx.Logits(logits) + rx.SelfReinforcement(1.0)
    return rx.EntropicReplicator(score, temperature)


def _residual_size(max_steps, adjoint):
    """Total size of what the VJP of a rest point keeps for the backward pass."""

    def loss(s):
        method = rx.RestPoint(max_steps=max_steps, adjoint=adjoint)
        eq = rx.equilibrium(_two_token_flow(s), y0=jnp.array([0.9, 0.1]), method=method)
        return jnp.sum(eq.log_p)

    out = jax.eval_shape(lambda s: jax.vjp(loss, s)[1], jnp.array([0.0, 0.3]))
    return sum(x.size for x in jax.tree_util.tree_leaves(out))


def test_gradient_cost_does_not_grow_with_iterations():
    """The VJP of a rest point keeps the same residuals whatever the iteration budget
    (what the implicit function theorem needs: the root and the parameters), so its
    backward pass is one linear solve; through the iterations
    (`RecursiveCheckpointAdjoint`) it keeps checkpoints of the iterates, whose number
    grows with `max_steps`."""
    # (`max_steps=1` is also the search of `test_failed_search_...`: one trace.)
    implicit_1 = _residual_size(1, None)
    implicit_500 = _residual_size(500, None)
    through_500 = _residual_size(500, optx.RecursiveCheckpointAdjoint())
    assert implicit_1 == implicit_500
    assert through_500 > 2 * implicit_500


# --------------------------------------------------------------------------------------
# What an equilibrium is


def test_residual_and_quantal_response(zoo):
    _, _, eq = zoo
    ok = np.asarray(eq.result == rx.RESULTS.successful)
    assert np.all(np.asarray(eq.residual)[ok] <= RESIDUAL_ATOL)
    # p = softmax(z(p)/T) with the memory at rest (c = p), on the face (numpy).
    params = ZOO_PARAMS
    p = np.exp(np.asarray(eq.log_p))
    face = np.isfinite(params["logits"])
    z = (
        np.where(face, params["logits"], 0)
        + params["beta"][:, None] * p
        + np.einsum("rij,rj->ri", params["A"], p)
        - params["alpha"][:, None] * p
    )
    target = scipy.special.softmax(
        np.where(face, z / params["temperature"][:, None], -np.inf), axis=-1
    )
    np.testing.assert_allclose(p[ok], target[ok], rtol=0, atol=1e-12)


def test_long_ode_path_ends_at_the_stable_equilibrium(zoo):
    """The path of `rx.solve` (log-weights and memory) from near the stable rest point
    of the base row ends at it. Explicit Euler with a small constant step is enough
    (and compiles quickly): its fixed points are exactly the zeros of the field, and
    near a stable node it converges to them."""
    _, _, eq = zoo
    base = jax.tree_util.tree_map(lambda x: x[ZOO_BASE_INDEX], ZOO_PARAMS)
    log_p = np.asarray(eq.log_p[ZOO_BASE_INDEX])
    start = np.exp(log_p) * np.array([1.05, 0.95, 1.0])
    sol = rx.solve(
        _zoo_flow(base),
        y0=start / start.sum(),
        t1=60.0,
        solver=diffrax.Euler(),
        dt0=0.05,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=1200,
    )
    np.testing.assert_allclose(np.asarray(sol.log_p[-1]), log_p, rtol=0, atol=ODE_ATOL)
    # The memory of the penalty (both stages) has come to rest at p.
    memory = np.asarray(sol.aux[3][-1])
    np.testing.assert_allclose(
        memory, np.broadcast_to(np.exp(log_p), memory.shape), rtol=0, atol=ODE_ATOL
    )


# --------------------------------------------------------------------------------------
# Failures, bad input, recompiles


def test_failed_search_result_throw_and_no_recompile():
    traces = lambda: eqx.debug.get_num_traces(_equilibrium._equilibrium_rows)  # noqa: E731

    def search(logits, temperature, y0, throw):
        method = rx.RestPoint(max_steps=1, throw=throw)
        flow = _two_token_flow(logits, temperature)
        return rx.equilibrium(flow, y0=y0, method=method)

    # One Newton step cannot both move and confirm convergence: the search fails.
    eq = search(np.array([0.0, 0.3]), 0.5, np.array([0.9, 0.1]), False)
    traced = traces()
    assert bool(eq.result == rx.RESULTS.rest_point_not_found)
    assert not bool(eq.stable) and np.isnan(complex(eq.leading_eigenvalue).real)
    assert "did not converge" in rx.RESULTS[eq.result]
    with pytest.raises(Exception, match="did not converge"):
        search(np.array([0.1, -0.2]), 0.3, np.array([0.2, 0.8]), True)
    # New values of the logits, the temperature, the start and `throw`: no recompile.
    assert traces() == traced


def test_bad_input():
    with pytest.raises(ValueError, match="FrequencyPenalty.*tau=None.*fading memory"):
        rx.equilibrium(
            rx.EntropicReplicator(rx.Logits(jnp.zeros(3)) + rx.FrequencyPenalty(0.3))
        )
    with pytest.raises(ValueError, match="`flow`.*rx.limit_log_p"):
        rx.equilibrium(rx.Replicator(jnp.array([0.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match="rx.equilibrium"):
        rx.solve(rx.EntropicReplicator(jnp.zeros(3)), t1=1.0, method=rx.RestPoint())
    with pytest.raises(TypeError, match="rest points"):
        rx.equilibrium(rx.EntropicReplicator(jnp.zeros(3)), method=rx.ODE())
    with pytest.raises(ValueError, match="eigensolver"):
        rx.RestPoint(eigensolver="lanczos")


# --------------------------------------------------------------------------------------
# Large vocabularies: matrix-free Newton (BiCGStab) and Arnoldi


def test_arnoldi_and_matrix_free_newton_at_v300():
    """(E) with a low-rank payoff `A = U Wᵀ` whose columns have mean 0 and zero logits:
    the uniform point is a rest point (`z = 0` there), and the tangent Jacobian is
    `P U Wᵀ P / (V T) - P`, so its eigenvalues are those of the `r x r` matrix
    `Wᵀ U / (V T)` minus 1, and -1. Arnoldi sees an invariant Krylov space after
    `r + 1` steps, so its Ritz value is exact here; the reference is numpy's `eig` of
    the small matrix (independent of replicax's dense branch). `dense_max=64` switches
    both the Newton steps (to matrix-free BiCGStab) and the eigensolver (to Arnoldi)."""
    vocab, rank, temperature = 300, 3, 1.0
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, vocab, rank))
    u -= u.mean(axis=1, keepdims=True)
    # W = U R with R a rotation-and-scaling: Wᵀ U ≈ V Rᵀ has a complex leading pair
    # (about 1 ± i, times V) with a positive real part.
    w = u @ np.array([[1.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    small = np.linalg.eigvals(np.einsum("bvi,bvj->bij", w, u) / (vocab * temperature))
    assert np.all(small.real.max(axis=1) > 0)
    # Scale each row's payoff so that the leading real part is -0.5 (stable) or +0.5.
    scale = np.array([0.5, 1.5]) / small.real.max(axis=1)
    u = u * scale[:, None, None]
    expected = small[np.arange(2), small.real.argmax(axis=1)] * scale - 1
    flow = rx.EntropicReplicator(rx.LowRankPayoff(u, w), temperature)
    y0 = jax.nn.softmax(1e-3 * jnp.asarray(rng.standard_normal((2, vocab))))
    eq = rx.equilibrium(flow, y0=y0, method=rx.RestPoint(dense_max=64, krylov_dim=16))
    np.testing.assert_allclose(np.exp(np.asarray(eq.log_p)), 1 / vocab, rtol=1e-10)
    np.testing.assert_allclose(eq.leading_eigenvalue.real, expected.real, atol=EIG_ATOL)
    np.testing.assert_allclose(
        np.abs(eq.leading_eigenvalue.imag), np.abs(expected.imag), atol=EIG_ATOL
    )
    np.testing.assert_array_equal(np.asarray(eq.stable), [True, False])


def test_arnoldi_equals_dense_when_the_krylov_space_fills_the_tangent_space():
    """(E) with self-reinforcement at V = 64: most tokens have p ≈ 0 at the rest point,
    so `1ᵀJ` is large and the Krylov space nearly degenerate (Arnoldi's residual falls
    to ~1e-9 without breaking down). Rounding then left components along the gauge
    direction `1` in the basis, which the last, tiny residual blew up into a basis
    vector with Ritz value 0 (reported as the leading eigenvalue, "neutral", where the
    dense eigensolver gives -0.48). Arnoldi with the whole Krylov space must agree with
    the dense eigensolver."""
    logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 64), jnp.float64)
    flow = rx.EntropicReplicator(rx.Logits(logits) + rx.SelfReinforcement(1.0), 0.7)
    dense = rx.equilibrium(flow, method=rx.RestPoint(eigensolver="dense"))
    arnoldi = rx.equilibrium(flow, method=rx.RestPoint(eigensolver="arnoldi"))
    assert np.all(dense.leading_eigenvalue.real < -0.4)
    np.testing.assert_allclose(
        arnoldi.leading_eigenvalue, dense.leading_eigenvalue, atol=EIG_ATOL
    )
    np.testing.assert_array_equal(np.asarray(arnoldi.stable), np.asarray(dense.stable))


def test_matrix_free_newton_in_float32_without_x64():
    """With x64 disabled (float32 only, as on most accelerators), lineax's BiCGStab
    takes a negative `alpha`, `omega` or `rho` for a breakdown, and every matrix-free
    Newton step failed at its first iteration (residual left at its start). The
    default above `dense_max` is then GMRES: it must converge to the dense solver's
    rest point, and its implicit gradient must match the dense one's."""
    with jax.enable_x64(False):
        logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 64), jnp.float32)
        weights = jax.random.normal(jax.random.key(1), (2, 64), jnp.float32)

        def run(s, dense_max):
            flow = rx.EntropicReplicator(rx.Logits(s) + rx.SelfReinforcement(1.0), 0.7)
            return rx.equilibrium(flow, method=rx.RestPoint(dense_max=dense_max))

        def loss(s, dense_max):
            return jnp.sum(weights * jnp.exp(run(s, dense_max).log_p))

        dense, matrix_free = run(logits, 512), run(logits, 32)
        assert np.all(np.asarray(matrix_free.num_steps) > 1)
        np.testing.assert_allclose(matrix_free.log_p, dense.log_p, atol=1e-5)
        np.testing.assert_allclose(
            matrix_free.leading_eigenvalue, dense.leading_eigenvalue, atol=1e-5
        )
        g_dense = jax.grad(loss)(logits, 512)
        g_free = jax.grad(loss)(logits, 32)
        scale = float(jnp.max(jnp.abs(g_dense)))
        np.testing.assert_allclose(g_free, g_dense, atol=1e-5 * scale)
