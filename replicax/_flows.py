"""The two flows of THEORY §1: the replicator (R) and the entropic replicator (E).

Both are written in log space, `θ = log p` up to a constant (THEORY §6.1):

- (R) `θ̇ = z/T`: the paper's flow. Temperature is an exact rescaling of time and the flow
  tends to the argmax set of the scores, *not* to `softmax(s/T)`.
- (E) `θ̇ = z/T - θ`: the flow whose rest point is `softmax(s/T)`; temperature sets the
  endpoint, not the speed.

The vector fields returned here are *centred* (`θ̇ - <p, θ̇>`), which changes nothing about
`p` but keeps `logsumexp θ = 0`, so the integrated state stays equal to `log p`.

A flow owns its geometry: the readout of `log p` from log-weights, the vector field, the
closed form and limit for constant scores, the time to come within `eps` of the limit, and
its discrete map. `solve`, the observables and the discrete maps only call these, so a new
flow is one new class (see `tests/test_new_flow.py`).
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._misc import compute_dtype, python_scalar
from ._scores import AbstractScore, Logits
from ._time_to import entropic_time_to, replicator_time_to


def _bad_host_temperature(temperature):
    """The first entry of a host temperature that is not finite and > 0, or `None`. A
    Python number is checked without numpy (this runs at every token of a loop)."""
    if type(temperature) is float or type(temperature) is int:
        ok = math.isfinite(temperature) and temperature > 0
        return None if ok else temperature
    host = np.asarray(temperature, np.float64)
    ok = np.isfinite(host) & (host > 0)
    return None if np.all(ok) else host[~ok].reshape(-1)[0]


class AbstractFlow(eqx.Module):
    """Base class of the flows: a score, a temperature, and the log-space dynamics.

    **Arguments:**

    - `score`: an `AbstractScore` (e.g. `Logits(logits) + FrequencyPenalty(0.3)`), or an
        array of logits of shape `(*batch, vocab)`, which is wrapped in `Logits`.
    - `temperature`: `T > 0`, a scalar or one per batch row. Dynamic: changing its value
        does not recompile. `T = 0` (greedy decoding) is not a flow; use the argmax.
    """

    score: AbstractScore
    temperature: Float[Array, "*temperature_batch"]

    def __init__(
        self,
        score: AbstractScore | Float[ArrayLike, "*batch vocab"],
        temperature: Float[ArrayLike, "*temperature_batch"] = 1.0,
    ):
        if not isinstance(score, AbstractScore):
            score = Logits(score)
        self.score = score
        python_number = type(temperature) is float or type(temperature) is int
        if python_number or isinstance(temperature, np.ndarray | np.number):
            # Host values are checked now; device arrays are checked on device by
            # `solve` (reading them here would wait for the device).
            bad = _bad_host_temperature(temperature)
            if bad is not None:
                raise ValueError(
                    f"`temperature` must be finite and > 0; received {bad}. Greedy "
                    "decoding (T = 0) is the argmax, not a flow."
                )
        if python_number:
            # The common case (one Python number, e.g. in a decoding loop): converted
            # once per value.
            self.temperature = python_scalar(temperature)
            return
        temperature = jnp.asarray(temperature)
        if not jnp.issubdtype(temperature.dtype, jnp.floating):
            temperature = temperature.astype(compute_dtype(temperature.dtype))
        self.temperature = temperature

    # -- the geometry of one context ------------------------------------------------
    #
    # Every method below works on one context (a row of length V) and is what the methods
    # of `solve`, the observables and the discrete maps call: a new flow is one new class.
    # `face` is the boolean mask of the tokens the row lives on; `log_p` is `-inf` off it.

    def readout(
        self, theta: Float[Array, " vocab"], face: Bool[Array, " vocab"]
    ) -> Float[Array, " vocab"]:
        """`log p` from unnormalised log-weights on a face (`-inf` off it)."""
        return jax.nn.log_softmax(jnp.where(face, theta, -jnp.inf))

    @abc.abstractmethod
    def log_rate(
        self,
        t: Float[Array, ""],
        log_p: Float[Array, " vocab"],
        aux: PyTree,
        face: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """`θ̇` of one context, centred (`<p, θ̇> = 0`, which keeps `logsumexp θ = 0`)
        and zero off the face."""

    def state_rate(
        self,
        t: Float[Array, ""],
        theta: Float[Array, " vocab"],
        aux: PyTree,
        face: Bool[Array, " vocab"],
    ) -> tuple[Float[Array, " vocab"], PyTree]:
        """`(θ̇, ċ)` of one context at log-weights `theta` and history `aux`: the full
        field that the ODE method integrates and whose linearisation gives Lyapunov
        exponents and the stability of rest points."""
        if not self.score.reads_p and _fusable(type(self)):
            rate = self.rate_up_to_constant(t, theta, aux, face)
            if rate is not None:
                return fused_state_rate(self.score, t, theta, aux, face, rate)
        log_p = self.readout(theta, face)
        return self.log_rate(t, log_p, aux, face), self.score.aux_rate(t, log_p, aux)

    def rate_up_to_constant(
        self,
        t: Float[Array, ""],
        theta: Float[Array, " vocab"],
        aux: PyTree,
        face: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"] | None:
        """`log_rate` before centring, up to a constant, read from log-weights `theta`
        (`log p` up to a constant), for scores that do not read `log p`
        (`score.reads_p` false); `None` (the default) if the flow has no such form.

        With it `state_rate` needs two reductions over the vocabulary instead of four:
        one for the maxima of `theta` and of the rate, one for the normaliser and
        `<p, rate>`; `log p` is never formed before the rate (`fused_state_rate`)."""
        del t, theta, aux, face
        return None

    @abc.abstractmethod
    def closed_form(
        self,
        dt: Float[Array, ""],
        log_p0: Float[Array, " vocab"] | None,
        centred_scores: Float[Array, " vocab"],
        face: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """`log p(t0 + dt)` for constant scores (THEORY §1).

        `log_p0` is the normalised start (`None`: uniform on the face) and
        `centred_scores` the scores minus their maximum on the face (`0` off it), computed
        once for all times: the centring keeps `log p₀` from being rounded away next to
        large scores, and from uniform the maximum of the log-weights is known (`0`)."""

    def closed_form_coefficients(
        self, dt: Float[Array, "*times"]
    ) -> tuple[Float[Array, "*times"], Float[Array, "*times"]] | None:
        """`(a, b)` such that `closed_form(dt, log_p0, s, face)` is
        `log_softmax(b log p₀ + a s)` on the face (`a s` read as `0` where `s = 0`),
        for a flow whose log-weights obey a linear ODE with constant scores; `None`
        (the default) for a flow without such a closed form. Lets
        `rx.Exact(kernel=...)` write a whole trajectory from one read of the scores."""
        del dt
        return None

    @abc.abstractmethod
    def limit_log_p(
        self,
        log_p0: Float[Array, " vocab"],
        scores: Float[Array, " vocab"],
        face: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """`log p(t)` as `t -> ∞` for constant scores."""

    @abc.abstractmethod
    def time_to(
        self,
        log_p0: Float[Array, " vocab"],
        scores: Float[Array, " vocab"],
        face: Bool[Array, " vocab"],
        eps: Float[Array, ""],
        *,
        bound: bool = False,
    ) -> Float[Array, ""]:
        """Time for constant scores to bring the flow within `eps` of its limit, in the
        flow's own sense of "within" (or a closed-form upper bound on it)."""

    @abc.abstractmethod
    def discrete_step(
        self,
        theta: Float[Array, " vocab"],
        rate: Float[Array, " vocab"],
        step_size: Float[Array, ""],
    ) -> Float[Array, " vocab"]:
        """The flow's own discrete-time map on log-weights, given `rate = z/T` (THEORY
        §2): exact for constant scores where the flow has one."""


