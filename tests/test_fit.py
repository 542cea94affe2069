"""`rx.fit`: parameters recovered from synthetic observables, and an honest report.

Targets come from references that do not use `fit`'s machinery: numpy's closed form of
(E) for constant logits, and scipy's `solve_ivp` of (E) with a fading-memory frequency
penalty and self-reinforcement written in probability space. The fit starts 30-50% off
the true values. The ODE fit is compiled once for the whole file (one program serves two
cases), so that the file stays well within its time budget.
"""

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate
import scipy.special

import replicax as rx
from replicax import _fit

V = 8
TS = np.linspace(0.25, 2.0, 8)
LOGITS = np.random.default_rng(0).normal(size=V) * 1.5


def _entropy(t, log_p, flow):
    del t, flow
    return rx.entropy(log_p)


def _entropy_and_p(t, log_p, flow):
    del t, flow
    return rx.entropy(log_p), jnp.exp(log_p)


ENTROPY = rx.SaveAt(ts=TS, fn=_entropy)
ENTROPY_AND_P = rx.SaveAt(ts=TS, fn=_entropy_and_p)


def _traces():
    return eqx.debug.get_num_traces(_fit._fit)


def _closed_form_entropies(temperature, logits=LOGITS):
    """Entropy along (E) from uniform with constant logits, THEORY §1:
    `p(t) = softmax((1 - e^{-t}) s / T)`."""
    p = scipy.special.softmax(np.outer(1 - np.exp(-TS), logits) / temperature, axis=-1)
    return -np.sum(p * np.log(p), axis=-1)


# --------------------------------------------------------------------------------------
# Constant logits: the exact path against the closed form


def test_temperature_from_closed_form_entropies_batched_and_no_recompile():
    # The targets are the closed form in float64 and the exact path reproduces it to
    # rounding, so the temperature is recovered to the gradient tolerance: 1e-8 is far
    # above what the optimiser reaches and far below the acceptance 1e-3. Two contexts
    # with a temperature each (a batch, as for `solve`) are fitted in one optimisation.
    RTOL = 1e-8
    logits = np.stack([LOGITS, LOGITS[::-1] * 0.5])
    before = _traces()
    # New targets, new starts and a new `where` function each time: one compile.
    cases = [((0.7, 1.6), [1.0, 1.0]), ((1.6, 0.3), [0.9, 0.45])]
    for true, start in cases:
        target = np.stack(
            [_closed_form_entropies(T, s) for T, s in zip(true, logits, strict=True)]
        )
        out = rx.fit(
            rx.EntropicReplicator(logits, np.array(start)),
            lambda f: f.temperature,
            target,
            saveat=ENTROPY,
            t1=TS[-1],
            tol=1e-12,
        )
        assert bool(out.converged)
        assert 0 < int(out.num_steps) < 200
        np.testing.assert_allclose(np.asarray(out.flow.temperature), true, rtol=RTOL)
        assert float(out.loss) < 1e-20
        assert float(out.grad_norm) < 1e-12
        losses = np.asarray(out.losses)
        n = int(out.num_steps)
        assert np.all(np.isfinite(losses[: n + 1]))
        assert np.all(np.isnan(losses[n + 1 :]))
        assert losses[n] == float(out.loss)
        assert np.all(np.diff(losses[: n + 1]) <= 0)  # the line search only descends
    assert _traces() == before + 1


def test_max_steps_report_is_honest():
    out = rx.fit(
        rx.EntropicReplicator(LOGITS, 1.0),
        lambda f: f.temperature,
        _closed_form_entropies(0.7),
        saveat=ENTROPY,
        t1=TS[-1],
        max_steps=2,
    )
    assert not bool(out.converged)
    assert int(out.num_steps) == 2
    assert out.losses.shape == (3,)
    assert np.all(np.isfinite(np.asarray(out.losses)))
    assert float(out.grad_norm) > 1e-8
    assert float(out.losses[2]) < float(out.losses[0])


def test_custom_optax_optimizers():
    # Adam with a fixed rate ends in a neighbourhood of the optimum, not at it: the
    # gradient tolerance is set where that neighbourhood is 1e-4 wide.
    true = 0.7
    target = _closed_form_entropies(true)
    out = rx.fit(
        rx.EntropicReplicator(LOGITS, 1.0),
        lambda f: f.temperature,
        target,
        saveat=ENTROPY,
        t1=TS[-1],
        optimizer=optax.adam(3e-2),
        max_steps=400,
        tol=1e-6,
    )
    assert bool(out.converged)
    np.testing.assert_allclose(float(out.flow.temperature), true, rtol=1e-3)
    # optax's own L-BFGS, its zoom line search fed through value_and_grad_from_state.
    out = rx.fit(
        rx.EntropicReplicator(LOGITS, 1.0),
        lambda f: f.temperature,
        target,
        saveat=ENTROPY,
        t1=TS[-1],
        optimizer=optax.lbfgs(),
        max_steps=50,
        gradient="forward",
        tol=1e-10,
    )
    assert bool(out.converged)
    np.testing.assert_allclose(float(out.flow.temperature), true, rtol=1e-8)


