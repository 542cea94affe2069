"""`generate`: a decoding loop in which every token is chosen from a flow run on that
token's (penalised) logits.

At each step the loop

1. takes the model's next-token logits `s` and applies the token-level penalties of the
   history (THEORY §4 names their fluid limits; here they act on the sampled tokens):
   repetition (transformers' `RepetitionPenaltyLogitsProcessor`), presence and frequency
   (OpenAI's additive form), then no-repeat-n-gram (transformers'
   `NoRepeatNGramLogitsProcessor`);
2. builds a flow on the penalised logits and runs it from uniform to `t1` (or to its
   limit), on the face its supports leave (the warpers: temperature first, as
   transformers orders them; THEORY §3);
3. samples the next token from the resulting distribution (an explicit key and
   inverse-CDF draws), takes its argmax, or, given `targets`, takes the target token
   (teacher forcing);
4. feeds the token to the model.

The whole loop is one `lax.scan` under one `jit` for a JAX model, or a Python loop
around one jitted step for a model that is not JAX (`jit=False`): both run the same
step function, so they give the same tokens.
"""

import math
import sys
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

from ._custom_types import RealScalarLike
from ._flows import AbstractFlow, EntropicReplicator
from ._misc import compute_dtype, is_concrete
from ._observables import entropy, kl, limit_log_p, time_to
from ._rows import explicitly_sharded
from ._solve import solve
from ._support import as_supports


class Generation(eqx.Module):
    """What `generate` returns: the generated tokens and per-step records.

    **Fields** (`batch` rows, `steps = max_new_tokens`):

    - `tokens`: the generated tokens, shape `(batch, steps)` (the targets when given).
    - `log_prob`: log-probability of each chosen token under its step's distribution
        (the flow's `log p` at `t1` on the penalised logits), `(batch, steps)`.
    - `entropy`: entropy (nats) of each step's distribution, `(batch, steps)`.
    - `kl`: `KL(p ‖ q)` of each step's distribution `p` to `q`, the same flow (same
        temperature, time and supports) run on the unpenalised logits, `(batch, steps)`.
        `+inf` where a support evaluated on the penalised logits keeps a token the one
        evaluated on the raw logits drops.
    - `time_to`: with `time_to_eps`, the time each step's flow needs to come within
        `eps` of its limit (`rx.time_to`), `(batch, steps)`; `None` otherwise.
    - `log_p`: with `save_log_p=True`, every step's distribution,
        `(batch, steps, vocab)`; `None` otherwise.
    - `repeated_ngrams`: per row, the number of positions `j` of the generated tokens
        whose n-gram `tokens[j : j + n]` (`n = loop_ngram_size`) already occurred at an
        earlier position; `0` for a sequence without repeated n-grams.
    - `cycle_length`: per row, the smallest period `p` with `1 <= p <= k // 2` such that
        the last `k = loop_window` generated tokens repeat with period `p`
        (`x[i] = x[i - p]` for each of them past the first `p`), i.e. the tail is at
        least two turns of a cycle of length `p`; `0` where there is none.
    - `state`: the model's state after the last call; the model has consumed every
        generated token (it is called `steps + 1` times: once on the prompt, once per
        generated token), so decoding can continue from it.
    """

    tokens: Int[Array, "batch steps"]
    log_prob: Float[Array, "batch steps"]
    entropy: Float[Array, "batch steps"]
    kl: Float[Array, "batch steps"]
    time_to: Float[Array, "batch steps"] | None
    log_p: Float[Array, "batch steps vocab"] | None
    repeated_ngrams: Int[Array, " batch"]
    cycle_length: Int[Array, " batch"]
    state: PyTree


# --------------------------------------------------------------------------------------
# The static configuration of a run and its dynamic parameters


class _Config(eqx.Module):
    """Everything that decides the shape of the program (one compile per value)."""

    steps: int = eqx.field(static=True)
    prompt_length: int = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    no_repeat_ngram_size: int = eqx.field(static=True)
    counts: str = eqx.field(static=True)
    choice: str = eqx.field(static=True)  # "greedy", "sample" or "targets"
    to_limit: bool = eqx.field(static=True)
    temperature_first: bool = eqx.field(static=True)
    with_time_to: bool = eqx.field(static=True)
    save_log_p: bool = eqx.field(static=True)
    loop_ngram_size: int = eqx.field(static=True)
    loop_window: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    token_dtype: Any = eqx.field(static=True)


class _Params(eqx.Module):
    """The values (dynamic: new values do not recompile)."""

    flow: Callable = eqx.field(static=True)
    temperature: Float[Array, "*temperature_rows"]
    t1: Float[Array, ""]
    supports: tuple
    repetition_penalty: Float[Array, "*repetition_rows"]
    presence_penalty: Float[Array, "*presence_penalty_rows"]
    frequency_penalty: Float[Array, "*frequency_penalty_rows"]
    eps: Float[Array, ""] | None


class _Carry(eqx.Module):
    history: Int[Array, "batch length"]  # prompt, then the generated tokens
    seen_prompt: Bool[Array, "batch vocab"]  # tokens of the prompt (mask-aware)
    counts: Float[Array, "batch vocab"]  # generated counts (or expected counts)
    unseen: Float[Array, "batch vocab"]  # probability that a token was not generated


# --------------------------------------------------------------------------------------
# Inputs sharded over a mesh of explicit axes


