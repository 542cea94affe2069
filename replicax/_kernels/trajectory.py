"""The saved path of a flow whose closed form is affine in two vectors per context.

For constant scores the log-weights of both flows of THEORY §1 are, on the face,

    θ(t)_i = b(t) x_i + a(t) s_i,        log p(t) = θ(t) - logsumexp θ(t),

with `x = log p₀` (`0` from a uniform start), `s` the scores minus their maximum on the
face, and `(a, b) = ((t - t0)/T, 1)` for (R), `((1 - e^{-(t - t0)})/T, e^{-(t - t0)})`
for (E) (`AbstractFlow.closed_form_coefficients`); `θ = -inf` off the face. A whole
trajectory is then one read of `(x, s)` for every normaliser at every saved time and one
write of the `(times, vocab)` block: `affine_trajectory` does exactly that, either in
plain jnp (the reference, two XLA passes) or as two Pallas kernels:

1. normalisers: the vocabulary is cut into chunks, one program per chunk, each running
   an online logsumexp (a maximum and a rescaled sum per saved time) over blocks of the
   chunk; the partial results of the chunks are combined in jnp (a few numbers per
   chunk and time);
2. write: one program per (block of times, block of tokens), which reads its block of
   `(x, s)` once and writes `θ - logsumexp θ` for its times.

Both are written for one context; a batch is `jax.vmap` of them, which Pallas turns into
an extra grid axis (one program per context and block). They use only what the Triton
lowering accepts: power-of-two blocks, masked loads and stores where the vocabulary or
the number of times is not a multiple of the block, float32 (or float64) accumulation.
Lowered for a CUDA GPU they run as Triton kernels; on every other platform (CPU, TPU:
the kernels use Triton's masked loads) in Pallas's interpreter, which is correct but
slow. The choice is made when lowering (`lax.platform_dependent`), not from
the default backend, so a program lowered for a GPU from a CPU host gets the kernels.

Both kinds agree to rounding with `flow.closed_form`, which stays the definition: the
same expression of `θ` (including how tokens tied at the maximum keep the derivative of
their coefficient, see `linear_closed_form`), so the same values and derivatives.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Bool, Float

KERNELS = ("jnp", "pallas")

# Elements of the `(times, vocab)` tile one program holds: 8192 float32 is 64 registers
# per thread at 4 warps. A starting point, not a measurement: the benchmarks on a GPU
# should tune this, `_BLOCKS_PER_PROGRAM` and `_NUM_WARPS`.
_TILE = 8192
# Blocks of the vocabulary that one program of the normaliser pass reads: enough work
# per program, and enough programs (V / (8 block_v) per context) to fill the device.
_BLOCKS_PER_PROGRAM = 8
_NUM_WARPS = 4


def default_block_v(vocab: int) -> int:
    """The block of the vocabulary used when none is given: the next power of two of
    `vocab`, at most 1024. The write pass blocks the times to keep its tile within
    `_TILE` elements (`_time_block`); the normaliser pass, which holds every time at
    once, reads smaller blocks of the vocabulary when needed."""
    return min(1024, pl.next_power_of_2(vocab))


def affine_trajectory(
    x: Float[Array, "*rows vocab"] | None,
    s: Float[Array, "*rows vocab"],
    face: Bool[Array, "*rows vocab"],
    a: Float[Array, "*rows times"],
    b: Float[Array, "*rows times"],
    *,
    kernel: str = "jnp",
    interpret: bool | None = None,
    block_v: int | None = None,
) -> Float[Array, "*rows times vocab"]:
    """`log p(t)` at every time of `(a, b)`: `log_softmax(b x + a s)` on `face`, `-inf`
    off it.

    **Arguments:**

    - `x`: `log p₀` (finite on the face), or `None` for a uniform start.
    - `s`: the scores minus their maximum on the face (`≤ 0` there, `0` at the top).
    - `face`: the tokens the context lives on (at least one per row).
    - `a`, `b`: the coefficients of `s` and `x` at each saved time, `a ≥ 0` (may be
        `+inf`, then only the tokens at the maximum remain, as in `linear_closed_form`).
    - `kernel`: `"jnp"` (the reference: two XLA passes) or `"pallas"` (one pass for the
        normalisers, one for the write; see the module docstring).
    - `interpret`: `True` runs the Pallas kernels in the interpreter, `False` lowers
        them with Triton; `None` (default) picks Triton when lowering for a CUDA GPU
        and the interpreter elsewhere.
    - `block_v`: the block of the vocabulary, a power of two; default
        `default_block_v(vocab)`.

    **Returns:**

    `log p` of shape `(*rows, times, vocab)`, in float32 (float64 for float64 inputs).

    **Raises:**

    `ValueError` for an unknown `kernel` or a `block_v` that is not a power of two.

    Derivatives: with `"jnp"` by autodiff of the expression; with `"pallas"` by a custom
    JVP written in jnp from the saved output (`d log p = dθ - <p, dθ>`, `dθ` linear in
    the tangents of `x`, `s`, `a`, `b`), which JAX transposes for reverse mode: no
    kernel runs in the backward pass and nothing but the output is kept.
    """
    x, s, a, b, block_v = _prepare(x, s, face, a, b, kernel, block_v)
    if kernel == "jnp":
        return jax.nn.log_softmax(_theta(x, s, a, b), axis=-1)
    fused = functools.partial(_fused, interpret=interpret, block_v=block_v)
    return _over_rows(fused, x, s, a, b)


def affine_moments(
    x: Float[Array, "*rows vocab"] | None,
    s: Float[Array, "*rows vocab"],
    face: Bool[Array, "*rows vocab"],
    a: Float[Array, "*rows times"],
    b: Float[Array, "*rows times"],
    *,
    kernel: str = "jnp",
    interpret: bool | None = None,
    block_v: int | None = None,
) -> tuple[Float[Array, "*rows times"], ...]:
    """What one read of `(x, s)` gives about `p = softmax(θ)`, `θ = b x + a s` on
    `face`, at every time of `(a, b)`, without writing `log p`:

    - `top = max θ`,
    - `lse = logsumexp θ`,
    - `entropy = lse - <p, θ>`,
    - `mean_s = <p, s>`.

    Arguments as `affine_trajectory`. `"jnp"` computes them time after time
    (`lax.map`: at most one `(vocab,)` array per context alive); `"pallas"` in the
    normaliser pass of the trajectory kernel, with two more sums per time (see
    `_accumulate`).

    Derivatives by a custom VJP: the backward pass recomputes `p(t)` from `(x, s)` and
    the saved `(top, lse, entropy, mean_s)`, so reverse mode keeps nothing of size
    `(times, vocab)` either: with `"jnp"` time after time (`lax.scan`), with `"pallas"`
    in one more kernel that reads `(x, s)` once and writes their cotangents once (the
    forward kernel also counts the tokens at `top`, which the backward pass needs).
    Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) is not available here.
    """
    x, s, a, b, block_v = _prepare(x, s, face, a, b, kernel, block_v)
    one = functools.partial(
        _moments, kernel=kernel, interpret=interpret, block_v=block_v
    )
    return _over_rows(one, x, s, a, b)


def _prepare(x, s, face, a, b, kernel, block_v):
    """The checks and the common form of both entry points: accumulator dtype, `s`
    at `-inf` and `x` at `0` off the face, and the default `block_v`."""
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}; received {kernel!r}.")
    check_block_v(block_v)
    dtype = _accumulator_dtype(s.dtype)
    s = jnp.where(face, s.astype(dtype), -jnp.inf)
    if x is not None:
        x = jnp.where(face, x.astype(dtype), 0)
    if block_v is None:
        block_v = default_block_v(s.shape[-1])
    return x, s, a.astype(dtype), b.astype(dtype), block_v


def _over_rows(one, x, s, a, b):
    """`one` (a function of one context) over the leading axes of the rows, which
    Pallas turns into one more grid axis."""
    rows = s.shape[:-1]
    if not rows:
        return one(x, s, a, b)
    flat = [None if y is None else y.reshape((-1, y.shape[-1])) for y in (x, s, a, b)]
    out = jax.vmap(one)(*flat)
    return jax.tree.map(lambda y: y.reshape(rows + y.shape[1:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _moments(x, s, a, b, kernel, interpret, block_v):
    """`(top, lse, entropy, mean_s)` of one context; `s` is `-inf` off the face."""
    return _moments_with_ties(x, s, a, b, kernel, interpret, block_v)[:4]


def _moments_with_ties(x, s, a, b, kernel, interpret, block_v):
    """`_moments` and the number of tokens at `top` per time (`None` from the jnp
    path, whose backward pass counts them itself)."""
    if kernel == "jnp":
        return _moments_jnp(x, s, a, b) + (None,)
    times = a.shape[0]
    pallas = functools.partial(_pass_over_vocab, block_v=block_v, moments=True)
    out = _on_platform(pallas, interpret, x, s, a, b)
    return tuple(y[:times] for y in out)


def _on_platform(kernel, interpret, *args):
    """`kernel(*args, interpret)`: Triton when lowering for a CUDA GPU and the Pallas
    interpreter elsewhere (`interpret=None`), or as `interpret` says."""
    if interpret is not None:
        return kernel(*args, interpret=interpret)
    return lax.platform_dependent(
        *args,
        cuda=functools.partial(kernel, interpret=False),
        default=functools.partial(kernel, interpret=True),
    )


def _moments_jnp(x, s, a, b):
    def at(coefficients):
        theta = _theta(x, s, coefficients[0][None], coefficients[1][None])[0]
        alive = theta > -jnp.inf
        if x is None:
            # From a uniform start `θ = a s` peaks at 0 (`s` is centred on the face),
            # and `<p, θ> = a <p, s>`: two sums per time (XLA on CPU recomputes `e`
            # for each sum it does not fuse with another).
            e = jnp.exp(theta)
            total = jnp.sum(e)  # >= 1: the top tokens count 1 each
            mean_s = jnp.sum(e * jnp.where(alive, s, 0)) / total
            # With `a = inf` only tokens at `s = 0` keep mass: `<p, θ> = 0`.
            mean_theta = jnp.where(jnp.abs(coefficients[0]) < jnp.inf, coefficients[0], 0)
            mean_theta = mean_theta * mean_s
            # `0 * total`, not a constant: under `vmap` a constant output would be
            # unbatched, and its cotangent summed over the batch.
            top = 0 * total
            return top, jnp.log(total), jnp.log(total) - mean_theta, mean_s
        top = jnp.max(theta)
        shift = jnp.where(top > -jnp.inf, top, 0)
        e = jnp.exp(theta - shift)
        total = jnp.sum(e)
        first = jnp.sum(e * jnp.where(alive, theta - shift, 0))
        mean_s = jnp.sum(e * jnp.where(alive, s, 0)) / total
        return top, shift + jnp.log(total), jnp.log(total) - first / total, mean_s

    return lax.map(at, (a, b))


def _moments_fwd(x, s, a, b, kernel, interpret, block_v):
    *out, ties = _moments_with_ties(x, s, a, b, kernel, interpret, block_v)
    return tuple(out), (x, s, a, b, tuple(out), ties)


def _moments_bwd(kernel, interpret, block_v, residuals, cotangents):
    """Per time, with `q = p(t)` recomputed and `log q = θ - lse`:

    - `d top = <1_top / #top, dθ>` (ties share, as `jnp.max`), `d lse = <q, dθ>`,
    - `d entropy = -<q (log q + entropy), dθ>`,
    - `d mean_s = <q (s - mean_s), dθ> + <q, ds>`,

    and `dθ = a ds + s da + b dx + x db` on the face (the slope of `a` where `s = 0`
    as in `_theta`). The weights `w` of `dθ` are summed over the times into the
    cotangents of `s` and `x` and reduced against `s` and `x` for those of `a` and
    `b` (`_tile_cotangents`): in jnp time after time (one `(vocab,)` accumulator
    each), or with `"pallas"` in one kernel that reads `(x, s)` once and writes the
    two cotangents once."""
    x, s, a, b, (top, lse, entropy, mean_s), ties = residuals
    on = s > -jnp.inf
    s0 = jnp.where(on, s, 0)
    if x is None:  # `θ = a s` peaks at 0 on the top tokens, everywhere if `a = 0`
        num_on, num_top = jnp.sum(on), jnp.sum(on & (s0 == 0))
        ties = jnp.where(a == 0, num_on, num_top).astype(s.dtype)
    per_time = (a, b, top, lse, entropy, mean_s) + tuple(cotangents)
    if kernel == "pallas":
        backward = functools.partial(_moments_backward_pass, block_v=block_v)
        return _on_platform(backward, interpret, x, s, ties, *per_time)

    if x is not None and ties is None:
        ties = jnp.zeros_like(a)  # counted time after time in `_tile_cotangents`

    def at(carry, per_time_k):
        ds, dx, da, db = _tile_cotangents(x, s, *(y[None] for y in per_time_k))
        carry = (carry[0] + ds, None if x is None else carry[1] + dx)
        return carry, (da[0], None if db is None else db[0])

    init = (jnp.zeros_like(s0), None if x is None else jnp.zeros_like(x))
    (ds, dx), (da, db) = lax.scan(at, init, per_time + (ties,))
    return dx, ds, da, jnp.zeros_like(b) if db is None else db


def _tile_cotangents(
    x, s, a, b, top, lse, entropy, mean_s, g_top, g_lse, g_ent, g_mean, ties
):
    """The backward pass of `_moments` on a tile of times × tokens: `x`, `s` of shape
    `(tokens,)`, the rest `(times,)` (`ties`: the tokens at `top`, or 0 to count them
    here, on this tile, which must then hold the whole vocabulary). Returns the
    cotangents of `s` and `x` summed over the tile's times (`0` off the face; `None`
    for `x` from a uniform start) and those of `a` and `b` summed over its tokens.

    With `q = p(t)` recomputed, the weight `w` of `dθ` is `share · 1_top + q (g_lse -
    g_ent (log q + entropy) + g_mean (s - mean_s))`, and `d mean_s` also has `<q, ds>`.
    """
    theta = _theta(x, s, a, b)
    alive = theta > -jnp.inf
    log_q = jnp.where(alive, theta - lse[:, None], 0)
    q = jnp.where(alive, jnp.exp(log_q), 0)
    on = s > -jnp.inf
    s0 = jnp.where(on, s, 0)[None, :]
    a = a[:, None]
    if x is None:
        tied = on[None, :] & ((s0 == 0) | (a == 0))
    else:
        tied = alive & (theta == top[:, None])
        counted = jnp.sum(jnp.where(tied, 1.0, 0.0), axis=1).astype(s.dtype)
        ties = jnp.where(ties > 0, ties, counted)
    share = g_top / jnp.maximum(ties, 1)
    w = jnp.where(tied, share[:, None], 0) + q * (
        g_lse[:, None]
        - g_ent[:, None] * (log_q + entropy[:, None])
        + g_mean[:, None] * (s0 - mean_s[:, None])
    )
    slope = jnp.where(s0 == 0, jnp.where(jnp.abs(a) < jnp.inf, a, 0), a)
    ds = jnp.sum(jnp.where(w == 0, 0, slope * w) + g_mean[:, None] * q, axis=0)
    ds = jnp.where(on, ds, 0)
    da = jnp.sum(w * s0, axis=1)
    if x is None:
        return ds, None, da, None
    dx = jnp.where(on, jnp.sum(b[:, None] * w, axis=0), 0)
    return ds, dx, da, jnp.sum(w * x[None, :], axis=1)


def _moments_backward_pass(x, s, ties, *per_time, interpret, block_v):
    """The backward pass of `_moments` as one Pallas kernel: one program per block of
    the vocabulary holds every time, reads `(x, s)` once and writes its block of the
    cotangents of `s` and `x` once, with its partial sums for those of `a` and `b`
    (added up in jnp)."""
    vocab, times = s.shape[0], ties.shape[0]
    padded = pl.next_power_of_2(times)
    columns = [jnp.pad(y, (0, padded - times)) for y in per_time + (ties,)]
    block_n = max(1, min(block_v, _TILE // padded))
    blocks = pl.cdiv(vocab, block_n)
    has_x = x is not None
    inputs = (s,) + ((x,) if has_x else ()) + tuple(columns)
    whole = [pl.BlockSpec(y.shape, lambda *_: (0,)) for y in inputs]
    vector = pl.BlockSpec((vocab,), lambda i: (0,))
    partial_spec = pl.BlockSpec((None, padded), lambda i: (i, 0))
    num_vectors = 2 if has_x else 1
    out = pl.pallas_call(
        functools.partial(
            _moments_backward_kernel, has_x=has_x, vocab=vocab, block_n=block_n
        ),
        grid=(blocks,),
        in_specs=whole,
        out_specs=[vector] * num_vectors + [partial_spec] * num_vectors,
        out_shape=[jax.ShapeDtypeStruct((vocab,), s.dtype)] * num_vectors
        + [jax.ShapeDtypeStruct((blocks, padded), s.dtype)] * num_vectors,
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS),
        interpret=interpret,
        name="replicax_moments_backward",
    )(*inputs)
    if has_x:
        ds, dx, da, db = out
        return dx, ds, jnp.sum(da, axis=0)[:times], jnp.sum(db, axis=0)[:times]
    ds, da = out
    return None, ds, jnp.sum(da, axis=0)[:times], jnp.zeros_like(per_time[1])


def _moments_backward_kernel(*refs, has_x, vocab, block_n):
    if has_x:
        s_ref, x_ref, *column_refs, ds_ref, dx_ref, da_ref, db_ref = refs
    else:
        s_ref, *column_refs, ds_ref, da_ref = refs
        x_ref = dx_ref = db_ref = None
    start = pl.program_id(0) * block_n
    s, valid = _load_block(s_ref, start, block_n, vocab, -jnp.inf)
    x = None if x_ref is None else _load_block(x_ref, start, block_n, vocab, 0.0)[0]
    ds, dx, da, db = _tile_cotangents(x, s, *(ref[...] for ref in column_refs))
    window = pl.ds(start, block_n)
    plgpu.store(ds_ref.at[window], ds, mask=valid)
    da_ref[...] = da
    if x is not None:
        plgpu.store(dx_ref.at[window], dx, mask=valid)
        db_ref[...] = db


_moments.defvjp(_moments_fwd, _moments_bwd)


def check_block_v(block_v) -> None:
    """`ValueError` unless `block_v` is `None` or a power of two."""
    if block_v is None:
        return
    if (
        not isinstance(block_v, int)
        or isinstance(block_v, bool)
        or block_v < 1
        or block_v & (block_v - 1)
    ):
        raise ValueError(
            f"`block_v` must be a power of two (e.g. 256, 1024) or None; received "
            f"{block_v!r}."
        )


def _accumulator_dtype(dtype) -> jnp.dtype:
    """float64 stays float64; float32 and half precision accumulate in float32."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def _theta(x, s, a, b):
    """`b x + a s` on the face (`s > -inf`), `-inf` off it, for times along the
    second-to-last axis: `x`, `s` of shape `(..., vocab)`, `a`, `b` of `(..., times)`.

    Written as `linear_closed_form` writes it, so that values and derivatives agree:
    where `s = 0` (the maximum) the term is `s · a` with `a` made finite, which is `0`
    even for `a = +inf` and keeps the derivative `a` of tokens tied at the maximum."""
    on = s > -jnp.inf
    s0 = jnp.where(on, s, 0)[..., None, :]
    a = a[..., :, None]
    finite = jnp.where(jnp.abs(a) < jnp.inf, a, 0)
    theta = jnp.where(s0 == 0, s0 * finite, a * s0)
    if x is not None:
        theta = theta + b[..., :, None] * x[..., None, :]
    return jnp.where(on[..., None, :], theta, -jnp.inf)


