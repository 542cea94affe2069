"""Finite-time Lyapunov exponents of a flow (THEORY §5): how fast nearby paths separate
or merge, from the variational equation integrated along the path with QR
re-orthonormalisation (the standard discrete-QR method of Benettin et al.).

Everything is written for one context and mapped over the batch, like `solve`.
"""

from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow
from ._methods.base import error_if_failed
from ._methods.ode import check_max_steps, tolerances
from ._misc import error_if_rows, is_concrete
from ._rows import (
    as_scalar,
    prepare_rows,
    Row,
    Rows,
    vmap_rows,
    with_auto_axes,
)
from ._solution import RESULTS

# `k=None` means every direction of the tangent space up to this dimension; above it the
# user must ask for a few (QR of a (dimension, k) matrix per interval, k jvps per step).
_FULL_MAX_DIMENSION = 256


class Lyapunov(eqx.Module):
    """What `lyapunov_exponents` returns, per context.

    **Fields:**

    - `exponents`: the `k` finite-time Lyapunov exponents, largest first, shape
        `(*batch, k)`. With `k=None` and a row whose face leaves fewer than `k`
        directions, the missing ones are `-inf`.
    - `log_p`: `log p(t1)`, shape `(*batch, vocab)` (`-inf` off the face).
    - `result`: a `RESULTS` per row (the first failure over the intervals).
    - `stats`: `num_steps`, `num_accepted_steps`, `num_rejected_steps` per row, summed
        over the intervals.
    """

    exponents: Float[Array, "*batch k"]
    log_p: Float[Array, "*batch vocab"]
    result: RESULTS
    stats: dict[str, Int[Array, "*batch"]]


