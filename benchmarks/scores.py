"""What do state-dependent scores cost at vocabulary scale, in memory, time and accuracy?

Two questions, each measured in the same run as its baseline:

(a) Memory of a low-rank payoff. `rx.LowRankPayoff(U, W)` (`z = U (Wᵀ p)`, rank `r`)
    must never form the `V × V` matrix. The script solves
    `Replicator(Logits(s) + LowRankPayoff(U, W))` on the ODE path at `V = 128,256`,
    `r = 16`, `B = 4` (one `U`, `W` per row), and the same solve with `Logits` alone,
    each in a fresh subprocess, and reads the peak resident memory (`ru_maxrss`) of each.
    A third subprocess imports the same libraries, builds the inputs and runs a trivial
    jitted operation: its peak is the baseline subtracted from both. The ratio of the two
    increments is the figure of merit (target: within 2×). The inputs themselves count:
    `U` and `W` are `2·B·V·r` floats, while the logits are `B·V`.

(b) A state-dependent solve at `B = 8`, `V = 32,000`: logits plus a two-stage fading
    frequency penalty, `Replicator(Logits(s) + FrequencyPenalty(alpha, tau, stages=2))`.
    Compared:
    - replicax in float64 at rtol = atol = 1e-10 (the reference);
    - replicax in float32 at its default tolerances (1e-6 on `log p`);
    - replicax in float64 at the default tolerances;
    - plain diffrax on `p` as a user writes it (state `(p, c₁, c₂)` of shape `(B, V)` in
      one `diffeqsolve`, `ṗ = p (z - <p, z>)/T`, Tsit5, PID at rtol = atol = 1e-6), jitted,
      in float32.
    For each: compile time (first call minus the median), median time of the repeats,
    solver steps, the largest `|Δp|` against the reference and `|Σp - 1|` at `t1`.

Run it from the repository root:

    python benchmarks/scores.py            # both parts, CPU-sized defaults
    python benchmarks/scores.py --part b   # only (b)
"""

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_case(case: str, vocab: int, batch: int, rank: int, t1: float) -> None:
    """One case of (a), run in its own process; prints the peak RSS as JSON."""
    import jax
    import jax.numpy as jnp

    import replicax as rx

    key_s, key_u, key_w = jax.random.split(jax.random.key(0), 3)
    logits = 3.0 * jax.random.normal(key_s, (batch, vocab), jnp.float32)
    U = jax.random.normal(key_u, (batch, vocab, rank), jnp.float32) / rank**0.5
    W = jax.random.normal(key_w, (batch, vocab, rank), jnp.float32)
    jax.block_until_ready((logits, U, W))
    steps = 0
    start = time.perf_counter()
    if case == "baseline":
        jax.block_until_ready(jax.jit(lambda x: x + 1)(logits))
    else:
        score = rx.Logits(logits)
        if case == "lowrank":
            score = score + rx.LowRankPayoff(U, W)
        sol = rx.solve(rx.Replicator(score, 1.0), t1=t1, method=rx.ODE())
        jax.block_until_ready(sol.log_p)
        steps = int(sol.stats["num_steps"].max())
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "case": case,
                "peak_mib": _peak_rss_mib(),
                "steps": steps,
                "seconds": seconds,
            }
        )
    )


def part_a(args) -> dict:
    results = {}
    for case in ("baseline", "logits", "lowrank"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-case",
            case,
            "--vocab-a",
            str(args.vocab_a),
            "--batch-a",
            str(args.batch_a),
            "--rank",
            str(args.rank),
            "--t1-a",
            str(args.t1_a),
        ]
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["baseline"]["peak_mib"]
    logits = results["logits"]["peak_mib"] - base
    lowrank = results["lowrank"]["peak_mib"] - base
    inputs_mib = 2 * args.batch_a * args.vocab_a * args.rank * 4 / 2**20
    print(
        f"\n(a) peak RSS, V = {args.vocab_a}, r = {args.rank}, B = {args.batch_a}, "
        f"float32, ODE path, t1 = {args.t1_a}"
    )
    print("| case | peak RSS (MiB) | above baseline (MiB) | steps | wall (s) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| baseline (imports, inputs, trivial jit) | {base:.0f} | — | — | — |")
    for name, key, extra in (
        ("Logits alone", "logits", logits),
        ("Logits + LowRankPayoff", "lowrank", lowrank),
    ):
        r = results[key]
        print(
            f"| {name} | {r['peak_mib']:.0f} | {extra:.0f} | {r['steps']} | "
            f"{r['seconds']:.1f} |"
        )
    ratio = lowrank / logits
    print(
        f"ratio (low-rank / logits, above baseline): {ratio:.2f}; U and W hold "
        f"{inputs_mib:.0f} MiB; a dense A would hold "
        f"{args.batch_a * args.vocab_a**2 * 4 / 2**30:.0f} GiB"
    )
    return {"results": results, "ratio": ratio, "inputs_mib": inputs_mib}


