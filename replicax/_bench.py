"""`replicax bench`: one benchmark suite, run on whatever device JAX sees.

The suite first measures the device's copy bandwidth (an in-place, donated `x + 1`),
then, for every batch size `B` and vocabulary size `V` asked for and 32 saved times on
`[0, t1]`, runs these cases:

- (a) the full trajectory for constant logits, `rx.solve(rx.Replicator(s, T), ...)`,
    against a jitted `jax.nn.log_softmax` over `(times, B, V)`;
- (b) observables only (the entropy at every saved time) through `SaveAt(fn=...)`,
    against plain jnp that materialises `(times, B, V)` and then takes the entropy;
- (c) the ODE path with a state-dependent score (logits and a two-stage fading frequency
    penalty under the entropic replicator) against plain diffrax Tsit5 on `p`;
- (d) the gradient with respect to the logits of the summed entropy at the saved
    times, through the closed form, against the same loss written in plain jnp;
- (e) the fixed cost of one direct `rx.solve` call (B = 1, V = 32,000) against the same
    call inside the user's `jax.jit`.

Each entry reports its median time, compile time, memory, error against an exact
reference and its ratios to the bytes floor (inputs read once and outputs written once,
over the measured bandwidth) and to the baseline. Errors are compared with named
tolerances (`TOLERANCES`); the suite's exit status is non-zero if one fails. Timings are
reported against the DESIGN targets, never asserted.
"""

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import replicax as rx

# XLA options that cut compile time, per platform, measured by `compile_study` against
# the default compile (compile time, and run time relative to the default's). On GPUs the
# autotuner (which times candidate kernels for each fusion while compiling) is what made
# one compile take minutes; on CPUs LLVM's most expensive passes.
FAST_COMPILE_OPTIONS = {
    "gpu": {"xla_gpu_autotune_level": 0},
    "cpu": {"xla_llvm_disable_expensive_passes": True},
}

# Tolerances of the correctness checks. Errors are measured on the first
# `REFERENCE_ROWS` contexts, against float64 references.
TOLERANCES = {
    # Closed forms, max abs error in p (cases a, e).
    "closed_form_p": 1e-5,
    # Entropy at the saved times, max abs error in nats relative to log V, the
    # largest entropy (case b). A float32 sum over V terms rounds to about this on a
    # CPU; replicax also passes if within twice the plain jnp baseline's error.
    "entropy_rel": 1e-4,
    # ODE path, max abs error in p: replicax passes if within the baseline's error
    # or within this (case c).
    "ode_p": 1e-4,
    # Gradient, max abs error relative to the largest reference entry (case d).
    "gradient_rel": 1e-4,
}
REFERENCE_ROWS = 2
CASES = ("a", "b", "c", "d", "e")
CASE_TITLES = {
    "a": "full trajectory, constant logits",
    "b": "observables only (entropy at every saved time)",
    "c": "ODE path, Logits + FrequencyPenalty(0.3, tau=1, stages=2), entropic",
    "d": "gradient of the summed entropy w.r.t. the logits",
    "e": "per-call overhead, B = 1, V = 32000",
}
FULL_BATCH = (1, 64, 256, 1024)
FULL_VOCAB = (32000, 128256, 262144)
# `--quick` without `--batch` / `--vocab`: a few (B, V) per case, chosen to keep a
# CPU run compile-bound and short (each new shape compiles every entry again).
QUICK_SIZES = {
    "a": ((8, 4096),),
    "b": ((8, 4096),),
    "c": ((1, 4096),),
    "d": ((8, 4096),),
}
NUM_TIMES = 32
T1 = 4.0
TEMPERATURE = 0.7
# Timed calls of the per-call overhead case (each well under a millisecond).
OVERHEAD_REPEATS = 200
ALPHA, TAU = 0.3, 1.0  # the frequency penalty of case (c)
OVERHEAD_SIZE = (1, 32000)  # (B, V) of case (e)
# The copy-bandwidth probe moves at least this much, more than a CPU's last-level cache
# or a GPU's L2 holds.
_MIN_COPY_BYTES = 256 * 2**20
_MAX_STEPS = 4096
# Case (c)'s reference is RK4 in numpy up to this many logits (rows x V), replicax in
# float64 at rtol = atol = 1e-10 above (a compilation, but fast on an accelerator).
_RK4_MAX_SIZE = 2 * 32768
_RK4_SUBSTEPS = 16
# Working sets above this fraction of the device's memory are not attempted.
_FIT_FRACTION = 0.9


