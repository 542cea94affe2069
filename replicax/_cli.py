"""The `replicax` command line (`replicax demo`, or `python -m replicax demo`).

`replicax demo` runs both flows of THEORY §1 — the replicator (R) and the entropic
replicator (E) — on a batch of next-token logits at a few temperatures, prints a table
of what happens along the way and where each flow ends, and plots entropy and KL to
`softmax(s/T)` against time.
"""

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._flows import EntropicReplicator, Replicator
from ._observables import entropy, kl, limit_log_p, target_log_p, time_to
from ._saveat import SaveAt
from ._solve import solve


_DEFAULT_TEMPERATURES = (0.5, 0.7, 1.0, 1.5)
# Times at which the temperature-rescaling identity p_T(t) = p_1(t/T) is checked.
_RESCALING_TIMES = (0.5, 1.0, 2.0)
# Number of saved times on [0, t1] for the curves (t = 1 is added if not among them).
# Fixed, so that the memory of a solve does not grow with t1.
_NUM_SAVED_TIMES = 81


class CliError(Exception):
    """A user error: printed as `replicax <command>: error: <message>`, exit code 2."""


# --------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `replicax` command line.

    **Arguments:**

    - `argv`: the arguments after the program name (default: `sys.argv[1:]`).

    **Returns:**

    The exit code: 0 on success, 2 for a bad argument or input file (the message is
    printed to stderr). Malformed options exit through `argparse` with code 2 as well.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except CliError as e:
        print(f"replicax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicax",
        description=(
            "Replicator flows of next-token distributions on the probability simplex."
        ),
    )
    from . import __version__

    parser.add_argument(
        "--version", action="version", version=f"replicax {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run both flows on LLM-like logits; print a table and plot entropy and KL",
        description=(
            "Run the replicator (R) and the entropic replicator (E) on a batch of "
            "next-token logits at several temperatures T. (R) passes softmax(s/T) at "
            "t = 1 and converges to the argmax; (E) converges to softmax(s/T)."
        ),
    )
    demo.add_argument(
        "--logits",
        metavar="PATH",
        type=Path,
        default=None,
        help=(
            "a .npy file of logits, shape (V,) or (B, V); -inf masks a token. Default: "
            "synthetic LLM-like logits, 8 contexts x 32000 tokens."
        ),
    )
    demo.add_argument(
        "--temperatures",
        metavar="T",
        type=float,
        nargs="+",
        default=list(_DEFAULT_TEMPERATURES),
        help="temperatures to run at (default: %(default)s)",
    )
    demo.add_argument(
        "--eps",
        type=float,
        default=1e-3,
        help=(
            "threshold of the 'time to eps' column: 1 - p(argmax) <= eps for R, "
            "KL(p || softmax(s/T)) <= eps for E (default: %(default)g)"
        ),
    )
    demo.add_argument(
        "--t1",
        type=float,
        default=8.0,
        help="final time of the paths, >= 1 (default: %(default)g)",
    )
    demo.add_argument(
        "--out",
        metavar="PNG",
        type=Path,
        default=Path("replicax-demo.png"),
        help="where to write the plot (default: %(default)s)",
    )
    demo.add_argument("--no-plot", action="store_true", help="do not write the plot")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the synthetic logits (default: %(default)s)",
    )
    demo.set_defaults(run=_demo)
    return parser


# --------------------------------------------------------------------------------------
# `replicax demo`


def _demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    temperatures = _check_options(args)
    if args.logits is None:
        logits = synthetic_logits(args.seed)
        source = f"synthetic LLM-like logits (seed {args.seed})"
    else:
        logits = load_logits(args.logits)
        source = f"logits from {args.logits}"
    batch, vocab = logits.shape

    ts = _saved_times(args.t1)
    curves = {}
    rows = []
    for name, cls in (("R", Replicator), ("E", EntropicReplicator)):
        result = _run_flow(cls, logits, temperatures, ts, args.t1, args.eps)
        for i, temperature in enumerate(temperatures):
            curves[(name, float(temperature))] = {
                "entropy": result["entropy"][i].mean(axis=0),
                "kl": result["kl"][i].mean(axis=0),
            }
            values = tuple(float(result[key][i]) for key in _TABLE_KEYS)
            rows.append((name, float(temperature)) + values)

    print(
        f"replicax demo: {batch} context{'s' if batch != 1 else ''} x {vocab} tokens, "
        f"{source}; paths from uniform over t in [0, {args.t1:g}]."
    )
    print(
        "R = Replicator (theta' = s/T), E = EntropicReplicator (theta' = s/T - theta); "
        "pi_T = softmax(s/T)."
    )
    print()
    print(_format_table(rows, args.eps, args.t1))
    print()
    print(
        "(R) passes pi_T at t = 1 (KL(t=1) ~ 0) but does not stop there: it converges "
        "to the argmax\n"
        "    token (|p_inf - argmax| = 0), and temperature only rescales its time: "
        "p_T(t) = p_1(t/T)\n"
        "    up to float32 round-off.\n"
        "(E) converges to pi_T = softmax(s/T) (|p_inf - pi_T| ~ 0): temperature sets "
        "where it ends,\n"
        "    not how fast it gets there, so the rescaling identity fails for it."
    )

    if not args.no_plot:
        from .plot import plot_entropy_kl

        path = plot_entropy_kl(
            np.asarray(ts),
            curves,
            args.out,
            title=(
                f"replicax demo: {source}, {batch} x {vocab}; mean over contexts "
                "(solid R, dashed E)"
            ),
        )
        print()
        print(f"plot written to {path}")
    print(f"wall time: {time.perf_counter() - start:.1f} s (including JAX compilation)")
    return 0


