"""Summary statistics of a path that one read of the logits gives for every saved time
(the observables-only fast path of `rx.Exact`)."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._flows import AbstractFlow
from ._observables import entropy


class PathStatistics(eqx.Module):
    """What `rx.path_statistics` keeps at a time: three numbers per context.

    **Fields:**

    - `entropy`: `H(p) = -Σ p_i log p_i` (nats), as `rx.entropy`.
    - `top_prob`: the largest probability, `max_i p_i` (the model's confidence).
    - `mean_score`: the expected score `<p, s>` under `p`, with `s` the flow's constant
        scores (its logits, in their own units, not divided by the temperature; masked
        tokens carry no mass). The free energy of THEORY §1 is
        `mean_score + T * entropy`.

    Under `rx.solve(..., saveat=rx.SaveAt(ts=..., fn=rx.path_statistics))` each field
    has shape `(*batch, times)`.
    """

    entropy: Float[Array, "*batch"]
    top_prob: Float[Array, "*batch"]
    mean_score: Float[Array, "*batch"]


def path_statistics(
    t: Float[Array, ""], log_p: Float[Array, "*batch vocab"], flow: AbstractFlow
) -> PathStatistics:
    """Entropy, top probability and expected score of `p`: an observable for
    `rx.SaveAt(fn=rx.path_statistics)` with a fast path.

    Given to `SaveAt(fn=...)` like any function `fn(t, log_p, flow)`, it is what
    `rx.Exact` (the closed forms) computes **without materialising `log p`**: for both
    built-in flows (any flow whose `closed_form_coefficients` is not `None`), at every
    saved time at once, from one read of the logits (and the start) per context. Reverse
    mode recomputes `p(t)` time after time, so neither direction keeps anything of size
    `(times, vocab)`: the peak memory of `jax.grad` through it is a few `(batch, vocab)`
    arrays whatever the number of saved times. `rx.Exact(kernel="pallas")` computes the
    same sums in the normaliser pass of its Pallas kernel, and the gradient in one
    more kernel (one read of the logits, one write of their cotangent). On every other
    path (the ODE, `Switched`, a flow without affine coefficients) it is evaluated from
    `log_p` like any function.

    Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) through the fast path is
    not available (it is a custom VJP); reverse mode is.

    **Arguments:**

    - `t`: the time (unused).
    - `log_p`: log-probabilities, `-inf` off the face.
    - `flow`: the flow of the same context(s), whose score must be constant (its
        scores give `mean_score`).

    **Returns:**

    A `PathStatistics`.

    **Raises:**

    `ValueError` if the flow's score is not constant (a history or state-dependent
    score has no single expected score).
    """
    del t
    if not flow.score.is_constant:
        raise ValueError(
            "`rx.path_statistics` needs a flow with a constant score (its `mean_score` "
            f"is the expected constant score); this flow's score is "
            f"{type(flow.score).__name__}. Use `SaveAt(fn=...)` with e.g. `rx.entropy`."
        )
    alive = log_p > -jnp.inf
    scores = flow.score.constant_value().astype(log_p.dtype)
    p = jnp.where(alive, jnp.exp(jnp.where(alive, log_p, 0)), 0)
    return PathStatistics(
        entropy=entropy(log_p),
        top_prob=jnp.exp(jnp.max(log_p, axis=-1)),
        mean_score=jnp.sum(jnp.where(alive, p * scores, 0), axis=-1),
    )


def statistics_from_moments(
    top: Float[Array, " times"],
    lse: Float[Array, " times"],
    entropy_: Float[Array, " times"],
    mean_centred: Float[Array, " times"],
    score_top: Float[Array, ""],
) -> PathStatistics:
    """`PathStatistics` from the sums of the one-read pass (`affine_moments`), whose
    scores were centred at `score_top`."""
    return PathStatistics(
        entropy=jnp.maximum(entropy_, 0),  # >= 0 up to rounding, as `rx.entropy`
        top_prob=jnp.exp(top - lse),
        mean_score=mean_centred + score_top,
    )
