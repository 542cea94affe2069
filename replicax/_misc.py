"""Small internal helpers: dtypes, concreteness and error messages with batch indices."""

import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox.internal import unvmap_any, unvmap_max
from jaxtyping import Array, Bool, Int, PyTree


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


def python_scalar(x: float | int) -> Array:
    """A Python number as a weakly typed JAX scalar, as `jnp.asarray(x)` makes it (a
    float as the default float dtype, an int promoted to it). Cached per value: arrays are
    immutable, and a decoding loop passes the same temperature at every token."""
    return _python_scalar(type(x), x, jax.config.jax_enable_x64)


def typed_scalar(x: float | int, dtype) -> Array:
    """A Python number as a JAX scalar of `dtype`, cached per value as `python_scalar`."""
    return _typed_scalar(type(x), x, jnp.dtype(dtype))


@functools.lru_cache(maxsize=256)
def _typed_scalar(kind, x, dtype) -> Array:
    del kind
    with jax.ensure_compile_time_eval():
        return jnp.asarray(x, dtype)


@functools.lru_cache(maxsize=256)
def _python_scalar(kind, x, x64) -> Array:
    del kind, x64  # part of the key only
    with jax.ensure_compile_time_eval():
        out = jnp.asarray(x)
        if not jnp.issubdtype(out.dtype, jnp.floating):
            out = out.astype(compute_dtype(out.dtype))
    return out


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
    x: PyTree,
    bad: Bool[Array, "*batch"],
    message: str | Sequence[str],
    kind: Int[Array, "*batch"] | None = None,
) -> PyTree:
    """Raise at run time if any row of `bad` is true, naming the first such batch index.

    `message` is formatted with `{index}`. It may instead be a sequence of such
    templates, one per value of `kind` (integers shaped like `bad`): the first bad row's
    kind picks its message. Batches of more than 1024 rows name the index only when it
    is among the first 1024.
    """
    shape = bad.shape
    flat = bad.reshape(-1)
    n = flat.shape[0]
    if n == 0:
        return x
    templates = [message] if isinstance(message, str) else list(message)
    first = jnp.argmax(flat)
    count = min(n, _MAX_INDEXED_MESSAGES)
    indices = [format_index(i, shape) for i in range(count)]
    if n > count:
        indices.append(f"(beyond the first {count} rows)")
        index = jnp.minimum(first, count)
    else:
        index = first
    msgs = [t.format(index=i) for t in templates for i in indices]
    if kind is not None:
        index = kind.reshape(-1)[first].astype(index.dtype) * len(indices) + index
    any_bad = jnp.any(flat)
    # The check is made on a scalar flag, not on `x`, and `x` is read through the flag
    # so that the check is not dropped as unused (the flag is false whenever the program
    # goes on; under `EQX_ON_ERROR=nan` it is true and `x` NaN, as equinox leaves it).
    flag = _checked_flag(any_bad, index, msgs, (x, bad))

    def read(leaf):
        return jnp.where(flag, _nan_like(leaf), leaf) if eqx.is_array(leaf) else leaf

    return jtu.tree_map(read, x)


def _checked_flag(any_bad, index, msgs, like) -> Array:
    """`any_bad`, after a run-time check that raises `msgs[index]` if it is true.

    On arrays sharded over a mesh of explicit axes the check runs on every device (under
    `shard_map`). Left to XLA, the check's `cond` (a host callback) is placed on one
    device: a sharded `x` passed through it would be gathered there and split again
    ("involuntary full rematerialization"), and a failing check would leave the other
    devices waiting at a collective until the process aborts. The same holds in a
    region of a mesh's axes made `Auto` (`with_auto_axes`), whose mesh is the context's.
    """
    mesh = _explicit_mesh(like)
    if mesh is None:
        context = jax.sharding.get_abstract_mesh()
        if not context.empty and context.size > 1:
            mesh = context
    if mesh is None:
        return eqx.branched_error_if(any_bad, any_bad, index, msgs)

    def check(any_bad, index):
        return eqx.branched_error_if(any_bad, any_bad, index, msgs)

    # `shard_map` maps over devices only: a `vmap` around it is resolved first.
    any_bad, index = unvmap_any(any_bad), unvmap_max(index)
    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(
        check,
        mesh=mesh,
        in_specs=(replicated, replicated),
        out_specs=replicated,
        check_vma=False,
    )(any_bad, index)


def _explicit_mesh(tree: PyTree):
    """The mesh an array leaf of `tree` lies on, if all the mesh's axes are explicit."""
    for leaf in jtu.tree_leaves(tree):
        if not eqx.is_array(leaf):
            continue
        mesh = getattr(getattr(jax.typeof(leaf), "sharding", None), "mesh", None)
        if (
            mesh is not None
            and not mesh.empty
            and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
        ):
            return mesh
    return None