def lyapunov_exponents(
    flow: AbstractFlow,
    *,
    t1: RealScalarLike,
    t0: RealScalarLike = 0.0,
    y0: Float[ArrayLike, "*batch vocab"] | None = None,
    log_y0: Float[ArrayLike, "*batch vocab"] | None = None,
    support=None,
    temperature_first: bool = True,
    k: int | None = None,
    intervals: int = 100,
    key: PRNGKeyArray | None = None,
    solver: diffrax.AbstractSolver | None = None,
    rtol: RealScalarLike = 1e-8,
    atol: RealScalarLike = 1e-8,
    max_steps: int = 4096,
    throw: bool = True,
) -> Lyapunov:
    """The `k` largest finite-time Lyapunov exponents of `flow` along its path from `y0`
    over `[t0, t1]` (THEORY §5): a fixed point has all of them negative (the most
    negative is the fastest-merging direction, the largest tells how robust the
    attractor is), a limit cycle has one equal to 0 (along the loop) and the others
    negative, chaos or a brittle saddle-like passage has a positive one.

    **The equation.** The state is the one `solve` integrates on the ODE path: the
    log-weights `θ` on the face and the score's history `aux` (if any). A perturbation
    `S` of it obeys the variational equation `Ṡ = J(t) S`, `J` the Jacobian of the
    vector field (`flow.log_rate` and `score.aux_rate`) along the path; in log space,
    `J = Dz G(p)/T - κ I` on `θ` (`κ = 1` for (E), `0` for (R)). Here `S` is a frame of
    `k` tangent vectors integrated with the path by diffrax (one `jax.jvp` of the field
    per vector and step) over `intervals` equal sub-intervals of `[t0, t1]`; after each
    the frame is re-orthonormalised by QR (Gram-Schmidt applied twice, in jnp) and
    `log|diag R|` accumulated. The exponents are the sums divided by `t1 - t0`,
    sorted. Inputs sharded over a mesh (batch or vocabulary) run as the ODE path does,
    with the mesh's axes made `Auto`.

    **The tangent space.** The field does not change when `θ` is shifted by a constant
    on the face, nor when `θ` changes off it: those directions would carry spurious zero
    exponents. The frame lives in the tangent space of the face instead: `θ`-components
    of mean zero on the face (`P = I - 11ᵀ/n`, `n` the face size) and zero off it, plus
    every component of the history, a space of dimension `n - 1 + (history size)`. The
    frame is projected by `P` before each QR, which is exact for the dynamics of `θ`
    modulo constants (`J 1 = 0`). Histories are kept whole, so a history with neutral
    directions of its own (cumulative counts, `tau=None`, are not damped) contributes
    zero exponents.

    **The chart.** Lengths are Euclidean in these log coordinates. Finite-time exponents
    depend on the coordinates and on the initial frame (by `O(1/(t1 - t0))`: at a
    stable node, about `0.5/(t1 - t0)` in the tests, so three digits need `t1 - t0` of
    order 10³); their limits `t1 → ∞` do not. To characterise an attractor, burn in
    to it with `solve` first and start there. For
    constant logits the log chart makes them exact at every time: THEORY §5's
    sensitivities `∂p(t)/∂log p₀ = G(p(t))` for (R) and `e^{-t} G(p(t))` for (E) say
    that in log coordinates `S = I` for (R) and `S = e^{-t} I` for (E) (modulo
    constants), so every exponent is `0` for (R) and `-1` for (E).

    **The initial frame.** With `key=None`, the first `k` vectors of a fixed orthonormal
    basis of the tangent space: Helmert vectors over the face tokens ordered by
    decreasing start probability (vector `j` compares the `j + 1` most likely tokens
    with the next one), then the unit vectors of the history. With `k` below the
    dimension this explores the most likely tokens first; pass a `key` for a random
    (Gaussian, projected, orthonormalised) frame, which is generic: it has a component
    along every direction almost surely. With `k` equal to the dimension the frame does
    not matter.

    **Arguments:**

    - `flow`: a flow (any score; the path is integrated as on `solve`'s ODE path).
    - `t1`, `t0`: the time span, `t1 > t0`, finite. Dynamic.
    - `y0`, `log_y0`, `support`, `temperature_first`: the start and the face, as in
        `solve`.
    - `k`: how many exponents (a static int `>= 1`, at most the dimension of the tangent
        space, `V - 1 + (history size)` for a full face). Default: all of them, when
        that is at most 256; at vocabulary scale ask for a few. A row whose face leaves
        fewer than `k` directions is an error (with `k=None` its missing exponents are
        `-inf` instead).
    - `intervals`: the number of re-orthonormalisations (a static int `>= 1`). Between
        two of them a perturbation grows or shrinks by `e^{λ Δt}`: keep
        `Δt (λ_max - λ_min)` below about 20 so that the frame stays well conditioned.
    - `key`: a JAX PRNG key for a random initial frame (split over the batch); `None`:
        the fixed frame above.
    - `solver`, `rtol`, `atol`, `max_steps`, `throw`: as in `rx.ODE`: a diffrax solver
        (`None`: `diffrax.Tsit5()`), the tolerances of a `diffrax.PIDController` on
        the path and the frame together (dynamic; default `1e-8`: the frame's vectors
        are kept at unit length as they are integrated, so these bound its error
        relative to its size), the step budget of each interval (static) and whether
        to raise on a failed solve (else reported per row in `result`, and those rows'
        exponents are not meaningful).

    **Returns:**

    A `Lyapunov`: `exponents` of shape `(*batch, k)`, largest first, `log_p` at `t1`,
    `result` and `stats`.

    **Raises:**

    `ValueError` / `TypeError` naming the argument for a bad `k`, `intervals`,
    `max_steps`, `throw`, `key` or solver, `t1 <= t0` (at run time under `jit`), and
    what `solve` raises for the flow, the start and the face; at run time, a row whose
    face leaves fewer than `k` directions, named by its batch index.
    """
    rows = prepare_rows(
        flow, y0=y0, log_y0=log_y0, support=support, temperature_first=temperature_first
    )
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"`k` must be an int >= 1 or None; received {k!r}.")
    if not isinstance(intervals, int) or isinstance(intervals, bool) or intervals < 1:
        raise ValueError(f"`intervals` must be an int >= 1; received {intervals!r}.")
    check_max_steps(max_steps, allow_none=False)
    if solver is None:
        solver = diffrax.Tsit5()
    if not isinstance(throw, bool):
        raise TypeError(f"`throw` must be a bool; received {throw!r}.")
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(
            "`solver` must be a diffrax solver (e.g. `diffrax.Tsit5()`); received "
            f"{type(solver).__name__}."
        )
    dtype = rows.dtype
    t0 = as_scalar(t0, "t0", dtype)
    t1 = as_scalar(t1, "t1", dtype)
    if is_concrete(t0) and is_concrete(t1):
        if not bool(np.asarray(t1) > np.asarray(t0)):
            raise ValueError(f"`t1` must be > `t0`; received t0={t0}, t1={t1}.")
    else:
        t1 = eqx.error_if(
            t1,
            ~(jnp.isfinite(t0) & jnp.isfinite(t1) & (t1 > t0)),
            "`t1` must be > `t0`, both finite.",
        )
    rtol, atol = tolerances(rtol, atol, dtype, None)
    use_key = jnp.asarray(key is not None)
    if key is None:
        # Unused (the fixed frame is chosen on device), but present, so that giving a
        # key or not does not compile twice.
        key = jax.random.key(0)
    elif not isinstance(key, jax.Array):
        raise TypeError(
            "`key` must be a JAX PRNG key (`jax.random.key(...)`); received "
            f"{type(key).__name__}."
        )
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a legacy uint32 key
    keys = jax.random.split(key, rows.num_rows)
    history = _history_size(rows)
    dimension = rows.vocab_size - 1 + history
    if dimension < 1:
        raise ValueError(
            "The tangent space has no direction (one token and no history): there is "
            "no exponent to compute."
        )
    if k is None:
        if dimension > _FULL_MAX_DIMENSION:
            raise ValueError(
                f"The tangent space has dimension {dimension} (vocab - 1 + history "
                f"size); above {_FULL_MAX_DIMENSION}, give `k`, the number of "
                "exponents wanted (e.g. `k=4`)."
            )
        k, pad = dimension, jnp.asarray(True)
    else:
        if k > dimension:
            raise ValueError(
                f"`k` must be at most the dimension of the tangent space, {dimension} "
                f"(vocab - 1 + history size); received k={k}."
            )
        pad = jnp.asarray(False)
    # On a mesh of explicit axes, run with them made `Auto` (as the ODE path).
    return with_auto_axes(
        _lyapunov_rows,
        rows,
        keys,
        use_key,
        t0,
        t1,
        rtol,
        atol,
        solver,
        history,
        k,
        pad,
        intervals,
        max_steps,
        throw,
    )