def _check_options(args: argparse.Namespace) -> np.ndarray:
    temperatures = np.asarray(args.temperatures, dtype=np.float32)
    if not np.all(np.isfinite(temperatures) & (temperatures > 0)):
        raise CliError(
            f"--temperatures must be finite and > 0; received {args.temperatures}. "
            "(T = 0, greedy decoding, is the argmax, not a flow.)"
        )
    if len(set(temperatures.tolist())) != len(temperatures):
        raise CliError(f"--temperatures has repeated values: {args.temperatures}.")
    if not (math.isfinite(args.eps) and args.eps > 0):
        raise CliError(f"--eps must be finite and > 0; received {args.eps}.")
    if not (math.isfinite(args.t1) and args.t1 >= 1):
        raise CliError(
            f"--t1 must be finite and >= 1 (the table reports t = 1); received "
            f"{args.t1}."
        )
    if not args.no_plot and args.out.parent and not args.out.parent.is_dir():
        raise CliError(f"--out: folder {args.out.parent} does not exist.")
    return temperatures


def _saved_times(t1: float) -> np.ndarray:
    # A uniform grid that contains t = 1 exactly (the table reads the t = 1 columns off
    # it) and ends at t1.
    ts = np.union1d(np.linspace(0.0, t1, _NUM_SAVED_TIMES), [1.0])
    return ts.astype(np.float32)


# --------------------------------------------------------------------------------------
# Logits


def synthetic_logits(seed: int = 0, batch: int = 8, vocab: int = 32_000) -> np.ndarray:
    """Deterministic, heavy-tailed logits that look like a language model's.

    Why they look like an LM's: the next-token probabilities of a trained LM are close
    to Zipf's law in rank, `p(rank r) ∝ r^(-a)`, with `a` between about 1 and 2.5
    depending on how predictable the context is, so a handful of tokens hold most of the
    mass and a long tail of tens of thousands holds the rest. The logits are therefore
    `-a log r` (one `a` per context), plus heavy-tailed Student-t noise (4 degrees of
    freedom; it breaks the exact power law and ties, and lets a few tail tokens stand
    out as real logits do), shuffled over the vocabulary independently per context
    (token ids are not sorted by probability), and shifted by a random offset per
    context (raw logits have an arbitrary level; the flows do not see it). Over seeds,
    the entropy of `softmax(s)` has a median of about 2.3 nats (0.9 to 7) and the top
    token a median mass of about 0.5.

    **Arguments:**

    - `seed`: seed of the `jax.random` key; the same seed gives the same logits.
    - `batch`: number of contexts `B`.
    - `vocab`: vocabulary size `V`.

    **Returns:**

    A float32 NumPy array of shape `(batch, vocab)`.
    """
    key = jax.random.PRNGKey(seed)
    return np.asarray(_synthetic_logits(key, batch, vocab), dtype=np.float32)


@eqx.filter_jit
def _synthetic_logits(key, batch, vocab):
    f32 = jnp.float32  # explicit everywhere: the same logits with or without x64
    k_exponent, k_noise, k_perm, k_offset = jax.random.split(key, 4)
    exponent = jax.random.uniform(k_exponent, (batch, 1), f32, minval=1.0, maxval=2.5)
    log_rank = jnp.log(jnp.arange(1, vocab + 1, dtype=f32))[None, :]
    # Student-t with 4 degrees of freedom, as a normal over sqrt(chi-square / 4): cheap
    # to compile, unlike `jax.random.t` (a gamma sampler with a rejection loop).
    normals = jax.random.normal(k_noise, (5, batch, vocab), f32)
    chi2 = jnp.sum(normals[1:] ** 2, axis=0)
    noise = 0.3 * normals[0] / jnp.sqrt(chi2 / 4)
    sorted_logits = -exponent * log_rank + noise
    # An independent random permutation of the vocabulary per context.
    perms = jnp.argsort(jax.random.uniform(k_perm, (batch, vocab), f32), axis=-1)
    logits = jnp.take_along_axis(sorted_logits, perms, axis=-1)
    offset = jax.random.uniform(k_offset, (batch, 1), f32, minval=-2.0, maxval=8.0)
    return logits + offset


