"""Argument preparation and run-time checks shared by every entry point.

Every entry point (`solve`, the observables of a flow, the discrete maps) works the same
way (diffrax `_integrate.py`, equinox `nn/_linear.py`):

1. outside `jit`, `prepare_rows` checks what is known from shapes and host values, finds
   the batch shape of the flow, its start and its supports, and `prepare_times` turns
   times into arrays (so that new values do not recompile);
2. inside `jit`, `Rows.flat()` broadcasts every leaf to the batch, attaches the run-time
   checks of the values (on device, naming the batch index), flattens the batch and
   returns one `Row` per context;
3. `vmap_rows` maps a one-context function over those rows and restores the batch shape
   (`on_rows` hands them all to one function, for work that couples the contexts).

This module is internal: its names carry no underscore so that the other modules can
share them, and nothing here is re-exported.
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._flows import AbstractFlow
from ._misc import as_numpy, compute_dtype, error_if_rows, is_concrete, typed_scalar
from ._saveat import SaveAt
from ._support import AbstractSupport, as_supports, face_of_row


# Tolerance on `|Σ y0 - 1|` (or `|logsumexp log_y0|`) per dtype.
Y0_TOLERANCE = {4: 1e-4, 8: 1e-9}


class Row(eqx.Module):
    """One context, prepared: its flow, the face it lives on and its start.

    **Fields:**

    - `flow`: the flow of this context (its own logits, temperature and parameters).
    - `face`: the tokens the context lives on: those its logits allow, on which `y0`
        puts mass, and that its supports keep.
    - `alive`: the same without the supports (the face of the unrestricted flow).
    - `log_y0`: the start as log-probabilities, as given (`None`: uniform on the face).
    - `supports`: the supports of this context (one parameter set each), as given.
    """

    # Built for the whole flattened batch (a leading axis of rows) and mapped over it.
    flow: AbstractFlow
    face: Bool[Array, "*rows vocab"]
    alive: Bool[Array, "*rows vocab"]
    log_y0: Float[Array, "*rows vocab"] | None
    supports: tuple[AbstractSupport, ...]
    dtype: Any = eqx.field(static=True)

    @property
    def uniform(self) -> bool:
        return self.log_y0 is None

    def log_p0(self, on: Bool[Array, " vocab"] | None = None) -> Float[Array, " vocab"]:
        """The start I-projected onto `on` (default: the face), `-inf` off it; uniform on
        it when no start was given."""
        on = self.face if on is None else on
        start = jnp.zeros(on.shape, self.dtype) if self.log_y0 is None else self.log_y0
        return jax.nn.log_softmax(jnp.where(on, start, -jnp.inf))

    def theta0(self, on: Bool[Array, " vocab"] | None = None) -> Float[Array, " vocab"]:
        """`log_p0(on)` with `0` off `on`: finite log-weights to integrate."""
        on = self.face if on is None else on
        return jnp.where(on, self.log_p0(on), 0)

    def scores(self) -> Float[Array, " vocab"]:
        """The constant scores (finite; masked tokens hold 0)."""
        return self.flow.score.constant_value().astype(self.dtype)

    def centred_scores(
        self, on: Bool[Array, " vocab"] | None = None
    ) -> Float[Array, " vocab"]:
        """The constant scores minus their maximum on `on` (default: the face), `0` off
        it."""
        on = self.face if on is None else on
        scores = self.scores()
        top = jnp.max(jnp.where(on, scores, -jnp.inf))
        return jnp.where(on, scores - top, 0)


class Rows(eqx.Module):
    """A flow, its start and its supports, with the batch shape they broadcast to.

    Built outside `jit` from shapes alone (no value is read, so nothing waits for the
    device); `flat()` is called inside `jit`.
    """

    flow: AbstractFlow  # as given
    start: Float[Array, "*start_batch vocab"] | None  # y0 or log_y0, as given
    supports: tuple[AbstractSupport, ...]
    start_name: str | None = eqx.field(static=True)
    batch_shape: tuple[int, ...] = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    temperature_first: bool = eqx.field(static=True, default=True)

    @property
    def num_rows(self) -> int:
        return math.prod(self.batch_shape)

    def flat(self) -> Row:
        """One `Row` per context (leading axis: the flattened batch), with the run-time
        checks of every value attached."""
        batch_shape, vocab = self.batch_shape, self.vocab_size
        flow = self.flow
        score = flow.score.broadcast_batch(batch_shape)
        temperature = jnp.broadcast_to(flow.temperature, batch_shape)
        flow = eqx.tree_at(lambda f: (f.score, f.temperature), flow, (score, temperature))
        flow = self.flatten(check_flow_values(flow, self.dtype))
        supports = tuple(
            self.flatten(s.broadcast_batch(batch_shape).check()) for s in self.supports
        )
        alive = score_face(flow.score, (self.num_rows, vocab))
        log_y0 = None
        if self.start is not None:
            start = self.start.astype(self.dtype)
            log_y0 = jnp.log(start) if self.start_name == "y0" else start
            log_y0 = jnp.broadcast_to(log_y0, batch_shape + (vocab,))
            log_y0 = check_start(log_y0, self.start_name, Y0_TOLERANCE[self.dtype.itemsize])
            log_y0 = log_y0.reshape(self.num_rows, vocab)
            alive = alive & (log_y0 > -jnp.inf)
        face = alive
        if supports:
            logits = flow.score.constant_logits()
            # A face sorts the vocabulary: each row is gathered onto the devices of its
            # batch shard for it, and the face is split again as the logits are.
            args = gather_within_rows((logits, flow.temperature, supports))
            kept = jax.vmap(face_of_row, in_axes=(0, 0, 0, None))(
                *match_row_sharding(args), self.temperature_first
            )
            kept = reshard_like(kept, logits)
            kept = error_if_rows(
                kept,
                self.unflatten(~jnp.any(kept & (logits > -jnp.inf), axis=-1)),
                "`support` leaves no token at batch index {index}.",
            )
            face = face & kept
        if self.start is not None:
            face = error_if_rows(
                face,
                self.unflatten(~jnp.any(face, axis=-1)),
                f"`{self.start_name}` puts no mass on any token allowed by the logits"
                + (" and `support`" if supports else "")
                + " at batch index {index}.",
            )
        return Row(flow, face, alive, log_y0, supports, self.dtype)

    def flatten(self, tree: PyTree) -> PyTree:
        """Every array leaf of `tree` (leading shape `batch_shape`) as `(rows, ...)`."""
        n, k = self.num_rows, len(self.batch_shape)
        return jtu.tree_map(
            lambda x: x.reshape((n,) + x.shape[k:]) if eqx.is_array(x) else x, tree
        )

    def broadcast(self, x: ArrayLike) -> Array:
        """An extra per-row argument (e.g. `eps`) as one value per row."""
        return jnp.broadcast_to(x, self.batch_shape).reshape(self.num_rows)

    def unflatten(self, x: Array) -> Array:
        return x.reshape(self.batch_shape + x.shape[1:])


def score_face(score, shape: tuple[int, ...]) -> Bool[Array, "..."]:
    """The tokens `score` allows, as a mask of `shape` (`score.face()` is `None` when it
    allows all of them)."""
    face = score.face()
    return jnp.ones(shape, bool) if face is None else face


def vmap_rows(fn: Callable[..., PyTree], rows: Rows, *args) -> PyTree:
    """`fn(row, *arg_rows)` for every context, with the batch shape restored on every
    leaf of the output. Each of `args` is broadcast to one value per row. Call inside
    `jit` (un-jitted, a vmapped closed form dispatches many small operations)."""
    return on_rows(jax.vmap(fn), rows, *args)


def on_rows(fn: Callable[..., PyTree], rows: Rows, *args) -> PyTree:
    """`fn(flat_rows, *arg_rows)` once for all contexts (every leaf leading with one
    axis of rows), with the batch shape restored on every leaf of the output: for work
    that couples the contexts (one step size for the batch); `vmap_rows` maps `fn`
    over them instead."""
    row = rows.flat()
    args = [rows.broadcast(a) for a in args]
    row, args = match_row_sharding((row, args))
    return jtu.tree_map(rows.unflatten, fn(row, *args))


def _row_axis_spec(x) -> tuple[Any, Any]:
    """`(mesh, spec of the leading axis)` of an array sharded over a mesh of explicit
    axes, `(None, None)` otherwise."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not len(sharding.spec):
        return None, None
    return mesh, sharding.spec[0]


