"""The `replicax` command line (`replicax demo`, or `python -m replicax demo`).

`replicax demo` runs both flows of THEORY §1 — the replicator (R) and the entropic
replicator (E) — on a batch of next-token logits at a few temperatures, prints a table
of what happens along the way and where each flow ends, and plots entropy and KL to
`softmax(s/T)` against time. `replicax check` measures each claim of THEORY §1 for both
flows and says which holds (`_check.py`). `replicax trajectory` runs the flows on a
`.npy` file of logits and writes the paths to an `.npz` file (and a plot).

A thin layer over the public API: the library checks the values it is given, and its
error messages are the ones the user reads.
"""

import argparse
import contextlib
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import replicax as rx

from ._bench import bench_arguments, bench_main
from ._check import check_arguments, check_main

_DEFAULT_TEMPERATURES = (0.5, 0.7, 1.0, 1.5)
_DEFAULT_OUT = "replicax-demo.png"  # argparse applies `type=Path` to it
# Times at which the temperature-rescaling identity p_T(t) = p_1(t/T) is checked.
_RESCALING_TIMES = (0.5, 1.0, 2.0)
# Number of saved times on [0, t1] for the curves (t = 1 is added if not among them).
# Fixed, so that the memory of a solve does not grow with t1.
_NUM_SAVED_TIMES = 81

# What a bad option or input file raises, here or in the library (the equinox errors
# are its checks of array values). Anything else is a bug and keeps its traceback.
_USER_ERRORS = (
    ValueError, TypeError, OSError, eqx.EquinoxRuntimeError, eqx.EquinoxTracetimeError
)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `replicax` command line.

    **Arguments:**

    - `argv`: the arguments after the program name (default: `sys.argv[1:]`).

    **Returns:**

    The exit status: 0 on success; 2 for a bad option value or input file, reported in
    one line on stderr (`replicax <command>: error: <message>`), and for a malformed
    command line (argparse's usage message).
    """
    args = _build_parser().parse_args(argv)
    try:
        return args.run(args)
    except _USER_ERRORS as e:
        print(f"replicax {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2


def _first_line(error: BaseException) -> str:
    text = str(error)
    # A check made on device (`eqx.error_if`) arrives inside a report of where it
    # failed; its own message is on the line that names the error class.
    match = re.search(r"EquinoxRuntimeError: (.+)", text)
    if match:
        return match.group(1).strip()
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


# Help texts of `replicax demo`'s options.
_HELP = {
    "logits": "a .npy file of logits, shape (V,) or (B, V); -inf masks a token. "
    "Default: synthetic LLM-like logits, 8 contexts x 32000 tokens.",
    "T": "temperatures to run at (default: %(default)s)",
    "eps": "threshold of the 'time to eps' column: 1 - p(argmax) <= eps for R, "
    "KL(p || softmax(s/T)) <= eps for E (default: %(default)g)",
    "t1": "final time of the paths, >= 1 (default: %(default)g)",
    "out": "where to write the plot (default: %(default)s)",
    "seed": "seed of the synthetic logits (default: %(default)s)",
}


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a malformed option is reported in one line, as the
    commands report bad values, instead of after the usage text."""

    def error(self, message: str):  # pyright: ignore[reportIncompatibleMethodOverride]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replicax",
        description="Replicator flows of next-token distributions on the probability "
        "simplex.",
    )
    parser.add_argument(
        "--version", action="version", version=f"replicax {rx.__version__}"
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_SubcommandParser
    )
    demo = commands.add_parser(
        "demo",
        help="run both flows on LLM-like logits; print a table and plot entropy and KL",
        description="Run the replicator (R) and the entropic replicator (E) on a batch "
        "of next-token logits at several temperatures T. (R) passes softmax(s/T) at "
        "t = 1 and converges to the argmax; (E) converges to softmax(s/T).",
    )
    add = demo.add_argument
    add("--logits", metavar="PATH", type=Path, help=_HELP["logits"])
    add("--temperatures", metavar="T", type=float, nargs="+", help=_HELP["T"])
    add("--eps", type=float, default=1e-3, help=_HELP["eps"])
    add("--t1", type=float, default=8.0, help=_HELP["t1"])
    add("--out", metavar="PNG", type=Path, default=_DEFAULT_OUT, help=_HELP["out"])
    add("--no-plot", action="store_true", help="do not write the plot")
    add("--seed", type=int, default=0, help=_HELP["seed"])
    demo.set_defaults(run=_demo, temperatures=list(_DEFAULT_TEMPERATURES))
    bench = commands.add_parser(
        "bench",
        help="benchmark the flows against plain JAX / diffrax and the bytes floor",
        description="Measure the device's copy bandwidth, then time replicax against "
        "plain JAX / diffrax baselines and the bytes floor on full trajectories (a), "
        "observables only (b), the ODE path with a state-dependent score (c), "
        "gradients (d) and per-call overhead (e); check every result against an exact "
        "reference. Exit status 1 if a correctness check fails.",
    )
    bench_arguments(bench)
    bench.set_defaults(run=bench_main)
    check = commands.add_parser(
        "check",
        help="measure each claim of THEORY §1 for both flows; print which holds",
        description="Measure each claim about the replicator flow (the paper's) on "
        "built-in synthetic logits, for the replicator (R) and the entropic replicator "
        "(E), in float64, and print a table: the claim, whether it holds for each flow "
        "(measured) with the measured error or gap, and the verdict of THEORY §1. Exit "
        "status 0 when every measured verdict is the expected one, 1 otherwise.",
    )
    check_arguments(check)
    check.set_defaults(run=check_main)
    trajectory = commands.add_parser(
        "trajectory",
        help="run the flows on a .npy file of logits; write the paths to .npz, a PNG",
        description="Run the replicator (R) and/or the entropic replicator (E) from "
        "uniform on the logits of a .npy file, at one or more temperatures, optionally "
        "on a top-k / top-p face (transformers' order: temperature, top-k, top-p), and "
        "write the saved paths with their entropy and KL to softmax(s/T) to an .npz "
        "file. " + _NPZ_KEYS,
    )
    add = trajectory.add_argument
    add("--logits", metavar="PATH", type=Path, required=True, help=_TRAJ_HELP["logits"])
    add("--out", metavar="NPZ", type=Path, required=True, help=_TRAJ_HELP["out"])
    add("--temperatures", metavar="T", type=float, nargs="+", help=_HELP["T"])
    add("--flow", default="both", help=_TRAJ_HELP["flow"])
    add("--t1", type=float, default=8.0, help=_TRAJ_HELP["t1"])
    add("--times", type=int, default=41, help=_TRAJ_HELP["times"])
    add("--top-k", type=int, help=_TRAJ_HELP["top_k"])
    add("--top-p", type=float, help=_TRAJ_HELP["top_p"])
    add("--png", metavar="PNG", type=Path, help=_TRAJ_HELP["png"])
    add("--no-log-p", action="store_true", help=_TRAJ_HELP["no_log_p"])
    add("--x64", action="store_true", help=_TRAJ_HELP["x64"])
    trajectory.set_defaults(run=_trajectory, temperatures=[1.0])
    return parser