def load_logits(path: Path) -> np.ndarray:
    """Reads and checks the `--logits` file.

    **Arguments:**

    - `path`: a `.npy` file holding real logits of shape `(V,)` or `(B, V)`, `V >= 2`.
        `-inf` masks a token; NaN and `+inf` are errors.

    **Returns:**

    A float32 array of shape `(B, V)` (`B = 1` for a 1-D file).

    **Raises:**

    `CliError` naming `--logits` for a missing or unreadable file, a wrong shape or
    dtype, NaN or `+inf` entries, or a row with every token masked.
    """
    if not path.exists():
        raise CliError(f"--logits: file not found: {path}")
    if path.is_dir():
        raise CliError(f"--logits: {path} is a folder, not a .npy file.")
    try:
        logits = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CliError(f"--logits: cannot read {path} as a .npy array ({e}).") from None
    if not isinstance(logits, np.ndarray):  # an .npz archive
        raise CliError(
            f"--logits: {path} holds several arrays (.npz); save one array with "
            "np.save."
        )
    dtype = logits.dtype
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise CliError(
            f"--logits: expected real numbers; {path} has dtype {logits.dtype}."
        )
    if logits.ndim not in (1, 2):
        raise CliError(
            f"--logits: expected shape (V,) or (B, V); {path} has shape {logits.shape} "
            f"({logits.ndim} dimensions)."
        )
    if logits.shape[-1] < 2 or logits.size == 0:
        raise CliError(
            f"--logits: need at least one context of at least 2 tokens; {path} has "
            f"shape {logits.shape}."
        )
    logits = np.atleast_2d(logits).astype(np.float32)
    bad = np.isnan(logits) | (logits == np.inf)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        what = "NaN" if np.isnan(logits[index]) else "+inf"
        raise CliError(
            f"--logits: {path} contains {what} (first at row {index[0]}, token "
            f"{index[1]}; {int(bad.sum())} bad entries in all). Use -inf to mask a "
            "token."
        )
    empty = np.all(logits == -np.inf, axis=-1)
    if empty.any():
        raise CliError(
            f"--logits: row {int(np.argmax(empty))} of {path} is all -inf: no token "
            "left."
        )
    return logits


# --------------------------------------------------------------------------------------
# The computation


_TABLE_KEYS = (
    "time_to",
    "entropy_1",
    "kl_1",
    "kl_t1",
    "top1_t1",
    "limit_to_target",
    "limit_to_argmax",
    "rescaling_error",
)


def _observe(t: Any, log_p: Any, flow: Any) -> dict[str, Any]:
    # Called by `solve` for one context at one saved time: keep three scalars instead of
    # a vocabulary-sized vector.
    del t
    return {
        "entropy": entropy(log_p),
        "kl": kl(log_p, target_log_p(flow)),
        "top1": jnp.exp(jnp.max(log_p)),
    }


def _run_flow(
    cls: type,
    logits: np.ndarray,
    temperatures: np.ndarray,
    ts: np.ndarray,
    t1: float,
    eps: float,
) -> dict[str, np.ndarray]:
    """Everything the table and the plot need for one flow class.

    **Arguments:**

    - `cls`: `replicax.Replicator` or `replicax.EntropicReplicator`.
    - `logits`: shape `(B, V)`.
    - `temperatures`: shape `(nT,)`.
    - `ts`: saved times, containing `1.0` and ending at `t1`.
    - `t1`: final time.
    - `eps`: threshold of `replicax.time_to`.

    **Returns:**

    A dict with `"entropy"` and `"kl"` of shape `(nT, B, times)`, and, for each of
    `_TABLE_KEYS`, a per-temperature summary of shape `(nT,)`: means over the batch,
    except the rescaling error, a maximum over contexts, times and tokens.
    """
    t_check = np.asarray([t for t in _RESCALING_TIMES if t <= t1], np.float32)
    i1 = int(np.flatnonzero(ts == 1.0)[0])
    # One temperature at a time: the same compiled function for each (the temperature
    # is a dynamic argument), and a peak memory of B x times x V floats rather than
    # nT times that.
    t1, eps = np.float32(t1), np.float32(eps)
    outs = [
        _core(cls, logits, temperature, ts, t1, eps, t_check, i1)
        for temperature in temperatures
    ]
    return {k: np.stack([np.asarray(out[k]) for out in outs]) for k in outs[0]}