def _padded_spec(x) -> tuple:
    """The `PartitionSpec` of an explicitly sharded array, one entry per axis."""
    return (tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim)[: x.ndim]


def match_row_sharding(tree: PyTree) -> PyTree:
    """Every array leaf of `tree` (leading axis: the rows) sharded along that axis as
    the first leaf that is.

    With explicit sharding (a `NamedSharding` over a mesh of `Explicit` axes, the
    default of `jax.make_mesh`) `vmap` requires every mapped input to be sharded the same
    way along the mapped axis. Logits sharded over the batch (data parallelism) meet
    leaves built here (the face, a broadcast temperature) that are not: those are
    resharded to the logits' batch sharding, their other axes kept as they are. Without a
    leaf sharded along the rows nothing changes."""
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_array(x) and x.ndim >= 1]
    mesh = axis = None
    for x in leaves:
        mesh, axis = _row_axis_spec(x)
        if axis is not None:
            break
    if axis is None:
        return tree

    def match(x):
        if not (eqx.is_array(x) and x.ndim >= 1):
            return x
        x_mesh, x_axis = _row_axis_spec(x)
        if x_axis == axis:
            return x
        rest = (None,) * (x.ndim - 1)
        if x_mesh is not None:
            rest = _padded_spec(x)[1:]
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis, *rest))
        return jax.sharding.reshard(x, sharding)

    return jtu.tree_map(match, tree)