def centred_rate(rate, log_p, face):
    """`rate - <p, rate>` on the face, `0` off it."""
    top = jax.lax.stop_gradient(jnp.max(jnp.where(face, rate, -jnp.inf)))
    rate = _shifted(rate, top, face)
    return jnp.where(face, rate - jnp.sum(jnp.exp(log_p) * rate), 0)


def _shifted(rate, top, face):
    """`rate - top` on the face (`top` its maximum there, if finite), `0` off it.

    The shift cancels in the centring, but without it `<p, rate>` of huge rates (logits
    ~1e30) keeps a rounding error near `eps |rate|`: noise in the rates of the leading
    tokens, which an adaptive solver chases with ever smaller steps. `top` is taken
    under `stop_gradient`: a constant shift has no gradient to give."""
    return jnp.where(face, rate - jnp.where(jnp.isfinite(top), top, 0), 0)


def _owner(cls: type, name: str) -> type:
    return next(k for k in cls.__mro__ if name in vars(k))


def _fusable(cls: type) -> bool:
    """Whether `cls.rate_up_to_constant` describes `cls`'s field: a subclass that
    overrides `log_rate` or `readout` below it keeps the unfused field."""
    owner = _owner(cls, "rate_up_to_constant")
    return all(issubclass(owner, _owner(cls, n)) for n in ("log_rate", "readout"))