def _core_impl(cls, logits, temperature, ts, t1, eps, t_check, i1):
    # One jitted function per flow class: a single XLA compilation instead of one per
    # eager operation inside `time_to`, `target_log_p` and `limit_log_p`, and the
    # (B, V) intermediates never leave the device.
    flow = cls(logits, temperature)
    obs = solve(flow, t1=t1, saveat=SaveAt(ts=ts, fn=_observe)).observables

    target = jnp.exp(target_log_p(flow))  # (B, V)
    limit = jnp.exp(limit_log_p(flow))
    # The argmax "vertex": uniform on the set of top logits (one-hot unless tied), which
    # is where (R) goes from a uniform start.
    top = (logits == jnp.max(logits, axis=-1, keepdims=True)).astype(logits.dtype)
    vertex = top / jnp.sum(top, axis=-1, keepdims=True)

    # Temperature-rescaling identity p_T(t) = p_1(t/T), at a few t.
    p_t = solve(flow, t1=t_check[-1], saveat=SaveAt(ts=t_check)).p
    scaled = t_check / temperature
    p_1 = solve(cls(logits, 1.0), t1=scaled[-1], saveat=SaveAt(ts=scaled)).p

    return {
        "entropy": obs["entropy"],
        "kl": obs["kl"],
        "time_to": jnp.mean(time_to(flow, eps)),
        "entropy_1": jnp.mean(obs["entropy"][:, i1]),
        "kl_1": jnp.mean(obs["kl"][:, i1]),
        "kl_t1": jnp.mean(obs["kl"][:, -1]),
        "top1_t1": jnp.mean(obs["top1"][:, -1]),
        "limit_to_target": jnp.mean(jnp.max(jnp.abs(limit - target), axis=-1)),
        "limit_to_argmax": jnp.mean(jnp.max(jnp.abs(limit - vertex), axis=-1)),
        "rescaling_error": jnp.max(jnp.abs(p_t - p_1)),
    }


_core = eqx.filter_jit(_core_impl)


# --------------------------------------------------------------------------------------
# The table


_COLUMNS = (
    # (header, format) for each of _TABLE_KEYS.
    ("t to eps", "{:8.2f}"),
    ("H(t=1)", "{:7.3f}"),
    ("KL(t=1)", "{:8.1e}"),
    ("KL(t1)", "{:8.1e}"),
    ("top-1(t1)", "{:9.4f}"),
    ("|p_inf-pi_T|", "{:12.1e}"),
    ("|p_inf-argmax|", "{:14.1e}"),
    ("max|p_T(t)-p_1(t/T)|", "{:20.1e}"),
)


def _format_table(rows: list[tuple], eps: float, t1: float) -> str:
    headers = ["flow", "T"] + [h for h, _ in _COLUMNS]
    body = []
    for name, temperature, *values in rows:
        cells = [name, _format_temperature(temperature)]
        for (_, fmt), value in zip(_COLUMNS, values, strict=True):
            # A round-off negative that prints as zero prints as "0.000", not "-0.000".
            text = fmt.format(float(value)).strip()
            if float(text) == 0:
                text = fmt.format(0.0).strip()
            cells.append(text)
        body.append(cells)
    widths = [max(len(r[j]) for r in [headers] + body) for j in range(len(headers))]

    def line(cells):
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first] + rest)

    out = [line(headers), line(["-" * w for w in widths])]
    previous = None
    for cells in body:
        if previous is not None and cells[0] != previous:
            out.append("")
        out.append(line(cells))
        previous = cells[0]
    t_check = ", ".join(f"{t:g}" for t in _RESCALING_TIMES if t <= t1)
    out += [
        "",
        f"t to eps: time to come within eps = {eps:g} of where the flow ends "
        "(replicax.time_to):",
        "  R: 1 - p(argmax set) <= eps;  E: KL(p || pi_T) <= eps.",
        "KL = KL(p(t) || pi_T) (values within ~1e-7 of 0 are float32 round-off); "
        "top-1 = mass of the",
        f"most likely token; t1 = {t1:g}.",
        "|p_inf - .| = max-abs distance of the t -> inf limit (replicax.limit_log_p) "
        "to pi_T and to the argmax token.",
        "Columns are means over the contexts, except the last: max over contexts, "
        f"tokens and t in {{{t_check}}}.",
    ]
    return "\n".join(out)


def _format_temperature(temperature: float) -> str:
    text = f"{temperature:g}"
    return text if any(c in text for c in ".en") else text + ".0"