# --------------------------------------------------------------------------------------
# Command line


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `replicax bench` to `parser`."""
    add = parser.add_argument
    add(
        "--quick",
        action="store_true",
        help="a smoke run that checks every case: 3 repeats and, unless --batch or "
        "--vocab is given, (B, V) = "
        + ", ".join(
            f"{', '.join(map(str, sizes))} for {case}"
            for case, sizes in QUICK_SIZES.items()
        )
        + f", {OVERHEAD_SIZE} for e",
    )
    add(
        "--batch",
        metavar="B",
        type=int,
        nargs="+",
        help=f"batch sizes (default: {' '.join(map(str, FULL_BATCH))})",
    )
    add(
        "--vocab",
        metavar="V",
        type=int,
        nargs="+",
        help=f"vocabulary sizes (default: {' '.join(map(str, FULL_VOCAB))})",
    )
    add(
        "--repeats",
        type=int,
        help="timed calls after the first (default: 5; 3 with --quick)",
    )
    add(
        "--cases",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        help="cases to run (default: all)",
    )
    add("--x64", action="store_true", help="compute in float64")
    add(
        "--memory-limit-gib",
        type=float,
        default=8.0,
        help="memory assumed "
        "available when the device does not report it, e.g. on CPU (default: 8)",
    )
    add("--json", metavar="PATH", help="write every figure as JSON to PATH")
    add("--markdown", metavar="PATH", help="write the Markdown table to PATH")
    add("--seed", type=int, default=0, help="seed of the logits (default: 0)")


def bench_main(args: argparse.Namespace) -> int:
    """Runs the suite for parsed options; returns the exit status (1 if a check
    failed)."""
    quick_sizes = args.quick and args.batch is None and args.vocab is None
    batches = args.batch or ((1, 8) if quick_sizes else FULL_BATCH)
    vocabs = args.vocab or ((4096, 32000) if quick_sizes else FULL_VOCAB)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    for name, values in (("--batch", batches), ("--vocab", vocabs)):
        if any(v < 1 for v in values):
            raise ValueError(f"{name} values must be >= 1; received {list(values)}.")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1; received {repeats}.")
    if not args.memory_limit_gib > 0:
        raise ValueError(
            f"--memory-limit-gib must be > 0; received {args.memory_limit_gib}."
        )
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    suite = Suite(
        batches=sorted(set(batches)),
        vocabs=sorted(set(vocabs)),
        repeats=repeats,
        cases=[c for c in CASES if c in args.cases],
        dtype=np.dtype(np.float64 if args.x64 else np.float32),
        memory_limit=args.memory_limit_gib * 2**30,
        seed=args.seed,
        quick=args.quick,
        sizes=QUICK_SIZES if quick_sizes else None,
    )
    results = suite.run()
    text = markdown(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    failed = [c for c in results["checks"] if not c["passed"]]
    for c in failed:
        print(f"check failed: {c['name']}: {c['detail']}", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------
# Measuring


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median over `repeats` calls, each ended by `block_until_ready`; last output."""
    times, out = [], None
    for _ in range(repeats):
        del out  # free the last output before the next call allocates its own
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _device_memory() -> tuple[int, int] | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["bytes_in_use"]), int(stats["peak_bytes_in_use"])


def _xla_memory(compiled: Any) -> int | None:
    try:
        analysis = compiled.memory_analysis()
        return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    except Exception:  # not every backend implements it
        return None


def measure_jitted(
    fn: Callable,
    args: tuple,
    repeats: int,
    as_user_calls: bool = False,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A jitted function: compile timed on its own (`lower(...).compile()`, with XLA's
    `compiler_options` if given), then the median of `repeats` calls of the compiled
    program. With `as_user_calls`, the calls timed are of `jax.jit(fn)` itself, with its
    own dispatch (one more compile, in the warm-up): what a user's loop pays per
    call."""
    before = _device_memory()
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - start
    call = jax.jit(fn) if as_user_calls else compiled
    jax.block_until_ready(call(*args))  # warm-up
    time_s, out = _median_time(lambda: call(*args), repeats)
    memory, source = _memory_of(before, compiled)
    return dict(
        compile_s=compile_s,
        time_s=time_s,
        memory_bytes=memory,
        memory_source=source,
        out=out,
    )


def measure_direct(
    fn: Callable[[], Any],
    jitted: Callable | None,
    args: tuple,
    repeats: int,
    plan_memory: bool = True,
) -> dict[str, Any]:
    """A call as a user writes it (not jitted by the caller): compile time is the first
    call minus the median. Memory, where the device does not report its peak, is
    XLA's plan for `jitted(*args)`, the same computation under one `jax.jit` (one more
    compilation; skipped unless `plan_memory`)."""
    before = _device_memory()
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    del out
    time_s, out = _median_time(fn, repeats)
    compiled = None
    if plan_memory and jitted is not None and not _peak_rose(before):
        compiled = jax.jit(jitted).lower(*args).compile()
    memory, source = _memory_of(before, compiled)
    return dict(
        compile_s=max(first - time_s, 0.0),
        time_s=time_s,
        memory_bytes=memory,
        memory_source=source,
        out=out,
    )


def _peak_rose(before: tuple[int, int] | None) -> bool:
    after = _device_memory()
    return before is not None and after is not None and after[1] > before[1]


def _memory_of(
    before: tuple[int, int] | None, compiled: Any
) -> tuple[int | None, str | None]:
    # The device's peak is a high-water mark over the whole process: it describes this
    # call only when this call raised it.
    after = _device_memory()
    if before is not None and after is not None and after[1] > before[1]:
        return after[1] - before[0], "device peak_bytes_in_use"
    if compiled is not None:
        memory = _xla_memory(compiled)
        if memory is not None:
            return memory, "XLA memory_analysis (temp + output)"
    return None, None


def copy_bandwidth(dtype: np.dtype, repeats: int) -> float:
    """Bytes per second of an in-place (donated) `x + 1` over at least 256 MiB."""
    n = _MIN_COPY_BYTES // dtype.itemsize
    # `+ 1`, not `+ 0`, which XLA may fold into no copy at all.
    step = jax.jit(lambda y: y + 1, donate_argnums=0)
    x = jax.block_until_ready(step(jnp.zeros((n,), dtype)))
    times = []
    for _ in range(max(repeats, 5)):
        start = time.perf_counter()
        x = jax.block_until_ready(step(x))
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


# --------------------------------------------------------------------------------------
# Float64 references on the first rows


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def reference_p(logits: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """(R) from uniform in float64: `softmax(t s / T)`, shape `(rows, times, V)`."""
    z = logits.astype(np.float64) / TEMPERATURE
    return _softmax64(ts[None, :, None] * z[:, None, :])


def reference_ode_p(logits: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Case (c) in float64 numpy, independently of replicax and diffrax: classical RK4
    with `_RK4_SUBSTEPS` equal steps per saved interval on `(θ, c₁, c₂)`, where
    `θ̇ = (s - α c₂)/T - θ`, `ċ₁ = (p - c₁)/τ`, `ċ₂ = (c₁ - c₂)/τ`, `p = softmax(θ)`,
    from uniform with both memories at uniform. Returns `p`, `(rows, times, V)`."""
    s = logits.astype(np.float64)
    p0 = np.full(s.shape, 1 / s.shape[-1])

    def rate(y):
        theta, c1, c2 = y
        p = _softmax64(theta)
        return np.stack(
            [(s - ALPHA * c2) / TEMPERATURE - theta, (p - c1) / TAU, (c1 - c2) / TAU]
        )

    y = np.stack([np.zeros_like(s), p0, p0])
    out = [_softmax64(y[0])]
    for i in range(len(ts) - 1):
        h = (ts[i + 1] - ts[i]) / _RK4_SUBSTEPS
        for _ in range(_RK4_SUBSTEPS):
            k1 = rate(y)
            k2 = rate(y + h / 2 * k1)
            k3 = rate(y + h / 2 * k2)
            k4 = rate(y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(_softmax64(y[0]))
    return np.stack(out, axis=1)


def _entropy64(p: np.ndarray) -> np.ndarray:
    safe = np.where(p > 0, p, 1.0)
    return -np.sum(p * np.log(safe), axis=-1)


def _max_abs(a: Any, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)))