def part_b(args) -> dict:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    import replicax as rx

    jax.config.update("jax_enable_x64", True)
    B, V, T, t1 = args.batch_b, args.vocab_b, args.temperature, args.t1_b
    alpha, tau = args.alpha, args.tau
    logits64 = np.asarray(
        3.0 * jax.random.normal(jax.random.key(1), (B, V), jnp.float64)
    )

    def timed(fn):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        return out, max(first - median, 0.0), median

    def replicax_fn(dtype, rtol):
        logits = jnp.asarray(logits64, dtype)

        def run():
            score = rx.Logits(logits) + rx.FrequencyPenalty(alpha, tau=tau, stages=2)
            sol = rx.solve(
                rx.Replicator(score, T), t1=t1, rtol=rtol, atol=rtol, max_steps=100_000
            )
            return sol.log_p[:, -1], sol.stats["num_steps"]

        return run

    def diffrax_fn(dtype, rtol):
        s = jnp.asarray(logits64, dtype)
        p0 = jnp.full((B, V), 1.0 / V, dtype)
        a, k, temperature = (jnp.asarray(x, dtype) for x in (alpha, 1 / tau, T))

        def field(t, y, args):
            p, c1, c2 = y
            z = s - a * c2
            dp = p * (z - jnp.sum(p * z, axis=-1, keepdims=True)) / temperature
            return dp, (p - c1) * k, (c1 - c2) * k

        @jax.jit
        def solve():
            # Times in the state's dtype: with float64 enabled, Python floats would
            # promote the whole solve to float64.
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field),
                diffrax.Tsit5(),
                jnp.asarray(0.0, dtype),
                jnp.asarray(t1, dtype),
                None,
                (p0, p0, p0),
                stepsize_controller=diffrax.PIDController(
                    rtol=jnp.asarray(rtol, dtype), atol=jnp.asarray(rtol, dtype)
                ),
                max_steps=100_000,
            )
            return sol.ys[0][-1], sol.stats["num_steps"]

        return solve

    (ref_log_p, ref_steps), ref_compile, ref_time = timed(
        replicax_fn(jnp.float64, 1e-10)
    )
    ref_p = np.exp(np.asarray(ref_log_p, np.float64))
    rows = [
        (
            "replicax float64, rtol = atol = 1e-10 (reference)",
            ref_compile,
            ref_time,
            int(np.max(ref_steps)),
            0.0,
            float(np.max(np.abs(ref_p.sum(-1) - 1))),
        )
    ]
    cases = [
        ("replicax float32, rtol = atol = 1e-6", replicax_fn(jnp.float32, 1e-6), True),
        ("replicax float64, rtol = atol = 1e-6", replicax_fn(jnp.float64, 1e-6), True),
        (
            "plain diffrax on p, float32, rtol = atol = 1e-6",
            diffrax_fn(jnp.float32, 1e-6),
            False,
        ),
    ]
    for name, fn, log in cases:
        (out, steps), compile_s, median = timed(fn)
        p = np.asarray(out, np.float64)
        p = np.exp(p) if log else p
        name = f"{name} (output {out.dtype})"
        rows.append(
            (
                name,
                compile_s,
                median,
                int(np.max(steps)),
                float(np.max(np.abs(p - ref_p))),
                float(np.max(np.abs(p.sum(-1) - 1))),
            )
        )
    print(
        f"\n(b) B = {B}, V = {V}, Logits + FrequencyPenalty(alpha={alpha}, tau={tau}, "
        f"stages=2), Replicator, T = {T}, t1 = {t1}, uniform start, median of "
        f"{args.repeats}"
    )
    print(
        "| entry | compile (s) | time (ms) | steps | max abs error in p | max abs (Σp − 1) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, c, m, steps, err, mass in rows:
        print(
            f"| {name} | {c:.2f} | {1e3 * m:.0f} | {steps} | {err:.1e} | {mass:.1e} |"
        )
    return {"rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "both"), default="both")
    parser.add_argument("--vocab-a", type=int, default=128_256)
    parser.add_argument("--batch-a", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--t1-a", type=float, default=1.0)
    parser.add_argument("--vocab-b", type=int, default=32_000)
    parser.add_argument("--batch-b", type=int, default=8)
    parser.add_argument("--t1-b", type=float, default=4.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case is not None:
        _memory_case(args.memory_case, args.vocab_a, args.batch_a, args.rank, args.t1_a)
        return
    versions = {p: importlib.metadata.version(p) for p in ("jax", "diffrax", "equinox")}
    print(
        f"versions: {versions}; cores: {os.cpu_count()}; load: {os.getloadavg()[0]:.1f}"
    )
    out = {"versions": versions}
    start = time.perf_counter()
    if args.part in ("a", "both"):
        out["a"] = part_a(args)
    if args.part in ("b", "both"):
        out["b"] = part_b(args)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
