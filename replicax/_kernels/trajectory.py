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
    if kernel not in KERNELS:
        raise ValueError(f"`kernel` must be one of {KERNELS}; received {kernel!r}.")
    check_block_v(block_v)
    dtype = _accumulator_dtype(s.dtype)
    s = jnp.where(face, s.astype(dtype), -jnp.inf)
    if x is not None:
        x = jnp.where(face, x.astype(dtype), 0)
    a, b = a.astype(dtype), b.astype(dtype)
    if kernel == "jnp":
        return jax.nn.log_softmax(_theta(x, s, a, b), axis=-1)
    vocab, times = s.shape[-1], a.shape[-1]
    if block_v is None:
        block_v = default_block_v(vocab)
    fused = functools.partial(_fused, interpret=interpret, block_v=block_v)
    rows = s.shape[:-1]
    if not rows:
        return fused(x, s, a, b)
    flat = [None if y is None else y.reshape((-1, y.shape[-1])) for y in (x, s, a, b)]
    out = jax.vmap(fused)(*flat)
    return out.reshape(rows + (times, vocab))


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
    if interpret is not None:
        return _fused_forward(x, s, a, b, interpret, block_v)
    return lax.platform_dependent(
        x,
        s,
        a,
        b,
        cuda=functools.partial(_fused_forward, interpret=False, block_v=block_v),
        default=functools.partial(_fused_forward, interpret=True, block_v=block_v),
    )


def _fused_forward(x, s, a, b, interpret, block_v):
    vocab, times = s.shape[0], a.shape[0]
    dtype = s.dtype
    padded = pl.next_power_of_2(times)
    # The times padded to a power of two (Triton's blocks are); the padding is never
    # written out.
    a = jnp.pad(a, (0, padded - times))
    b = jnp.pad(b, (0, padded - times))
    has_x = x is not None
    inputs = (s, a, b) + ((x,) if has_x else ())
    whole = [pl.BlockSpec(y.shape, lambda *_: (0,)) for y in inputs]
    params = plgpu.CompilerParams(num_warps=_NUM_WARPS)

    # Pass 1: per chunk of the vocabulary, the running maximum and the sum of
    # exponentials below it, for every time.
    block_n = max(1, min(block_v, _TILE // padded))
    num_blocks = pl.cdiv(vocab, block_n)
    per_program = min(_BLOCKS_PER_PROGRAM, num_blocks)
    chunks = pl.cdiv(num_blocks, per_program)
    partial_spec = pl.BlockSpec((None, padded), lambda c: (c, 0))
    top, total = pl.pallas_call(
        functools.partial(
            _normaliser_kernel,
            has_x=has_x,
            vocab=vocab,
            block_v=block_n,
            per_program=per_program,
        ),
        grid=(chunks,),
        in_specs=whole,
        out_specs=[partial_spec, partial_spec],
        out_shape=[jax.ShapeDtypeStruct((chunks, padded), dtype)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="replicax_trajectory_normalisers",
    )(*inputs)
    shift = jnp.max(top, axis=0)
    shift = jnp.where(shift > -jnp.inf, shift, 0)
    lse = shift + jnp.log(jnp.sum(total * jnp.exp(top - shift[None, :]), axis=0))

    # Pass 2: every (block of times, block of tokens) written once.
    block_t = _time_block(padded, block_v)
    inputs = inputs + (lse,)
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
        out_shape=jax.ShapeDtypeStruct((times, vocab), dtype),
        compiler_params=params,
        interpret=interpret,
        name="replicax_trajectory_write",
    )(*inputs)


def _load_block(ref, start, size, vocab, other):
    index = start + jnp.arange(size, dtype=jnp.int32)
    valid = index < vocab
    return plgpu.load(ref.at[pl.ds(start, size)], mask=valid, other=other), valid


def _normaliser_kernel(*refs, has_x, vocab, block_v, per_program):
    if has_x:
        s_ref, a_ref, b_ref, x_ref, top_ref, total_ref = refs
    else:
        s_ref, a_ref, b_ref, top_ref, total_ref = refs
        x_ref = None
    a, b = a_ref[...], b_ref[...]
    first = pl.program_id(0) * per_program

    def body(k, carry):
        top, total = carry
        start = (first + k) * block_v
        s, _ = _load_block(s_ref, start, block_v, vocab, -jnp.inf)
        x = None if x_ref is None else _load_block(x_ref, start, block_v, vocab, 0.0)[0]
        theta = _theta(x, s, a, b)
        new_top = jnp.maximum(top, jnp.max(theta, axis=1))
        # A time whose maximum is still -inf (no token of the face seen yet) keeps a
        # zero sum; shifting by 0 there avoids `-inf - -inf`.
        shift = jnp.where(new_top > -jnp.inf, new_top, 0)
        total = total * jnp.exp(top - shift) + jnp.sum(
            jnp.exp(theta - shift[:, None]), axis=1
        )
        return new_top, total

    init = (
        jnp.full(a.shape, -jnp.inf, a.dtype),
        jnp.zeros(a.shape, a.dtype),
    )
    top, total = lax.fori_loop(0, per_program, body, init)
    top_ref[...] = top
    total_ref[...] = total


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
