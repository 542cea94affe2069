"""Switched faces (THEORY §3, last point): top-p / min-p re-evaluated along the path."""

import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
import torch
from transformers import TopPLogitsWarper

from .helpers import closed_form_log_p, random_logits


# Event times are found to rtol = atol = 1e-9 (float64); allow a few times that.
EVENT_TOL = 1e-7


def test_entropic_from_uniform_never_switches(getkey):
    # p̃(t) is the softmax at temperature T/(1 - e^{-t}) >= T: its nucleus contains the
    # initial face, so the switched path is the fixed-face path.
    logits = random_logits(getkey(), (3, 40))
    ts = jnp.linspace(0.0, 10.0, 11)
    flow = rx.EntropicReplicator(logits, 0.8)
    switched = rx.solve(
        flow, t1=10.0, support=rx.TopP(0.9), saveat=rx.SaveAt(ts=ts), method=rx.Switched()
    )
    fixed = rx.solve(flow, t1=10.0, support=rx.TopP(0.9), saveat=rx.SaveAt(ts=ts))
    assert jnp.all(switched.info.num_switches == 0)
    assert jnp.all(switched.info.switch_ts == jnp.inf)
    np.testing.assert_allclose(jnp.exp(switched.log_p), jnp.exp(fixed.log_p), atol=1e-12)


def test_replicator_min_p_switching_times_closed_form(getkey):
    # Under (R) from uniform, p̃(t) = softmax(t s/T): token j fails min-p once
    # (s_j - max s) t/T < log(min_p), i.e. at t_j = T log(min_p) / (s_j - max s).
    # Logit spread small enough that most tokens start on the face (T log min_p = -3.2).
    logits = random_logits(getkey(), (12,), scale=1.0)
    temperature, min_p = 0.7, 0.01
    flow = rx.Replicator(logits, temperature)
    sol = rx.solve(
        flow, t1=50.0, support=rx.MinP(min_p), method=rx.Switched(max_switches=32)
    )
    face0 = np.asarray(rx.face(flow, rx.MinP(min_p)))
    s = np.asarray(logits)
    gaps = s - s.max()
    expected = np.where(gaps < 0, temperature * np.log(min_p) / np.where(gaps < 0, gaps, -1), np.inf)
    expected = np.where(face0, expected, 0.0)  # off the initial face: left at t0
    removed = np.asarray(sol.info.removed_at)
    late = face0 & np.isfinite(expected) & (expected < 50.0)
    assert late.sum() >= 3
    np.testing.assert_allclose(removed[late], expected[late], rtol=EVENT_TOL)
    assert np.all(removed[~face0] == 0.0)
    assert int(sol.info.num_switches) == int(late.sum())
    assert np.all(np.diff(np.asarray(sol.info.switch_ts)[: int(sol.info.num_switches)]) > 0)


def test_replicator_top_p_switches_match_transformers(getkey):
    # Each switching time is where transformers' TopPLogitsWarper, applied to p̃(t), drops
    # one more token; and (R) never switches before t = 1.
    logits = random_logits(getkey(), (20,), scale=2.0)
    temperature, top_p = 1.0, 0.9
    flow = rx.Replicator(logits, temperature)
    sol = rx.solve(
        flow, t1=6.0, support=rx.TopP(top_p), method=rx.Switched(max_switches=32)
    )
    n = int(sol.info.num_switches)
    assert n >= 2
    taus = np.asarray(sol.info.switch_ts[:n])
    assert taus[0] >= 1.0
    warper = TopPLogitsWarper(top_p)

    def nucleus(t):
        log_p = rx.solve(rx.Replicator(logits, temperature), t1=t).log_p[0]
        out = warper(None, torch.tensor(np.asarray(log_p))[None])
        return int(torch.isfinite(out).sum())

    sizes = np.asarray(sol.info.face_size)
    for k, tau in enumerate(taus):
        assert nucleus(tau * (1 - 1e-6)) == sizes[k]
        assert nucleus(tau * (1 + 1e-6)) == sizes[k + 1]


def test_switched_path_is_projection_of_the_full_flow(getkey):
    # Restrict-then-flow = flow-then-restrict: at every saved time the switched path is
    # p̃(t) renormalised on the face it reports.
    logits = random_logits(getkey(), (2, 15))
    ts = jnp.linspace(0.0, 5.0, 26)
    flow = rx.Replicator(logits, 0.6)
    sol = rx.solve(
        flow, t1=5.0, support=rx.TopP(0.8), saveat=rx.SaveAt(ts=ts), method=rx.Switched()
    )
    full = rx.solve(flow, t1=5.0, saveat=rx.SaveAt(ts=ts)).log_p
    face = np.asarray(sol.log_p) > -np.inf
    expected = np.where(face, np.asarray(full), -np.inf)
    expected = expected - np.log(np.sum(np.exp(expected), -1, keepdims=True))
    np.testing.assert_allclose(np.exp(sol.log_p), np.exp(expected), atol=1e-12)
    # Faces only shrink.
    sizes = face.sum(-1)
    assert np.all(np.diff(sizes, axis=-1) <= 0)


def test_switched_errors_and_limits(getkey):
    logits = random_logits(getkey(), (2, 10))
    flow = rx.Replicator(logits, 1.0)
    with pytest.raises(TypeError, match="support"):
        rx.solve(flow, t1=1.0, support=rx.TopK(3), method=rx.Switched())
    state = rx.Replicator(rx.Logits(logits) + rx.SelfReinforcement(1.0), 1.0)
    with pytest.raises(ValueError, match="constant score"):
        rx.solve(state, t1=1.0, support=rx.TopP(0.9), method=rx.Switched())
    # Too few switches allowed: flagged per row, not silent.
    logits = random_logits(getkey(), (2, 10), scale=1.0)
    flow = rx.Replicator(logits, 1.0)
    sol = rx.solve(
        flow,
        t1=40.0,
        support=rx.TopP(0.99),
        method=rx.Switched(max_switches=1, throw=False),
    )
    assert jnp.all(sol.info.num_switches <= 1)
    # The switches a row needs, in closed form rather than from a second solve allowing
    # more of them (a second program to compile): under (R) from uniform the switched
    # face at t is the top-p set of p̃(t) = softmax(t s/T) (the transformers test above),
    # and one token leaves at each switch.
    p = np.exp(closed_form_log_p(False, logits, 1.0, [0.0, 40.0]))
    mass = np.cumsum(np.sort(p, axis=-1)[..., ::-1], axis=-1)
    nucleus = np.sum(mass < np.longdouble(0.99), axis=-1) + 1
    flagged = nucleus[:, 0] - nucleus[:, 1] > 1
    assert np.any(flagged)
    assert np.all(np.asarray(sol.result == rx.RESULTS.max_steps_reached) == flagged)