def _demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    # What the demo itself needs: one table row per temperature, a t = 1 column, and a
    # folder to write the plot to (checked now, not after the computation).
    temperatures = np.asarray(args.temperatures, np.float32)
    if len(set(temperatures.tolist())) != len(temperatures):
        raise ValueError(f"--temperatures has repeated values: {args.temperatures}.")
    if not (math.isfinite(args.t1) and args.t1 >= 1):
        raise ValueError(
            f"--t1 must be finite and >= 1 (the table reports t = 1); received "
            f"{args.t1}."
        )
    if not args.no_plot and not args.out.parent.is_dir():
        raise ValueError(f"--out: folder {args.out.parent} does not exist.")
    if args.logits is None:
        logits = rx.datasets.synthetic_logits(args.seed)
        source = f"synthetic LLM-like logits (seed {args.seed})"
    else:
        logits = rx.datasets.load_logits(args.logits)
        source = f"logits from {args.logits}"
    batch, vocab = logits.shape

    # All flows are built before anything is compiled, so that the library's check of
    # the temperatures comes first; its check of eps comes in the first `time_to`.
    score = rx.Logits(logits)
    flows = [
        (name, float(temperature), cls(score, temperature))
        for name, cls in (("R", rx.Replicator), ("E", rx.EntropicReplicator))
        for temperature in temperatures
    ]
    # Saved times: a uniform grid that ends at t1 and contains t = 1 exactly, as the
    # table reads its t = 1 columns off it.
    ts = np.union1d(np.linspace(0.0, args.t1, _NUM_SAVED_TIMES), [1.0])
    ts = ts.astype(np.float32)
    t_check = np.asarray([t for t in _RESCALING_TIMES if t <= args.t1], np.float32)
    i1 = int(np.flatnonzero(ts == 1.0)[0])
    curves, rows = {}, []
    for name, temperature, flow in flows:
        t_eps = rx.time_to(flow, np.float32(args.eps))
        out = _summary(flow, ts, np.float32(args.t1), t_check, i1)
        out["time_to"] = jnp.mean(t_eps)
        curves[(name, temperature)] = out  # the plot reads "entropy" and "kl"
        rows.append((name, temperature, *(float(out[k]) for k, _, _ in _COLUMNS)))

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
    print("\n".join(_CONCLUSIONS))
    if not args.no_plot:
        from .plot import plot_entropy_kl

        title = (
            f"replicax demo: {source}, {batch} x {vocab}; mean over contexts "
            "(solid R, dashed E)"
        )
        path = plot_entropy_kl(np.asarray(ts), curves, args.out, title=title)
        print()
        print(f"plot written to {path}")
    print(f"wall time: {time.perf_counter() - start:.1f} s (including JAX compilation)")
    return 0