class _Layout(NamedTuple):
    """Where a run's arrays live when its logits or tokens are sharded over a mesh of
    explicit axes: the mesh, and the mesh axis (or axes) of the batch and of the
    vocabulary (`None`: not sharded)."""

    mesh: Any
    batch: Any
    vocab: Any


def _layout(logits: Array | None, tokens: Array) -> _Layout | None:
    """The layout of a run from the model's logits `(batch, vocab)` (the batch and
    vocabulary axes) and the tokens `(batch, ...)` (the batch axis, when the logits do
    not shard it); `None` when neither is sharded over a mesh of explicit axes."""
    mesh = batch = vocab = None
    for _, logits_mesh, spec in explicitly_sharded(logits):
        mesh, batch, vocab = logits_mesh, spec[0], spec[-1]
    for _, token_mesh, spec in explicitly_sharded(tokens):
        mesh = token_mesh if mesh is None else mesh
        if batch is None and spec[0] != vocab:
            batch = spec[0]
    return None if mesh is None else _Layout(mesh, batch, vocab)


def _on_mesh(fn: Callable, layout: _Layout | None, specs: PyTree, *args) -> PyTree:
    """`fn(*args)`; under a layout, with the mesh's axes made `Auto` and the outputs
    placed as `specs` (`PartitionSpec`s, one per output leaf).

    The loop's own steps (penalties, flows, choice, records) run so: XLA partitions
    them from their inputs' shardings, as it does for the flows (`rx.solve`), where
    explicit sharding would refuse their unsharded buffers and nested solvers. The
    model is not: it runs as its author wrote it, on the mesh's explicit axes."""
    if layout is None:
        return fn(*args)
    dynamic, static = eqx.partition(args, eqx.is_array)
    shardings = jtu.tree_map(
        lambda spec: NamedSharding(layout.mesh, spec),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    call = jax.sharding.auto_axes(
        lambda dynamic: fn(*eqx.combine(dynamic, static)), out_sharding=shardings
    )
    return call(dynamic)


def _carry_specs(layout: _Layout) -> _Carry:
    """The placement of the loop's buffers: split over the batch only, whole rows on
    each device (see `_step_on_mesh`)."""
    rows = PartitionSpec(layout.batch, None)
    return _Carry(rows, rows, rows, rows)


def _record_specs(layout: _Layout, config: _Config) -> dict[str, PartitionSpec]:
    """The placement of one step's records: per row, and `log_p` per row and token."""
    names = ["log_prob", "entropy", "kl"] + ["time_to"] * config.with_time_to
    specs = {name: PartitionSpec(layout.batch) for name in names}
    if config.save_log_p:
        specs["log_p"] = PartitionSpec(layout.batch, layout.vocab)
    return specs


# --------------------------------------------------------------------------------------
# Penalties (one batch of logits; THEORY §4 for their fluid limits)


def _scale(x, shape):
    """A scalar or per-row parameter as a column against `(batch, vocab)`."""
    return jnp.broadcast_to(x, shape[:1])[:, None] if x.ndim else x


def _repetition(logits, seen, penalty, soft):
    """transformers' rule: a token already seen has its logit divided by the penalty
    when positive, multiplied when negative. `soft`: `seen` is a probability and the
    penalised logit is the expectation `s + P(seen) (pen(s) - s)`."""
    penalty = _scale(penalty, logits.shape).astype(logits.dtype)
    finite = jnp.isfinite(logits)
    safe = jnp.where(finite, logits, 0)  # -inf logits stay -inf, with finite gradients
    penalised = jnp.where(safe < 0, safe * penalty, safe / penalty)
    if soft:
        out = safe + seen * (penalised - safe)
    else:
        out = jnp.where(seen, penalised, safe)
    return jnp.where(finite, out, logits)


def _additive(logits, present, counts, presence, frequency):
    """OpenAI's presence and frequency penalties, `s - a_p [c > 0] - a_f c`."""
    shape = logits.shape
    shift = _scale(presence, shape).astype(logits.dtype) * present
    shift = shift + _scale(frequency, shape).astype(logits.dtype) * counts
    return jnp.where(jnp.isfinite(logits), logits - shift, logits)


def _banned_ngrams(history, length, n, vocab):
    """transformers' no-repeat-n-gram rule on `history[:, :length]`: the tokens that
    would complete an n-gram that already occurred (a window whose first `n - 1` tokens
    equal the last `n - 1` tokens bans its last token). `length` may be traced."""
    batch, total = history.shape
    starts = jnp.arange(total - n + 1)
    windows = jnp.stack([history[:, starts + i] for i in range(n)], axis=-1)
    prefix_at = length - (n - 1) + jnp.arange(n - 1)
    prefix = jnp.take_along_axis(
        history, jnp.broadcast_to(jnp.clip(prefix_at, 0, total - 1), (batch, n - 1)), 1
    )
    match = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1)
    # Windows that end inside what exists; none before `n` tokens exist.
    match = match & (starts + n <= length)[None, :] & (length >= n)
    one_hot = jax.nn.one_hot(windows[..., -1], vocab, dtype=bool)
    return jnp.any(match[..., None] & one_hot, axis=1)


# --------------------------------------------------------------------------------------
# One step


