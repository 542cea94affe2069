"""Score terms of THEORY §4: payoffs, memories of the path, and their conserved energy.

References: nashpy (replicator dynamics of a game), scipy `solve_ivp` at rtol 1e-11 (the
memory equations), transformers' `RepetitionPenaltyLogitsProcessor`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import nashpy
import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import replicax as rx
from replicax import _solve

from .helpers import random_logits, random_simplex

RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)

# Agreement with nashpy at its time points (float64). nashpy integrates with scipy's
# `odeint` at its default tolerances (1.49e-8), which is its own accuracy limit; replicax
# runs at 1e-11, so the difference is nashpy's error, measured below 1e-7.
NASHPY_TOL = 1e-6
# replicax at rtol = atol = 1e-11 against scipy DOP853 at rtol 1e-11 (float64).
SCIPY_TOL = 1e-8
# Relative drift of the conserved energy over t in [0, 200] (float64, Tsit5 at 1e-10:
# measured 1.5e-9).
ENERGY_TOL = 1e-6


def _rps(l, w):
    return np.array([[0.0, -l, w], [w, 0.0, -l], [-l, w, 0.0]])


def _games():
    """Three games as one batch of 4×4 payoffs: a smaller game is padded, and its start
    puts no mass on the padding, so the flow runs on the game's own face."""
    rps = np.zeros((4, 4))
    rps[:3, :3] = _rps(1.0, 1.0)
    # Hawk-dove (value 2, cost 3): an interior attractor at p_hawk = 2/3.
    hawk_dove = np.zeros((4, 4))
    hawk_dove[:2, :2] = [[-0.5, 2.0], [0.0, 1.0]]
    random = np.random.default_rng(0).normal(size=(4, 4))
    y0 = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.9, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    sizes = (3, 2, 4)
    return np.stack([rps, hawk_dove, random]), y0, sizes


def test_payoff_matches_nashpy():
    # Rock-paper-scissors, hawk-dove and a random 4×4 game, one payoff matrix per row of
    # one solve, each against nashpy's replicator dynamics of that game alone.
    A, y0, sizes = _games()
    ts = np.linspace(0.0, 10.0, 21)
    flow = rx.Replicator(rx.Payoff(A), 1.0)
    sol = rx.solve(
        flow, t1=10.0, y0=y0, saveat=rx.SaveAt(ts=ts), rtol=1e-11, atol=1e-11
    )
    assert sol.method == "ode"
    for row, n in enumerate(sizes):
        game = nashpy.Game(A[row, :n, :n])
        reference = game.replicator_dynamics(y0=y0[row, :n], timepoints=ts)
        p = np.exp(np.asarray(sol.log_p[row]))
        np.testing.assert_allclose(p[:, :n], reference, rtol=0, atol=NASHPY_TOL)
        np.testing.assert_array_equal(p[:, n:], 0.0)
    # Rock-paper-scissors with w = l: p₁p₂p₃ is conserved under (R) (THEORY §4).
    product = np.prod(np.exp(np.asarray(sol.log_p[0, :, :3])), axis=-1)
    np.testing.assert_allclose(product, product[0], rtol=1e-9)


def test_low_rank_payoff_equals_full_payoff(getkey):
    # The same score evaluated two ways, at random states and along a path (discrete map:
    # the checks and the batching of `solve` without an ODE compile per term).
    vocab, rank = 512, 4
    U = jax.random.normal(getkey(), (2, vocab, rank), jnp.float64)
    W = jax.random.normal(getkey(), (2, vocab, rank), jnp.float64)
    A = U @ jnp.swapaxes(W, -1, -2)
    low, full = rx.LowRankPayoff(U, W), rx.Payoff(A)
    log_p = jnp.log(random_simplex(getkey(), (2, vocab)))
    at = lambda term: jax.vmap(lambda m, lp: m(jnp.zeros(()), lp, None))(term, log_p)
    np.testing.assert_allclose(at(low), at(full), rtol=1e-12, atol=1e-12)
    logits = random_logits(getkey(), (2, vocab), scale=1.0)
    paths = [
        rx.multiplicative_weights(
            rx.Replicator(rx.Logits(logits) + term, 0.7), 0.05, 20
        )
        for term in (low, full)
    ]
    np.testing.assert_allclose(paths[0], paths[1], rtol=0, atol=1e-11)
    assert np.max(np.abs(paths[0][:, -1] - paths[0][:, 0])) > 0.1