def gather_within_rows(tree: PyTree) -> PyTree:
    """Every array leaf of `tree` (leading axis: the rows) with only that axis left
    sharded: what sorts or scans a row (a face) needs the whole row on each device."""

    def gather(x):
        if not (eqx.is_array(x) and x.ndim >= 2):
            return x
        mesh, axis = _row_axis_spec(x)
        if mesh is None or all(a is None for a in jax.typeof(x).sharding.spec[1:]):
            return x
        spec = jax.sharding.PartitionSpec(axis, *(None,) * (x.ndim - 1))
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))

    return jtu.tree_map(gather, tree)


def reshard_like(x: Array, like: Array) -> Array:
    """`x` sharded as `like` (same shape) when `like` is sharded over a mesh of explicit
    axes; `x` unchanged otherwise."""
    mesh, _ = _row_axis_spec(like)
    if mesh is None or jax.typeof(x).sharding == jax.typeof(like).sharding:
        return x
    return jax.sharding.reshard(x, jax.typeof(like).sharding)


def with_auto_axes(fn: Callable[..., PyTree], rows: Rows, *args) -> PyTree:
    """`fn(rows, *args)`; on inputs sharded over a mesh of explicit axes (the default
    of `jax.make_mesh`), run with the mesh's axes made `Auto`, its outputs sharded as the
    inputs are: the batch axes as the rows, a trailing vocabulary axis as the vocabulary.

    For what runs nested solvers (diffrax, optimistix): under explicit sharding, JAX 0.10
    refuses their loops inside `vmap` over sharded rows, and diffrax builds its
    step buffers unsharded, so a loop's carry would change type. With `Auto` axes XLA's
    partitioner places that work instead, from the inputs' shardings. Every output leaf
    must lead with the batch shape (those that do not are replicated)."""
    mesh, spec = _explicit_spec(rows)
    if mesh is None:
        return fn(rows, *args)
    nb, vocab = len(rows.batch_shape), rows.vocab_size
    batch_spec, vocab_spec = spec[:nb], spec[nb] if len(spec) > nb else None
    if rows.supports and vocab_spec is not None:
        # Faces sort each row (again and again for `rx.Switched`). Left to XLA's
        # partitioner in the `Auto` region, sorts over the split vocabulary went
        # through collectives (8 CPU devices, (16, 32000) logits, top-p: `rx.Switched`
        # 37 s against 5.6 s batch-sharded, `rx.time_to` 2.5 s against 0.28 s), so the
        # rows are gathered whole onto the devices of their batch shard first, the
        # region computes whole rows, and its outputs are split over the vocabulary
        # again outside it.
        rows = _whole_rows(rows, vocab)
        whole = _run_auto(fn, rows, args, mesh, batch_spec, None)
        place = _output_placement(mesh, rows, batch_spec, vocab_spec)
        return jtu.tree_map(
            lambda x: jax.sharding.reshard(x, place(x)) if eqx.is_array(x) else x, whole
        )
    return _run_auto(fn, rows, args, mesh, batch_spec, vocab_spec)