# --------------------------------------------------------------------------------------
# A history-dependent score on the ODE path, against scipy


def _scipy_targets(temperature, alpha, tau, beta):
    """Entropies and probabilities at `TS` of (E) with
    `z = s - alpha c + beta p`, `c' = (p - c)/tau`, `c(0) = p(0)` uniform, integrated
    in probability space by scipy (THEORY §1 and §4)."""

    def field(t, y):
        p, c = y[:V], y[V:]
        g = (LOGITS - alpha * c + beta * p) / temperature - np.log(p)
        return np.concatenate([p * (g - p @ g), (p - c) / tau])

    y0 = np.full(2 * V, 1.0 / V)
    out = scipy.integrate.solve_ivp(
        field, (0.0, TS[-1]), y0, t_eval=TS, method="DOP853", rtol=1e-12, atol=1e-14
    )
    assert out.success
    p = out.y[:V].T
    return -np.sum(p * np.log(p), axis=-1), p


def _flow(temperature, alpha, tau, beta):
    score = (
        rx.Logits(LOGITS)
        + rx.FrequencyPenalty(alpha, tau=tau, stages=1)
        + rx.SelfReinforcement(beta)
    )
    return rx.EntropicReplicator(score, temperature)


def _params(f):
    memory = f.score.terms[1]
    return (f.temperature, memory.alpha, memory.tau, f.score.terms[2].beta)


def test_recovers_temperature_penalty_tau_and_signed_scale():
    # Two cases through one compiled fit: the temperature and the penalty strength
    # (the acceptance case), with the memory time constant (positive) and the
    # self-reinforcement strength (signed: `positive=False`, and negative in the second
    # case) fitted alongside. The fit integrates with a fixed step of 0.05 (Tsit5)
    # against scipy at rtol 1e-12; the parameters come out within ~3e-9 of the truth
    # (measured), so 1e-6 leaves room for other platforms and is still far inside the
    # acceptance tolerance 1e-3.
    RTOL = 1e-6
    method = rx.ODE(
        solver=diffrax.Tsit5(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.05,
        max_steps=64,
        adjoint=diffrax.ForwardMode(),
    )
    cases = [
        ((0.7, 0.8, 1.0, 0.5), (1.0, 0.5, 1.4, 0.3)),
        ((1.2, 1.5, 0.5, -0.8), (0.8, 1.0, 0.7, -0.5)),
    ]
    before = _traces()
    for true, start in cases:
        out = rx.fit(
            _flow(*start),
            _params,
            _scipy_targets(*true),
            saveat=ENTROPY_AND_P,
            t1=TS[-1],
            method=method,
            positive=(True, True, True, False),
            gradient="forward",
            tol=1e-12,
        )
        assert bool(out.converged), out
        got = np.array([float(x) for x in _params(out.flow)])
        np.testing.assert_allclose(got, true, rtol=RTOL)
    assert _traces() == before + 1


# --------------------------------------------------------------------------------------
# Bad input


def _fit_entropy(**kwargs):
    options = dict(
        flow=rx.EntropicReplicator(LOGITS, 1.0),
        where=lambda f: f.temperature,
        target=_closed_form_entropies(0.7),
        saveat=ENTROPY,
        t1=TS[-1],
    )
    options.update(kwargs)
    flow, where, target = (
        options.pop("flow"),
        options.pop("where"),
        options.pop("target"),
    )
    return rx.fit(flow, where, target, **options)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(where=lambda f: f.score), TypeError, "`where` must select real arrays"),
        (dict(where=lambda f: (f.temperature, None)), TypeError, "element 1"),
        (dict(where=lambda f: f.temperature * 2), ValueError, "`where` must select"),
        (dict(where=lambda f: f.nope), TypeError, "`where\\(flow\\)` failed"),
        (dict(target=np.zeros(7)), ValueError, "`target` must have the shapes"),
        (
            dict(target=(np.zeros(8), np.zeros(8))),
            ValueError,
            "`target` must have the structure",
        ),
        (dict(target=np.full(8, np.nan)), ValueError, "`target` must not contain NaN"),
        (dict(max_steps=0), ValueError, "`max_steps` must be an int >= 1"),
        (dict(tol=-1.0), ValueError, "`tol` must be finite and > 0"),
        (dict(positive=(True, False)), ValueError, "`positive` must be one bool"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(gradient="central"), (TypeError, ValueError), "gradient"),
        (dict(saveat=None), TypeError, "saveat"),
        (dict(loss=lambda p, t: p), ValueError, "`loss` must return a scalar"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    # For `optimizer`, `gradient` and `saveat` the tests' runtime type checker may
    # refuse the value before `fit` does; both errors name the argument.
    with pytest.raises(error, match=match):
        _fit_entropy(**kwargs)


def test_positive_parameter_must_start_positive():
    flow = rx.EntropicReplicator(rx.Logits(LOGITS) + rx.SelfReinforcement(-0.5), 1.0)
    with pytest.raises(ValueError, match="initial value must be > 0"):
        rx.fit(
            flow,
            lambda f: f.score.terms[1].beta,
            _closed_form_entropies(0.7),
            saveat=ENTROPY,
            t1=TS[-1],
        )