def _scipy(field, y0, ts):
    out = scipy.integrate.solve_ivp(
        field, (0.0, ts[-1]), y0, t_eval=ts, method="DOP853", rtol=1e-11, atol=1e-12
    )
    assert out.success
    return out.y.T


# (E) with a memory is the same code with `- θ` added (compared with scipy in
# test_ode_path for other scores); (R) alone keeps this file fast.
@pytest.mark.parametrize("entropic", [False])
def test_fading_two_stage_memory_matches_scipy(getkey, entropic):
    # ċ₁ = (p - c₁)/τ, ċ₂ = (c₁ - c₂)/τ, z = s - α c₂ (THEORY §4), in log space. Row 0
    # starts its memory at the start distribution (the default), row 1 elsewhere.
    vocab, alpha, tau, temperature = 4, 1.5, 0.7, 0.8
    logits = np.asarray(random_logits(getkey(), (vocab,), scale=1.0))
    p0 = np.asarray(random_simplex(getkey(), (vocab,)))
    memory0 = np.stack([p0, np.array([0.0, 0.5, 1.0, 2.0])])
    default = rx.FrequencyPenalty(alpha, tau=tau, stages=2)
    np.testing.assert_allclose(
        default.init_aux(jnp.log(p0)), np.stack([p0, p0]), rtol=1e-15
    )
    ts = np.linspace(0.0, 8.0, 17)
    term = rx.FrequencyPenalty(alpha, tau=tau, stages=2, memory0=memory0)
    flow_cls = rx.EntropicReplicator if entropic else rx.Replicator
    sol = rx.solve(
        flow_cls(rx.Logits(logits) + term, temperature),
        t1=8.0,
        y0=p0,
        saveat=rx.SaveAt(ts=ts),
        rtol=1e-11,
        atol=1e-11,
    )
    memory = sol.aux[1]
    assert memory.shape == (2, 17, 2, vocab)

    def field(t, y):
        theta, c1, c2 = y[:vocab], y[vocab : 2 * vocab], y[2 * vocab :]
        p = scipy.special.softmax(theta)
        rate = (logits - alpha * c2) / temperature - (theta if entropic else 0)
        return np.concatenate([rate, (p - c1) / tau, (c1 - c2) / tau])

    for row in range(2):
        start = memory0[row]
        ref = _scipy(field, np.concatenate([np.log(p0), start, start]), ts)
        ref_p = scipy.special.softmax(ref[:, :vocab], axis=-1)
        np.testing.assert_allclose(np.exp(sol.log_p[row]), ref_p, atol=SCIPY_TOL)
        np.testing.assert_allclose(
            memory[row, :, 0], ref[:, vocab : 2 * vocab], atol=SCIPY_TOL
        )
        np.testing.assert_allclose(
            memory[row, :, 1], ref[:, 2 * vocab :], atol=SCIPY_TOL
        )


def test_frequency_penalty_energy_conserved(getkey):
    # THEORY §4: the cumulative frequency penalty under (R) is Hamiltonian.
    vocab, alpha, temperature = 4, 0.7, 0.8
    logits = random_logits(getkey(), (vocab,), scale=1.0)
    p0 = random_simplex(getkey(), (vocab,))
    ts = jnp.linspace(0.0, 200.0, 101)
    flow = rx.Replicator(rx.Logits(logits) + rx.FrequencyPenalty(alpha), temperature)
    method = rx.ODE(rtol=1e-10, atol=1e-10, max_steps=20_000)
    sol = rx.solve(flow, t1=200.0, y0=p0, saveat=rx.SaveAt(ts=ts), method=method)
    counts = sol.aux[1]
    energy = rx.frequency_penalty_hamiltonian(
        sol.log_p, counts, logits, temperature, alpha
    )
    assert energy.shape == (101,)
    drift = np.max(np.abs(energy - energy[0])) / np.abs(energy[0])
    assert drift <= ENERGY_TOL, drift
    # The path really moves: the counts grow and the distribution keeps changing.
    assert np.ptp(np.exp(sol.log_p[:, 0])) > 0.05
    # Unnormalised log-weights give the same value (the energy is gauge invariant).
    shifted = sol.log_p + 3.0
    np.testing.assert_allclose(
        rx.frequency_penalty_hamiltonian(shifted, counts, logits, temperature, alpha),
        energy,
        rtol=1e-12,
    )


