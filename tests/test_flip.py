"""`rx.flip_margin` against its closed forms.

- Constant logits (THEORY §1): `g_j = θ_j(t1) - θ_k(t1)` is linear in the perturbation,
  and from uniform it is `c(t1) (s_j + δ_j - s_k - δ_k)` with `c = t1/T` for (R) and
  `(1 - e^{-t1})/T` for (E). The nearest flip moves the top two logits towards each
  other: half the gap in L∞, the gap over √2 in L2, whatever `t1` and `T`.
- Lock-in under self-reinforcement (THEORY §4, "Brittle attractors"): under (R) the flow
  from `x₀ = p₁(0)` locks onto token 1 iff `x₀` is above the saddle
  `x* = (1 + δ/β)/2`, so the perturbation has to move the effective gap to
  `δ' = β(2x₀ - 1)`.

Sizes are small (V <= 6, ODE rows of V = 2) so the file runs in well under 35 s.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replicax as rx
from replicax import _flip

# Acceptance tolerance of issue 8 for constant logits (the iteration lands on the
# boundary to about 1e-15 here; 1e-4 is the promise).
MARGIN_TOL = 1e-4
# The boundary found is the true one to better than this relative amount: pushing the
# perturbation this much further flips the argmax, pulling it back this much does not.
SIDE_REL = 1e-6
INF = -np.inf

# Three contexts, V = 6: one full, two with masked tokens (a face), one of which has its
# top two tokens only 0.05 apart.
LOGITS = np.array(
    [
        [0.3, 1.7, -0.4, 1.1, 0.0, -2.0],
        [INF, 0.9, 2.4, INF, 1.6, -1.0],
        [1.0, INF, -3.0, 0.95, INF, 0.5],
    ]
)
TEMPERATURES = np.array([0.7, 1.0, 1.6])


def _top_two(logits, face):
    s = np.where(face, logits, -np.inf)
    order = np.argsort(-s, kind="stable")
    return order[0], order[1], s[order[0]] - s[order[1]]


def _argmax_after(flow_cls, logits, temperature, t1, support):
    flow = flow_cls(jnp.asarray(logits), jnp.asarray(temperature))
    sol = rx.solve(flow, t1=t1, support=support)
    return np.asarray(jnp.argmax(sol.log_p[..., -1, :], axis=-1))


@pytest.mark.parametrize(
    "flow_cls, support",
    [(rx.Replicator, None), (rx.EntropicReplicator, rx.TopK(3))],
)
def test_constant_logits_margin_is_half_the_gap(flow_cls, support):
    t1 = 1.5
    flow = flow_cls(jnp.asarray(LOGITS), jnp.asarray(TEMPERATURES))
    face = np.asarray(rx.face(flow, support if support is not None else rx.Full()))
    out = {
        norm: rx.flip_margin(flow, t1=t1, support=support, norm=norm, rivals=2)
        for norm in ("linf", "l2")
    }
    for norm, scale in (("linf", 2.0), ("l2", np.sqrt(2.0))):
        res = out[norm]
        assert np.all(np.asarray(res.converged))
        assert np.all(np.asarray(res.result._value) == 0)
        for b in range(LOGITS.shape[0]):
            k, j, gap = _top_two(LOGITS[b], face[b])
            assert int(res.token[b]) == k and int(res.rival[b]) == j
            np.testing.assert_allclose(
                float(res.margin[b]), gap / scale, atol=MARGIN_TOL
            )
            delta = np.asarray(res.perturbation[b])
            # The two logits move towards each other by half the gap each; nothing
            # else moves (∇g is zero elsewhere), and nothing off the face.
            expected = np.zeros_like(delta)
            expected[k], expected[j] = -gap / 2, gap / 2
            np.testing.assert_allclose(delta, expected, atol=MARGIN_TOL)
            assert np.all(delta[~face[b]] == 0)
            size = np.max(np.abs(delta)) if norm == "linf" else np.linalg.norm(delta)
            np.testing.assert_allclose(float(res.margin[b]), size, rtol=1e-12)
            # Rival margins, most probable rival first: half its own gap (L∞).
            if norm == "linf":
                for r, tok in enumerate(np.asarray(res.rival_tokens[b])):
                    if tok < 0:
                        assert np.isinf(float(res.rival_margins[b, r]))
                        continue
                    own = LOGITS[b, k] - LOGITS[b, tok]
                    np.testing.assert_allclose(
                        float(res.rival_margins[b, r]), own / 2, atol=MARGIN_TOL
                    )
        # Re-solving with the perturbation scaled a hair past the boundary flips the
        # argmax to the rival; a hair short of it does not.
        delta = np.asarray(res.perturbation)
        past = _argmax_after(
            flow_cls, LOGITS + delta * (1 + SIDE_REL), TEMPERATURES, t1, support
        )
        short = _argmax_after(
            flow_cls, LOGITS + delta * (1 - SIDE_REL), TEMPERATURES, t1, support
        )
        np.testing.assert_array_equal(past, np.asarray(res.rival))
        np.testing.assert_array_equal(short, np.asarray(res.token))


# --------------------------------------------------------------------------------------
# Lock-in under self-reinforcement (THEORY §4)

BETA, GAP, T = 1.0, 0.2, 1.0
X0 = np.array([0.7, 0.8])  # both above the saddle x* = (1 + GAP/BETA)/2 = 0.6
# Near the boundary the path lingers at the saddle and leaves it at the rate
# λ = 2β x*(1 - x*)/T (0.42 at x* = 0.7, 0.32 at 0.8); the boundary at a finite t1 is
# the saddle condition moved by O(e^{-λ t1}) in the gap: 3e-6 at t1 = 40, far below the
# 1e-3 of the acceptance. At t1 = 40 the log-probabilities reach about -50, harmless in
# log space. The ODE tolerances (1e-10) keep the solver's error in `g` far below that
# too: the boundary is only as sharp as the solve that locates it. Forward mode (two
# tangents for V = 2) compiles in about half the time of a pullback through the solve.
LOCK_T1 = 40.0
LOCK_TOL = 1e-3
ODE = rx.ODE(rtol=1e-10, atol=1e-10, adjoint=diffrax.ForwardMode())


def _lock_in_flow():
    score = rx.Logits(jnp.array([0.0, GAP])) + rx.SelfReinforcement(BETA)
    return rx.Replicator(score, T)


def _lock_in(**kwargs):
    y0 = jnp.stack([jnp.asarray(X0), jnp.asarray(1 - X0)], axis=-1)
    return rx.flip_margin(
        _lock_in_flow(), t1=LOCK_T1, y0=y0, rivals=1, method=ODE, **kwargs
    )


def test_self_reinforcement_lock_in_margin_from_the_saddle():
    # The effective gap must move from GAP to β(2x₀ - 1), split evenly over the two
    # logits (L∞) or along (-1, 1)/√2 (L2).
    needed = np.abs(BETA * (2 * X0 - 1) - GAP)
    for norm, scale in (("linf", 2.0), ("l2", np.sqrt(2.0))):
        res = _lock_in(norm=norm)
        assert np.all(np.asarray(res.converged))
        np.testing.assert_array_equal(np.asarray(res.token), [0, 0])
        np.testing.assert_array_equal(np.asarray(res.rival), [1, 1])
        np.testing.assert_allclose(
            np.asarray(res.margin), needed / scale, atol=LOCK_TOL
        )
        delta = np.asarray(res.perturbation)
        np.testing.assert_allclose(delta[:, 1] - delta[:, 0], needed, atol=2 * LOCK_TOL)


def test_convergence_report_is_honest():
    # One projection cannot confirm itself (convergence compares successive boundary
    # points), so `max_steps=1` on the nonlinear lock-in must report failure; same
    # compiled program as above (`max_steps` and `throw` are dynamic).
    res = _lock_in(norm="l2", max_steps=1, throw=False)
    assert not np.any(np.asarray(res.converged))
    assert np.all(res.result == rx.RESULTS.nonlinear_max_steps_reached)
    assert np.all(np.asarray(res.num_steps) == 1)
    with pytest.raises(eqx.EquinoxRuntimeError, match="maximum number of steps"):
        jax.block_until_ready(_lock_in(norm="l2", max_steps=1).margin)


# --------------------------------------------------------------------------------------
# Batching, recompiles, bad arguments


def test_batched_equals_per_row_and_no_recompile():
    flow = rx.Replicator(jnp.asarray(LOGITS), jnp.asarray(TEMPERATURES))
    batched = rx.flip_margin(flow, t1=1.5, rivals=2)
    traces = eqx.debug.get_num_traces(_flip._flip_rows)
    # New values of the logits, temperatures, t1, norm, max_steps, tolerances: the same
    # compiled program.
    other = rx.flip_margin(
        rx.Replicator(jnp.asarray(LOGITS[::-1].copy()), jnp.asarray(TEMPERATURES * 2)),
        t1=2.5,
        rivals=2,
        norm="linf",
        max_steps=5,
        rtol=1e-7,
        atol=1e-9,
        throw=False,
    )
    jax.block_until_ready(other.margin)
    assert eqx.debug.get_num_traces(_flip._flip_rows) == traces
    # Each row alone (a batch of copies of it, which reuses the compiled program and
    # computes nothing but that row) gives what it gives inside the mixed batch.
    for b in range(LOGITS.shape[0]):
        row = rx.flip_margin(
            rx.Replicator(
                jnp.asarray(np.broadcast_to(LOGITS[b], LOGITS.shape).copy()),
                jnp.full(3, TEMPERATURES[b]),
            ),
            t1=1.5,
            rivals=2,
        )
        for name in ("margin", "perturbation", "token", "rival", "rival_margins"):
            for copy in range(3):
                np.testing.assert_allclose(
                    np.asarray(getattr(row, name))[copy],
                    np.asarray(getattr(batched, name))[b],
                    rtol=1e-12,
                    atol=1e-14,
                )
    assert eqx.debug.get_num_traces(_flip._flip_rows) == traces


def test_bad_arguments_name_themselves():
    flow = rx.Replicator(jnp.asarray(LOGITS))
    with pytest.raises(ValueError, match="`norm` must be 'l2' or 'linf'"):
        rx.flip_margin(flow, t1=1.0, norm="l1")
    for bad in (0, 6, True):
        with pytest.raises(ValueError, match=r"`rivals` must be an int in \[1, vocab"):
            rx.flip_margin(flow, t1=1.0, rivals=bad)
    with pytest.raises(ValueError, match="`max_steps` must be an int >= 1"):
        rx.flip_margin(flow, t1=1.0, max_steps=0)
    with pytest.raises(ValueError, match="not differentiable"):
        rx.flip_margin(flow, t1=1.0, support=rx.TopP(0.9), method=rx.Switched())
    with pytest.raises(ValueError, match="`method` must be"):
        rx.flip_margin(flow, t1=1.0, method="euler")
    with pytest.raises(ValueError, match="`rtol` must be finite and > 0"):
        rx.flip_margin(flow, t1=1.0, rtol=-1.0)
