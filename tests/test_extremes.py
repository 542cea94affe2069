"""Extremes audit: both flows against longdouble closed forms on extreme inputs.

The grid is (R) and (E) × float32 and float64 × a batch of logit sets (random, tied
maxima, ±1e4 with ties, ±1e30 with ties, masked tokens, one token left, a near-tie) ×
T ∈ {1e-6, 1, 1e6} × t ∈ {0, 1e-3, 1, 10, 1e6} × {uniform start, Dirichlet y0}. Each
test case is one batched `solve` (the temperatures and logit sets are batch dimensions,
the times are saved times), compared with THEORY §1's closed forms evaluated in
`np.longdouble` by `helpers.closed_form_log_p`, which centres the scores by their
maximum on the support before scaling them, so that ties stay exact and underflow gives
exact zeros. A failure lists every (logit set, T, t) that is off.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx

from .helpers import closed_form_log_p, FLOWS


VOCAB = 6
LOGIT_SETS = {
    "normal": np.random.default_rng(0).normal(0.0, 3.0, VOCAB),
    "tied": [1.5, -0.5, 1.5, 0.25, 1.5, -2.0],
    "pm1e4_ties": [1e4, -1e4, 1e4, 0.0, -1e4, 1e4],
    "pm1e30_ties": [1e30, -1e30, 0.0, -1e30, 1e30, 5.0],
    "masked": [0.3, -np.inf, 1.2, -np.inf, -0.7, 2.0],
    "one_left": [-np.inf, -np.inf, 5.0, -np.inf, -np.inf, -np.inf],
    "near_tie": [1.0, 1.0 - 2.0**-20, 0.5, -3.0, 1.0 - 2.0**-18, 0.0],
}
NAMES = list(LOGIT_SETS)
# Every value is a float32 value, so both dtypes solve exactly the same problem.
LOGITS = np.array([LOGIT_SETS[k] for k in NAMES], np.float32)
TEMPERATURES = [1e-6, 1.0, 1e6]
TIMES = [0.0, 1e-3, 1.0, 10.0, 1e6]


def _dirichlet_y0():
    y0 = np.random.default_rng(1).dirichlet(np.ones(VOCAB), len(NAMES))
    # One zero makes a face the start chooses (not the logits).
    y0[NAMES.index("normal"), 1] = 0.0
    return y0 / y0.sum(-1, keepdims=True)


Y0 = _dirichlet_y0()

# |Δp| against the longdouble closed form: a few ulps of a probability of order 1.
P_TOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}
# Σp is formed in longdouble from the returned log p: a few ulps of 1 in the dtype.
MASS_ULPS = 4


def _cases(bad, what, limit=40):
    """Report lines for the failing cases of one check (none when it passes)."""
    if not bad:
        return []
    more = [f"  ... and {len(bad) - limit} more"] if len(bad) > limit else []
    return [f"{len(bad)} {what}:"] + [f"  {b}" for b in bad[:limit]] + more


@pytest.mark.parametrize("start", ["uniform", "dirichlet"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("flow_cls", FLOWS)
def test_extremes_against_longdouble(flow_cls, dtype, start):
    entropic = flow_cls is rx.EntropicReplicator
    tol = P_TOL[dtype]
    logits = jnp.asarray(LOGITS, dtype)
    # Batch (temperature, logit set): one solve for the whole grid.
    temperature = jnp.asarray(TEMPERATURES, dtype)[:, None]
    y0 = None if start == "uniform" else jnp.asarray(Y0, dtype)
    ts = jnp.asarray(TIMES, dtype)
    flow = flow_cls(logits, temperature)
    sol = rx.solve(flow, t1=ts[-1], y0=y0, saveat=rx.SaveAt(ts=ts))
    assert sol.method == "exact"
    assert sol.log_p.dtype == dtype
    assert sol.log_p.shape == (len(TEMPERATURES), len(NAMES), len(TIMES), VOCAB)

    # The reference sees exactly the values replicax sees (dtype-rounded y0, T and t).
    shape = (len(TEMPERATURES), len(NAMES), VOCAB)
    expected_log_p = closed_form_log_p(
        entropic,
        np.broadcast_to(np.asarray(logits), shape),
        np.broadcast_to(np.asarray(temperature), shape[:-1]),
        np.asarray(ts),
        None if y0 is None else np.broadcast_to(np.asarray(y0), shape),
    )
    expected = np.exp(expected_log_p)
    log_p = np.asarray(sol.log_p).astype(np.longdouble)
    p = np.exp(log_p)

    def where(i, j, k):
        return f"{NAMES[j]}, T={TEMPERATURES[i]:g}, t={TIMES[k]:g}"

    # Never NaN or +inf. Exactly -inf off the support (masked logits, zeros of y0), and
    # elsewhere only where log p is below the dtype's range (e.g. -1e42 in float32).
    off = expected_log_p == -np.inf
    beyond = expected_log_p < -np.finfo(dtype).max
    bad_value = np.isnan(log_p) | (log_p == np.inf)
    bad_value = bad_value | ((log_p == -np.inf) & ~beyond)
    bad_value = bad_value | (off & ~(log_p == -np.inf))
    problems = []
    rows = zip(*np.nonzero(np.any(bad_value, -1)), strict=True)
    problems += _cases([where(*ijk) for ijk in rows], "rows with NaN, +inf or -inf")

    err = np.max(np.abs(p - expected), -1)
    rows = zip(*np.nonzero(~(err <= tol)), strict=True)
    bad = [
        f"{where(*ijk)}: |Δp| = {float(err[ijk]):.3g}, got "
        f"{np.round(p[ijk].astype(float), 4)}, expected "
        f"{np.round(expected[ijk].astype(float), 4)}"
        for ijk in rows
    ]
    problems += _cases(bad, f"rows off the closed form by more than {tol:g}")

    mass_tol = MASS_ULPS * np.finfo(dtype).eps
    mass_err = np.abs(np.sum(p, -1) - 1)
    rows = zip(*np.nonzero(~(mass_err <= mass_tol)), strict=True)
    bad = [f"{where(*ijk)}: |Σp - 1| = {float(mass_err[ijk]):.3g}" for ijk in rows]
    problems += _cases(bad, f"rows whose mass is off by more than {mass_tol:g}")
    assert not problems, "\n".join(problems)


def _limit_bound(entropic, logits, temperature, t, y0):
    """Upper bound on max|p(t) - p(∞)| from THEORY §1, in longdouble, per row.

    (R): 1 - P(t) ≤ ((1 - P₀)/P₀) e^{-Δ t/T}, P the mass of the argmax set, Δ the gap to
    the next score; the argmax set keeps the ratios of p₀, so this bounds every |Δp|.
    (E): KL(p(t)‖π) ≤ e^{-2t} R²/8 with R = range(log p₀ - s/T), and by Pinsker
    |Δp| ≤ √(KL/2) ≤ e^{-t} R/4."""
    ld = np.longdouble
    s = logits.astype(ld)
    T = temperature.astype(ld)[..., None]
    t = ld(t)
    support = s > -np.inf
    p0 = np.ones(s.shape, ld) if y0 is None else y0.astype(ld)
    support = support & (p0 > 0)
    p0 = np.where(support, p0, 0)
    p0 = p0 / p0.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        if entropic:
            g = np.log(np.where(support, p0, 1)) - s / T
            spread = np.max(np.where(support, g, -np.inf), -1) - np.min(
                np.where(support, g, np.inf), -1
            )
            return np.exp(-t) * spread / 4
        top = np.max(np.where(support, s, -np.inf), -1, keepdims=True)
        winners = support & (s == top)
        rest = np.max(np.where(support & ~winners, s, -np.inf), -1)
        gap = top[..., 0] - rest  # +inf when the argmax set is the whole support
        mass = np.sum(np.where(winners, p0, 0), -1)
        return (1 - mass) / mass * np.exp(-gap * t / T[..., 0])


@pytest.mark.parametrize("start", ["uniform", "dirichlet"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("flow_cls", FLOWS)
def test_extremes_limit(flow_cls, dtype, start):
    # At t = 1e6, `solve` agrees with `limit_log_p` wherever THEORY §1's convergence
    # bound says the limit is reached to within the tolerance. For (R) that excludes
    # small gaps (the near-tie) and T = 1e6; for (E) the bound is e^{-t} whatever T, so
    # every row is compared. `limit_log_p` itself is checked on every row against the
    # limit in longdouble: p₀ on the argmax set (R), softmax(s/T) on supp p₀ (E).
    entropic = flow_cls is rx.EntropicReplicator
    tol = P_TOL[dtype]
    logits = jnp.asarray(LOGITS, dtype)
    temperature = jnp.asarray(TEMPERATURES, dtype)[:, None]
    y0 = None if start == "uniform" else jnp.asarray(Y0, dtype)
    t1 = jnp.asarray(TIMES[-1], dtype)
    flow = flow_cls(logits, temperature)
    at_t1 = rx.solve(flow, t1=t1, y0=y0).log_p[..., 0, :]
    at_t1 = np.exp(np.asarray(at_t1, np.float64))
    limit = np.exp(np.asarray(rx.limit_log_p(flow, y0=y0), np.float64))
    assert limit.shape == at_t1.shape == (len(TEMPERATURES), len(NAMES), VOCAB)

    shape = limit.shape
    s = np.broadcast_to(np.asarray(logits), shape)
    T = np.broadcast_to(np.asarray(temperature), shape[:-1])
    p0 = None if y0 is None else np.broadcast_to(np.asarray(y0), shape)
    support = (s > -np.inf) & (True if p0 is None else p0 > 0)
    start_mass = np.where(support, 1.0 if p0 is None else p0, 0).astype(np.longdouble)
    if entropic:
        # softmax(s/T) on the support: (R) from uniform at t = 1.
        on_support = np.where(support, s, -np.inf)
        expected = np.exp(closed_form_log_p(False, on_support, T, [1.0]))[..., 0, :]
    else:
        top = np.max(np.where(support, s, -np.inf), -1, keepdims=True)
        expected = np.where(support & (s == top), start_mass, 0)
        expected = expected / expected.sum(-1, keepdims=True)

    def where(i, j):
        return f"{NAMES[j]}, T={TEMPERATURES[i]:g}"

    problems = []
    err = np.max(np.abs(limit - expected), -1)
    rows = zip(*np.nonzero(~(err <= tol)), strict=True)
    bad = [
        f"{where(*ij)}: |Δp| = {float(err[ij]):.3g}, got {np.round(limit[ij], 4)}, "
        f"expected {np.round(expected[ij].astype(float), 4)}"
        for ij in rows
    ]
    problems += _cases(bad, f"limit_log_p rows off by more than {tol:g}")

    bound = _limit_bound(entropic, s, T, np.asarray(t1), p0)
    reached = bound <= tol
    assert np.sum(reached) >= len(NAMES), "too few rows reach the limit to compare"
    if entropic:
        assert np.all(reached)
    gap = np.max(np.abs(at_t1 - limit), -1)
    rows = zip(*np.nonzero(reached & ~(gap <= 2 * tol)), strict=True)
    bad = [
        f"{where(*ij)}: |Δp| = {float(gap[ij]):.3g}, got "
        f"{np.round(at_t1[ij], 4)}, limit {np.round(limit[ij], 4)}"
        for ij in rows
    ]
    problems += _cases(bad, f"rows at t = 1e6 off the limit by more than {2 * tol:g}")
    assert not problems, "\n".join(problems)
