"""Small internal helpers: dtypes, concreteness and error messages with batch indices."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype replicax computes in for inputs of `dtype`.

    float32 and float64 are kept; half precision (bf16, fp16) and integers are promoted to
    float32, or to float64 when `jax_enable_x64` is on and the input was an integer.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        return dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(jnp.result_type(float))


def is_concrete(x) -> bool:
    """Whether `x` has a value now (not a tracer), so that it can be checked eagerly."""
    return not isinstance(x, jax.core.Tracer)


def as_numpy(x) -> np.ndarray:
    """A concrete array as numpy (half precision widened), for checks made now.

    Checks of concrete values use numpy, not jnp: under an outer `jax.jit`, jnp
    operations on a closed-over constant would give tracers.
    """
    x = np.asarray(x)
    if x.dtype.kind == "f" and x.dtype.itemsize < 4 or x.dtype.kind not in "fc":
        x = x.astype(np.float32)
    return x


_MAX_INDEXED_MESSAGES = 1024


def error_if_rows(
    x: PyTree, bad: Bool[Array, "*batch"], message: str
) -> PyTree:
    """Raise at run time if any row of `bad` is true, naming the first such batch index.

    `message` is formatted with `{index}`. Batches of more than 1024 rows name the index
    only when it is among the first 1024.
    """
    shape = bad.shape
    flat = bad.reshape(-1)
    n = flat.shape[0]
    if n == 0:
        return x
    first = jnp.argmax(flat)
    count = min(n, _MAX_INDEXED_MESSAGES)
    msgs = [message.format(index=format_index(i, shape)) for i in range(count)]
    if n > count:
        msgs.append(message.format(index=f"(beyond the first {count} rows)"))
        index = jnp.minimum(first, count)
    else:
        index = first
    return eqx.branched_error_if(x, jnp.any(flat), index, msgs)


def format_index(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Unravel a flat batch index into a tuple of Python ints."""
    if not shape:
        return ()
    return tuple(int(i) for i in np.unravel_index(flat_index, shape))