def _step_distribution(params, config, logits, temperature, supports):
    """`log p` at `t1` (or the limit) of the flow built on `logits`."""
    flow = params.flow(logits, temperature)
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "`flow` must be a flow class (e.g. `rx.EntropicReplicator`) or a function "
            "`flow(logits, temperature)` returning a replicax flow; it returned "
            f"{type(flow).__name__}."
        )
    kwargs = dict(support=supports or None, temperature_first=config.temperature_first)
    if config.to_limit:
        log_p = limit_log_p(flow, **kwargs)
    else:
        log_p = solve(flow, t1=params.t1, **kwargs).log_p[..., -1, :]
    return flow, log_p.astype(config.dtype)


def _both_distributions(params, config, penalised, logits):
    """The step's distribution and the unpenalised one. They run as one batch of twice
    the rows: one flow in the program instead of two, half the compile time."""
    batch = logits.shape[0]
    twice = lambda x: jnp.concatenate([x, x]) if x.ndim else x  # noqa: E731
    temperature = params.temperature
    if temperature.ndim:
        temperature = twice(jnp.broadcast_to(temperature, (batch,)))
    doubled = tuple(
        jtu.tree_map(twice, s.broadcast_batch((batch,))) if s.batch_shape else s
        for s in params.supports
    )
    _, both = _step_distribution(
        params, config, jnp.concatenate([penalised, logits]), temperature, doubled
    )
    return both[:batch], both[batch:]


def _inverse_cdf(log_p, u):
    """The first token whose cumulative probability exceeds `u` (tokens of probability
    0 are never chosen; rounding that leaves the total below `u` picks the last token
    with mass)."""
    p = jnp.exp(log_p)
    cdf = jnp.cumsum(p, axis=-1)
    token = jnp.sum(cdf <= u[:, None], axis=-1)
    vocab = log_p.shape[-1]
    last = vocab - 1 - jnp.argmax(jnp.flip(p > 0, axis=-1), axis=-1)
    return jnp.minimum(token, last)


def _step(params, config, carry, logits, t, x):
    """One decoding step: penalties, flow, choice, records. `t` is the step index
    (traced), `x` the step's key or target (or `None`)."""
    dtype = config.dtype
    logits = logits.astype(dtype)
    soft = config.counts == "expected"
    supports = params.supports
    length = config.prompt_length + t
    if soft:
        seen = 1 - jnp.where(carry.seen_prompt, 0, 1).astype(dtype) * carry.unseen
        present = 1 - carry.unseen
    else:
        seen = carry.seen_prompt | (carry.counts > 0)
        present = (carry.counts > 0).astype(dtype)
    penalised = _repetition(logits, seen, params.repetition_penalty, soft)
    penalised = _additive(
        penalised,
        present,
        carry.counts,
        params.presence_penalty,
        params.frequency_penalty,
    )
    if config.no_repeat_ngram_size:
        banned = _banned_ngrams(
            carry.history, length, config.no_repeat_ngram_size, config.vocab_size
        )
        penalised = jnp.where(banned, -jnp.inf, penalised)
    log_p, log_q = _both_distributions(params, config, penalised, logits)

    if config.choice == "greedy":
        token = jnp.argmax(log_p, axis=-1)
    elif config.choice == "sample":
        u = jax.random.uniform(x, log_p.shape[:1], dtype)
        token = _inverse_cdf(log_p, u)
    else:
        token = x
    token = token.astype(config.token_dtype)
    chosen = jnp.take_along_axis(log_p, token[:, None].astype(jnp.int32), -1)[:, 0]
    records = dict(log_prob=chosen, entropy=entropy(log_p), kl=kl(log_p, log_q))
    if config.with_time_to:
        records["time_to"] = time_to(
            params.flow(penalised, params.temperature),
            params.eps,
            support=supports or None,
            temperature_first=config.temperature_first,
        ).astype(dtype)
    if config.save_log_p:
        records["log_p"] = log_p

    if soft:
        p = jnp.exp(log_p)
        counts = carry.counts + p
        unseen = carry.unseen * (1 - p)
    else:
        one_hot = jax.nn.one_hot(token, config.vocab_size, dtype=dtype)
        counts = carry.counts + one_hot
        unseen = carry.unseen * (1 - one_hot)
    history = jax.lax.dynamic_update_slice_in_dim(
        carry.history, token[:, None], length, axis=1
    )
    carry = _Carry(history, carry.seen_prompt, counts, unseen)
    return carry, token, records


def _step_on_mesh(params, config, carry, logits, t, x):
    """`_step`; on sharded inputs, on whole rows split over the batch.

    Logits split over the vocabulary are gathered into whole rows first (one
    all-gather of the step's `(batch, vocab)` logits), and the step's `log_p` record is
    split again. Left to itself, XLA's partitioner sorted a face (`rx.TopP`) over the
    split vocabulary through collectives: 2.7 s against 0.29 s on whole rows for one
    `(16, 32000)` top-p distribution on 8 CPU devices. The sampler's cumulative sum
    needs whole rows too."""
    layout = _layout(logits, carry.history)
    if layout is None:
        return _step(params, config, carry, logits, t, x)
    if layout.vocab is not None:
        rows = NamedSharding(layout.mesh, PartitionSpec(layout.batch, None))
        logits = jax.sharding.reshard(logits, rows)
    specs = (
        _carry_specs(layout),
        PartitionSpec(layout.batch),
        _record_specs(layout, config),
    )
    return _on_mesh(_step, layout, specs, params, config, carry, logits, t, x)


# --------------------------------------------------------------------------------------
# The loop detector


