"""Logits to run the flows on: a synthetic, language-model-like batch, or a `.npy` file.

Both return host (NumPy) float32 arrays of shape `(batch, vocab)`, ready for
`replicax.Replicator(logits, temperature)`.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float


def synthetic_logits(
    seed: int = 0, batch: int = 8, vocab: int = 32_000
) -> Float[np.ndarray, "batch vocab"]:
    """Deterministic, heavy-tailed logits shaped like those of a language model.

    A trained model's next-token probabilities follow Zipf's law in rank closely:
    `p(rank r) ∝ r^(-a)`, with `a` from about 1 to 2.5 depending on how predictable the
    context is. A few tokens then carry most of the mass and a tail of tens of thousands
    carries the rest. Each context here gets its own exponent `a` and logits
    `-a log r`, to which are added Student-t noise with 4 degrees of freedom (it breaks
    the exact power law and its ties, and lifts a few tail tokens as real logits do), an
    independent shuffle of the vocabulary (token ids are not sorted by probability) and
    a random offset (raw logits have an arbitrary level, which the flows ignore). Over
    seeds, the entropy of `softmax(s)` has a median near 2.3 nats (range 0.9 to 7) and
    the top token a median mass near 0.5.

    **Arguments:**

    - `seed`: seed of the `jax.random` key; one seed always gives the same logits,
        with or without `jax_enable_x64`.
    - `batch`: number of contexts `B`.
    - `vocab`: vocabulary size `V`.

    **Returns:**

    A float32 NumPy array of shape `(batch, vocab)`.
    """
    key = jax.random.PRNGKey(seed)
    return np.asarray(_synthetic_logits(key, batch, vocab), dtype=np.float32)


@eqx.filter_jit
def _synthetic_logits(key, batch, vocab):
    f32 = jnp.float32  # spelled out everywhere, so that x64 mode changes nothing
    k_exponent, k_noise, k_perm, k_offset = jax.random.split(key, 4)
    exponent = jax.random.uniform(k_exponent, (batch, 1), f32, minval=1.0, maxval=2.5)
    log_rank = jnp.log(jnp.arange(1, vocab + 1, dtype=f32))[None, :]
    # Student-t(4) built as normal / sqrt(chi-square(4) / 4): `jax.random.t` samples a
    # gamma with a rejection loop, which is slow to compile.
    normals = jax.random.normal(k_noise, (5, batch, vocab), f32)
    chi2 = jnp.sum(normals[1:] ** 2, axis=0)
    noise = 0.3 * normals[0] / jnp.sqrt(chi2 / 4)
    sorted_logits = -exponent * log_rank + noise
    # Shuffle each context's vocabulary with its own permutation.
    perms = jnp.argsort(jax.random.uniform(k_perm, (batch, vocab), f32), axis=-1)
    logits = jnp.take_along_axis(sorted_logits, perms, axis=-1)
    offset = jax.random.uniform(k_offset, (batch, 1), f32, minval=-2.0, maxval=8.0)
    return logits + offset


def load_logits(path: str | os.PathLike) -> Float[np.ndarray, "batch vocab"]:
    """Reads a batch of logits from a `.npy` file and checks it.

    **Arguments:**

    - `path`: a `.npy` file (as written by `np.save`) holding one array of real numbers
        of shape `(V,)` or `(B, V)`, with `B >= 1` and `V >= 2`. `-inf` masks a token;
        NaN, `+inf` and rows with every token masked are errors.

    **Returns:**

    A float32 NumPy array of shape `(B, V)`; a 1-D file gives `B = 1`.

    **Raises:**

    `ValueError`, in one line naming the file and the problem, when the file is not a
    single `.npy` array (e.g. text, or an `.npz` archive), holds non-real numbers, has
    the wrong shape, or contains NaN, `+inf` or an all-`-inf` row (the first bad entry
    is given by row and token). `OSError` (such as `FileNotFoundError`) when the file
    cannot be opened at all.
    """
    path = os.fspath(path)
    try:
        logits = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read {path} as a .npy array ({reason}).") from None
    if not isinstance(logits, np.ndarray):  # `np.load` opened an `.npz` archive
        logits.close()
        raise ValueError(
            f"{path} holds several arrays (.npz); save a single one with np.save."
        )
    if not (
        np.issubdtype(logits.dtype, np.floating)
        or np.issubdtype(logits.dtype, np.integer)
    ):
        raise ValueError(
            f"{path} has dtype {logits.dtype}; logits must be real numbers."
        )
    if logits.ndim not in (1, 2):
        raise ValueError(
            f"{path} has shape {logits.shape}; logits must have shape (V,) or (B, V)."
        )
    if logits.size == 0 or logits.shape[-1] < 2:
        raise ValueError(
            f"{path} has shape {logits.shape}; logits need at least one context of at "
            "least 2 tokens."
        )
    logits = np.atleast_2d(logits).astype(np.float32)
    bad = np.isnan(logits) | (logits == np.inf)
    if bad.any():
        row, token = (int(i) for i in np.argwhere(bad)[0])
        what = "NaN" if np.isnan(logits[row, token]) else "+inf"
        raise ValueError(
            f"{path} contains {what} (first at row {row}, token {token}; "
            f"{int(bad.sum())} bad entries in all); use -inf to mask a token."
        )
    empty = np.all(logits == -np.inf, axis=-1)
    if empty.any():
        raise ValueError(
            f"row {int(np.argmax(empty))} of {path} is all -inf: no token is left."
        )
    return logits
