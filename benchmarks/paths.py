"""How fast and how accurate is a whole next-token path, against plain JAX and diffrax?

For constant logits `s` (one row per context) this script computes the same saved path
`p(t)`, of shape `(batch, times, vocab)`, in several ways. For each one it reports the
compile time, the steady-state time, the error in `p` and the number of solver steps:

- `replicax` with the method picked automatically (the closed form), for the
  replicator (R) and for the entropic replicator (E);
- `replicax` with `method="ode"` (diffrax Tsit5 on `log p`, rtol = atol = 1e-6);
- plain diffrax on `p` as a user would write it: `jax.vmap` over rows of `diffeqsolve`
  with Tsit5 and a PID controller at rtol = atol = 1e-6, jitted;
- plain XLA, `jax.nn.softmax(ts[:, None, None] * logits[None] / T, axis=-1)`, jitted;
- the hardware floor: the bytes that must move (the logits read once, the output
  written once) divided by the in-place (donated-buffer) copy bandwidth measured in
  this run. Beside it are the same bytes at the bandwidth of a copy into a freshly
  allocated output. Every entry allocates its output, and on a CPU that also costs
  page faults.

Times are shown as a percentage of the floor (`floor / time`) and as a speed-up over
plain diffrax on the same flow (`diffrax time / time`). The error is the largest
absolute difference in `p` from the closed form, evaluated with numpy in float64 from
uniform: (R) `softmax(t s / T)`, (E) `softmax((1 - e^{-t}) s / T)`.

Compile time is the first call minus the steady-state median. For replicax this also
includes the first run of its un-jitted argument handling.

Run it from the repository root:

    python benchmarks/paths.py                       # CPU-sized defaults
    PYTHONPATH=. python benchmarks/paths.py --batch 64 --vocab 128256     # on a GPU
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import replicax as rx
from replicax._bench import device_description, package_version

# The copy-bandwidth probe uses at least this many bytes, so that its buffer does not
# fit in the last-level cache of a CPU (tens of MB) or the L2 of a GPU (50 MB on an
# H100 / H200).
_MIN_COPY_BYTES = 256 * 2**20
_MAX_STEPS = 4096  # the same budget as `rx.solve`'s default
_FLOWS = {"R": rx.Replicator, "E": rx.EntropicReplicator}


@dataclasses.dataclass
class Entry:
    name: str
    flow: str | None  # "R", "E", or None for the floor rows
    compile_s: float | None
    time_s: float
    max_error: float | None
    steps: int | None
    pct_of_floor: float | None = None
    speedup_vs_diffrax: float | None = None


# --------------------------------------------------------------------------------------
# Timing


def time_call(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """Returns (first call - steady-state median, the median, the last output)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        del out  # free the last output before the next call allocates its own
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return max(first - median, 0.0), median, out


def copy_bandwidth(nbytes: int, dtype, repeats: int) -> tuple[float, float]:
    """Bytes per second of one elementwise pass (read once, write once) over `nbytes`.

    Returns two figures. The first is measured in place: the input buffer is donated,
    so the pass streams through memory that is already mapped. The second writes into
    a freshly allocated output, as every entry of this benchmark does. On a GPU the two
    agree. On a CPU the fresh output also pays for page faults and is several times
    slower.
    """
    n = max(nbytes, _MIN_COPY_BYTES) // jnp.dtype(dtype).itemsize
    # `y + 1` rather than `y + 0`: XLA may fold `y + 0` to the identity and not copy.
    fresh = jax.jit(lambda y: y + 1)
    in_place = jax.jit(lambda y: y + 1, donate_argnums=0)
    repeats = max(repeats, 5)
    x = jnp.zeros((n,), dtype)
    nbytes = x.nbytes
    _, fresh_s, _ = time_call(functools.partial(fresh, x), repeats)
    x = jax.block_until_ready(in_place(x))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(in_place(x))
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times), 2 * nbytes / fresh_s


# --------------------------------------------------------------------------------------
# The ways of computing the path


def replicax_path(
    flow_cls, logits, ts, *, t1: float, temperature: float, method: str
) -> Callable[[], rx.Trajectory]:
    """`rx.solve` as a user calls it, from building the flow to the trajectory."""

    def run():
        flow = flow_cls(logits, temperature)
        return rx.solve(flow, t1=t1, saveat=rx.SaveAt(ts=ts), method=method)

    return run