# --------------------------------------------------------------------------------------
# The cases


def _log_softmax_path(s, ts):
    # What a user writes for the whole path: (times, B, V).
    return jax.nn.log_softmax(ts[:, None, None] * s[None] / TEMPERATURE, axis=-1)


def _entropy_plain(s, ts):
    log_p = _log_softmax_path(s, ts)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)  # (times, B)


def _entropy_obs(t, log_p, flow):
    del t, flow
    return rx.entropy(log_p)


def _replicax_path(s, ts):
    flow = rx.Replicator(s, TEMPERATURE)
    return rx.solve(flow, t1=ts[-1], saveat=rx.SaveAt(ts=ts)).log_p


def _replicax_kernel_path(kernel, s, ts):
    flow = rx.Replicator(s, TEMPERATURE)
    method = rx.Exact(kernel=kernel)
    return rx.solve(flow, t1=ts[-1], saveat=rx.SaveAt(ts=ts), method=method).log_p


def _replicax_entropy(s, ts, kernel="auto"):
    # The one-read path: `rx.path_statistics` (entropy, top probability, mean score).
    flow = rx.Replicator(s, TEMPERATURE)
    saveat = rx.SaveAt(ts=ts, fn=rx.path_statistics)
    method = rx.Exact(kernel=kernel)
    return rx.solve(flow, t1=ts[-1], saveat=saveat, method=method).observables.entropy


def _replicax_entropy_generic(s, ts):
    # Any function of log p: evaluated time after time on the saved log p.
    flow = rx.Replicator(s, TEMPERATURE)
    return rx.solve(
        flow, t1=ts[-1], saveat=rx.SaveAt(ts=ts, fn=_entropy_obs)
    ).observables


def _ode_flow(s):
    score = rx.Logits(s) + rx.FrequencyPenalty(ALPHA, tau=TAU, stages=2)
    return rx.EntropicReplicator(score, TEMPERATURE)


def _replicax_ode(s, ts, rtol=1e-6, shared_steps=False):
    sol = rx.solve(
        _ode_flow(s),
        t1=ts[-1],
        saveat=rx.SaveAt(ts=ts),
        rtol=rtol,
        atol=rtol,
        max_steps=100_000,
        shared_steps=shared_steps,
    )
    return sol.log_p, sol.stats["num_steps"]


def _plain_diffrax_ode(s, ts):
    # The same flow written on p, as a user would: state (p, c1, c2), memory starting
    # at the start distribution, Tsit5 with a PID controller at rtol = atol = 1e-6.
    dtype = s.dtype

    def field(t, y, s):
        p, c1, c2 = y
        g = (s - ALPHA * c2) / TEMPERATURE - jnp.log(p)
        dp = p * (g - jnp.sum(p * g))
        return dp, (p - c1) / TAU, (c1 - c2) / TAU

    def one(s):
        p0 = jnp.full(s.shape, 1 / s.shape[-1], dtype)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            None,
            (p0, p0, p0),
            args=s,
            saveat=diffrax.SaveAt(ts=ts, fn=lambda t, y, args: y[0]),
            stepsize_controller=diffrax.PIDController(
                rtol=jnp.asarray(1e-6, dtype), atol=jnp.asarray(1e-6, dtype)
            ),
            max_steps=_MAX_STEPS,
        )
        return sol.ys, sol.stats["num_steps"]

    return jax.vmap(one)(s)


def _summed_entropy(s, ts, kernel="auto"):
    return jnp.sum(_replicax_entropy(s, ts, kernel))


def _summed_entropy_generic(s, ts):
    return jnp.sum(_replicax_entropy_generic(s, ts))


def _summed_entropy_plain(s, ts):
    return jnp.sum(_entropy_plain(s, ts))