def test_presence_penalty_tends_to_hard_indicator():
    # φ(c) = 1 - exp(-k c) -> 1[c > 0]; the gap at the smallest present c is exp(-k c).
    logits = jnp.array([0.3, -1.0, 2.0, 0.0, 1.0])
    memory = jnp.array([0.0, 0.05, 0.5, 0.0, 3.0])
    alpha = 0.8
    hard = jax.nn.log_softmax(logits - alpha * (memory > 0).astype(logits.dtype))
    gaps = []
    for sharpness in (1.0, 10.0, 100.0, 1000.0):
        term = rx.PresencePenalty(alpha, sharpness, memory0=memory)
        flow = rx.Replicator(rx.Logits(logits) + term, 1.0)
        # One multiplicative-weights step of size 1 from uniform is softmax(z(0)/T).
        log_p1 = rx.multiplicative_weights(flow, 1.0, 1)[1]
        gaps.append(float(jnp.max(jnp.abs(log_p1 - hard))))
        assert gaps[-1] <= 2 * alpha * np.exp(-sharpness * 0.05) + 1e-14
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-15


@pytest.mark.parametrize("tau", [None, 0.5])
def test_repetition_penalty_matches_transformers(getkey, tau):
    vocab = 12
    logits = np.array(random_logits(getkey(), (3, vocab), scale=2.0))
    logits[1, 4] = -np.inf  # a masked token that was also seen
    logits[2, 0] = 0.0
    seen = [[0, 3, 3, 7], [1, 4, 11], [0, 2, 5, 6, 9]]
    penalty = np.array([1.3, 2.0, 0.7])
    memory0 = np.zeros((3, vocab))
    for r, ids in enumerate(seen):
        memory0[r, ids] = 1.0
    # A large sharpness makes the presence of a memory of 1 exactly 1 in float64.
    term = rx.RepetitionPenalty(penalty, 1e3, tau=tau, memory0=memory0, logits=logits)
    flow = rx.Replicator(rx.Logits(logits) + term, 1.0)
    log_p1 = np.asarray(rx.multiplicative_weights(flow, 1.0, 1)[:, 1])
    for r, ids in enumerate(seen):
        processor = RepetitionPenaltyLogitsProcessor(penalty=float(penalty[r]))
        expected = processor(
            torch.tensor([ids]), torch.tensor(logits[r : r + 1], dtype=torch.float64)
        )
        expected = torch.log_softmax(expected, dim=-1).numpy()[0]
        np.testing.assert_allclose(log_p1[r], expected, rtol=0, atol=1e-13)
    # The term itself is the additive shift r(s) - s on the seen tokens, 0 elsewhere.
    one = eqx.tree_at(
        lambda t: (t.penalty, t.logits, t.memory0),
        term,
        (term.penalty[0], term.logits[0], term.memory0[0]),
    )
    z = one(
        jnp.zeros(()),
        jnp.log(jnp.full(vocab, 1.0 / vocab)),
        one.init_aux(jnp.log(jnp.full(vocab, 1.0 / vocab))),
    )
    s = logits[0]
    shift = np.where(s > 0, s / 1.3, s * 1.3) - s
    np.testing.assert_allclose(z, np.where(memory0[0] > 0, shift, 0.0), atol=1e-14)