def _history_size(rows: Rows) -> int:
    """The number of entries of one context's history (static)."""

    def init(row):
        theta0 = row.theta0()
        return row.flow.score.init_aux(row.flow.readout(theta0, row.face))

    shapes = jax.eval_shape(lambda r: vmap_rows(init, r), rows)
    batch = len(rows.batch_shape)
    return sum(int(np.prod(x.shape[batch:])) for x in jtu.tree_leaves(shapes))


class _Tangent(eqx.Module):
    """The state of one context as one flat vector `(θ, history)` and the geometry of
    its tangent space."""

    y0: Float[Array, " size"]
    unravel: Callable = eqx.field(static=True)
    face: Bool[Array, " vocab"]
    n: Int[Array, ""]  # the face size
    valid: Bool[Array, " k"]  # which of the k directions exist on this face

    @classmethod
    def of(cls, row: Row, k: int) -> "_Tangent":
        theta0 = row.theta0()
        aux0 = row.flow.score.init_aux(row.flow.readout(theta0, row.face))
        y0, unravel = ravel_pytree((theta0, aux0))
        history = y0.shape[0] - theta0.shape[0]
        n = jnp.sum(row.face)
        return cls(
            y0.astype(row.dtype), unravel, row.face, n, jnp.arange(k) < n - 1 + history
        )

    def project(self, frame: Float[Array, "k size"]) -> Float[Array, "k size"]:
        """`P` on the θ-components (mean zero on the face, zero off it); the history
        whole."""
        vocab, on_face = self.face.shape[0], self.face[None, :]
        theta = jnp.where(on_face, frame[:, :vocab], 0)
        mean = jnp.sum(theta, axis=1, keepdims=True) / self.n.astype(frame.dtype)
        theta = jnp.where(on_face, theta - mean, 0)
        return jnp.concatenate([theta, frame[:, vocab:]], axis=1)

    def orthonormalise(self, frame):
        """The projected frame re-orthonormalised, and `log|diag R|` of its QR."""
        # Reduced QR of the (size, k) matrix. The existing directions come first, so the
        # missing ones (zero columns) change nothing before them.
        valid = self.valid
        q, growth = _gram_schmidt(jnp.where(valid[:, None], self.project(frame), 0))
        log_growth = jnp.where(valid, jnp.log(jnp.where(valid, growth, 1)), 0)
        return jnp.where(valid[:, None], q, 0), log_growth