def plain_diffrax_path(flow: str, *, t1: float, temperature: float):
    """Jitted `(logits, ts) -> (p, num_steps)`: diffrax on `p`, no replicax."""
    if flow == "R":

        def vector_field(t, p, s):
            return p * (s - p @ s) / temperature

    else:

        def vector_field(t, p, s):
            g = s / temperature - jnp.log(p)
            return p * (g - p @ g)

    def one(s, ts):
        p0 = jnp.full(s.shape, 1 / s.shape[-1], s.dtype)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            0.0,
            t1,
            None,
            p0,
            args=s,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            max_steps=_MAX_STEPS,
        )
        return sol.ys, sol.stats["num_steps"]

    return jax.jit(jax.vmap(one, in_axes=(0, None)))


def plain_softmax_path(*, temperature: float):
    """Jitted `(logits, ts) -> p` of shape `(times, batch, vocab)`."""

    def path(logits, ts):
        return jax.nn.softmax(ts[:, None, None] * logits[None] / temperature, axis=-1)

    return jax.jit(path)


# --------------------------------------------------------------------------------------
# Accuracy


def reference_p(logits: np.ndarray, ts: np.ndarray, temperature: float, flow: str):
    """Closed-form `p(t)` from uniform in float64, shape `(batch, times, vocab)`."""
    z = logits.astype(np.float64) / temperature
    weight = ts if flow == "R" else -np.expm1(-ts)
    out = np.empty((z.shape[0], ts.shape[0], z.shape[1]), np.float64)
    for b in range(z.shape[0]):  # one row at a time keeps the temporaries small
        x = weight[:, None] * z[b][None, :]
        x -= x.max(axis=-1, keepdims=True)
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        out[b] = x
    return out


def max_error(out: np.ndarray, reference: np.ndarray, *, log: bool = False) -> float:
    """Largest `|p - reference|`; `out` holds `log p` when `log` is true."""
    err = 0.0
    for b in range(reference.shape[0]):  # row by row, again to bound the memory
        p = out[b].astype(np.float64)
        if log:
            p = np.exp(p)
        err = max(err, float(np.max(np.abs(p - reference[b]))))
    return err


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = jnp.float64 if args.x64 else jnp.float32
    key = jax.random.key(args.seed)
    logits = 3.0 * jax.random.normal(key, (args.batch, args.vocab), dtype)
    ts = jnp.linspace(0.0, args.t1, args.times, dtype=dtype)
    T, t1, repeats = args.temperature, args.t1, args.repeats

    ts_np = np.asarray(ts).astype(np.float64)
    references = {
        flow: reference_p(np.asarray(logits), ts_np, T, flow) for flow in _FLOWS
    }

    # The floor: the logits read once, (batch, times, vocab) written once.
    itemsize = jnp.dtype(dtype).itemsize
    out_bytes = itemsize * args.batch * args.times * args.vocab
    floor_bytes = out_bytes + itemsize * args.batch * args.vocab
    bandwidth, fresh_bandwidth = copy_bandwidth(out_bytes, dtype, repeats)
    floor_s = floor_bytes / bandwidth
    no_work = dict(flow=None, compile_s=None, max_error=None, steps=None)
    entries = [
        Entry("hardware floor (in-place copy bandwidth)", time_s=floor_s, **no_work),
        Entry(
            "same bytes at fresh-output copy bandwidth",
            time_s=floor_bytes / fresh_bandwidth,
            **no_work,
        ),
    ]

    # Compile the small kernels of the flows' eager input checks first, so that their
    # one-off cost is not charged to whichever replicax entry runs first.
    jax.block_until_ready([cls(logits, T) for cls in _FLOWS.values()])

    softmax = plain_softmax_path(temperature=T)
    compile_s, time_s, out = time_call(functools.partial(softmax, logits, ts), repeats)
    # (times, batch, vocab) -> (batch, times, vocab), a view
    err = max_error(np.asarray(out).transpose(1, 0, 2), references["R"])
    del out
    name = "XLA softmax over (times, B, V)"
    entries.append(Entry(name, "R", compile_s, time_s, err, None))

    for flow, flow_cls in _FLOWS.items():
        for method, label in (("auto", "exact (auto)"), ("ode", "method='ode'")):
            fn = replicax_path(
                flow_cls, logits, ts, t1=t1, temperature=T, method=method
            )
            compile_s, time_s, sol = time_call(fn, repeats)
            err = max_error(np.asarray(sol.log_p), references[flow], log=True)
            steps = int(jnp.max(sol.stats["num_steps"]))
            del sol
            name = f"replicax {flow_cls.__name__}, {label}"
            entries.append(Entry(name, flow, compile_s, time_s, err, steps))

        solve = plain_diffrax_path(flow, t1=t1, temperature=T)
        fn = functools.partial(solve, logits, ts)
        compile_s, time_s, out = time_call(fn, repeats)
        p, num_steps = out
        err = max_error(np.asarray(p), references[flow])
        steps = int(jnp.max(num_steps))
        del out, p
        name = f"plain diffrax Tsit5 on p, vmapped ({flow})"
        entries.append(Entry(name, flow, compile_s, time_s, err, steps))

    diffrax_s = {
        e.flow: e.time_s for e in entries if e.name.startswith("plain diffrax")
    }
    for e in entries:
        e.pct_of_floor = 100 * floor_s / e.time_s
        # The floor and the softmax rows are compared with plain diffrax on (R).
        e.speedup_vs_diffrax = diffrax_s[e.flow or "R"] / e.time_s

    return {
        "device": device_description(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": package_version("jaxlib"),
            "diffrax": diffrax.__version__,
            "equinox": eqx.__version__,
            "replicax": rx.__version__,
        },
        "sizes": {
            "batch": args.batch,
            "vocab": args.vocab,
            "times": args.times,
            "t1": t1,
            "temperature": T,
            "dtype": jnp.dtype(dtype).name,
            "repeats": repeats,
            "seed": args.seed,
        },
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "fresh_output_copy_bandwidth_GBps": fresh_bandwidth / 1e9,
        "floor_bytes": floor_bytes,
        "entries": [dataclasses.asdict(e) for e in entries],
    }


