"""The diffrax path against the exact path, and state-dependent scores against scipy."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
import scipy.integrate

from .helpers import FLOWS, random_logits, random_simplex, tree_allclose


# Acceptance tolerances of the core issue.
F64_ODE_TOL = 1e-8  # Tsit5 at rtol = atol = 1e-10 vs closed form, max |Δp|
F32_ODE_TOL = 1e-5  # Tsit5 at rtol = atol = 1e-6, V = 32,000, std 3
F32_MASS_TOL = 1e-6  # |Σp - 1| in every saved float32 state


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_ode_matches_exact_float64(getkey, flow_cls):
    logits = random_logits(getkey(), (3, 64))
    y0 = random_simplex(getkey(), (3, 64))
    flow = flow_cls(logits, 0.6)
    saveat = rx.SaveAt(ts=jnp.linspace(0.0, 5.0, 17))
    exact = rx.solve(flow, t1=5.0, y0=y0, saveat=saveat)
    ode = rx.solve(
        flow, t1=5.0, y0=y0, saveat=saveat, method="ode", rtol=1e-10, atol=1e-10
    )
    assert exact.method == "exact" and ode.method == "ode"
    assert jnp.all(ode.stats["num_steps"] > 0)
    assert jnp.all(ode.result == rx.RESULTS.successful)
    err = jnp.max(jnp.abs(jnp.exp(ode.log_p) - jnp.exp(exact.log_p)))
    assert err <= F64_ODE_TOL


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_ode_matches_exact_float32_large_vocab(getkey, flow_cls):
    logits = random_logits(getkey(), (8, 32_000), scale=3.0, dtype=jnp.float32)
    flow = flow_cls(logits, 0.7)
    saveat = rx.SaveAt(ts=jnp.linspace(0.0, 4.0, 9, dtype=jnp.float32))
    exact = rx.solve(flow, t1=4.0, saveat=saveat)
    ode = rx.solve(flow, t1=4.0, saveat=saveat, solver=diffrax.Tsit5())
    assert ode.method == "ode"
    assert ode.log_p.dtype == jnp.float32
    err = jnp.max(jnp.abs(jnp.exp(ode.log_p) - jnp.exp(exact.log_p)))
    assert err <= F32_ODE_TOL
    for sol in (exact, ode):
        mass = np.sum(np.exp(np.asarray(sol.log_p, np.float64)), axis=-1)
        assert np.max(np.abs(mass - 1)) <= F32_MASS_TOL


def test_ode_with_masked_tokens_and_faces(getkey):
    logits = random_logits(getkey(), (2, 20))
    logits = logits.at[0, :5].set(-jnp.inf)
    y0 = random_simplex(getkey(), (2, 20)).at[1, 3].set(0.0)
    y0 = y0 / jnp.sum(y0, axis=-1, keepdims=True)
    flow = rx.EntropicReplicator(logits, 1.3)
    exact = rx.solve(flow, t1=3.0, y0=y0)
    ode = rx.solve(flow, t1=3.0, y0=y0, method="ode", rtol=1e-10, atol=1e-10)
    assert jnp.all(exact.log_p[0, 0, :5] == -jnp.inf)
    assert exact.log_p[1, 0, 3] == -jnp.inf
    assert jnp.all(ode.log_p[0, 0, :5] == -jnp.inf)
    np.testing.assert_allclose(jnp.exp(ode.log_p), jnp.exp(exact.log_p), atol=1e-8)


def test_ode_other_solvers_and_controllers(getkey):
    logits = random_logits(getkey(), (2, 10))
    flow = rx.Replicator(logits, 0.9)
    exact = rx.solve(flow, t1=2.0)
    for solver in (diffrax.Dopri5(), diffrax.Dopri8(), diffrax.Kvaerno5()):
        sol = rx.solve(
            flow,
            t1=2.0,
            solver=solver,
            stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-9),
        )
        np.testing.assert_allclose(jnp.exp(sol.log_p), jnp.exp(exact.log_p), atol=1e-7)
    fixed = rx.solve(
        flow,
        t1=2.0,
        solver=diffrax.Heun(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.01,
    )
    assert jnp.all(fixed.stats["num_steps"] == 200)
    np.testing.assert_allclose(jnp.exp(fixed.log_p), jnp.exp(exact.log_p), atol=1e-4)


def test_ode_convergence_order_of_fixed_step_solvers(getkey):
    # Log error against log step has the solver's order as slope.
    logits = random_logits(getkey(), (12,))
    flow = rx.EntropicReplicator(logits, 0.8)
    exact = jnp.exp(rx.solve(flow, t1=1.0).log_p)
    for solver, order in ((diffrax.Euler(), 1), (diffrax.Heun(), 2), (diffrax.Tsit5(), 5)):
        steps = np.array([0.1, 0.05, 0.025])
        errors = []
        for dt in steps:
            sol = rx.solve(
                flow,
                t1=1.0,
                solver=solver,
                stepsize_controller=diffrax.ConstantStepSize(),
                dt0=float(dt),
            )
            errors.append(float(jnp.max(jnp.abs(jnp.exp(sol.log_p) - exact))))
        slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert slope == pytest.approx(order, abs=0.3)


def test_max_steps_reported_per_row(getkey):
    # Row 1 (logits 100x larger) needs more than 8 steps, the others fewer.
    logits = random_logits(getkey(), (3, 10), 1.0) * jnp.array([0.1, 10.0, 0.1])[:, None]
    flow = rx.Replicator(logits, 0.5)
    sol = rx.solve(flow, t1=10.0, method="ode", max_steps=8, throw=False)
    failed = np.asarray(sol.result == rx.RESULTS.max_steps_reached)
    assert failed.tolist() == [False, True, False]
    # The error names the row and the kind of failure.
    with pytest.raises(Exception, match=r"failed at batch index \(1,\).*`max_steps`"):
        rx.solve(flow, t1=10.0, method="ode", max_steps=8)


def _scipy_log_space(field, y0, ts):
    out = scipy.integrate.solve_ivp(
        field, (0.0, ts[-1]), y0, t_eval=ts, method="DOP853", rtol=1e-11, atol=1e-12
    )
    assert out.success
    return out.y.T


def test_frequency_penalty_matches_scipy_and_conserves_energy(getkey):
    # THEORY §4: ċ = p, θ̇ = (s - αc)/T; H = logsumexp θ - <s,c>/T + α|c|²/(2T) is
    # conserved under (R).
    vocab, alpha, temperature = 5, 0.7, 0.8
    logits = np.asarray(random_logits(getkey(), (vocab,), scale=1.0))
    ts = np.linspace(0.0, 6.0, 13)
    flow = rx.Replicator(rx.Logits(logits) + rx.FrequencyPenalty(alpha), temperature)
    sol = rx.solve(
        flow, t1=6.0, saveat=rx.SaveAt(ts=ts), rtol=1e-11, atol=1e-11
    )
    assert sol.method == "ode"
    counts = sol.aux[1]
    assert counts.shape == (13, vocab)

    def field(t, y):
        theta, c = y[:vocab], y[vocab:]
        p = np.exp(theta - scipy.special.logsumexp(theta))
        return np.concatenate([(logits - alpha * c) / temperature, p])

    ref = _scipy_log_space(field, np.zeros(2 * vocab), ts)
    ref_p = scipy.special.softmax(ref[:, :vocab], axis=-1)
    np.testing.assert_allclose(np.exp(sol.log_p), ref_p, atol=1e-8)
    np.testing.assert_allclose(counts, ref[:, vocab:], atol=1e-8)

    # The conserved quantity, with θ = log p + (the log-normaliser removed by centring):
    # recover logsumexp θ from the reference and check it along replicax's path too.
    def hamiltonian(theta, c):
        return (
            scipy.special.logsumexp(theta, axis=-1)
            - c @ logits / temperature
            + alpha * np.sum(c**2, axis=-1) / (2 * temperature)
        )

    h = hamiltonian(ref[:, :vocab], ref[:, vocab:])
    np.testing.assert_allclose(h, h[0], atol=1e-8)


def test_self_reinforcement_lock_in(getkey):
    # THEORY §4: s = (0, δ), z = s + βp under (R); x = p₁ has a saddle at
    # x* = (1 + δ/β)/2. Above it the flow locks onto the wrong token 1.
    delta, beta, temperature = 0.3, 2.0, 1.0
    x_star = (1 + delta / beta) / 2
    logits = jnp.array([0.0, delta])
    flow = rx.Replicator(rx.Logits(logits) + rx.SelfReinforcement(beta), temperature)
    y0 = jnp.array([[x_star + 0.02, 1 - x_star - 0.02], [x_star - 0.02, 1 - x_star + 0.02]])
    ts = np.linspace(0.0, 30.0, 7)
    sol = rx.solve(flow, t1=30.0, y0=y0, saveat=rx.SaveAt(ts=ts), rtol=1e-10, atol=1e-10)
    p1 = np.exp(np.asarray(sol.log_p[:, :, 0]))
    assert p1[0, -1] > 0.99  # locked onto the wrong token
    assert p1[1, -1] < 0.01

    def field(t, x):
        return x * (1 - x) * (beta * (2 * x - 1) - delta) / temperature

    for row in range(2):
        ref = scipy.integrate.solve_ivp(
            field, (0, 30), [float(y0[row, 0])], t_eval=ts, rtol=1e-11, atol=1e-13,
            method="DOP853",
        )
        np.testing.assert_allclose(p1[row], ref.y[0], atol=1e-8)


def test_state_dependent_score_under_vmap_and_batch(getkey):
    logits = random_logits(getkey(), (4, 6))
    beta = jnp.array([0.0, 0.5, 1.0, 2.0])
    flow = rx.EntropicReplicator(rx.Logits(logits) + rx.SelfReinforcement(beta), 1.0)
    batched = rx.solve(flow, t1=2.0, rtol=1e-9, atol=1e-9)
    rows = jax.vmap(
        lambda s, b: rx.solve(
            rx.EntropicReplicator(rx.Logits(s) + rx.SelfReinforcement(b), 1.0),
            t1=2.0,
            rtol=1e-9,
            atol=1e-9,
        ).log_p
    )(logits, beta)
    np.testing.assert_allclose(batched.log_p, rows, atol=1e-12)
    # β = 0 is the constant-score flow.
    plain = rx.solve(rx.EntropicReplicator(logits[0], 1.0), t1=2.0)
    np.testing.assert_allclose(batched.log_p[0], plain.log_p, atol=1e-8)


# `shared_steps`: the batch as one state with one step size. Rows of very different
# stiffness (temperatures 0.05 to 2), a history-dependent score and a given start.
def _shared_problem(getkey):
    logits = random_logits(getkey(), (4, 48))
    temperature = jnp.array([0.05, 0.3, 1.0, 2.0])
    y0 = random_simplex(getkey(), (4, 48))
    return logits, temperature, y0


def test_shared_steps_match_each_row_alone(getkey):
    logits, temperature, y0 = _shared_problem(getkey)
    ts = jnp.linspace(0.0, 3.0, 7)
    # A history-dependent score (its memory saved too), and the observables route.
    penalised = rx.EntropicReplicator(
        rx.Logits(logits) + rx.FrequencyPenalty(0.3, tau=1.0, stages=2), temperature
    )
    fn = lambda t, log_p, flow: rx.entropy(log_p)
    runs = {
        (sh, f): rx.solve(
            penalised, t1=3.0, y0=y0, saveat=rx.SaveAt(ts=ts, fn=f), shared_steps=sh,
            rtol=1e-10, atol=1e-10,
        )
        for sh, f in ((False, None), (True, None), (True, fn))
    }
    each, together = runs[False, None], runs[True, None]
    assert together.log_p.shape == each.log_p.shape == (4, 7, 48)
    err = jnp.max(jnp.abs(jnp.exp(together.log_p) - jnp.exp(each.log_p)))
    assert err <= F64_ODE_TOL
    assert jax.tree.map(jnp.shape, together.aux) == jax.tree.map(jnp.shape, each.aux)
    assert tree_allclose(together.aux, each.aux, rtol=0, atol=F64_ODE_TOL)
    np.testing.assert_allclose(
        runs[True, fn].observables, rx.entropy(together.log_p), rtol=0, atol=1e-12
    )
    # One count and one result for the batch, at least the stiffest row's own count.
    steps = together.stats["num_accepted_steps"]
    assert jnp.all(steps == steps[0])
    assert jnp.all(together.result == rx.RESULTS.successful)
    assert steps[0] >= jnp.max(each.stats["num_accepted_steps"])


def test_shared_steps_gradient_and_failure(getkey):
    # Constant scores: values and gradients of every row against the closed form.
    logits, temperature, y0 = _shared_problem(getkey)

    def loss(s, method):
        flow = rx.EntropicReplicator(s, temperature)
        log_p = rx.solve(flow, t1=2.0, y0=y0, method=method).log_p
        return jnp.sum(rx.entropy(log_p)), log_p

    shared = rx.ODE(rtol=1e-10, atol=1e-10, shared_steps=True)
    (_, exact), grad_exact = jax.value_and_grad(loss, has_aux=True)(logits, rx.Exact())
    (_, together), grad = jax.value_and_grad(loss, has_aux=True)(logits, shared)
    err = jnp.max(jnp.abs(jnp.exp(together) - jnp.exp(exact)), axis=(1, 2))
    assert jnp.all(err <= F64_ODE_TOL), err
    assert jnp.max(jnp.abs(grad - grad_exact)) <= 1e-7 * jnp.max(jnp.abs(grad_exact))
    # A failure fails the batch.
    flow = rx.Replicator(logits, temperature)
    sol = rx.solve(flow, t1=10.0, max_steps=2, throw=False, shared_steps=True)
    assert jnp.all(sol.result == rx.RESULTS.max_steps_reached)


def test_shared_steps_bad_options():
    with pytest.raises(TypeError, match="shared_steps"):
        rx.ODE(shared_steps="yes")

    class Halving(diffrax.AbstractStepSizeController):
        def wrap(self, direction):
            return self

        def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
            return t0 + dt0, None

        def adapt_step_size(self, t0, t1, y0, y1, args, y_error, order, state):
            raise NotImplementedError

    with pytest.raises(ValueError, match="`shared_steps=True` needs a step-size"):
        rx.ODE(stepsize_controller=Halving(), shared_steps=True)
    # Wrapped in a clip controller, a PID controller's norm is still taken per row.
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    rx.ODE(stepsize_controller=diffrax.ClipStepSizeController(pid), shared_steps=True)