def _gram_schmidt(frame: Float[Array, "k size"]):
    """The reduced QR of `frame.T` by classical Gram-Schmidt with one
    reorthogonalisation ("twice is enough"): the orthonormal rows `q` and `|diag R|`.
    A zero row gives a zero row of `q` and `0`.

    Written in jnp rather than `jnp.linalg.qr`: every operation is a product or a sum
    over `size`, which XLA partitions over a sharded vocabulary like any reduction, and
    no LAPACK kernel runs. jaxlib's CPU LAPACK kernels split a batch over XLA's CPU
    thread pool and wait for it, which never finished when several CPU devices called
    them at once (a sharded program on `--xla_force_host_platform_device_count`)."""
    k = frame.shape[0]

    def column(j, carry):
        q, growth = carry
        v = frame[j]
        for _ in range(2):
            v = v - jnp.dot(q, v, precision="highest") @ q  # rows >= j of q are 0
        norm = jnp.sqrt(jnp.sum(v * v))
        row = jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1), 0)
        return q.at[j].set(row), growth.at[j].set(norm)

    init = (jnp.zeros_like(frame), jnp.zeros((k,), frame.dtype))
    return jax.lax.fori_loop(0, k, column, init)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)
def _lyapunov_rows(
    rows,
    keys,
    use_key,
    t0,
    t1,
    rtol,
    atol,
    solver,
    history,
    k,
    pad,
    intervals,
    max_steps,
    throw,
):
    row = rows.flat()
    directions = jnp.sum(row.face, axis=-1) - 1 + history
    # `pad` (whether `k` was left to its default, which pads with -inf) is dynamic: the
    # default and an explicit `k` of the same value share a compile.
    face = error_if_rows(
        row.face,
        rows.unflatten((directions < k) & ~pad),
        f"`k={k}` is more than the directions the face leaves at batch index "
        "{index} (face size - 1 + history size).",
    )
    row = eqx.tree_at(lambda r: r.face, row, face)

    def one(row, key):
        tangent = _Tangent.of(row, k)
        # Both frames are cheap (k vectors); choosing at run time spares a compile.
        log_p0 = row.flow.readout(row.theta0(), row.face)
        fixed = _helmert_frame(log_p0, row.face, tangent.n, history, k, row.dtype)
        random = jax.random.normal(key, fixed.shape, row.dtype)
        frame, _ = tangent.orthonormalise(jnp.where(use_key, random, fixed))
        return _lyapunov_row(
            row,
            tangent,
            frame,
            t0,
            t1,
            rtol,
            atol,
            solver,
            k,
            intervals,
            max_steps,
            throw,
        )

    out = jtu.tree_map(rows.unflatten, jax.vmap(one)(row, keys))
    if throw:
        out = error_if_failed(out, out.result, "`rx.lyapunov_exponents`")
    return out