def _nan_like(x: Array) -> float | int | bool:
    """What equinox's checks leave in place of `x` under `EQX_ON_ERROR=nan`, as a Python
    scalar (weakly typed: `x` keeps its dtype and weak type)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return float("nan")
    if jnp.issubdtype(x.dtype, jnp.integer):
        return int(jnp.iinfo(x.dtype).max)
    return True


def format_index(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Unravel a flat batch index into a tuple of Python ints."""
    if not shape:
        return ()
    return tuple(int(i) for i in np.unravel_index(flat_index, shape))


# ----------------------------------------------------------------------------------------
# Parameters that must lie in an interval (scores and supports share these checks)


def in_interval(xp, value, low, high, low_open: bool, high_open: bool):
    """Elementwise `value ∈ interval` (and not NaN), with numpy or jnp as `xp`.

    An infinite bound admits infinite values only where it is closed (`high=inf` with
    `high_open=False` accepts `+inf`)."""
    ok = ~xp.isnan(value)
    ok &= value > low if low_open else value >= low
    ok &= value < high if high_open else value <= high
    return ok


def interval_str(low, high, low_open: bool, high_open: bool) -> str:
    return ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")


def is_host_value(value) -> bool:
    """Whether `value` lives on the host (Python or numpy), so that checking it costs no
    device round trip."""
    return isinstance(value, int | float | np.ndarray | np.number | list | tuple)


def check_host_interval(value, name: str, low, high, low_open: bool, high_open: bool):
    """`ValueError` now if a host value leaves the interval; device values (and tracers)
    are checked later on device by `check_interval`."""
    if is_host_value(value):
        host = np.asarray(value, np.float64)
        ok = in_interval(np, host, low, high, low_open, high_open)
        if not np.all(ok):
            interval = interval_str(low, high, low_open, high_open)
            raise ValueError(
                f"`{name}` must be in {interval}; received {host[~ok].reshape(-1)[0]}."
            )


def check_interval(value, name, low, high, low_open, high_open, *, attach_to=None):
    """Run-time error naming the batch row where `value` leaves the interval. The check
    is attached to `attach_to` (default `value`): it must be an array the computation
    goes on to read, or the compiler drops the check."""
    ok = in_interval(jnp, value, low, high, low_open, high_open)
    interval = interval_str(low, high, low_open, high_open)
    return error_if_rows(
        value if attach_to is None else attach_to,
        ~ok,
        f"`{name}` must be in {interval}; it is not at batch index {{index}}.",
    )


# ----------------------------------------------------------------------------------------
# Per-row fields: parameters given as a scalar or one value per batch row


def fields_batch_shape(module, row_fields: dict[str, int], what: str) -> tuple[int, ...]:
    """The batch shape of `module`'s per-row fields: each field `name` with `core` trailing
    axes (`0` for a scalar per row, `1` for a vector over the vocabulary). A field that is
    `None` (an option not given) has no rows."""
    row_fields = present_fields(module, row_fields)
    shapes = []
    for name, core in row_fields.items():
        shape = jnp.shape(getattr(module, name))
        shapes.append(shape[: len(shape) - core])
    try:
        return tuple(jnp.broadcast_shapes(*shapes)) if shapes else ()
    except ValueError:
        raise ValueError(
            f"The per-row parameters of `{what}` do not broadcast together: "
            + ", ".join(f"`{n}` {jnp.shape(getattr(module, n))}" for n in row_fields)
            + "."
        ) from None


def broadcast_fields(module, row_fields: dict[str, int], batch_shape, what: str):
    """`module` with every per-row field given the leading shape `batch_shape`."""
    row_fields = present_fields(module, row_fields)
    if not row_fields:
        return module
    values = []
    for name, core in row_fields.items():
        x = jnp.asarray(getattr(module, name))
        tail = x.shape[x.ndim - core :] if core else ()
        try:
            values.append(jnp.broadcast_to(x, tuple(batch_shape) + tail))
        except ValueError:
            raise ValueError(
                f"`{name}` of `{what}` has shape {x.shape}, which does not broadcast to "
                f"the batch shape {tuple(batch_shape)}"
                + (f" (plus {core} trailing axis)" if core else "")
                + "."
            ) from None
    return eqx.tree_at(
        lambda m: tuple(getattr(m, n) for n in row_fields), module, tuple(values)
    )


def present_fields(module, row_fields: dict[str, int]) -> dict[str, int]:
    """The per-row fields of `module` that are not `None`."""
    return {n: c for n, c in row_fields.items() if getattr(module, n) is not None}