def _repeated_ngrams(tokens, n):
    """Per row: positions whose n-gram already occurred earlier."""
    steps = tokens.shape[-1]
    if steps < n:
        return jnp.zeros(tokens.shape[:1], jnp.int32)
    starts = jnp.arange(steps - n + 1)
    windows = jnp.stack([tokens[:, starts + i] for i in range(n)], axis=-1)
    equal = jnp.all(windows[:, :, None, :] == windows[:, None, :, :], axis=-1)
    earlier = starts[None, :] < starts[:, None]  # [j, i]: i < j
    return jnp.sum(jnp.any(equal & earlier[None], axis=-1), axis=-1).astype(jnp.int32)


def _cycle_length(tokens, window):
    """Per row: the smallest period `p <= window // 2` of the last `window` tokens."""
    tail = tokens[:, tokens.shape[-1] - window :]
    best = jnp.zeros(tokens.shape[:1], jnp.int32)
    for p in range(window // 2, 0, -1):  # descending: the smallest period wins
        periodic = jnp.all(tail[:, p:] == tail[:, :-p], axis=-1)
        best = jnp.where(periodic, p, best)
    return best


# --------------------------------------------------------------------------------------
# The two loops


def _init(config, prompt, mask, dtype):
    batch = prompt.shape[0]
    vocab = config.vocab_size
    total = config.prompt_length + config.steps
    history = jnp.zeros((batch, total), config.token_dtype)
    history = history.at[:, : config.prompt_length].set(prompt)
    one_hot = jax.nn.one_hot(prompt, vocab, dtype=bool) & mask[..., None]
    seen = jnp.any(one_hot, axis=1)
    counts = jnp.zeros((batch, vocab), dtype)
    return _Carry(history, seen, counts, jnp.ones((batch, vocab), dtype))


def _start(config, prompt, mask, logits):
    """The loop's first carry; on sharded inputs, split over the batch as the model's
    logits on the prompt are (or as the prompt is, if they are not)."""
    layout = _layout(logits, prompt)
    specs = None if layout is None else _carry_specs(layout)
    return _on_mesh(_init, layout, specs, config, prompt, mask, config.dtype)


def _finish(config, tokens, records, state):
    """Stack the records (steps first) into a `Generation` (batch first)."""
    records = {k: jnp.moveaxis(v, 0, 1) for k, v in records.items()}
    layout = _layout(None, tokens)
    specs = None if layout is None else (PartitionSpec(layout.batch),) * 2
    repeated, cycle = _on_mesh(
        lambda tokens: (
            _repeated_ngrams(tokens, config.loop_ngram_size),
            _cycle_length(tokens, config.loop_window),
        ),
        layout,
        specs,
        tokens,
    )
    return Generation(
        tokens=tokens,
        log_prob=records["log_prob"],
        entropy=records["entropy"],
        kl=records["kl"],
        time_to=records.get("time_to"),
        log_p=records.get("log_p"),
        repeated_ngrams=repeated,
        cycle_length=cycle,
        state=state,
    )


# The progress bars of the running jitted loops: a host callback per step updates the
# newest one (`progress=True` with `jit=True`).
_BARS: list[Any] = []


def _tick(step):
    del step
    if _BARS:
        _BARS[-1].update(1)


@eqx.filter_jit
@eqx.debug.assert_max_traces(max_traces=None)  # counts traces for the no-recompile test
def _generate_scan(logits_fn, config, params, prompt, mask, state, xs, progress=False):
    logits, state = logits_fn(prompt, state)
    carry = _start(config, prompt, mask, logits)

    def body(loop, scan_in):
        carry, logits, state = loop
        t, x = scan_in
        carry, token, records = _step_on_mesh(params, config, carry, logits, t, x)
        logits, state = logits_fn(token[:, None], state)
        if progress:
            jax.debug.callback(_tick, t)
        return (carry, logits, state), (token, records)

    ts = jnp.arange(config.steps)
    (_, _, state), (tokens, records) = jax.lax.scan(
        body, (carry, logits, state), (ts, xs)
    )
    return _finish(config, jnp.moveaxis(tokens, 0, 1), records, state)


_start_jit = eqx.filter_jit(_start)
_step_jit = eqx.filter_jit(
    eqx.debug.assert_max_traces(_step_on_mesh, max_traces=None)
)
_finish_jit = eqx.filter_jit(_finish)


def _progress_bar(progress, steps):
    """A tqdm bar over the steps of the host loop, or `None`. `progress=None`: only
    when stderr is a terminal and tqdm is installed; `True`: tqdm is required."""
    if progress is False:
        return None
    if progress is None and not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError as error:
        if progress is None:
            return None
        raise ImportError(
            "`progress=True` needs tqdm: `pip install tqdm` (or the `bench` extra)."
        ) from error
    return tqdm(total=steps, desc="rx.generate", unit="token", file=sys.stderr)


def _generate_host(logits_fn, config, params, prompt, mask, state, xs, progress):
    logits, state = logits_fn(prompt, state)
    carry = _start_jit(config, prompt, mask, jnp.asarray(logits))
    tokens, records = [], []
    ts = jnp.arange(config.steps)  # the step indices of the scan, with their dtype
    bar = _progress_bar(progress, config.steps)
    try:
        for t in range(config.steps):
            x = None if xs is None else xs[t]
            logits = jnp.asarray(logits)
            carry, token, record = _step_jit(params, config, carry, logits, ts[t], x)
            logits, state = logits_fn(token[:, None], state)
            tokens.append(token)
            records.append(record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    stacked = jtu.tree_map(lambda *r: jnp.stack(r), *records)
    return _finish_jit(config, jnp.stack(tokens, axis=1), stacked, state)


# --------------------------------------------------------------------------------------
# Argument checks (outside jit)


def _host_scalar_or_rows(x, name, dtype, batch, *, low, low_open, allow_none=False):
    """A scalar or per-row parameter as an array; host values checked now."""
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int | float | np.ndarray | np.number):
        if not eqx.is_array(x):
            raise TypeError(
                f"`{name}` must be a number or an array of shape () or ({batch},); "
                f"received {type(x).__name__}."
            )
    arr = jnp.asarray(x)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] not in (1, batch)):
        raise ValueError(
            f"`{name}` must be a scalar or one value per row, shape ({batch},); "
            f"received shape {arr.shape}."
        )
    real = jnp.issubdtype(arr.dtype, jnp.floating)
    if not (real or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be real; received dtype {arr.dtype}.")
    if is_concrete(arr):
        host = np.asarray(arr, np.float64)
        ok = np.isfinite(host) & ((host > low) if low_open else (host >= low))
        if not np.all(ok):
            relation = ">" if low_open else ">="
            raise ValueError(
                f"`{name}` must be finite and {relation} {low}; received "
                f"{host[~ok].reshape(-1)[0] if host.ndim else host}."
            )
    else:
        ok = jnp.isfinite(arr) & ((arr > low) if low_open else (arr >= low))
        relation = ">" if low_open else ">="
        arr = eqx.error_if(arr, ~ok, f"`{name}` must be finite and {relation} {low}.")
    return arr.astype(dtype)


def _check_int(x, name, low):
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise ValueError(f"`{name}` must be an int >= {low}; received {x!r}.")
    return x


def _as_flow_fn(flow):
    if isinstance(flow, type):
        if not issubclass(flow, AbstractFlow):
            raise TypeError(
                "`flow` must be a flow class (e.g. `rx.EntropicReplicator`) or a "
                "function `flow(logits, temperature)`; received the class "
                f"{flow.__name__}."
            )
        return flow
    if isinstance(flow, AbstractFlow):
        raise TypeError(
            "`flow` must be a flow class or a function `flow(logits, temperature)` "
            "that builds the flow of one step from its logits; received a flow "
            "instance "
            f"({type(flow).__name__}). Pass its class, e.g. `flow=rx.Replicator`."
        )
    if not callable(flow):
        raise TypeError(
            "`flow` must be a flow class or a function `flow(logits, temperature)`; "
            f"received {type(flow).__name__}."
        )
    return flow


def _check_model(logits_fn, prompt, state, batch, jit):
    """Call `logits_fn` abstractly on the prompt and on one token, and check what it
    returns: `(logits of shape (batch, vocab), a state of unchanged structure)`."""
    if not callable(logits_fn):
        raise TypeError(
            "`logits_fn` must be callable as `logits_fn(tokens, state) -> (logits, "
            f"state)`; received {type(logits_fn).__name__}."
        )
    if not jit:
        return None  # a host model is only called for real, and checked then

    def describe(what, out):
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                "`logits_fn` must return a pair `(logits, state)`; called on "
                f"{what} it returned {type(out).__name__}."
            )
        logits = out[0]
        if (
            not hasattr(logits, "shape")
            or len(logits.shape) != 2
            or logits.shape[0] != batch
            or not jnp.issubdtype(logits.dtype, jnp.floating)
        ):
            shape = getattr(logits, "shape", None)
            raise ValueError(
                f"`logits_fn` must return next-token logits of shape (batch={batch}, "
                f"vocab), floating; called on {what} it returned shape {shape}."
            )
        return out

    def probe(what, tokens, state):
        try:
            out = jax.eval_shape(logits_fn, tokens, state)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`logits_fn(tokens, state)` failed on {what}, tokens of shape "
                f"{tokens.shape}: {type(error).__name__}: {error}"
            ) from error
        return describe(f"{what} {tokens.shape}", out)

    logits, state1 = probe("the prompt", prompt, state)
    # One token per row, sharded over the batch as the prompt is.
    sharding = None
    for _, mesh, spec in explicitly_sharded(prompt):
        sharding = NamedSharding(mesh, PartitionSpec(spec[0], None))
    one = jax.ShapeDtypeStruct((batch, 1), prompt.dtype, sharding=sharding)
    logits2, state2 = probe("one token per row", one, state1)
    same_state = jtu.tree_structure(state1) == jtu.tree_structure(state2) and all(
        a.shape == b.shape and a.dtype == b.dtype
        for a, b in zip(jtu.tree_leaves(state1), jtu.tree_leaves(state2), strict=True)
    )
    if logits2.shape != logits.shape or not same_state:
        raise ValueError(
            "`logits_fn` must return logits and a state of the same shapes whatever "
            "the number of tokens it is given (the state is the carry of the loop: a "
            "fixed-size cache, not one that grows)."
        )
    return logits