class Suite:
    """One run of the suite; `run()` returns everything as JSON-ready data."""

    def __init__(
        self,
        *,
        batches,
        vocabs,
        repeats,
        cases,
        dtype,
        memory_limit,
        seed,
        quick,
        sizes=None,
    ):
        self.batches, self.vocabs, self.repeats = batches, vocabs, repeats
        self.quick, self.sizes = quick, sizes
        self.cases, self.dtype, self.seed = cases, dtype, seed
        stats = jax.devices()[0].memory_stats()
        if stats and "bytes_limit" in stats:
            self.memory_limit = float(stats["bytes_limit"])
            self.memory_limit_source = "device bytes_limit"
        else:
            self.memory_limit = float(memory_limit)
            self.memory_limit_source = "--memory-limit-gib"
        self.rows: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self._logits: dict[int, Any] = {}
        self._references: dict[tuple, Any] = {}

    # -- inputs ------------------------------------------------------------------------

    def logits(self, batch: int, vocab: int):
        # One array per vocabulary size, sliced per batch: the first rows (those the
        # references are computed on) are the same for every batch size.
        if vocab not in self._logits:
            key = jax.random.fold_in(jax.random.key(self.seed), vocab)
            shape = (max(*self.batches, batch, REFERENCE_ROWS), vocab)
            self._logits[vocab] = 3 * jax.random.normal(key, shape, self.dtype)
        return self._logits[vocab][:batch]

    def times(self):
        return jnp.linspace(0, T1, NUM_TIMES, dtype=self.dtype)

    def ref_logits(self, vocab: int) -> np.ndarray:
        return np.asarray(self._logits[vocab][:REFERENCE_ROWS], np.float64)

    # -- bookkeeping -------------------------------------------------------------------

    def fits(self, nbytes: int | float) -> bool:
        return nbytes <= _FIT_FRACTION * self.memory_limit

    def add_row(self, case, batch, vocab, entry, kind, **fields):
        row = dict(
            case=case,
            batch=batch,
            vocab=vocab,
            entry=entry,
            kind=kind,
            status="ok",
            compile_s=None,
            time_s=None,
            memory_bytes=None,
            memory_source=None,
            error=None,
            error_kind=None,
            steps=None,
            ratio_to_floor=None,
            ratio_to_baseline=None,
        )
        row.update(fields)
        self.rows.append(row)
        return row

    def check(self, name, value, tolerance, passed=None, detail=""):
        passed = bool(value <= tolerance) if passed is None else bool(passed)
        if not math.isfinite(value):
            passed = False
        self.checks.append(
            dict(
                name=name,
                value=value,
                tolerance=tolerance,
                passed=passed,
                detail=detail or f"{value:.3g} vs tolerance {tolerance:.3g}",
            )
        )

    def target(self, name, value, goal, met):
        self.targets.append(dict(name=name, value=value, target=goal, met=bool(met)))

    # -- running -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.bandwidth = copy_bandwidth(self.dtype, self.repeats)
        tasks = []
        for case in self.cases:
            if case == "e":
                tasks.append((case, *OVERHEAD_SIZE))
                continue
            if self.sizes is not None:
                tasks += [(case, b, v) for b, v in self.sizes[case]]
                continue
            tasks += [(case, b, v) for v in self.vocabs for b in self.batches]
        self.tasks = tasks
        for case, batch, vocab in _progress(tasks):
            self.run_one(case, batch, vocab)
        for row in self.rows:  # ratios to the floor and the baseline of the same size
            same = [
                r
                for r in self.rows
                if (r["case"], r["batch"], r["vocab"])
                == (row["case"], row["batch"], row["vocab"])
                and r["time_s"]
            ]
            floor = [r["time_s"] for r in same if r["kind"] == "floor"]
            base = [r["time_s"] for r in same if r["kind"] == "baseline"]
            if row["time_s"] and row["kind"] != "floor":
                if floor:
                    row["ratio_to_floor"] = row["time_s"] / floor[0]
                if base:
                    row["ratio_to_baseline"] = row["time_s"] / base[0]
        self.set_targets()
        return dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            device=device_description(),
            versions={
                p: package_version(p)
                for p in ("jax", "jaxlib", "diffrax", "equinox", "replicax")
            },
            settings=dict(
                batch=self.batches,
                vocab=self.vocabs,
                times=NUM_TIMES,
                t1=T1,
                temperature=TEMPERATURE,
                repeats=self.repeats,
                dtype=self.dtype.name,
                cases=self.cases,
                seed=self.seed,
                sizes=[list(task) for task in self.tasks],
                quick=self.quick,
                memory_limit_bytes=self.memory_limit,
                memory_limit_source=self.memory_limit_source,
            ),
            tolerances=dict(TOLERANCES),
            copy_bandwidth_GBps=self.bandwidth / 1e9,
            rows=self.rows,
            checks=self.checks,
            targets=self.targets,
            all_checks_passed=all(c["passed"] for c in self.checks),
            total_wall_s=time.perf_counter() - start,
        )

    def run_one(self, case, batch, vocab):
        method = getattr(self, f"case_{case}")
        try:
            method(batch, vocab)
        except Exception as e:  # one case never stops the suite
            lines = str(e).strip().splitlines()
            text = f"{type(e).__name__}: {lines[0] if lines else ''}"
            oom = "RESOURCE_EXHAUSTED" in str(e) or "Out of memory" in str(e)
            status = "out of memory (RESOURCE_EXHAUSTED)" if oom else f"error: {text}"
            self.add_row(case, batch, vocab, "(case failed)", "error", status=status)
            if not oom:
                self.check(
                    f"{case} B={batch} V={vocab} ran",
                    1.0,
                    0.0,
                    passed=False,
                    detail=text,
                )

    def floor_row(self, case, batch, vocab, nbytes, what):
        return self.add_row(
            case,
            batch,
            vocab,
            f"bytes floor ({what})",
            "floor",
            time_s=nbytes / self.bandwidth,
        )

    def no_fit(self, case, batch, vocab, entry, kind, nbytes):
        self.add_row(
            case,
            batch,
            vocab,
            entry,
            kind,
            status=f"does not fit (needs ~{_bytes(nbytes)})",
        )

    # (a) ---------------------------------------------------------------------------

    def case_a(self, batch, vocab):
        it = self.dtype.itemsize
        out_bytes = NUM_TIMES * batch * vocab * it
        self.floor_row(
            "a",
            batch,
            vocab,
            out_bytes + batch * vocab * it,
            "logits read + path written",
        )
        s, ts = self.logits(batch, vocab), self.times()
        rows = min(batch, REFERENCE_ROWS)
        ref = reference_p(self.ref_logits(vocab)[:rows], np.asarray(ts, np.float64))
        name = "jitted jax.nn.log_softmax over (times, B, V)"
        if self.fits(3 * out_bytes):
            m = measure_jitted(_log_softmax_path, (s, ts), self.repeats)
            out = m.pop("out")
            err = _max_abs(
                np.exp(np.asarray(out[:, :rows], np.float64)), ref.transpose(1, 0, 2)
            )
            del out
            self.add_row(
                "a", batch, vocab, name, "baseline", error=err, error_kind="p", **m
            )
        else:
            self.no_fit("a", batch, vocab, name, "baseline", 3 * out_bytes)
        name = "replicax rx.solve(Replicator, SaveAt(ts))"
        if self.fits(3 * out_bytes):
            self.closed_form_row(
                batch, vocab, name, _replicax_path, (s, ts), ref, "", not self.quick
            )
        else:
            self.no_fit("a", batch, vocab, name, "replicax", 3 * out_bytes)
        if not self.quick and self.fits(3 * out_bytes):
            self.case_a_variants(batch, vocab, s, ts, ref)

    def closed_form_row(
        self, batch, vocab, entry, fn, args, ref, what, plan_memory=True
    ):
        """A replicax row of case (a): `fn(*args)` (the saved `log_p`) timed as a
        direct call, its max abs error in p against `ref` (the first rows, float64)
        recorded and checked (the check named with `what`)."""
        m = measure_direct(
            functools.partial(fn, *args), fn, args, self.repeats, plan_memory
        )
        out = m.pop("out")
        err = _max_abs(np.exp(np.asarray(out[: ref.shape[0]], np.float64)), ref)
        del out
        self.add_row(
            "a", batch, vocab, entry, "replicax", error=err, error_kind="p", steps=0,
            **m,
        )
        self.check(
            f"a B={batch} V={vocab}{what} max abs error in p",
            err,
            TOLERANCES["closed_form_p"],
        )

    def case_a_variants(self, batch, vocab, s, ts, ref):
        """The fused trajectory kernels (`rx.Exact(kernel=...)`: "jnp" everywhere,
        "pallas" on a GPU only, where it is not interpreted) and bfloat16 logits (computed
        in float32; error against float64 from the same bfloat16 values)."""
        kernels = ["jnp"] + (["pallas"] if jax.default_backend() == "gpu" else [])
        for kernel in kernels:
            self.closed_form_row(
                batch,
                vocab,
                f"replicax rx.Exact(kernel={kernel!r})",
                functools.partial(_replicax_kernel_path, kernel),
                (s, ts),
                ref,
                f" kernel={kernel}",
            )
        half = s.astype(jnp.bfloat16)
        ref_half = reference_p(
            np.asarray(half[: ref.shape[0]], np.float64), np.asarray(ts, np.float64)
        )
        self.closed_form_row(
            batch,
            vocab,
            "replicax, bfloat16 logits (float32 output)",
            _replicax_path,
            (half, ts),
            ref_half,
            " bfloat16 logits",
        )

    # (b) ---------------------------------------------------------------------------

    def case_b(self, batch, vocab):
        it = self.dtype.itemsize
        self.floor_row("b", batch, vocab, batch * vocab * it, "logits read once")
        s, ts = self.logits(batch, vocab), self.times()
        rows = min(batch, REFERENCE_ROWS)
        ref = _entropy64(
            reference_p(self.ref_logits(vocab)[:rows], np.asarray(ts, np.float64))
        )  # (rows, times)
        path_bytes = NUM_TIMES * batch * vocab * it
        base_err = None
        name = "jitted jnp: log_softmax over (times, B, V), then entropy"
        if self.fits(3 * path_bytes):
            m = measure_jitted(_entropy_plain, (s, ts), self.repeats)
            out = np.asarray(m.pop("out"), np.float64)  # (times, B)
            base_err = _max_abs(out[:, :rows].T, ref)
            self.add_row(
                "b",
                batch,
                vocab,
                name,
                "baseline",
                error=base_err,
                error_kind="entropy",
                **m,
            )
        else:
            self.no_fit("b", batch, vocab, name, "baseline", 3 * path_bytes)
        entries = [
            ("replicax SaveAt(ts, fn=rx.path_statistics): one read", _replicax_entropy),
            ("replicax SaveAt(ts, fn=entropy): generic", _replicax_entropy_generic),
        ]
        if not self.quick and jax.default_backend() == "gpu":
            entries.append(
                (
                    "replicax rx.path_statistics, rx.Exact(kernel='pallas')",
                    functools.partial(_replicax_entropy, kernel="pallas"),
                )
            )
        for name, fn in entries:
            self.entropy_row(batch, vocab, name, fn, (s, ts), ref, base_err)

    def entropy_row(self, batch, vocab, entry, fn, args, ref, base_err):
        """A replicax row of case (b): the entropy at every saved time, timed as a
        direct call, its error against `ref` (float64) recorded and checked."""
        m = measure_direct(
            functools.partial(fn, *args), fn, args, self.repeats, not self.quick
        )
        out = np.asarray(m.pop("out"), np.float64)  # (B, times)
        err = _max_abs(out[: ref.shape[0]], ref)
        self.add_row(
            "b",
            batch,
            vocab,
            entry,
            "replicax",
            error=err,
            error_kind="entropy",
            steps=0,
            **m,
        )
        tol = TOLERANCES["entropy_rel"] * math.log(vocab)
        ok = err <= tol or (base_err is not None and err <= 2 * base_err)
        self.check(
            f"b B={batch} V={vocab} {entry}: max abs error in entropy",
            err,
            tol,
            passed=ok,
            detail=f"{err:.3g} vs tolerance {tol:.3g} or twice the "
            f"baseline's {_fmt(base_err, '.3g')}",
        )

    # (c) ---------------------------------------------------------------------------

    def ode_reference(self, vocab, ts):
        key = ("c", vocab)
        if key not in self._references:
            logits = self.ref_logits(vocab)
            if logits.size <= _RK4_MAX_SIZE:  # cheap in numpy, and independent
                self._references[key] = (
                    reference_ode_p(logits, np.asarray(ts, np.float64)),
                    f"numpy float64 RK4 on log p, {_RK4_SUBSTEPS} steps per saved "
                    "interval",
                )
                return self._references[key]
            with jax.enable_x64(True):
                s = jnp.asarray(logits, jnp.float64)
                t = jnp.asarray(np.asarray(ts, np.float64))
                log_p, _ = _replicax_ode(s, t, 1e-10)
                self._references[key] = (
                    np.exp(np.asarray(log_p)),
                    "replicax float64, rtol = atol = 1e-10",
                )
        return self._references[key]

    def case_c(self, batch, vocab):
        it = self.dtype.itemsize
        out_bytes = NUM_TIMES * batch * vocab * it
        self.floor_row(
            "c",
            batch,
            vocab,
            out_bytes + batch * vocab * it,
            "logits read + path written",
        )
        s, ts = self.logits(batch, vocab), self.times()
        rows = min(batch, REFERENCE_ROWS)
        ref, ref_name = self.ode_reference(vocab, ts)
        ref = ref[:rows]
        # Tsit5 keeps ~10 copies of the (p, c1, c2) state, plus the saved path.
        need = (30 * batch * vocab * it + out_bytes) * 1.5
        base_err = None
        name = "plain diffrax Tsit5 on p, vmapped, PID 1e-6"
        if self.fits(need):
            m = measure_jitted(_plain_diffrax_ode, (s, ts), self.repeats)
            p, steps = m.pop("out")
            base_err = _max_abs(p[:rows], ref)
            del p
            self.add_row(
                "c",
                batch,
                vocab,
                name,
                "baseline",
                error=base_err,
                error_kind="p",
                steps=int(np.max(steps)),
                **m,
            )
        else:
            self.no_fit("c", batch, vocab, name, "baseline", need)
        # One step size for the batch (`shared_steps`) only differs from the default
        # with more than one context.
        variants = [("replicax rx.solve, ODE path (Tsit5 on log p, 1e-6)", False)]
        if batch > 1:
            variants.append(("replicax ODE path, shared_steps=True", True))
        for name, shared in variants:
            if not self.fits(need):
                self.no_fit("c", batch, vocab, name, "replicax", need)
                continue
            fn = functools.partial(_replicax_ode, shared_steps=shared)
            m = measure_direct(
                functools.partial(fn, s, ts), fn, (s, ts), self.repeats, not self.quick
            )
            log_p, steps = m.pop("out")
            err = _max_abs(np.exp(np.asarray(log_p[:rows], np.float64)), ref)
            del log_p
            self.add_row(
                "c",
                batch,
                vocab,
                name,
                "replicax",
                error=err,
                error_kind="p",
                steps=int(np.max(steps)),
                reference=ref_name,
                **m,
            )
            ok = err <= TOLERANCES["ode_p"] or (
                base_err is not None and err <= base_err
            )
            self.check(
                f"c B={batch} V={vocab} {name}: max abs error in p",
                err,
                TOLERANCES["ode_p"],
                passed=ok,
                detail=f"{err:.3g} vs tolerance {TOLERANCES['ode_p']:.3g} or "
                f"the baseline's {_fmt(base_err, '.3g')}",
            )
            if not self.quick and not shared:
                self.compile_study(batch, vocab, s, ts, m["time_s"])

    def compile_study(self, batch, vocab, s, ts, default_time_s):
        """The ODE path (the slowest compile of the suite) compiled again with the
        XLA options that trade optimisation for compile time on this platform
        (`FAST_COMPILE_OPTIONS`), timed against the default compile's run time."""
        options = FAST_COMPILE_OPTIONS.get(jax.default_backend())
        if options is None:
            return
        m = measure_jitted(
            _replicax_ode,
            (s, ts),
            self.repeats,
            compiler_options=options,
        )
        m.pop("out")
        self.add_row(
            "c",
            batch,
            vocab,
            f"replicax ODE path, compiler_options={options}",
            "compile study",
            run_time_vs_default=m["time_s"] / default_time_s,
            **m,
        )

    # (d) ---------------------------------------------------------------------------

    def gradient_reference(self, vocab, ts):
        key = ("d", vocab)
        if key not in self._references:
            logits = self.ref_logits(vocab)
            with jax.enable_x64(True):
                s = jnp.asarray(logits, jnp.float64)
                t = jnp.asarray(np.asarray(ts, np.float64))
                g = jax.jit(jax.grad(_summed_entropy_plain))(s, t)
                self._references[key] = np.asarray(g)
        return self._references[key]

    def case_d(self, batch, vocab):
        it = self.dtype.itemsize
        self.floor_row(
            "d", batch, vocab, 2 * batch * vocab * it, "logits read + gradient written"
        )
        s, ts = self.logits(batch, vocab), self.times()
        rows = min(batch, REFERENCE_ROWS)
        ref = self.gradient_reference(vocab, ts)[:rows]
        scale = float(np.max(np.abs(ref)))
        path_bytes = NUM_TIMES * batch * vocab * it
        def gradient_row(name, kind, loss, forward_s=None):
            m = measure_jitted(jax.grad(loss), (s, ts), self.repeats)
            g = m.pop("out")
            err = _max_abs(g[:rows], ref) / scale
            del g
            fields = {}
            if forward_s is not None:
                fields["ratio_to_forward"] = m["time_s"] / forward_s
            self.add_row(
                "d",
                batch,
                vocab,
                name,
                kind,
                error=err,
                error_kind="gradient, relative",
                **fields,
                **m,
            )
            return err

        name = "jitted jax.grad of the plain jnp loss"
        if self.fits(5 * path_bytes):
            gradient_row(name, "baseline", _summed_entropy_plain)
        else:
            self.no_fit("d", batch, vocab, name, "baseline", 5 * path_bytes)
        # The one-read path keeps a few (B, V) arrays; the generic route, which saves
        # each time's intermediates for the backward pass, plans about 4.3x the path's
        # bytes (a CPU run at B = 8).
        entries = [
            ("rx.path_statistics", _summed_entropy, 16 * batch * vocab * it),
            ("generic SaveAt(fn=entropy)", _summed_entropy_generic, 5 * path_bytes),
        ]
        if not self.quick and jax.default_backend() == "gpu":
            entries.append(
                (
                    "rx.path_statistics, rx.Exact(kernel='pallas')",
                    functools.partial(_summed_entropy, kernel="pallas"),
                    16 * batch * vocab * it,
                )
            )
        for label, loss, need in entries:
            name = f"replicax jitted jax.grad, {label}"
            if not self.fits(need):
                self.no_fit("d", batch, vocab, name, "replicax", need)
                continue
            fwd = measure_jitted(loss, (s, ts), self.repeats)
            fwd.pop("out")
            self.add_row(
                "d", batch, vocab, f"replicax forward loss, {label}", "forward", **fwd
            )
            err = gradient_row(name, "replicax", loss, forward_s=fwd["time_s"])
            self.check(
                f"d B={batch} V={vocab} {label}: gradient relative error",
                err,
                TOLERANCES["gradient_rel"],
            )

    # (e) ---------------------------------------------------------------------------

    def case_e(self, batch, vocab):
        it = self.dtype.itemsize
        self.floor_row(
            "e", batch, vocab, 2 * batch * vocab * it, "logits read + p(t1) written"
        )
        s = self.logits(batch, vocab)
        t1 = float(self.times()[-1])  # a Python number, as a decoding loop passes it
        ref = _softmax64(T1 * self.ref_logits(vocab)[:1] / TEMPERATURE)
        # Each call is short: many repeats make the median steady on a shared machine.
        repeats = max(self.repeats, OVERHEAD_REPEATS)

        def direct():  # the flow is built inside the timed call, as in a decoding loop
            return rx.solve(rx.Replicator(s, TEMPERATURE), t1=t1).log_p

        def inside(s, t1):
            return rx.solve(rx.Replicator(s, TEMPERATURE), t1=t1).log_p

        jitted = measure_jitted(inside, (s, t1), repeats, as_user_calls=True)
        jitted.pop("out")
        self.add_row(
            "e",
            batch,
            vocab,
            "rx.solve inside the user's jax.jit",
            "baseline",
            **jitted,
        )
        m = measure_direct(direct, inside, (s, t1), repeats, not self.quick)
        out = m.pop("out")
        err = _max_abs(np.exp(np.asarray(out[:1, -1], np.float64)), ref)
        self.add_row(
            "e",
            batch,
            vocab,
            "rx.solve called directly",
            "replicax",
            error=err,
            error_kind="p",
            steps=0,
            **m,
        )
        self.check(
            f"e B={batch} V={vocab} max abs error in p",
            err,
            TOLERANCES["closed_form_p"],
        )

    # -- targets -----------------------------------------------------------------------

    def set_targets(self):
        """The DESIGN numbers, compared with what was measured (never asserted)."""

        def rows_of(case, kind):
            return [
                r
                for r in self.rows
                if r["case"] == case and r["kind"] == kind and r["time_s"]
            ]

        for r in rows_of("a", "replicax"):
            pct = 100 / r["ratio_to_floor"]
            self.target(
                f"a B={r['batch']} V={r['vocab']} {r['entry']}: % of floor",
                pct,
                ">= 85%",
                pct >= 85,
            )
        for r in rows_of("b", "replicax"):
            pct = 100 / r["ratio_to_floor"]
            self.target(
                f"b B={r['batch']} V={r['vocab']} {r['entry']}: % of read-once floor",
                pct,
                ">= 70%",
                pct >= 70,
            )
        for r in rows_of("c", "replicax"):
            base = [
                b
                for b in rows_of("c", "baseline")
                if (b["batch"], b["vocab"]) == (r["batch"], r["vocab"])
            ]
            if base:
                speedup = base[0]["time_s"] / r["time_s"]
                self.target(
                    f"c B={r['batch']} V={r['vocab']} {r['entry']}: speed-up over "
                    "plain diffrax",
                    speedup,
                    ">= 5x at equal or better error",
                    speedup >= 5 and r["error"] <= base[0]["error"],
                )
        for r in rows_of("c", "compile study"):
            ratio = r["run_time_vs_default"]
            self.target(
                f"c B={r['batch']} V={r['vocab']} {r['entry']}: compile (s), run time "
                f"{ratio:.2f}x the default compile's",
                r["compile_s"],
                "<= 5 s at <= 1.1x the run time",
                r["compile_s"] <= 5 and ratio <= 1.1,
            )
        for r in rows_of("d", "replicax"):
            label = f"d B={r['batch']} V={r['vocab']} {r['entry']}"
            self.target(
                f"{label}: time / forward",
                r["ratio_to_forward"],
                "<= 3",
                r["ratio_to_forward"] <= 3,
            )
            if r["batch"] == 256 and r["memory_bytes"] is not None:
                gib = r["memory_bytes"] / 2**30
                self.target(f"{label}: memory (GiB)", gib, "<= 4", gib <= 4)
        for r in rows_of("e", "replicax"):
            jitted = rows_of("e", "baseline")
            if jitted:
                limit = 2 * jitted[0]["time_s"] + 1e-4
                self.target(
                    "e: direct call time (ms)",
                    1e3 * r["time_s"],
                    f"<= 2 x jitted + 0.1 ms = {1e3 * limit:.3f} ms",
                    r["time_s"] <= limit,
                )
        worst = max(
            (
                r["compile_s"]
                for r in self.rows
                if r["compile_s"] is not None and r["kind"] in ("replicax", "forward")
            ),
            default=None,
        )
        if worst is not None:
            self.target(
                "compile time of the slowest replicax entry (s)",
                worst,
                "<= 5 s",
                worst <= 5,
            )