def _output_placement(mesh, rows: Rows, batch_spec, vocab_spec) -> Callable:
    """The sharding of an output of `with_auto_axes`, from its shape: leading with the
    batch shape, sharded as `batch_spec`, a trailing vocabulary axis as `vocab_spec`;
    anything else replicated."""
    nb, vocab = len(rows.batch_shape), rows.vocab_size

    def place(x) -> jax.sharding.NamedSharding:
        if x.shape[:nb] != rows.batch_shape:
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rest = [None] * (x.ndim - nb)
        if rest and x.shape[-1] == vocab:
            rest[-1] = vocab_spec
        return jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*batch_spec, *rest)
        )

    return place


def _whole_rows(tree: PyTree, vocab: int) -> PyTree:
    """Every array leaf of `tree` whose last axis (of size `vocab`) is sharded over a
    mesh of explicit axes, with that axis gathered (its other axes kept)."""

    def gather(x):
        if not (eqx.is_array(x) and x.ndim >= 1 and x.shape[-1] == vocab):
            return x
        mesh, _ = _row_axis_spec(x)
        if mesh is None:
            return x
        spec = _padded_spec(x)
        if spec[-1] is None:
            return x
        whole = jax.sharding.PartitionSpec(*spec[:-1], None)
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, whole))

    return jtu.tree_map(gather, tree)


def _run_auto(fn, rows: Rows, args: tuple, mesh, batch_spec, vocab_spec) -> PyTree:
    """`with_auto_axes` once the placement is known: `fn(rows, *args)` with `mesh`'s
    axes made `Auto`, outputs leading with the batch shape sharded as `batch_spec`, a
    trailing vocabulary axis as `vocab_spec`, the others replicated."""
    leaves, treedef = jtu.tree_flatten((rows, args))
    is_dynamic = [eqx.is_array(x) for x in leaves]

    def call(dynamic):
        dynamic = iter(dynamic)
        inputs = [next(dynamic) if d else x for x, d in zip(leaves, is_dynamic)]
        rows, args = jtu.tree_unflatten(treedef, inputs)
        return fn(rows, *args)

    # The outputs' shapes (one more trace, with every output replicated), to give
    # each output its sharding.
    dynamic = [x for x, d in zip(leaves, is_dynamic) if d]
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out_shape = eqx.filter_eval_shape(
        jax.sharding.auto_axes(call, out_sharding=replicated), dynamic
    )
    out_leaves, out_treedef = jtu.tree_flatten(out_shape)
    out_is_dynamic = [isinstance(x, jax.ShapeDtypeStruct) for x in out_leaves]

    place = _output_placement(mesh, rows, batch_spec, vocab_spec)

    def auto(dynamic):
        return [x for x in jtu.tree_leaves(call(dynamic)) if eqx.is_array(x)]

    shardings = [place(x) for x, d in zip(out_leaves, out_is_dynamic) if d]
    out = iter(jax.sharding.auto_axes(auto, out_sharding=shardings)(dynamic))
    out = [next(out) if d else x for x, d in zip(out_leaves, out_is_dynamic)]
    return jtu.tree_unflatten(out_treedef, out)


