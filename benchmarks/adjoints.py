"""What does a gradient through the ODE path cost in memory and time, per adjoint?

The problem: the gradient with respect to the logits of the entropy at `t1` through
`EntropicReplicator(Logits(s) + FrequencyPenalty(0.3, tau=1, stages=2), 0.7)` (a
state-dependent score: the state is `θ` and two memory stages, `3·B·V` floats), at
`B = 8`, `V = 32,000`, float32, `t1 = 8`, with Tsit5 and `--steps` constant steps (128
by default: "at least 100 steps"), so that every adjoint differentiates the same
discrete solve.

Compared, each in its own subprocess:

- `forward`: the solve alone (the memory every gradient is measured against);
- `checkpoints=C`: `diffrax.RecursiveCheckpointAdjoint(checkpoints=C)`, the discrete
  adjoint with binomial checkpointing; C = 8 is replicax's default (`rx.ODE`), and
  diffrax's own default (C = None) picks about `√(2·max_steps)` = 90 checkpoints for
  `max_steps = 4096`;
- `backsolve`: `diffrax.BacksolveAdjoint()`, the continuous adjoint solved backwards
  with the same solver and steps (constant memory).

For each: the memory XLA plans for the compiled program (`memory_analysis()`: temporary
buffers; arguments and outputs are the same for all), the process's peak resident
memory above a baseline process that imports the same libraries and builds the inputs
(this also counts what compiling takes), compile time, median run time, and the gradient's
relative error (max abs over max abs) against diffrax's default adjoint, which is the
exact derivative of the same discrete solve.

    python benchmarks/adjoints.py                  # CPU-sized defaults
    python benchmarks/adjoints.py --json out.json  # also write the figures as JSON
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


CASES = ("forward", "checkpoints=None", "checkpoints=16", "checkpoints=8",
         "checkpoints=4", "backsolve")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _one(case: str, args, out_path: str) -> dict:
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    import replicax as rx

    key = jax.random.key(args.seed)
    logits = 3.0 * jax.random.normal(key, (args.batch, args.vocab), jnp.float32)
    jax.block_until_ready(logits)
    if case == "baseline":
        jax.block_until_ready(jax.jit(lambda x: x + 1)(logits))
        return {"case": case, "peak_rss_mib": _peak_rss_mib()}

    def loss(s, adjoint):
        score = rx.Logits(s) + rx.FrequencyPenalty(0.3, tau=1.0, stages=2)
        flow = rx.EntropicReplicator(score, 0.7)
        method = rx.ODE(
            stepsize_controller=diffrax.ConstantStepSize(),
            dt0=args.t1 / args.steps,
            **({} if adjoint is None else {"adjoint": adjoint}),
        )
        sol = rx.solve(flow, t1=args.t1, method=method)
        return jnp.sum(rx.entropy(sol.log_p[:, -1])), sol.stats["num_steps"]

    if case == "forward":
        fn = jax.jit(lambda s: loss(s, None))
    else:
        if case == "backsolve":
            adjoint = diffrax.BacksolveAdjoint()
        else:
            c = case.split("=")[1]
            adjoint = diffrax.RecursiveCheckpointAdjoint(None if c == "None" else int(c))
        fn = jax.jit(jax.grad(lambda s: loss(s, adjoint), has_aux=True))
    start = time.perf_counter()
    compiled = fn.lower(logits).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(logits))
        times.append(time.perf_counter() - start)
    value, steps = out
    if case != "forward":
        np.save(out_path, np.asarray(value))
    return {
        "case": case,
        "temp_mib": memory.temp_size_in_bytes / 2**20,
        "peak_rss_mib": _peak_rss_mib(),
        "compile_s": compile_s,
        "time_s": statistics.median(times),
        "steps": int(np.max(steps)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--t1", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_one(args.one, args, args.out)))
        return

    import numpy as np

    flags = [f"--{k}={getattr(args, k)}" for k in ("batch", "vocab", "steps", "t1",
                                                   "repeats", "seed")]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("baseline",) + tuple(args.cases.split(",")):
            path = os.path.join(tmp, case.replace("=", "_") + ".npy")
            proc = subprocess.run(
                [sys.executable, __file__, f"--one={case}", f"--out={path}", *flags],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows[case] = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[case]["grad_path"] = path
            print(f"done: {case}", file=sys.stderr)
        reference = np.load(rows["checkpoints=None"]["grad_path"])
        for case, row in rows.items():
            if case not in ("baseline", "forward") and os.path.exists(row["grad_path"]):
                grad = np.load(row["grad_path"])
                row["grad_rel_error"] = float(
                    np.max(np.abs(grad - reference)) / np.max(np.abs(reference))
                )
            row.pop("grad_path")
    base = rows.pop("baseline")["peak_rss_mib"]
    fwd = rows["forward"]
    print(
        f"\nB = {args.batch}, V = {args.vocab}, float32, Tsit5, {args.steps} constant "
        f"steps to t1 = {args.t1}; peak RSS above a baseline of {base:.0f} MiB.\n"
    )
    print("| adjoint | XLA temp (MiB) | × forward | peak RSS − baseline (MiB) | × forward "
          "| compile (s) | time (s) | × forward | grad rel. error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case, row in rows.items():
        rss = row["peak_rss_mib"] - base
        error = row.get("grad_rel_error")
        print(
            f"| {case} | {row['temp_mib']:.1f} | {row['temp_mib'] / fwd['temp_mib']:.2f} "
            f"| {rss:.0f} | {rss / (fwd['peak_rss_mib'] - base):.2f} "
            f"| {row['compile_s']:.1f} | {row['time_s']:.2f} "
            f"| {row['time_s'] / fwd['time_s']:.2f} "
            f"| {'—' if error is None else f'{error:.1e}'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "baseline_rss_mib": base, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
