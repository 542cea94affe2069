"""Per-call overhead: entry points traced once per *structure* of their arguments.

A direct call of `solve` prepares its arguments in Python (shapes, dtypes, supports, times
made arrays) before its jitted work: about 1 ms, against ~0.1 ms of work for one context
of 32k tokens, and a decoding loop pays it at every token. Calls that differ only in
values prepare the same way, so `cached_call` traces the whole entry point (preparation
included) once per structure of its arguments into one `jax.jit`, kept in a small LRU
cache; later calls only flatten their arguments, run the host checks that must raise
eagerly, and dispatch.

What is checked from shapes is checked when `jax.jit` traces (a new shape retraces), and
values are checked on device as on the direct path, so a cached call raises what a direct
one does. Calls holding tracers (inside the user's `jit`, `grad` or `vmap`) are not
cached: the user's own trace already does this work once.
"""

import collections
import functools
import logging
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from ._misc import python_scalar


CACHE_SIZE = 64

# Marks a leaf that is part of the key (static), not an argument of the cached `jax.jit`.
_STATIC = object()


class _Cached(NamedTuple):
    fn: Callable[..., Any]
    info: Any


_cache: "collections.OrderedDict[Any, _Cached]" = collections.OrderedDict()


def has_tracer(tree: PyTree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(tree))


def cached_call(
    body: Callable[..., Any],
    tree: PyTree,
    key: Hashable,
    first_call: Callable[[], Any],
    host_args: Callable[[Any], tuple],
) -> Any | None:
    """`body(key, tree, *host_args(info))` under a `jax.jit` kept per structure of `tree`
    and per `key`, or `None` when the call cannot be cached (a leaf of `tree` is a tracer,
    or a static leaf or `key` is unhashable).

    - `body`: a module-level function (it is part of the cache key).
    - `tree`: the arguments. Array leaves and Python floats (made arrays) are arguments
        of the jitted function (new values do not retrace); every other leaf is part of
        the key.
    - `key`: the static configuration (hashable).
    - `first_call`: run eagerly once per new structure, before tracing (the checks a
        direct call makes from shapes and host values); what it returns is kept as
        `info`.
    - `host_args`: run on every call with `info`: the host-checked arguments passed to
        `body` after `tree` (e.g. times made arrays).

    As `eqx.filter_jit`, the call waits for its result, so that a failed run-time check
    (`eqx.error_if`) raises here, as an `eqx.EquinoxRuntimeError`.
    """
    leaves, treedef = jtu.tree_flatten(tree)
    dynamic, spec = [], []
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            return None
        if isinstance(x, jax.Array | np.ndarray | np.generic):
            dynamic.append(x)
            spec.append((x.dtype, getattr(x, "weak_type", False)))
        elif type(x) is float:
            x = python_scalar(x)
            dynamic.append(x)
            spec.append((x.dtype, True))
        else:
            spec.append((_STATIC, x))
    full_key = (body, key, treedef, tuple(spec))
    try:
        cached = _cache.get(full_key)
    except TypeError:
        return None
    if cached is None:
        info = first_call()
        traced = functools.partial(_traced, body, key, treedef, tuple(spec))
        cached = _cache[full_key] = _Cached(jax.jit(traced), info)
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(full_key)
    return _run(cached.fn, dynamic, host_args(cached.info))


class _QuietCallbackFailures(logging.Filter):
    # JAX logs each failed host callback; an `eqx.error_if` that fires is one, and is
    # reported by the error raised below instead.
    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "jax._src.callback"
            and record.getMessage() == "jax.pure_callback failed"
        )


_QUIET = _QuietCallbackFailures()
_EQX_MARK = "_EquinoxRuntimeError: "


def _run(fn, dynamic, args):
    """`fn(dynamic, *args)`, waited for, with a failed run-time check raised as the
    `eqx.EquinoxRuntimeError` carrying its message (what `eqx.filter_jit` raises on the
    direct path; `jax.jit` alone buries it in a long XLA runtime error)."""
    logger = logging.getLogger("jax._src.callback")
    logger.addFilter(_QUIET)
    try:
        out = fn(dynamic, *args)
        leaves = jtu.tree_leaves(out)
        if leaves:
            jax.block_until_ready(leaves[0])  # one program: one output ready, all ready
    except (jax.errors.JaxRuntimeError, ValueError) as error:
        text = str(error)
        if _EQX_MARK not in text:
            raise
        message = text.split(_EQX_MARK, 1)[1].split("\n\n\n", 1)[0].strip()
        raise eqx.EquinoxRuntimeError(message) from None
    finally:
        logger.removeFilter(_QUIET)
    return out


def _traced(body, key, treedef, spec, dynamic, *args):
    values = iter(dynamic)
    leaves = [s[1] if type(s) is tuple and s[0] is _STATIC else next(values) for s in spec]
    return body(key, jtu.tree_unflatten(treedef, leaves), *args)