def _explicit_spec(rows: Rows) -> tuple[Any, tuple]:
    """`(mesh, spec)` of the inputs of `rows` sharded over a mesh of explicit axes:
    the spec of one shaped `(*batch, vocab)` if any; else the batch axes' spec of one
    leading with them and the vocabulary's of one ending with it (e.g. logits of shape
    `(vocab,)` shared by a batch of starts), `None` for a part none gives;
    `(None, ())` if no input is sharded so."""
    nb, vocab = len(rows.batch_shape), rows.vocab_size
    mesh, batch_spec, vocab_spec = None, None, None
    for x, x_mesh, spec in explicitly_sharded((rows.flow, rows.start, rows.supports)):
        if x.shape == rows.batch_shape + (vocab,):
            return x_mesh, spec
        mesh = x_mesh if mesh is None else mesh
        if batch_spec is None and x.shape[:nb] == rows.batch_shape:
            if any(axis is not None for axis in spec[:nb]):
                batch_spec = spec[:nb]
        if vocab_spec is None and x.shape[-1] == vocab and spec[-1] is not None:
            vocab_spec = spec[-1]
    if mesh is None:
        return None, ()
    batch_spec = (None,) * nb if batch_spec is None else batch_spec
    return mesh, batch_spec + ((vocab_spec,) if vocab_spec is not None else ())


def explicitly_sharded(tree: PyTree):
    """`(leaf, mesh, spec)` for each array leaf of `tree` sharded along some axis over a
    mesh of explicit axes (`spec` padded with `None` to the leaf's rank)."""
    for x in jtu.tree_leaves(tree):
        if not (eqx.is_array(x) and x.ndim >= 1):
            continue
        mesh, _ = _row_axis_spec(x)
        if mesh is None:
            continue
        spec = _padded_spec(x)
        if any(axis is not None for axis in spec):
            yield x, mesh, spec


def explicit_batch_shards(rows: Rows) -> int | None:
    """Into how many parts the batch of `rows` is split over a mesh of explicit axes
    (the product of the sizes of the mesh axes that shard a batch axis; `1` when only
    the vocabulary is sharded), or `None` when no input is sharded over such a mesh."""
    mesh, spec = _explicit_spec(rows)
    if mesh is None:
        return None
    shards = 1
    for entry in spec[: len(rows.batch_shape)]:
        for axis in entry if isinstance(entry, tuple) else (entry,):
            if axis is not None:
                shards *= mesh.shape[axis]
    return shards