def _observe(t: Any, log_p: Any, flow: Any) -> dict[str, Any]:
    # Called by `solve` for one context at one saved time: keep three scalars instead of
    # a vocabulary-sized vector.
    del t
    return {
        "entropy": rx.entropy(log_p),
        "kl": rx.kl(log_p, rx.target_log_p(flow)),
        "top1": jnp.exp(jnp.max(log_p)),
    }


@eqx.filter_jit
def _summary(flow, ts, t1, t_check, i1):
    # One compilation per flow class (the temperature is dynamic), in which the (B, V)
    # intermediates stay on the device; one temperature at a time keeps the peak memory
    # at B x times x V floats.
    logits = flow.score.logits
    obs = rx.solve(flow, t1=t1, saveat=rx.SaveAt(ts=ts, fn=_observe)).observables
    target = jnp.exp(rx.target_log_p(flow))  # (B, V)
    limit = jnp.exp(rx.limit_log_p(flow))
    # The argmax "vertex": uniform on the set of top logits (one-hot unless tied), which
    # is where (R) goes from a uniform start.
    top = (logits == jnp.max(logits, axis=-1, keepdims=True)).astype(logits.dtype)
    vertex = top / jnp.sum(top, axis=-1, keepdims=True)
    # Temperature-rescaling identity p_T(t) = p_1(t/T), at a few t.
    p_t = rx.solve(flow, t1=t_check[-1], saveat=rx.SaveAt(ts=t_check)).p
    scaled = t_check / flow.temperature
    flow_1 = type(flow)(flow.score, 1.0)
    p_1 = rx.solve(flow_1, t1=scaled[-1], saveat=rx.SaveAt(ts=scaled)).p
    return {
        "entropy": jnp.mean(obs["entropy"], axis=0),  # (times,)
        "kl": jnp.mean(obs["kl"], axis=0),
        "entropy_1": jnp.mean(obs["entropy"][:, i1]),
        "kl_1": jnp.mean(obs["kl"][:, i1]),
        "kl_t1": jnp.mean(obs["kl"][:, -1]),
        "top1_t1": jnp.mean(obs["top1"][:, -1]),
        "limit_to_target": jnp.mean(jnp.max(jnp.abs(limit - target), axis=-1)),
        "limit_to_argmax": jnp.mean(jnp.max(jnp.abs(limit - vertex), axis=-1)),
        "rescaling_error": jnp.max(jnp.abs(p_t - p_1)),
    }


# The table's columns after flow and T: (key in the summary, header, format).
_COLUMNS = (
    ("time_to", "t to eps", "{:.2f}"),
    ("entropy_1", "H(t=1)", "{:.3f}"),
    ("kl_1", "KL(t=1)", "{:.1e}"),
    ("kl_t1", "KL(t1)", "{:.1e}"),
    ("top1_t1", "top-1(t1)", "{:.4f}"),
    ("limit_to_target", "|p_inf-pi_T|", "{:.1e}"),
    ("limit_to_argmax", "|p_inf-argmax|", "{:.1e}"),
    ("rescaling_error", "max|p_T(t)-p_1(t/T)|", "{:.1e}"),
)

