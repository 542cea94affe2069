"""How many passes over the vocabulary does one evaluation of the ODE path's vector
field make, and what does it cost: the fused field against its definition?

The ODE path evaluates `flow.state_rate` six times per Tsit5 step. Its definition reads
`log p` out of the log-weights and then centres the rate on it: four reductions over the
vocabulary, each waiting for the one before (max θ, `Σ e^θ`, the maximum of the rate
read from `log p`, `<p, rate>`). For scores that do not read `p` (logits, penalties:
`score.reads_p` false) the flows give their rate up to a constant from the
log-weights themselves, and `state_rate` needs two reductions, each over two arrays
stacked (`fused_state_rate`). This script compiles both for a batch of
rows, with the flow of case (c) of `replicax bench` (`EntropicReplicator(Logits(s) +
FrequencyPenalty(0.3, tau=1, stages=2), 0.7)`) and the plain `Replicator(s, 0.7)`, and
reports, from XLA's optimised program:

- `passes`: the fused loops at the top level of the program that run over the
  vocabulary (on a GPU, one kernel each);
- `reductions`: how many of them reduce over it;

with compile time, the median time of one evaluation, and the largest difference between
the two fields (relative to the largest rate).

Run it from the repository root (`--batch`, `--vocab`, `--repeats`, `--x64`):

    python benchmarks/field.py
"""

import argparse
import re

import jax
import jax.numpy as jnp

import replicax as rx
from replicax import _bench
from replicax._rows import prepare_rows


def _fields(flow):
    """The fused field and its definition, each over every row of `flow`."""
    rows = prepare_rows(flow, y0=None, log_y0=None, support=(), temperature_first=True)

    def start(row):
        theta0 = row.theta0()
        return theta0, row.flow.score.init_aux(row.flow.readout(theta0, row.face))

    def fused(t, row, y):
        return row.flow.state_rate(t, y[0], y[1], row.face)

    def definition(t, row, y):
        flow, face = row.flow, row.face
        log_p = flow.readout(y[0], face)
        return flow.log_rate(t, log_p, y[1], face), flow.score.aux_rate(t, log_p, y[1])

    def mapped(field):
        def run(row, y):
            t = jnp.asarray(0.5, row.dtype)
            return jax.vmap(lambda row, y: field(t, row, y))(row, y)

        return run

    # The rows are prepared (and their values checked) once, outside what is timed.
    row = jax.jit(lambda rows: rows.flat())(rows)
    y0 = jax.jit(jax.vmap(start))(row)
    return row, y0, {"fused": mapped(fused), "definition": mapped(definition)}


def _structure(fn, args, vocab):
    """`(passes, reductions)` of XLA's optimised program for `fn(*args)`: the fused
    loops at its top level that run over the vocabulary (on a GPU, one kernel each),
    and how many of them reduce over it."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    bodies = {}
    for block in text.split("\n\n"):
        head = re.match(r"(?:ENTRY )?(%\S+) ", block.strip())
        if head:
            bodies["ENTRY" if block.strip().startswith("ENTRY") else head[1]] = block
    passes = reductions = 0
    for line in bodies["ENTRY"].splitlines():
        fusion = re.search(r"= (\S+) fusion\(.*calls=(%[\w.-]+)", line)
        if fusion is None:
            continue
        reduces = " reduce(" in bodies.get(fusion[2], "")
        if reduces or re.search(rf"[\[,]{vocab}[\],]", fusion[1]):
            passes += 1
            reductions += reduces
    return passes, reductions


def main(argv=None) -> list[dict]:
    """Prints the table; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--x64", action="store_true")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(jnp.float64 if args.x64 else jnp.float32)
    s = 3.0 * jax.random.normal(jax.random.key(0), (args.batch, args.vocab), dtype)
    flows = {
        "(E) logits + frequency penalty": _bench._ode_flow(s),
        "(R) logits": rx.Replicator(s, _bench.TEMPERATURE),
    }
    device = jax.devices()[0].device_kind
    print(
        f"{device}, jax {jax.__version__}, B = {args.batch}, V = {args.vocab}, "
        f"{dtype.name}\n"
    )
    print(
        "| flow | field | passes | reductions | compile (s) | time (ms) "
        "| time / fused | max rel. diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    table = []
    for name, flow in flows.items():
        row, y0, fields = _fields(flow)
        results = {}
        for kind, fn in fields.items():
            m = _bench.measure_jitted(fn, (row, y0), args.repeats)
            loops, reductions = _structure(fn, (row, y0), args.vocab)
            results[kind] = (m, loops, reductions)
        rate = results["definition"][0]["out"]
        scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(rate))
        fused_time = results["fused"][0]["time_s"]
        for kind, (m, loops, reductions) in results.items():
            diff = jax.tree.map(
                lambda a, b: float(jnp.max(jnp.abs(a - b))), m["out"], rate
            )
            diff = max(jax.tree.leaves(diff)) / scale
            print(
                f"| {name} | {kind} | {loops} | {reductions} | {m['compile_s']:.2f} | "
                f"{1e3 * m['time_s']:.3f} | {m['time_s'] / fused_time:.2f} | "
                f"{diff:.1e} |"
            )
            table.append(
                dict(
                    flow=name,
                    field=kind,
                    passes=loops,
                    reductions=reductions,
                    time_s=m["time_s"],
                    relative_difference=diff,
                )
            )
    return table


if __name__ == "__main__":
    main()
