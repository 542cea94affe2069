"""Conserved quantities of flows with path-dependent scores (THEORY §4)."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._misc import compute_dtype


def frequency_penalty_hamiltonian(
    log_p: Float[ArrayLike, "*batch vocab"],
    counts: Float[ArrayLike, "*batch vocab"],
    logits: Float[ArrayLike, "*logits_batch vocab"],
    temperature: Float[ArrayLike, "*temperature_batch"],
    alpha: Float[ArrayLike, "*alpha_batch"],
) -> Float[Array, "*batch"]:
    """The energy conserved by the replicator (R) with a cumulative frequency penalty.

    For `Replicator(Logits(s) + FrequencyPenalty(alpha), T)` (counts `ċ = p`,
    `θ̇ = (s - alpha c)/T`), THEORY §4 gives the conserved Hamiltonian
    `ℋ = logsumexp θ - <s, c>/T + alpha |c|²/(2T)` of the *unnormalised* log-weights `θ`.
    replicax stores `log p` (normalised), which has lost the level of `θ`. This function
    returns the same energy in a form that needs only `log p` and `c`:

    `ℋ' = -mean(log p) - <s - mean(s), c>/T + alpha |c - mean(c)|²/(2T)`,

    the means taken over the tokens alive (`log p > -inf`). It is `ℋ` minus the mean of
    `θ` (whose rate `(mean(s) - alpha mean(c))/T` is the rate of
    `(mean(s) Σc - alpha (Σc)²/(2V))/T`, since `Σċ = 1`), so it is conserved as well, and
    it does not change when `θ` is shifted by a constant: normalised `log p` and raw
    log-weights give the same value. Under the entropic replicator (E) it decreases.

    **Arguments:**

    - `log_p`: log-probabilities (or unnormalised log-weights), `(*batch, vocab)`, e.g.
        `Trajectory.log_p`. `-inf` marks tokens off the face.
    - `counts`: the counts `c` of the `FrequencyPenalty` term, same shape (e.g. its
        entry of `Trajectory.aux`).
    - `logits`: the constant logits `s`, broadcastable to `log_p`.
    - `temperature`, `alpha`: broadcastable to the batch shape `log_p.shape[:-1]`.

    **Returns:**

    `ℋ'` of shape `*batch`.
    """
    log_p = jnp.asarray(log_p)
    dtype = compute_dtype(log_p.dtype)
    log_p = log_p.astype(dtype)
    counts = jnp.asarray(counts, dtype)
    logits = jnp.asarray(logits, dtype)
    batch = jnp.broadcast_shapes(log_p.shape, counts.shape, logits.shape)[:-1]
    log_p, counts, logits = (
        jnp.broadcast_to(x, batch + x.shape[-1:]) for x in (log_p, counts, logits)
    )
    temperature = jnp.broadcast_to(jnp.asarray(temperature, dtype), batch)[..., None]
    alpha = jnp.broadcast_to(jnp.asarray(alpha, dtype), batch)[..., None]
    alive = log_p > -jnp.inf
    log_p = jax.nn.log_softmax(jnp.where(alive, log_p, -jnp.inf), axis=-1)
    n = jnp.sum(alive, axis=-1, keepdims=True).astype(dtype)

    def centred(x):
        x = jnp.where(alive, x, 0)
        return jnp.where(alive, x - jnp.sum(x, axis=-1, keepdims=True) / n, 0)

    entropy_like = -jnp.sum(jnp.where(alive, log_p, 0), axis=-1, keepdims=True) / n
    s, c = centred(logits), centred(counts)
    energy = (
        entropy_like
        - jnp.sum(s * c, axis=-1, keepdims=True) / temperature
        + alpha * jnp.sum(c * c, axis=-1, keepdims=True) / (2 * temperature)
    )
    return energy[..., 0]