def test_alpha_sweep_is_one_solve(getkey):
    # A grid of penalties is a batch with one parameter per row: one compile. Row r equals
    # a solve in which every row has row r's parameters (same shapes: no new compile), so
    # each row depends on its own parameters only.
    vocab, rows = 6, 7
    logits = random_logits(getkey(), (vocab,), scale=1.0)
    alphas = jnp.linspace(0.0, 3.0, rows)
    taus = jnp.linspace(0.5, 1.0, rows)
    y0 = random_simplex(getkey(), (vocab,))
    options = dict(t1=2.0, y0=y0, rtol=1e-8, atol=1e-8)

    def sweep(alpha, tau):
        term = rx.FrequencyPenalty(alpha, tau=tau, stages=2)
        return rx.solve(rx.EntropicReplicator(rx.Logits(logits) + term, 0.5), **options)

    traces = eqx.debug.get_num_traces(_solve._solve_rows)
    batched = sweep(alphas, taus).log_p
    assert batched.shape == (rows, 1, vocab)
    for r in range(rows):
        alone = sweep(jnp.full(rows, alphas[r]), jnp.full(rows, taus[r])).log_p
        np.testing.assert_allclose(batched[r], alone[0], rtol=0, atol=1e-12)
    assert eqx.debug.get_num_traces(_solve._solve_rows) == traces + 1
    # The parameters matter: the rows differ.
    assert np.max(np.abs(batched[0] - batched[-1])) > 0.1


def test_discrete_maps_with_memory_and_payoff():
    # Multiplicative weights is the exponential-Euler step of (R), the memory advancing by
    # Euler steps: first order, so within a few η of the flow (scipy reference).
    vocab, num_steps, step_size, alpha, tau = 3, 100, 0.02, 0.5, 1.0
    A = _rps(1.0, 0.5)
    score = rx.Payoff(A) + rx.FrequencyPenalty(alpha, tau=tau, stages=2)
    y0 = np.array([0.6, 0.3, 0.1])
    path = rx.multiplicative_weights(
        rx.Replicator(score, 1.0), step_size, num_steps, y0=y0
    )
    assert path.shape == (num_steps + 1, vocab)

    def field(t, y):
        theta, c1, c2 = y[:vocab], y[vocab : 2 * vocab], y[2 * vocab :]
        p = scipy.special.softmax(theta)
        return np.concatenate([A @ p - alpha * c2, (p - c1) / tau, (c1 - c2) / tau])

    t1 = num_steps * step_size
    ref = _scipy(field, np.concatenate([np.log(y0), y0, y0]), np.array([0.0, t1]))
    error = np.max(np.abs(np.exp(path[-1]) - scipy.special.softmax(ref[-1, :vocab])))
    assert 1e-4 < error < 2 * step_size


# ----------------------------------------------------------------------------------------
# Bad input: named eagerly, under jit and under vmap.

_V = 3


def _payoff_flow(A):
    return rx.Replicator(rx.Logits(jnp.zeros(_V)) + rx.Payoff(A), 1.0)


def _low_rank_flow(U, W):
    return rx.Replicator(rx.Logits(jnp.zeros(_V)) + rx.LowRankPayoff(U, W), 1.0)


def _run(flow):
    # The checks live in the rows every entry point prepares; the discrete map compiles
    # in a fraction of the time of an ODE solve (`solve` is exercised below too).
    return rx.multiplicative_weights(flow, 0.1, 2)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 2), r"`A` must be a square payoff matrix"),
        # jaxtyping (a TypeError, in the tests only) speaks first here; it names `A` too.
        ((3,), r"A"),
        ((4, 4), r"`A` of Payoff has 4"),
    ],
)
def test_bad_payoff_shape(shape, match):
    A = jnp.ones(shape)
    errors = (TypeError, ValueError) if len(shape) < 2 else ValueError
    with pytest.raises(errors, match=match):
        _run(_payoff_flow(A))
    with pytest.raises(errors, match=match):
        jax.jit(lambda a: _run(_payoff_flow(a)))(A)
    with pytest.raises(errors, match=match):
        jax.vmap(lambda a: _run(_payoff_flow(a)))(jnp.stack([A, A]))