# --------------------------------------------------------------------------------------
# The entry point


def generate(
    logits_fn: Callable[[Int[Array, "batch tokens"], PyTree], tuple[Array, PyTree]],
    prompt: Int[ArrayLike, "batch prompt"],
    state: PyTree = None,
    *,
    max_new_tokens: int,
    flow: Callable[..., AbstractFlow] = EntropicReplicator,
    temperature: float | int | Float[ArrayLike, "*temperature_rows"] = 1.0,
    t1: RealScalarLike | None = None,
    support: Any = None,
    temperature_first: bool = True,
    key: PRNGKeyArray | None = None,
    targets: Int[ArrayLike, "batch steps"] | None = None,
    repetition_penalty: float | int | Float[ArrayLike, "*repetition_rows"] = 1.0,
    presence_penalty: float | int | Float[ArrayLike, "*presence_penalty_rows"] = 0.0,
    frequency_penalty: float | int | Float[ArrayLike, "*frequency_penalty_rows"] = 0.0,
    no_repeat_ngram_size: int = 0,
    attention_mask: Bool[ArrayLike, "batch prompt"]
    | Int[ArrayLike, "batch prompt"]
    | None = None,
    counts: Literal["tokens", "expected"] = "tokens",
    time_to_eps: RealScalarLike | None = None,
    save_log_p: bool = False,
    loop_ngram_size: int = 3,
    loop_window: int | None = None,
    jit: bool = True,
    progress: bool | None = None,
) -> Generation:
    """Decodes `max_new_tokens` tokens; each is drawn from a flow run on that step's
    penalised logits.

    At each step the model's next-token logits `s` get the penalties of the history,
    in this order: repetition (transformers' `RepetitionPenaltyLogitsProcessor`: a
    token of the prompt or generated so far has `s` divided by `repetition_penalty`
    where `s > 0`, multiplied where `s < 0`); presence and frequency (OpenAI's additive
    form, as vLLM applies it: `s - presence_penalty [c > 0] - frequency_penalty c`, `c`
    the count of the token among the *generated* tokens); then no-repeat-n-gram
    (transformers' `NoRepeatNGramLogitsProcessor`: over prompt and generated tokens, a
    token that would complete an n-gram that already occurred gets `-inf`). Then
    `flow(penalised, temperature)` runs from uniform to `t1` (`rx.solve`) or to its
    limit (`rx.limit_log_p`) on the face of `support` (the warpers, temperature first
    as transformers orders them; THEORY §3), and the next token is chosen from its
    distribution `p`.

    With the defaults (`flow=rx.EntropicReplicator`, `t1=None`) `p = softmax(s'/T)` on
    the face (THEORY §1: the limit of (E)), i.e. the distribution transformers samples
    from; `rx.Replicator` to its limit is uniform on the argmax set (greedy decoding),
    and at `t1 = 1` it passes `softmax(s'/T)` too.

    **Arguments:**

    - `logits_fn`: the model, `logits_fn(tokens, state) -> (logits, state)`. It is
        called first on the whole prompt (`tokens` of shape `(batch, prompt)`), then on
        each generated token (`(batch, 1)`), and returns the next-token logits, shape
        `(batch, vocab)`, after the tokens it has consumed, and its new state. The state
        carries what the model keeps between calls: an RNN's hidden state, a
        transformer's key-value cache of fixed size with its current length, or, for a
        model without a cache, a fixed-size buffer of the tokens so far that it reruns.
        It must keep its shapes from call to call (it is the carry of a `lax.scan`).
        Make it an `eqx.Module` (a PyTree) to differentiate with respect to its
        parameters. With `jit=False` it may be any Python callable (a PyTorch model
        behind `replicax.adapters.transformers.TransformersLogits`) that returns logits
        convertible with `jnp.asarray`.
    - `prompt`: the prompt tokens, integers of shape `(batch, prompt)`.
    - `state`: the model's initial state (any PyTree; default `None`).
    - `max_new_tokens`: the number of tokens to generate (static; no end-of-sequence
        stop: every row gets exactly this many).
    - `flow`: a flow class (`rx.EntropicReplicator`, default, or `rx.Replicator`) or a
        function `flow(logits, temperature) -> flow` (e.g. adding a score term). It is
        given the step's penalised logits stacked on its unpenalised ones (for `kl`),
        shape `(2 batch, vocab)`, and the temperature (a scalar, or one per row of
        that stack): per-row parameters of its own must be tiled likewise
        (`jnp.concatenate([beta, beta])`); scalars need nothing.
    - `temperature`: `T > 0`, a scalar or one per row. Dynamic.
    - `t1`: the time each step's flow runs to, finite and `>= 0` (dynamic), or `None` /
        `inf` (default): its limit (static choice; constant scores only).
    - `support`, `temperature_first`: the face of each step, as in `rx.solve` (e.g.
        `rx.TopK(50)`, `[rx.TopK(50), rx.TopP(0.9)]`), evaluated on the penalised
        logits.
    - `key`: a JAX PRNG key: sample. Step `t` draws `u = jax.random.uniform(keys[t],
        (batch,), dtype)` with `keys = jax.random.split(key, max_new_tokens)` and takes
        the first token whose cumulative probability (in token order) exceeds `u`
        (inverse CDF), so a reference given the same `u` picks the same token. Without a
        key (and without targets): greedy, the argmax of `p` (the first on ties).
    - `targets`: tokens of shape `(batch, max_new_tokens)` to feed instead of choosing
        (teacher forcing); `log_prob` is then their log-likelihood. Not with `key`.
    - `repetition_penalty`: `> 0`, `1` = off; a scalar or one per row. Dynamic.
    - `presence_penalty`, `frequency_penalty`: real, `0` = off; a scalar or one per
        row. Dynamic.
    - `no_repeat_ngram_size`: `n >= 1` bans repeated n-grams; `0` = off (static).
    - `attention_mask`: `(batch, prompt)`, true (or 1) at real prompt tokens; the
        repetition penalty ignores the others (left padding). transformers' own
        repetition penalty counts the pad token as seen; leave `attention_mask` out to
        get its behaviour (`tests/test_agreement.py` does). The n-gram rule sees every
        token, as transformers'. It is not passed to the model:
        put what the model needs of it in `state`.
    - `counts`: `"tokens"` (default): the penalties count the chosen tokens.
        `"expected"`: the **differentiable mode**: they count the step distributions
        instead, `c = Σ_{steps before} p_t` (the expected counts), with "seen" read as
        the probability of having been generated at least once, `1 - Π_t (1 - p_t)`
        (or `1` for a token of the prompt), and the repetition penalty applied as its
        expectation `s + P(seen) (pen(s) - s)`. Every record is then a smooth function
        of the temperature, `t1`, the penalty strengths and the model's parameters for
        fixed chosen tokens: with `targets`, `-log_prob.sum()` is the negative
        log-likelihood of a continuation and `entropy.sum()` the total entropy, and
        `jax.grad` of either is exact (checked against finite differences). The choice
        of tokens and the n-gram ban (both discrete) carry no gradient.
    - `time_to_eps`: record `rx.time_to(step_flow, time_to_eps)` at each step (a
        bisection per step: off by default). Dynamic.
    - `save_log_p`: keep every step's distribution in `Generation.log_p`.
    - `loop_ngram_size`: `n` of the loop detector's repeated n-grams (static, `>= 1`).
    - `loop_window`: `k` of the loop detector's cycle length (static, `2 <= k <=
        max_new_tokens`); default `min(max_new_tokens, 32)`.
    - `jit`: `True` (default): the whole loop is one `lax.scan` in one `jit`
        (`logits_fn` must be JAX). `False`: a Python loop calls `logits_fn` eagerly and
        runs each step's penalties, flow and choice in one jitted function (compiled
        once, reused at every step); the same tokens as `jit=True`.
    - `progress`: a tqdm progress bar over the steps on stderr (with `jit=True`, updated
        by a host callback at each step of the scan, which then waits for the result).
        `None` (default): shown only when stderr is a terminal and tqdm is installed;
        `True`: always (tqdm required: `pip install tqdm`); `False`: never.

    **Sharding:** the prompt, the state and the model's weights may be sharded over a
    mesh of explicit axes (call with the mesh in context, `jax.set_mesh(mesh)`). The
    model runs on those axes as written; each step's penalties, flow and choice run
    with the axes made `Auto` on whole rows split over the batch as the model's logits
    are (logits split over the vocabulary are gathered), and the records come back
    sharded over the batch (`log_p` also over the vocabulary). README, "Sharding",
    says what crosses devices.

    **Returns:**

    A `Generation`: tokens, per-step `log_prob`, `entropy`, `kl` (to the same flow on
    the unpenalised logits), optional `time_to` and `log_p`, the loop detector
    (`repeated_ngrams`, `cycle_length`) and the model's final state.

    **Raises:**

    `ValueError` / `TypeError` naming the argument for bad arguments known now
    (shapes, host values, a model returning the wrong shapes); run-time errors
    (`equinox.EquinoxRuntimeError`) for bad traced values (a temperature, penalty or
    `t1` out of range).
    """
    steps = _check_int(max_new_tokens, "max_new_tokens", 1)
    if not isinstance(jit, bool):
        raise TypeError(f"`jit` must be a bool; received {jit!r}.")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"`progress` must be a bool or None; received {progress!r}.")
    flags = (("temperature_first", temperature_first), ("save_log_p", save_log_p))
    for name, value in flags:
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool; received {value!r}.")
    ngram = _check_int(no_repeat_ngram_size, "no_repeat_ngram_size", 0)
    loop_n = _check_int(loop_ngram_size, "loop_ngram_size", 1)
    if loop_window is None:
        loop_window = min(steps, 32)
    if isinstance(loop_window, bool) or not isinstance(loop_window, int) or not (
        2 <= loop_window <= steps
    ):
        raise ValueError(
            f"`loop_window` must be an int in [2, max_new_tokens={steps}]; received "
            f"{loop_window!r}."
        )
    if counts not in ("tokens", "expected"):
        raise ValueError(
            f"`counts` must be 'tokens' or 'expected'; received {counts!r}."
        )
    flow_fn = _as_flow_fn(flow)
    supports = as_supports(support)

    if not eqx.is_array(prompt) and not isinstance(prompt, np.ndarray | list | tuple):
        raise TypeError(
            f"`prompt` must be an integer array of shape (batch, prompt); received "
            f"{type(prompt).__name__}."
        )
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(
        prompt.dtype, jnp.integer
    ):
        raise ValueError(
            "`prompt` must be an integer array of shape (batch, prompt) with at least "
            f"one token; received shape {prompt.shape}, dtype {prompt.dtype}."
        )
    batch, prompt_length = prompt.shape
    if attention_mask is None:
        mask = jnp.ones(prompt.shape, bool)
    else:
        mask = jnp.asarray(attention_mask)
        if mask.shape != prompt.shape:
            raise ValueError(
                "`attention_mask` must have the prompt's shape "
                f"{prompt.shape}; received {mask.shape}."
            )
        mask = mask != 0 if mask.dtype != bool else mask

    logits = _check_model(logits_fn, prompt, state, batch, jit)
    if logits is None:  # host mode: one real call tells the vocabulary and dtype
        vocab, logits_dtype = None, None
    else:
        vocab, logits_dtype = logits.shape[1], logits.dtype

    choice = "greedy"
    xs = None
    if targets is not None:
        if key is not None:
            raise ValueError(
                "Give at most one of `key` (sampling) and `targets` (teacher forcing)."
            )
        targets = jnp.asarray(targets)
        if targets.shape != (batch, steps) or not jnp.issubdtype(
            targets.dtype, jnp.integer
        ):
            raise ValueError(
                f"`targets` must be integers of shape (batch={batch}, "
                f"max_new_tokens={steps}); received shape {targets.shape}, dtype "
                f"{targets.dtype}."
            )
        choice = "targets"
        xs = jnp.moveaxis(targets.astype(prompt.dtype), 0, 1)
    elif key is not None:
        if not (eqx.is_array(key) and (
            jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
            or (key.dtype == jnp.uint32 and key.shape == (2,))
        )):
            raise TypeError(
                "`key` must be a JAX PRNG key (`jax.random.key(seed)`); received "
                f"{getattr(key, 'dtype', type(key).__name__)}."
            )
        choice = "sample"
        xs = jax.random.split(key, steps)

    to_limit = t1 is None or (
        isinstance(t1, int | float) and not isinstance(t1, bool) and t1 == math.inf
    )

    def build(vocab, logits_dtype):
        dtype = compute_dtype(logits_dtype)
        if targets is not None and is_concrete(targets):
            host = np.asarray(targets)
            if np.any((host < 0) | (host >= vocab)):
                raise ValueError(
                    f"`targets` must be token ids in [0, {vocab}); received "
                    f"{host[(host < 0) | (host >= vocab)][0]}."
                )
        for s in supports:
            s.check_vocab(vocab)
        rows = dict(low=0, low_open=True)
        params = _Params(
            flow=flow_fn,
            temperature=_host_scalar_or_rows(
                temperature, "temperature", dtype, batch, **rows
            ),
            t1=(
                jnp.zeros((), dtype)
                if to_limit
                else _host_scalar_or_rows(t1, "t1", dtype, 1, low=0, low_open=False)
            ),
            supports=supports,
            repetition_penalty=_host_scalar_or_rows(
                repetition_penalty, "repetition_penalty", dtype, batch, **rows
            ),
            presence_penalty=_host_scalar_or_rows(
                presence_penalty, "presence_penalty", dtype, batch, low=-np.inf,
                low_open=True,
            ),
            frequency_penalty=_host_scalar_or_rows(
                frequency_penalty, "frequency_penalty", dtype, batch, low=-np.inf,
                low_open=True,
            ),
            eps=_host_scalar_or_rows(
                time_to_eps, "time_to_eps", dtype, 1, low=0, low_open=True,
                allow_none=True,
            ),
        )
        if params.t1.ndim or (params.eps is not None and params.eps.ndim):
            raise ValueError("`t1` and `time_to_eps` must be scalars.")
        config = _Config(
            steps=steps,
            prompt_length=prompt_length,
            vocab_size=vocab,
            no_repeat_ngram_size=ngram,
            counts=counts,
            choice=choice,
            to_limit=to_limit,
            temperature_first=temperature_first,
            with_time_to=time_to_eps is not None,
            save_log_p=save_log_p,
            loop_ngram_size=loop_n,
            loop_window=loop_window,
            dtype=dtype,
            token_dtype=prompt.dtype,
        )
        return config, params

    if jit:
        config, params = build(vocab, logits_dtype)
        _check_flow(params, config, batch)
        bar = _progress_bar(progress, config.steps)
        if bar is None:
            return _generate_scan(logits_fn, config, params, prompt, mask, state, xs)
        _BARS.append(bar)
        try:
            out = _generate_scan(
                logits_fn, config, params, prompt, mask, state, xs, progress=True
            )
            return jax.block_until_ready(out)
        finally:
            _BARS.remove(bar)
            bar.close()
    return _generate_host_checked(
        logits_fn, build, prompt, mask, state, xs, batch, progress
    )


