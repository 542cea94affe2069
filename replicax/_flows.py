"""The two flows of THEORY §1: the replicator (R) and the entropic replicator (E).

Both are written in log space, `θ = log p` up to a constant (THEORY §6.1):

- (R) `θ̇ = z/T`: the paper's flow. Temperature is an exact rescaling of time and the flow
  tends to the argmax set of the scores, *not* to `softmax(s/T)`.
- (E) `θ̇ = z/T - θ`: the flow whose rest point is `softmax(s/T)`; temperature sets the
  endpoint, not the speed.

The vector fields returned here are *centred* (`θ̇ - <p, θ̇>`), which changes nothing about
`p` but keeps `logsumexp θ = 0`, so the integrated state stays equal to `log p`.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._misc import compute_dtype
from ._scores import AbstractScore, Logits


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

    # Decay rate of θ in `θ̇ = z/T - kappa θ`: 0 for (R), 1 for (E).
    kappa: ClassVar[float]

    def __init__(
        self,
        score: AbstractScore | Float[ArrayLike, "*batch vocab"],
        temperature: Float[ArrayLike, "*temperature_batch"] = 1.0,
    ):
        if not isinstance(score, AbstractScore):
            score = Logits(score)
        self.score = score
        if isinstance(temperature, int | float | np.ndarray | np.number):
            # Host values are checked now; device arrays are checked on device by
            # `solve` (reading them here would wait for the device).
            host = np.asarray(temperature, np.float64)
            if not np.all(np.isfinite(host) & (host > 0)):
                bad = host[~(np.isfinite(host) & (host > 0))] if host.ndim else host
                raise ValueError(
                    "`temperature` must be finite and > 0; received "
                    f"{bad.reshape(-1)[0]}. Greedy decoding (T = 0) is the argmax, not "
                    "a flow."
                )
        temperature = jnp.asarray(temperature)
        if not jnp.issubdtype(temperature.dtype, jnp.floating):
            temperature = temperature.astype(compute_dtype(temperature.dtype))
        self.temperature = temperature

    # -- one context ------------------------------------------------------------------

    def log_rate(
        self,
        t: Float[Array, ""],
        log_p: Float[Array, " vocab"],
        aux: PyTree,
        support: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """Centred `θ̇` of one context (zero off the support)."""
        temperature = self.temperature.astype(log_p.dtype)
        z = self.score(t, log_p, aux)
        rate = z / temperature
        if self.kappa != 0:
            rate = rate - self.kappa * _finite(log_p, support)
        rate = jnp.where(support, rate, 0)
        p = jnp.exp(log_p)
        return jnp.where(support, rate - jnp.sum(p * rate), 0)

    @abc.abstractmethod
    def decay(self, dt: Float[Array, ""]) -> Float[Array, ""]:
        """Weight of `log p₀` in the closed form after time `dt` (constant scores)."""

    @abc.abstractmethod
    def coefficient(self, dt: Float[Array, ""]) -> Float[Array, ""]:
        """Weight of the scores in the closed form after time `dt` (constant scores)."""

    def closed_form(
        self,
        dt: Float[Array, ""],
        log_p0: Float[Array, " vocab"],
        scores: Float[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """Unnormalised `θ(t0 + dt) = decay(dt) log p₀ + coefficient(dt) s` on the support
        (THEORY §1). The coefficient is a scalar computed first: one rounding per token."""
        return self.decay(dt) * log_p0 + self.coefficient(dt) * scores

    @abc.abstractmethod
    def limit_log_p(
        self,
        log_p0: Float[Array, " vocab"],
        scores: Float[Array, " vocab"],
        support: Bool[Array, " vocab"],
    ) -> Float[Array, " vocab"]:
        """`log p(t)` as `t -> ∞` for constant scores."""


def _finite(log_p, support):
    return jnp.where(support, log_p, 0)


class Replicator(AbstractFlow):
    """The replicator flow (R): `ṗ_i = p_i (z_i - <p, z>) / T`, i.e. `θ̇ = z/T`.

    This is the flow of arXiv:2508.21186. For constant scores `s`:

    - closed form `p(t) = softmax(log p₀ + t s/T)`; from uniform it passes `softmax(s/T)`
      at `t = 1` and does not stop there;
    - temperature is an exact time rescaling, `p_T(t) = p_1(t/T)`;
    - `t -> ∞`: `p₀` restricted to the argmax set of `s` (on the support of `p₀`),
      renormalised. It does **not** converge to `softmax(s/T)` (THEORY §1).

    **Arguments:** as `AbstractFlow`.
    """

    kappa: ClassVar[float] = 0.0

    def decay(self, dt):
        return jnp.ones_like(dt)

    def coefficient(self, dt):
        return dt / self.temperature.astype(dt.dtype)

    def limit_log_p(self, log_p0, scores, support):
        top = jnp.max(jnp.where(support, scores, -jnp.inf))
        winners = support & (scores == top)
        return jax.nn.log_softmax(jnp.where(winners, log_p0, -jnp.inf))


class EntropicReplicator(AbstractFlow):
    """The entropic replicator (E): `ṗ_i = p_i (g_i - <p, g>)`, `g = z/T - log p`.

    In log space `θ̇ = z/T - θ`, linear for constant scores, with closed form
    `p(t) = softmax(e^{-t} log p₀ + (1 - e^{-t}) s/T)`. It follows the same curve as (R)
    from uniform but stops at `softmax(s/T)`: this is the flow that converges to the
    softmax. Temperature sets the endpoint, not the speed; the free energy
    `F_T(p) = <p, s> + T H(p)` increases along it (THEORY §1).

    **Arguments:** as `AbstractFlow`.
    """

    kappa: ClassVar[float] = 1.0

    def decay(self, dt):
        return jnp.exp(-dt)

    def coefficient(self, dt):
        # -expm1(-dt) = 1 - e^{-dt}, accurate for small dt.
        return -jnp.expm1(-dt) / self.temperature.astype(dt.dtype)

    def limit_log_p(self, log_p0, scores, support):
        temperature = self.temperature.astype(scores.dtype)
        alive = support & (log_p0 > -jnp.inf)
        return jax.nn.log_softmax(jnp.where(alive, scores / temperature, -jnp.inf))