def map_rows_per_shard(fn: Callable[[Row], PyTree], rows: Rows, shards: int) -> PyTree:
    """`fn(row)` for every context, as `vmap_rows`, but one context at a time within
    each of `shards` equal parts of the flattened batch: the parts are `vmap`ped and
    the contexts of a part `lax.map`ped. Run under `with_auto_axes` with `shards` from
    `explicit_batch_shards`, so that each device holds one part.

    For programs that call LAPACK (dense linear solves, eigenvalues: `rx.equilibrium`):
    jaxlib's CPU LAPACK kernels split a batch of matrices over XLA's CPU thread pool
    and wait for the pieces, and several CPU devices doing so at once can leave every
    thread of the pool waiting (measured with jaxlib 0.10 on 8 CPU devices: the
    `vmap`ped program hung 3 times in 3). Each call here sees one matrix per device.
    A batch that does not split evenly is mapped as one part."""

    def mapped(flat: Row) -> PyTree:
        n = jtu.tree_leaves(flat)[0].shape[0]
        k = shards if n % shards == 0 else 1
        parts = jtu.tree_map(lambda x: x.reshape(k, n // k, *x.shape[1:]), flat)
        out = jax.vmap(lambda part: jax.lax.map(fn, part))(parts)
        return jtu.tree_map(lambda x: x.reshape(n, *x.shape[2:]), out)

    return on_rows(mapped, rows)


def prepare_rows(
    flow: AbstractFlow,
    *,
    y0: ArrayLike | None = None,
    log_y0: ArrayLike | None = None,
    support=None,
    temperature_first: bool = True,
    extra_batch_shapes: tuple[tuple[int, ...], ...] = (),
) -> Rows:
    """Check the shapes of a flow, its start and its supports, and find their common
    batch shape and the dtype to compute in."""
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "`flow` must be a replicax flow (e.g. `Replicator` or `EntropicReplicator`); "
            f"received {type(flow).__name__}."
        )
    if y0 is not None and log_y0 is not None:
        raise ValueError("Give at most one of `y0` and `log_y0`.")
    supports = as_supports(support)
    if supports and flow.score.constant_logits() is None:
        raise ValueError(
            "`support` is evaluated on the constant logits of the score, and this score "
            "has none: add a `Logits` term."
        )
    score = flow.score
    vocab_size = score.vocab_size

    float_leaves = [
        x
        for x in jtu.tree_leaves(flow)
        if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    start_name = "y0" if y0 is not None else ("log_y0" if log_y0 is not None else None)
    start = y0 if y0 is not None else log_y0
    if start is not None:
        start = jnp.asarray(start)
        if start.ndim == 0:
            raise ValueError(
                f"`{start_name}` must have shape (*batch, vocab); received a scalar."
            )
        if vocab_size is None:
            vocab_size = start.shape[-1]
        elif start.shape[-1] != vocab_size:
            raise ValueError(
                f"`{start_name}` must have shape (*batch, {vocab_size}) to match the "
                f"logits; received shape {start.shape}."
            )
        float_leaves.append(start)
    if vocab_size is None:
        raise ValueError(
            "Cannot tell the vocabulary size: the score has no `Logits` term, so give "
            "`y0` or `log_y0`."
        )
    # Python floats (temperature=0.7) are weakly typed and must not decide the dtype.
    strong = [x for x in float_leaves if not getattr(x, "weak_type", False)]
    itemsize = max([4] + [compute_dtype(x.dtype).itemsize for x in strong or float_leaves])
    dtype = jnp.dtype(jnp.float64 if itemsize == 8 else jnp.float32)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        dtype = jnp.dtype(jnp.float32)

    for s in supports:
        s.check_vocab(vocab_size)
    shapes = {
        "score": score.batch_shape,
        "temperature": flow.temperature.shape,
        **({start_name: start.shape[:-1]} if start is not None else {}),
        **{type(s).__name__: s.batch_shape for s in supports},
        **{f"argument {i}": shape for i, shape in enumerate(extra_batch_shapes)},
    }
    try:
        batch_shape = jnp.broadcast_shapes(*shapes.values())
    except ValueError:
        raise ValueError(
            "The batch shapes do not broadcast together: "
            + ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            + "."
        ) from None
    return Rows(
        flow,
        start,
        supports,
        start_name,
        tuple(batch_shape),
        vocab_size,
        dtype,
        temperature_first,
    )


def check_start(log_p0, name, tol):
    """Run-time errors for a start that is not a distribution, naming the batch index."""
    if name == "y0":
        bad_value = jnp.any(jnp.isnan(log_p0), axis=-1)
        value_msg = "`y0` has a negative or NaN entry at batch index {index}."
    else:
        bad_value = jnp.any(jnp.isnan(log_p0) | (log_p0 == jnp.inf), axis=-1)
        value_msg = "`log_y0` has a NaN or +inf entry at batch index {index}."
    total = jnp.sum(jnp.exp(jnp.where(jnp.isnan(log_p0), -jnp.inf, log_p0)), axis=-1)
    bad_sum = ~bad_value & ~(jnp.abs(total - 1) <= tol)
    what = "sum to 1" if name == "y0" else "be normalised (logsumexp 0)"
    sum_msg = f"`{name}` must {what} within {tol:g}; it does not at batch index {{index}}."
    log_p0 = error_if_rows(log_p0, bad_value, value_msg)
    return error_if_rows(log_p0, bad_sum, sum_msg)


def check_flow_values(flow: AbstractFlow, dtype) -> AbstractFlow:
    """Run-time checks of the temperature and of every score term (leaves broadcast to
    the batch shape, so that a bad row is named by its batch index).

    These are checks on device (`eqx.error_if`): nothing is copied to the host."""
    temperature = flow.temperature
    temperature = error_if_rows(
        temperature,
        ~(jnp.isfinite(temperature) & (temperature > 0)),
        "`temperature` must be finite and > 0; it is not at batch index {index}.",
    )
    # Below the smallest normal number `t/T` and `s/T` overflow (and a subnormal may be
    # flushed to 0): such a temperature is out of range, not greedy decoding.
    tiny = float(jnp.finfo(dtype).tiny)
    temperature = error_if_rows(
        temperature,
        temperature.astype(dtype) < tiny,
        f"`temperature` must be at least {tiny:.3g} (the smallest normal {dtype.name}); "
        "it is not at batch index {index}. Greedy decoding (T = 0) is the argmax.",
    )
    return eqx.tree_at(
        lambda f: (f.score, f.temperature), flow, (flow.score.check(), temperature)
    )


# ----------------------------------------------------------------------------------------
# Times


def as_scalar(x, name: str, dtype) -> Array:
    """A scalar argument as an array of `dtype`; a host value is checked to be finite.

    A Python number is checked in Python and converted once per value (this runs on
    every call of `solve`)."""
    if type(x) is float or type(x) is int:
        if not math.isfinite(x):
            raise ValueError(f"`{name}` must be finite; received {x}.")
        return typed_scalar(x, dtype)
    x = jnp.asarray(x)
    if x.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; received shape {x.shape}.")
    if not jnp.issubdtype(x.dtype, jnp.number) or jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be a real number; received dtype {x.dtype}.")
    if is_concrete(x) and not np.isfinite(as_numpy(x)):
        raise ValueError(f"`{name}` must be finite; received {x}.")
    return x.astype(dtype)


def check_scalar(
    x: Array, name: str, *, positive: bool = False, allow_zero: bool = False
) -> Array:
    """Run-time check (for traced values) that a scalar is finite, and `> 0` (or `>= 0`)
    when asked; concrete values were checked by `as_scalar` and are checked here too."""
    # Concrete values are checked with numpy: under an outer trace, jnp operations on
    # them would give tracers.
    xp, value = (np, as_numpy(x)) if is_concrete(x) else (jnp, x)
    ok = xp.isfinite(value)
    what = "finite"
    if positive:
        ok &= (value >= 0) if allow_zero else (value > 0)
        what = "finite and >= 0" if allow_zero else "finite and > 0"
    if is_concrete(x):
        if not bool(ok):
            raise ValueError(f"`{name}` must be {what}; received {x}.")
        return x
    return eqx.error_if(x, ~ok, f"`{name}` must be {what}.")


def prepare_times(t0, t1, saveat: SaveAt, dtype):
    """`t0`, `t1` and the saved times as arrays of `dtype` (dynamic), checked."""
    t0, t1, ts = prepare_time_values(t0, t1, saveat.ts, dtype)
    saveat = eqx.tree_at(lambda s: s.ts, saveat, ts, is_leaf=lambda x: x is None)
    return t0, t1, saveat


def prepare_time_values(t0, t1, ts, dtype):
    """`prepare_times` for the values alone: `(t0, t1, ts)` as arrays of `dtype`."""
    t0 = as_scalar(t0, "t0", dtype)
    t1 = as_scalar(t1, "t1", dtype)
    ts = None if ts is None else jnp.asarray(ts, dtype)
    return _check_times(t0, t1, ts)


def _check_times(t0, t1, ts):
    concrete = all(is_concrete(x) for x in (t0, t1, ts) if x is not None)
    xp, conv = (np, as_numpy) if concrete else (jnp, lambda x: x)
    a0, a1 = conv(t0), conv(t1)
    bad_order = a1 < a0
    if ts is not None:
        a = conv(ts)
        bad_ts = xp.any(a < a0) | xp.any(a > a1) | xp.any(xp.diff(a) < 0)
        bad_ts = bad_ts | xp.any(~xp.isfinite(a))
    else:
        bad_ts = xp.asarray(False)
    msg_order = "`t1` must be >= `t0`."
    msg_ts = "`SaveAt(ts=...)` must be finite, non-decreasing and within [t0, t1]."
    if concrete:
        if bool(bad_order):
            raise ValueError(f"{msg_order} Received t0={t0}, t1={t1}.")
        if bool(bad_ts):
            raise ValueError(f"{msg_ts} Received ts={ts}, t0={t0}, t1={t1}.")
        return t0, t1, ts
    t0 = eqx.error_if(t0, ~jnp.isfinite(t0), "`t0` must be finite.")
    t1 = eqx.error_if(t1, ~jnp.isfinite(t1), "`t1` must be finite.")
    t1 = eqx.error_if(t1, bad_order, msg_order)
    if ts is not None:
        ts = eqx.error_if(ts, bad_ts, msg_ts)
    return t0, t1, ts


def saved_times(t0, t1, saveat: SaveAt) -> Float[Array, " times"]:
    """The saved times, in order: `t0`, the entries of `ts`, `t1` (as `saveat` asks)."""
    parts = []
    if saveat.t0:
        parts.append(t0[None])
    if saveat.ts is not None:
        parts.append(saveat.ts)
    if saveat.t1:
        parts.append(t1[None])
    return jnp.concatenate(parts)


def floats_to_arrays(tree: PyTree, dtype) -> PyTree:
    """Python floats in `tree` as arrays of `dtype`: under `eqx.filter_jit` a Python
    float is static, and a new value would recompile."""
    return jtu.tree_map(
        lambda x: jnp.asarray(x, dtype) if isinstance(x, float) else x, tree
    )


def check_saveat_fn(saveat: SaveAt, rows: Rows, t0) -> None:
    """`TypeError` now (from shapes alone) if `SaveAt(fn=...)` cannot be called as
    `fn(t, log_p, flow)` on one context or does not return a PyTree of arrays."""
    if saveat.fn is None:
        return
    if not callable(saveat.fn):
        raise TypeError(
            f"`SaveAt(fn=...)` must be callable; received {type(saveat.fn).__name__}."
        )

    def one(row):
        return saveat.fn(t0, row.log_p0(), row.flow)

    try:
        out = jax.eval_shape(lambda r: vmap_rows(one, r), rows)
    except Exception as error:  # noqa: BLE001 - re-raised with what to change
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TypeError(
            "`SaveAt(fn=...)` must be a function `fn(t, log_p, flow)` of one context (a "
            "time, a `(vocab,)` array of log-probabilities and that context's flow) "
            f"returning a PyTree of arrays; calling it failed with "
            f"{type(error).__name__}: {first}"
        ) from error
    if not jtu.tree_leaves(out):
        raise TypeError("`SaveAt(fn=...)` returned no array; it must return some.")