def markdown_table(entries: list[dict[str, Any]]) -> str:
    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    lines = [
        "| entry | compile (s) | time (ms) | % of floor "
        "| × vs plain diffrax (same flow) | max abs error in p "
        "| steps (max over rows) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['name']} | {fmt(e['compile_s'], '.2f')} | {e['time_s'] * 1e3:.3g} "
            f"| {e['pct_of_floor']:.3g}% | {e['speedup_vs_diffrax']:.3g}× "
            f"| {fmt(e['max_error'], '.1e')} | {fmt(e['steps'], 'd')} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--batch", type=int, default=8, help="contexts B (default 8)")
    add("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    add("--times", type=int, default=32, help="saved times n_t (default 32)")
    add("--t1", type=float, default=4.0, help="final time (default 4.0)")
    add("--temperature", type=float, default=0.7, help="temperature T (default 0.7)")
    add("--repeats", type=int, default=5, help="timed calls after the first (5)")
    add("--seed", type=int, default=0, help="PRNG seed of the logits (default 0)")
    add("--x64", action="store_true", help="compute in float64")
    add("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if args.x64:
        jax.config.update("jax_enable_x64", True)

    start = time.perf_counter()
    results = run(args)
    results["total_wall_s"] = time.perf_counter() - start

    dev, ver, sizes = results["device"], results["versions"], results["sizes"]
    where = dev.get("cpu_model", dev["device_kind"])
    cores = f", {dev['cpu_cores']} cores" if "cpu_cores" in dev else ""
    print(f"device: {where} ({dev['platform']}{cores})")
    print(
        f"jax {ver['jax']}, jaxlib {ver['jaxlib']}, diffrax {ver['diffrax']}, "
        f"equinox {ver['equinox']}, replicax {ver['replicax']}"
    )
    print(
        f"sizes: B={sizes['batch']}, V={sizes['vocab']}, n_t={sizes['times']}, "
        f"t1={sizes['t1']}, T={sizes['temperature']}, {sizes['dtype']}, "
        f"median of {sizes['repeats']} calls"
    )
    print(
        f"copy bandwidth: {results['copy_bandwidth_GBps']:.1f} GB/s in place, "
        f"{results['fresh_output_copy_bandwidth_GBps']:.1f} GB/s into a fresh output; "
        f"the floor moves {results['floor_bytes'] / 2**20:.1f} MiB"
    )
    print()
    print(markdown_table(results["entries"]))
    print()
    print(f"total wall time {results['total_wall_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