def _time_block(num_times_padded: int, block_v: int) -> int:
    return min(num_times_padded, max(1, _TILE // block_v))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _fused(x, s, a, b, interpret, block_v):
    """`log_softmax(θ)` of one context by the two Pallas kernels."""
    forward = functools.partial(_fused_forward, block_v=block_v)
    return _on_platform(forward, interpret, x, s, a, b)


def _fused_forward(x, s, a, b, interpret, block_v):
    vocab, times = s.shape[0], a.shape[0]
    top, lse = _pass_over_vocab(x, s, a, b, interpret, block_v, moments=False)
    padded = top.shape[0]
    a = jnp.pad(a, (0, padded - times))
    b = jnp.pad(b, (0, padded - times))
    has_x = x is not None
    # Pass 2: every (block of times, block of tokens) written once.
    block_t = _time_block(padded, block_v)
    inputs = (s, a, b) + ((x,) if has_x else ()) + (lse,)
    whole = [pl.BlockSpec(y.shape, lambda *_: (0,)) for y in inputs]
    return pl.pallas_call(
        functools.partial(
            _write_kernel,
            has_x=has_x,
            vocab=vocab,
            times=times,
            block_t=block_t,
            block_v=block_v,
        ),
        grid=(padded // block_t, pl.cdiv(vocab, block_v)),
        in_specs=whole,
        out_specs=pl.BlockSpec((times, vocab), lambda i, j: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((times, vocab), s.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS),
        interpret=interpret,
        name="replicax_trajectory_write",
    )(*inputs)


def _pass_over_vocab(x, s, a, b, interpret, block_v, *, moments):
    """Pass 1, the one read of `(x, s)`: per chunk of the vocabulary the running
    maximum of `θ` and the sums of `_accumulate` for every time, then the chunks
    combined in jnp. Returns `(top, lse)`, with `moments` also `(entropy, mean_s,
    ties)` (`ties`: how many tokens sit at `top`), each over the times padded to a
    power of two (Triton's blocks are; the padding is
    never written out)."""
    vocab, times = s.shape[0], a.shape[0]
    dtype = s.dtype
    padded = pl.next_power_of_2(times)
    a = jnp.pad(a, (0, padded - times))
    b = jnp.pad(b, (0, padded - times))
    inputs = (s, a, b) + (() if x is None else (x,))
    whole = [pl.BlockSpec(y.shape, lambda *_: (0,)) for y in inputs]
    block_n = max(1, min(block_v, _TILE // padded))
    num_blocks = pl.cdiv(vocab, block_n)
    per_program = min(_BLOCKS_PER_PROGRAM, num_blocks)
    chunks = pl.cdiv(num_blocks, per_program)
    partial_spec = pl.BlockSpec((None, padded), lambda c: (c, 0))
    num_out = 5 if moments else 2
    parts = pl.pallas_call(
        functools.partial(
            _normaliser_kernel,
            has_x=x is not None,
            vocab=vocab,
            block_v=block_n,
            per_program=per_program,
            moments=moments,
        ),
        grid=(chunks,),
        in_specs=whole,
        out_specs=[partial_spec] * num_out,
        out_shape=[jax.ShapeDtypeStruct((chunks, padded), dtype)] * num_out,
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS),
        interpret=interpret,
        name="replicax_" + ("moments" if moments else "trajectory_normalisers"),
    )(*inputs)
    top = jnp.max(parts[0], axis=0)
    shift = jnp.where(top > -jnp.inf, top, 0)
    alive = parts[0] > -jnp.inf
    scale = jnp.where(alive, jnp.exp(parts[0] - shift[None, :]), 0)
    total = jnp.sum(parts[1] * scale, axis=0)
    lse = shift + jnp.log(total)
    if not moments:
        return top, lse
    gap = jnp.where(alive, parts[0] - shift[None, :], 0)
    first = jnp.sum(scale * (parts[2] + gap * parts[1]), axis=0)
    entropy = jnp.log(total) - first / total
    ties = jnp.sum(jnp.where(parts[0] == top[None, :], parts[4], 0), axis=0)
    return top, lse, entropy, jnp.sum(parts[3] * scale, axis=0) / total, ties


def _load_block(ref, start, size, vocab, other):
    index = start + jnp.arange(size, dtype=jnp.int32)
    valid = index < vocab
    return plgpu.load(ref.at[pl.ds(start, size)], mask=valid, other=other), valid


def _normaliser_kernel(*refs, has_x, vocab, block_v, per_program, moments=False):
    num_out = 5 if moments else 2
    ins, outs = refs[:-num_out], refs[-num_out:]
    s_ref, a_ref, b_ref = ins[:3]
    x_ref = ins[3] if has_x else None
    a, b = a_ref[...], b_ref[...]
    first = pl.program_id(0) * per_program

    def body(k, carry):
        start = (first + k) * block_v
        s, _ = _load_block(s_ref, start, block_v, vocab, -jnp.inf)
        x = None if x_ref is None else _load_block(x_ref, start, block_v, vocab, 0.0)[0]
        return _accumulate(carry, _theta(x, s, a, b), s, moments)

    init = (jnp.full(a.shape, -jnp.inf, a.dtype),) + tuple(
        jnp.zeros(a.shape, a.dtype) for _ in range(num_out - 1)
    )
    for ref, value in zip(outs, lax.fori_loop(0, per_program, body, init), strict=True):
        ref[...] = value


def _accumulate(carry, theta, s, moments):
    """One block of `θ` (times × tokens) folded into the running maximum `m` and the
    sums `Σ e`, and with `moments`, `Σ e (θ - m)` and `Σ e s`, where `e = exp(θ - m)`.
    A new maximum `m'` rescales them: `Σ e' = r Σ e`, `Σ e' (θ - m') = r (Σ e (θ - m)
    + (m - m') Σ e)`, `Σ e' s = r Σ e s`, `r = exp(m - m')`. With `moments` the number
    of tokens at the maximum is counted too (for the backward pass of `_moments`)."""
    top = carry[0]
    new_top = jnp.maximum(top, jnp.max(theta, axis=1))
    # A time whose maximum is still -inf (no token of the face seen yet) keeps zero
    # sums; shifting by 0 there avoids `-inf - -inf`.
    shift = jnp.where(new_top > -jnp.inf, new_top, 0)
    scale = jnp.exp(top - shift)
    e = jnp.exp(theta - shift[:, None])
    out = (new_top, carry[1] * scale + jnp.sum(e, axis=1))
    if not moments:
        return out
    alive = theta > -jnp.inf
    centred = jnp.where(alive, theta - shift[:, None], 0)
    s0 = jnp.where(alive, s[None, :], 0)
    gap = jnp.where(top > -jnp.inf, top - shift, 0)
    first = scale * (carry[2] + gap * carry[1]) + jnp.sum(e * centred, axis=1)
    # The tokens at the maximum (kept for the backward pass): restarted when it rises.
    at_top = jnp.sum(jnp.where(alive & (theta == new_top[:, None]), 1.0, 0.0), axis=1)
    ties = jnp.where(new_top > top, 0, carry[4]) + at_top.astype(theta.dtype)
    return out + (first, carry[3] * scale + jnp.sum(e * s0, axis=1), ties)


def _write_kernel(*refs, has_x, vocab, times, block_t, block_v):
    if has_x:
        s_ref, a_ref, b_ref, x_ref, lse_ref, out_ref = refs
    else:
        s_ref, a_ref, b_ref, lse_ref, out_ref = refs
        x_ref = None
    t0 = pl.program_id(0) * block_t
    v0 = pl.program_id(1) * block_v
    a = a_ref[pl.ds(t0, block_t)]
    b = b_ref[pl.ds(t0, block_t)]
    lse = lse_ref[pl.ds(t0, block_t)]
    s, valid = _load_block(s_ref, v0, block_v, vocab, -jnp.inf)
    x = None if x_ref is None else _load_block(x_ref, v0, block_v, vocab, 0.0)[0]
    log_p = _theta(x, s, a, b) - lse[:, None]
    kept = (t0 + jnp.arange(block_t, dtype=jnp.int32) < times)[:, None] & valid[None, :]
    plgpu.store(
        out_ref.at[pl.ds(t0, block_t), pl.ds(v0, block_v)],
        log_p.astype(out_ref.dtype),
        mask=kept,
    )


@_fused.defjvp
def _fused_jvp(interpret, block_v, primals, tangents):
    x, s, a, b = primals
    dx, ds, da, db = tangents
    out = _fused(x, s, a, b, interpret, block_v)
    # dθ of `_theta`, written out: linear in the tangents, so JAX transposes it for
    # reverse mode; `p = exp(out)` is the saved output.
    on = (s > -jnp.inf)[None, :]
    s0 = jnp.where(on, s[None, :], 0)
    a_ = a[:, None]
    slope = jnp.where(s0 == 0, jnp.where(jnp.abs(a_) < jnp.inf, a_, 0), a_)
    d_theta = slope * jnp.where(on, ds[None, :], 0) + da[:, None] * s0
    if x is not None:
        d_theta = d_theta + b[:, None] * dx[None, :] + db[:, None] * x[None, :]
    d_theta = jnp.where(on, d_theta, 0)
    d_out = d_theta - jnp.sum(jnp.exp(out) * d_theta, axis=-1, keepdims=True)
    return out, d_out