def _lyapunov_row(
    row: Row,
    tangent: _Tangent,
    frame,
    t0,
    t1,
    rtol,
    atol,
    solver,
    k,
    intervals,
    max_steps,
    throw,
) -> Lyapunov:
    flow, face, dtype = row.flow, row.face, row.dtype
    unravel, valid = tangent.unravel, tangent.valid

    def field(t, y):
        theta, aux = unravel(y)
        return ravel_pytree(flow.state_rate(t, theta, aux, face))[0].astype(dtype)

    def augmented(t, state, args):
        del args
        y, frame, _ = state
        rate, push = jax.linearize(lambda x: field(t, x), y)
        pushed = jax.vmap(push)(frame)
        # Each vector is kept at unit length as it goes, its log-length carried in
        # `log_scale` (the frame is `frame · diag(e^{log_scale})`, whatever `growth`):
        # the solver's tolerances then bound the frame's error relative to its size,
        # however fast it grows or shrinks within an interval.
        u, ju = tangent.project(frame), tangent.project(pushed)
        square = jnp.sum(u * u, axis=1)
        ok = square > 0
        growth = jnp.where(ok, jnp.sum(u * ju, axis=1) / jnp.where(ok, square, 1), 0)
        return rate, pushed - frame * growth[:, None], growth

    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    fractions = jnp.arange(intervals + 1, dtype=dtype) / intervals
    last = jnp.arange(intervals) == intervals - 1
    zero = jnp.zeros((), jnp.int32)
    stats0 = dict(num_steps=zero, num_accepted_steps=zero, num_rejected_steps=zero)

    def interval(carry, xs):
        y, frame, total, result, stats = carry
        log_scale = jnp.zeros(k, dtype)
        a, b, is_last = xs
        ta = t0 + (t1 - t0) * a
        tb = jnp.where(is_last, t1, t0 + (t1 - t0) * b)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(augmented),
            solver,
            ta,
            tb,
            None,
            (y, frame, log_scale),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            max_steps=max_steps,
            throw=False,  # raised per row by `_lyapunov_rows`
        )
        y, frame, log_scale = jtu.tree_map(lambda x: x[0], sol.ys)
        frame, log_growth = tangent.orthonormalise(frame)
        log_growth = log_growth + jnp.where(valid, log_scale, 0)
        new = RESULTS.promote(sol.result)
        result = RESULTS.where(result == RESULTS.successful, new, result)
        stats = {
            name: stats[name] + jnp.asarray(sol.stats[name], jnp.int32)
            for name in stats
        }
        return (y, frame, total + log_growth, result, stats), None

    carry = (tangent.y0, frame, jnp.zeros(k, dtype), RESULTS.successful, stats0)
    xs = (fractions[:-1], fractions[1:], last)
    (y, _, total, result, stats), _ = jax.lax.scan(interval, carry, xs)
    exponents = jnp.where(valid, total / (t1 - t0), -jnp.inf)
    exponents = -jnp.sort(-exponents)
    theta, _ = unravel(y)
    return Lyapunov(exponents, flow.readout(theta, face), result, stats)


def _helmert_frame(log_p0, face, n, history, k, dtype):
    """The first `k` vectors of the fixed basis of the tangent space: Helmert vectors
    over the face tokens by decreasing start probability, then the history's unit
    vectors (rows of a `(k, vocab + history)` array; zero past the dimension)."""
    vocab = log_p0.shape[0]
    order = jnp.argsort(-jnp.where(face, log_p0, -jnp.inf), stable=True)
    rank = (
        jnp.zeros(vocab, order.dtype)
        .at[order]
        .set(jnp.arange(vocab, dtype=order.dtype))
    )
    j = jnp.arange(k, dtype=order.dtype)[:, None]
    r = rank[None, :]
    size = (j + 1).astype(dtype)
    scale = 1 / jnp.sqrt(size * (size + 1))
    entry = jnp.where(r <= j, scale, jnp.where(r == j + 1, -size * scale, 0))
    theta = jnp.where(face[None, :] & (j < n - 1), entry, 0)
    index = j - (n - 1)
    aux = (index == jnp.arange(history, dtype=order.dtype)[None, :]).astype(dtype)
    return jnp.concatenate([theta, aux], axis=1)


__all__ = ["Lyapunov", "lyapunov_exponents"]