# Below the table; each string is one printed line.
_FOOTNOTES = (
    "t to eps: time to come within eps = {eps:g} of where the flow ends "
    "(replicax.time_to):",
    "  R: 1 - p(argmax set) <= eps;  E: KL(p || pi_T) <= eps.",
    "KL = KL(p(t) || pi_T) (values within ~1e-7 of 0 are float32 round-off); top-1 = "
    "mass of the",
    "most likely token; t1 = {t1:g}.",
    "|p_inf - .| = max-abs distance of the t -> inf limit (replicax.limit_log_p) to "
    "pi_T and to the argmax token.",
    "Columns are means over the contexts, except the last: max over contexts, tokens "
    "and t in {{{t_check}}}.",
)

_CONCLUSIONS = (
    "(R) passes pi_T at t = 1 (KL(t=1) ~ 0) but does not stop there: it converges to "
    "the argmax",
    "    token (|p_inf - argmax| = 0), and temperature only rescales its time: "
    "p_T(t) = p_1(t/T)",
    "    up to float32 round-off.",
    "(E) converges to pi_T = softmax(s/T) (|p_inf - pi_T| ~ 0): temperature sets where "
    "it ends,",
    "    not how fast it gets there, so the rescaling identity fails for it.",
)


def _format_table(rows: list[tuple], eps: float, t1: float) -> str:
    headers = ["flow", "T", *(header for _, header, _ in _COLUMNS)]
    body = []
    for name, temperature, *values in rows:
        text = f"{temperature:g}"
        cells = [name, text if any(c in text for c in ".en") else text + ".0"]
        for (_, _, fmt), value in zip(_COLUMNS, values, strict=True):
            # A round-off negative that prints as zero prints as "0.000", not "-0.000".
            cells.append(fmt.format(0.0 if float(fmt.format(value)) == 0 else value))
        body.append(cells)
    widths = [max(map(len, column)) for column in zip(headers, *body, strict=True)]

    def line(cells):
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    out = [line(headers), line(["-" * w for w in widths])]
    for i, cells in enumerate(body):
        if i and cells[0] != body[i - 1][0]:
            out.append("")  # a blank line between the flows
        out.append(line(cells))
    t_check = ", ".join(f"{t:g}" for t in _RESCALING_TIMES if t <= t1)
    notes = [note.format(eps=eps, t1=t1, t_check=t_check) for note in _FOOTNOTES]
    return "\n".join([*out, "", *notes])


# `replicax trajectory`.

_FLOW_CLASSES = {"R": rx.Replicator, "E": rx.EntropicReplicator}
_FLOW_CHOICES = {"R": ("R",), "E": ("E",), "both": ("R", "E")}

_NPZ_KEYS = (
    "Keys of the .npz file (F is R or E, for each flow run; nT temperatures, B "
    "contexts, N saved times, V tokens): ts (N,); temperatures (nT,); flows (the "
    "names run); logits (B, V) as read; target_log_p (nT, B, V), log softmax(s/T) on "
    "the face (-inf off it); F_log_p (nT, B, N, V), log p(t) (not with --no-log-p); "
    "F_entropy (nT, B, N); F_kl (nT, B, N), KL(p(t) || softmax(s/T) on the face); "
    "F_limit_log_p "
    "(nT, B, V), the t -> inf limit (the argmax set for R, softmax(s/T) for E)."
)

_TRAJ_HELP = {
    "logits": "a .npy file of logits, shape (V,) or (B, V), V >= 2; -inf masks a token",
    "out": "the .npz file to write (its folder must exist)",
    "flow": "R (replicator), E (entropic replicator) or both (default: %(default)s)",
    "t1": "final time, > 0 (default: %(default)g)",
    "times": "number of saved times, evenly spaced on [0, t1], >= 2 "
    "(default: %(default)s)",
    "top_k": "run on the face of the top-k tokens",
    "top_p": "run on the top-p (nucleus) face of softmax(s/T), top_p in (0, 1]",
    "png": "also plot entropy and KL against time (mean over contexts) to this PNG",
    "no_log_p": "do not write the paths themselves (F_log_p), only the observables",
    "x64": "compute in float64 (default: float32)",
}