def fused_state_rate(score, t, theta, aux, face, rate):
    """`state_rate` from `rate`, the uncentred rate up to a constant. Equal to
    `centred_rate(rate(log p), log p, face)`, since the centring removes any constant,
    but with two reductions over the vocabulary instead of four chained ones (max θ,
    then `Σ e^θ`, then the maximum of a rate read from `log p`, then `<p, rate>`):
    one of `(theta, rate)` stacked, for both maxima (the second is the shift of
    `centred_rate`), then one of `(e^θ, e^θ rate)` stacked, for both sums. Stacked,
    each pair is one reduction in XLA's program whatever its fusion heuristics."""
    neg_inf = jnp.asarray(-jnp.inf, theta.dtype)
    # Shifts only: the result does not depend on them.
    m, top = jax.lax.stop_gradient(
        jnp.max(jnp.where(face, jnp.stack([theta, rate]), neg_inf), axis=-1)
    )
    rate = _shifted(rate, top, face)
    # `exp(-inf) = 0` off the face (not a masked `exp`, whose gradient would be NaN).
    weights = jnp.exp(jnp.where(face, theta - m, neg_inf))
    total, weighted = jnp.sum(jnp.stack([weights, weights * rate]), axis=-1)
    mean = weighted / total
    log_p = jnp.where(face, theta - m - jnp.log(total), neg_inf)
    return jnp.where(face, rate - mean, 0), score.aux_rate(t, log_p, aux)


def linear_closed_form(decay, coefficient, log_p0, centred_scores, face):
    """`log softmax(decay log p₀ + coefficient (s - max s))` on the face: the closed form
    of every flow whose log-weights obey a linear ODE with constant scores.

    A coefficient that overflows (`t/T` past the float range) multiplies only the tokens
    below the maximum, which then go to `-inf`: the tokens at the maximum keep exactly
    `decay log p₀`, which is the limit."""
    # `0 * coefficient` where the scores are at their maximum, without forming
    # `0 * inf`; written with the scores (not a literal 0) so that tokens tied at the
    # maximum keep their derivative `coefficient`.
    finite = jnp.where(jnp.isfinite(coefficient), coefficient, 0)
    x = jnp.where(
        centred_scores == 0, centred_scores * finite, coefficient * centred_scores
    )
    if log_p0 is None:
        # The maximum is 0 (a token at the top of the scores): one reduction suffices.
        x = jnp.where(face, x, -jnp.inf)
        return x - jnp.log(jnp.sum(jnp.exp(x)))
    x = x + decay * jnp.where(face, log_p0, 0)
    return jax.nn.log_softmax(jnp.where(face, x, -jnp.inf))


def mirror_step(theta, rate, step_size):
    """The entropic mirror step `(1 - η) θ + η z/T`."""
    return (1 - step_size) * theta + step_size * rate


def multiplicative_step(theta, rate, step_size):
    """The multiplicative-weights step `θ + η z/T`."""
    return theta + step_size * rate