def test_bad_low_rank_shape():
    with pytest.raises(
        ValueError, match="`U` and `W` must have the same trailing shape"
    ):
        rx.LowRankPayoff(jnp.ones((3, 2)), jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="`U` of LowRankPayoff has 4"):
        _run(_low_rank_flow(jnp.ones((4, 2)), jnp.ones((4, 2))))


def _nan_cases():
    A = jnp.ones((2, _V, _V)).at[1, 0, 2].set(jnp.nan)
    U = jnp.ones((2, _V, 2)).at[1, 1, 0].set(jnp.nan)
    good = jnp.ones((2, _V, 2))
    return {
        "A": (lambda x: _payoff_flow(x), A),
        "U": (lambda x: _low_rank_flow(x, good), U),
        "W": (lambda x: _low_rank_flow(good, x), U),
    }


@pytest.mark.parametrize("name", ["A", "U", "W"])
def test_nan_in_payoff(name):
    make, bad = _nan_cases()[name]
    match = rf"`{name}` contains NaN or inf at batch index \(1,\)"
    with pytest.raises(RUNTIME_ERRORS, match=match):
        jax.block_until_ready(_run(make(bad)))
    with pytest.raises(RUNTIME_ERRORS, match=match):
        jax.block_until_ready(jax.jit(lambda x: _run(make(x)))(bad))
    with pytest.raises(RUNTIME_ERRORS, match=rf"`{name}` contains NaN or inf"):
        jax.block_until_ready(jax.vmap(lambda x: _run(make(x)))(bad))


def _memory_flow(name, value):
    logits = jnp.array([0.0, 1.0, -0.5])
    if name == "tau":
        term = rx.FrequencyPenalty(1.0, tau=value, stages=2)
    elif name == "sharpness":
        term = rx.PresencePenalty(1.0, value, tau=1.0)
    elif name == "penalty":
        term = rx.RepetitionPenalty(value, 10.0, logits=logits)
    else:
        term = rx.RepetitionPenalty(1.2, value, tau=1.0, logits=logits)
    return rx.EntropicReplicator(rx.Logits(logits) + term, 1.0)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("tau", 0.0),
        ("sharpness", 0.0),
        ("penalty", -2.0),
        ("repetition sharpness", -1.0),
    ],
)
def test_bad_memory_parameters(name, bad):
    arg = name.split()[-1]
    with pytest.raises(ValueError, match=rf"`{arg}` must be in \(0"):
        _memory_flow(name, bad)
    good = 0.5 if arg != "penalty" else 1.5
    values = jnp.array([good, bad])
    with pytest.raises(
        RUNTIME_ERRORS, match=rf"`{arg}` must be in \(0.*batch index \(1,\)"
    ):
        jax.block_until_ready(_run(_memory_flow(name, values)))
    with pytest.raises(RUNTIME_ERRORS, match=rf"`{arg}` must be in \(0"):
        jax.block_until_ready(jax.jit(lambda v: _run(_memory_flow(name, v)))(values))
    with pytest.raises(RUNTIME_ERRORS, match=rf"`{arg}` must be in \(0"):
        jax.block_until_ready(jax.vmap(lambda v: _run(_memory_flow(name, v)))(values))


@pytest.mark.parametrize("stages", [0, -1, 1.5])
def test_bad_stages(stages):
    match = "stages"  # jaxtyping (tests only) refuses 1.5 first, naming it too
    errors = (TypeError, ValueError)
    with pytest.raises(ValueError, match="`stages` must be an int >= 1"):
        rx.FrequencyPenalty(1.0, tau=1.0, stages=int(stages) if stages != 1.5 else 0)
    with pytest.raises(errors, match=match):
        rx.FrequencyPenalty(1.0, tau=1.0, stages=stages)
    with pytest.raises(errors, match=match):
        jax.jit(
            lambda a: _run(
                rx.Replicator(
                    rx.Logits(jnp.zeros(_V))
                    + rx.PresencePenalty(a, 1.0, tau=1.0, stages=stages)
                )
            )
        )(jnp.asarray(1.0))
    with pytest.raises(errors, match=match):
        jax.vmap(
            lambda a: _run(
                rx.Replicator(
                    rx.Logits(jnp.zeros(_V))
                    + rx.FrequencyPenalty(a, tau=1.0, stages=stages)
                )
            )
        )(jnp.ones(2))
    with pytest.raises(ValueError, match="needs a finite `tau`"):
        rx.FrequencyPenalty(1.0, stages=2)