def _check_flow(params, config, batch):
    """Build one step's flow abstractly: a `flow` that does not return a flow, or a
    limit asked of a flow with a history, fails now with a message naming it."""
    logits = jax.ShapeDtypeStruct((batch, config.vocab_size), config.dtype)
    try:
        jax.eval_shape(
            lambda p, s: _both_distributions(p, config, s, s), params, logits
        )
    except ValueError as error:
        if config.to_limit and "constant score" in str(error):
            raise ValueError(
                "`t1=None` runs each step's flow to its limit, which needs a constant "
                "score; this `flow` has a history term: give a finite `t1`."
            ) from error
        raise


def _generate_host_checked(
    logits_fn, build, prompt, mask, state, xs, batch, progress
):
    """`jit=False`: the model is called for real once here to learn its vocabulary."""
    logits, state0 = logits_fn(prompt, state)
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != batch or not jnp.issubdtype(
        logits.dtype, jnp.floating
    ):
        raise ValueError(
            "`logits_fn` must return next-token logits of shape "
            f"(batch={batch}, vocab), floating; called on the prompt it returned "
            f"shape {logits.shape}, dtype {logits.dtype}."
        )
    config, params = build(logits.shape[1], logits.dtype)
    _check_flow(params, config, batch)
    first = [(logits, state0)]

    def replay(tokens, state):
        # The prompt's logits are already known: the first call is not repeated.
        if first:
            return first.pop()
        return logits_fn(tokens, state)

    return _generate_host(replay, config, params, prompt, mask, state, xs, progress)


__all__ = ["Generation", "generate"]