class Replicator(AbstractFlow):
    """The replicator flow (R): `ṗ_i = p_i (z_i - <p, z>) / T`, i.e. `θ̇ = z/T`.

    This is the flow of arXiv:2508.21186. For constant scores `s`:

    - closed form `p(t) = softmax(log p₀ + t s/T)`; from uniform it passes `softmax(s/T)`
      at `t = 1` and does not stop there;
    - temperature is an exact time rescaling, `p_T(t) = p_1(t/T)`;
    - `t -> ∞`: `p₀` restricted to the argmax set of `s` (on the support of `p₀`),
      renormalised. It does **not** converge to `softmax(s/T)` (THEORY §1);
    - its discrete map is multiplicative weights, exact at every step size.

    **Arguments:** as `AbstractFlow`.
    """

    def log_rate(self, t, log_p, aux, face):
        z = self.score(t, log_p, aux).astype(log_p.dtype)
        return centred_rate(z / self.temperature.astype(log_p.dtype), log_p, face)

    def rate_up_to_constant(self, t, theta, aux, face):
        # The score ignores its `log_p` argument here (`reads_p` false).
        z = self.score(t, theta, aux).astype(theta.dtype)
        return z / self.temperature.astype(theta.dtype)

    def closed_form(self, dt, log_p0, centred_scores, face):
        coefficient = dt / self.temperature.astype(dt.dtype)
        return linear_closed_form(1, coefficient, log_p0, centred_scores, face)

    def closed_form_coefficients(self, dt):
        return dt / self.temperature.astype(dt.dtype), jnp.ones_like(dt)

    def limit_log_p(self, log_p0, scores, face):
        top = jnp.max(jnp.where(face, scores, -jnp.inf))
        winners = face & (scores == top)
        return jax.nn.log_softmax(jnp.where(winners, log_p0, -jnp.inf))

    def time_to(self, log_p0, scores, face, eps, *, bound=False):
        temperature = self.temperature.astype(scores.dtype)
        return replicator_time_to(temperature, log_p0, scores, face, eps, bound=bound)

    def discrete_step(self, theta, rate, step_size):
        return multiplicative_step(theta, rate, step_size)


class EntropicReplicator(AbstractFlow):
    """The entropic replicator (E): `ṗ_i = p_i (g_i - <p, g>)`, `g = z/T - log p`.

    In log space `θ̇ = z/T - θ`, linear for constant scores, with closed form
    `p(t) = softmax(e^{-t} log p₀ + (1 - e^{-t}) s/T)`. It follows the same curve as (R)
    from uniform but stops at `softmax(s/T)`: this is the flow that converges to the
    softmax. Temperature sets the endpoint, not the speed; the free energy
    `F_T(p) = <p, s> + T H(p)` increases along it (THEORY §1). Its discrete map is the
    entropic mirror step, exact for step sizes `η = 1 - e^{-h} < 1`.

    **Arguments:** as `AbstractFlow`.
    """

    def log_rate(self, t, log_p, aux, face):
        z = self.score(t, log_p, aux).astype(log_p.dtype)
        rate = z / self.temperature.astype(log_p.dtype) - jnp.where(face, log_p, 0)
        return centred_rate(rate, log_p, face)

    def rate_up_to_constant(self, t, theta, aux, face):
        # `log p = θ - logsumexp θ`: the constant is dropped (the score ignores its
        # `log_p` argument here, `reads_p` false).
        z = self.score(t, theta, aux).astype(theta.dtype)
        return z / self.temperature.astype(theta.dtype) - jnp.where(face, theta, 0)

    def closed_form(self, dt, log_p0, centred_scores, face):
        # -expm1(-dt) = 1 - e^{-dt}, accurate for small dt.
        coefficient = -jnp.expm1(-dt) / self.temperature.astype(dt.dtype)
        return linear_closed_form(jnp.exp(-dt), coefficient, log_p0, centred_scores, face)

    def closed_form_coefficients(self, dt):
        return -jnp.expm1(-dt) / self.temperature.astype(dt.dtype), jnp.exp(-dt)

    def limit_log_p(self, log_p0, scores, face):
        temperature = self.temperature.astype(scores.dtype)
        alive = face & (log_p0 > -jnp.inf)
        top = jnp.max(jnp.where(alive, scores, -jnp.inf))
        return jax.nn.log_softmax(jnp.where(alive, (scores - top) / temperature, -jnp.inf))

    def time_to(self, log_p0, scores, face, eps, *, bound=False):
        temperature = self.temperature.astype(scores.dtype)
        return entropic_time_to(temperature, log_p0, scores, face, eps, bound=bound)

    def discrete_step(self, theta, rate, step_size):
        return mirror_step(theta, rate, step_size)