def test_bad_memory0():
    with pytest.raises(ValueError, match=r"`memory0` must be in \[0"):
        rx.FrequencyPenalty(1.0, memory0=np.array([0.0, -1.0, 0.0]))
    bad = jnp.array([[0.0, 1.0, 0.0], [0.0, jnp.nan, 0.0]])
    flow = rx.Replicator(
        rx.Logits(jnp.zeros(_V)) + rx.FrequencyPenalty(1.0, memory0=bad), 1.0
    )
    with pytest.raises(
        RUNTIME_ERRORS,
        match=r"`memory0` must be finite and >= 0; it is not at batch index \(1,\)",
    ):
        jax.block_until_ready(_run(flow))


# The fused field of scores that do not read `p` (two reductions instead of four) equals
# the definition, `log_rate` on `readout(θ)`, with its derivative (float64).
FUSED_TOL = 1e-12
T_SAMPLE = jnp.asarray(0.3)


@pytest.mark.parametrize("flow_cls", (rx.Replicator, rx.EntropicReplicator))
def test_fused_field_equals_definition(getkey, flow_cls):
    logits = random_logits(getkey(), (40,), scale=30.0).at[:3].set(-jnp.inf)
    memory = random_simplex(getkey(), (40,))
    face = (logits > -jnp.inf).at[5].set(False)
    scores = {
        "logits": rx.Logits(logits),
        "penalties": rx.Logits(logits)
        + rx.FrequencyPenalty(0.4, tau=1.0, stages=2, memory0=memory)
        + rx.PresencePenalty(0.2, 5.0, memory0=memory)
        + rx.RepetitionPenalty(1.3, 5.0, logits=jnp.where(face, logits, 0)),
    }
    # Log-weights that are log p plus a large constant, as the integrated state drifts.
    theta = jnp.where(face, random_logits(getkey(), (40,)) + 50.0, 0)
    tangent = jnp.where(face, random_logits(getkey(), (40,)), 0)
    for name, score in scores.items():
        assert not score.reads_p, name
        flow = flow_cls(score, 0.7)
        aux = score.init_aux(flow.readout(theta, face))

        def fused(theta, flow=flow, aux=aux):
            return flow.state_rate(T_SAMPLE, theta, aux, face)

        def definition(theta, flow=flow, aux=aux):
            log_p = flow.readout(theta, face)
            rate = flow.log_rate(T_SAMPLE, log_p, aux, face)
            return rate, flow.score.aux_rate(T_SAMPLE, log_p, aux)

        for got, want in zip(
            jax.jvp(fused, (theta,), (tangent,)),
            jax.jvp(definition, (theta,), (tangent,)),
            strict=True,
        ):
            scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want))
            err = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got, want)
            assert max(jax.tree.leaves(err)) <= FUSED_TOL * scale, (name, err)
    # Scores that read `p` keep the definition, and so does a subclass that overrides
    # `log_rate`.
    assert (rx.Logits(logits) + rx.SelfReinforcement(1.0)).reads_p

    class Doubled(flow_cls):
        def log_rate(self, t, log_p, aux, face):
            return 2 * super().log_rate(t, log_p, aux, face)

    got = Doubled(rx.Logits(logits), 0.7).state_rate(T_SAMPLE, theta, None, face)[0]
    want = flow_cls(rx.Logits(logits), 0.7).state_rate(T_SAMPLE, theta, None, face)[0]
    np.testing.assert_allclose(got, 2 * want, rtol=0, atol=1e-12)