def _progress(tasks: Sequence[tuple]):
    """Iterates over `tasks` with a tqdm bar on a terminal, else one line each."""
    label = [f"{c} B={b} V={v}" for c, b, v in tasks]
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(tasks, desc="replicax bench", file=sys.stderr)
            for i, task in enumerate(bar):
                bar.set_postfix_str(label[i])
                yield task
            return
    for i, task in enumerate(tasks):
        print(
            f"replicax bench [{i + 1}/{len(tasks)}] {label[i]}",
            file=sys.stderr,
            flush=True,
        )
        yield task


# --------------------------------------------------------------------------------------
# Reporting


def package_version(name: str) -> str:
    """The installed version of a distribution, or "unknown"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def device_description() -> dict[str, str]:
    """The device JAX computes on, and the CPU model and core count on a CPU."""
    device = jax.devices()[0]
    info = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": str(jax.device_count()),
    }
    if device.platform == "cpu":
        model = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["cpu_model"] = model
        info["cpu_cores"] = str(os.cpu_count())
    return info


def _bytes(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: a header, one table of every row, the targets and the
    checks."""
    dev, ver, st = results["device"], results["versions"], results["settings"]
    where = dev.get("cpu_model", dev["device_kind"])
    cores = f", {dev['cpu_cores']} cores" if "cpu_cores" in dev else ""
    lines = [
        f"replicax bench, {results['date']}: {where} ({dev['platform']}{cores}); "
        f"jax {ver['jax']}, jaxlib {ver['jaxlib']}, diffrax {ver['diffrax']}, "
        f"equinox {ver['equinox']}, replicax {ver['replicax']}; {st['dtype']}; "
        f"{st['times']} saved times on [0, {st['t1']:g}], T = {st['temperature']:g}; "
        f"median of {st['repeats']} calls; copy bandwidth "
        f"{results['copy_bandwidth_GBps']:.1f} GB/s (in place); wall time "
        f"{results['total_wall_s']:.0f} s.",
        "",
        "| case | B | V | entry | compile (s) | time (ms) | time / floor "
        "| time / baseline | memory (MiB) | error | steps |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sources = set()
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['vocab']} | {r['entry']} "
                f"| {r['status']} | | | | | | |"
            )
            continue
        memory = "—"
        if r["memory_bytes"] is not None:
            mark = "" if r["memory_source"].startswith("device") else "*"
            sources.add(r["memory_source"])
            memory = f"{r['memory_bytes'] / 2**20:.4g}{mark}"
        error = "—" if r["error"] is None else f"{r['error']:.1e} ({r['error_kind']})"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['vocab']} | {r['entry']} "
            f"| {_fmt(r['compile_s'], '.2f')} | {r['time_s'] * 1e3:.3g} "
            f"| {_fmt(r['ratio_to_floor'], '.3g')} "
            f"| {_fmt(r['ratio_to_baseline'], '.3g')} | {memory} | {error} "
            f"| {_fmt(r['steps'], 'd')} |"
        )
    lines.append("")
    lines.append(
        "Cases: " + "; ".join(f"({c}) {CASE_TITLES[c]}" for c in st["cases"]) + "."
    )
    if any(s.startswith("XLA") for s in sources):
        lines.append(
            "Memory marked * is XLA's plan for the same computation under one "
            "`jax.jit` (temp + output bytes), not a measured peak."
        )
    if st["quick"] and any(
        r["memory_bytes"] is None and r["status"] == "ok" and r["kind"] != "floor"
        for r in results["rows"]
    ):
        lines.append(
            "With --quick, a direct call's memory (—) is not planned: it would cost "
            "one more compilation."
        )
    if results["targets"]:
        lines += ["", "| target | measured | goal | met |", "|---|---:|---|---|"]
        for t in results["targets"]:
            lines.append(
                f"| {t['name']} | {t['value']:.3g} | {t['target']} "
                f"| {'yes' if t['met'] else 'no'} |"
            )
    failed = [c for c in results["checks"] if not c["passed"]]
    lines.append("")
    lines.append(
        f"Correctness checks: {len(results['checks']) - len(failed)} of "
        f"{len(results['checks'])} passed"
        + (
            "."
            if not failed
            else "; failed: "
            + "; ".join(f"{c['name']} ({c['detail']})" for c in failed)
        )
    )
    return "\n".join(lines)