def _trajectory(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    # Options are checked before the file is read and anything is computed.
    if args.flow not in _FLOW_CHOICES:
        raise ValueError(
            f"--flow must be one of {', '.join(_FLOW_CHOICES)}; received {args.flow!r}."
        )
    temperatures = [float(t) for t in args.temperatures]
    bad = [t for t in temperatures if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"--temperatures must be finite and > 0; received {bad[0]:g}.")
    if len(set(temperatures)) != len(temperatures):
        raise ValueError(f"--temperatures has repeated values: {args.temperatures}.")
    if not (math.isfinite(args.t1) and args.t1 > 0):
        raise ValueError(f"--t1 must be finite and > 0; received {args.t1:g}.")
    if args.times < 2:
        raise ValueError(f"--times must be >= 2; received {args.times}.")
    if args.out.suffix != ".npz":
        raise ValueError(f"--out must name an .npz file; received {args.out}.")
    for option, path in (("--out", args.out), ("--png", args.png)):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{option}: folder {path.parent} does not exist.")
    # The supports check their own values (`top_k` >= 1, `top_p` in (0, 1]).
    support = []
    if args.top_k is not None:
        support.append(rx.TopK(args.top_k))
    if args.top_p is not None:
        support.append(rx.TopP(args.top_p))
    logits = rx.datasets.load_logits(args.logits)
    batch, vocab = logits.shape
    names = _FLOW_CHOICES[args.flow]

    # float32 unless asked: the library keeps the dtype of the logits it is given.
    with jax.enable_x64(True) if args.x64 else contextlib.nullcontext():
        dtype = np.float64 if args.x64 else np.float32
        scores = logits.astype(dtype)
        ts = np.linspace(0.0, args.t1, args.times, dtype=dtype)
        results: dict[str, Any] = {
            "ts": ts,
            "temperatures": np.asarray(temperatures),  # as given
            "flows": np.asarray(names),
            "logits": logits,
        }
        per_flow: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in names}
        targets = []
        for temperature in temperatures:
            for name in names:
                flow = _FLOW_CLASSES[name](scores, temperature)
                out = _trajectory_arrays(flow, ts, support or None)
                per_flow[name].append(jax.tree_util.tree_map(np.asarray, out))
            targets.append(per_flow[names[0]][-1]["target_log_p"])
    results["target_log_p"] = np.stack(targets)
    keys = ("entropy", "kl", "limit_log_p") + (() if args.no_log_p else ("log_p",))
    for name in names:
        for key in keys:
            results[f"{name}_{key}"] = np.stack([out[key] for out in per_flow[name]])
    np.savez(args.out, **results)

    face = ""
    if support:
        parts = [f"top-k {args.top_k}"] if args.top_k is not None else []
        parts += [f"top-p {args.top_p:g}"] if args.top_p is not None else []
        face = f", on the {' then '.join(parts)} face"
    print(
        f"replicax trajectory: {batch} context{'s' if batch != 1 else ''} x {vocab} "
        f"tokens from {args.logits}; flows {', '.join(names)} at T = "
        f"{', '.join(f'{t:g}' for t in temperatures)}{face}; {args.times} times on "
        f"[0, {args.t1:g}], from uniform, {np.dtype(dtype).name}."
    )
    print(f"results written to {args.out} (keys: {', '.join(results)})")
    if args.png is not None:
        from .plot import plot_entropy_kl

        curves = {
            (name, temperature): {
                "entropy": np.mean(out["entropy"], axis=0),
                "kl": np.mean(out["kl"], axis=0),
            }
            for name in names
            for temperature, out in zip(temperatures, per_flow[name], strict=True)
        }
        title = f"replicax trajectory: {args.logits.name}, {batch} x {vocab}{face}"
        path = plot_entropy_kl(ts, curves, args.png, title=title)
        print(f"plot written to {path}")
    print(f"wall time: {time.perf_counter() - start:.1f} s (including JAX compilation)")
    return 0


@eqx.filter_jit
def _trajectory_arrays(flow, ts, support):
    # One compilation per flow class and face (the temperature is dynamic).
    log_p = rx.solve(flow, t1=ts[-1], saveat=rx.SaveAt(ts=ts), support=support).log_p
    target = rx.target_log_p(flow, support=support)
    return {
        "log_p": log_p,
        "entropy": rx.entropy(log_p),
        "kl": rx.kl(log_p, target[:, None]),
        "target_log_p": target,
        "limit_log_p": rx.limit_log_p(flow, support=support),
    }
