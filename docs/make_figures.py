"""Regenerates the README's figures: `docs/ternary.png` and `docs/phase_portrait.png`.

Run from anywhere: `python docs/make_figures.py` (needs matplotlib; about a minute on
a laptop CPU).

1. `ternary.png`: paths on the triangle of three tokens. Left: the replicator (R) and
   the entropic replicator (E) on constant logits `s` at temperature `T`, from uniform
   and from two other starts: from uniform both follow the same curve and pass
   `softmax(s/T)` at `t = 1`; (R) goes on to the top token, (E) stops there. Right: (E)
   on a rock-paper-scissors payoff below its Hopf temperature (THEORY §4): the path
   winds onto a limit cycle.
2. `phase_portrait.png`: the velocity field of (E) on that payoff just above and just
   below `T_c = (l - w)/6`, with paths and the centre (filled: stable, hollow: not).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import replicax as rx
from replicax import plot


jax.config.update("jax_enable_x64", True)
HERE = Path(__file__).resolve().parent

# Constant logits for the two flows.
s = jnp.array([0.0, 1.0, 2.2])
T = 1.0
starts = jnp.array([[1 / 3, 1 / 3, 1 / 3], [0.8, 0.15, 0.05], [0.1, 0.8, 0.1]])
ts = jnp.linspace(0.0, 4.0, 200)

# Rock-paper-scissors: losses l, wins w; (E) has a Hopf bifurcation at T_c = (l - w)/6.
l, w = 1.0, 0.4
rps = jnp.array([[0.0, -l, w], [w, 0.0, -l], [-l, w, 0.0]])
T_c = (l - w) / 6


def figure(ncols):
    fig = Figure(figsize=(5.2 * ncols, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def ternary():
    fig, (left, right) = figure(2)
    paths = {}
    for name, cls in (("R", rx.Replicator), ("E", rx.EntropicReplicator)):
        sol = rx.solve(cls(s, T), t1=ts[-1], y0=starts, saveat=rx.SaveAt(ts=ts))
        paths[name] = sol.log_p
    names = [f"{n}, from {i}" for n in paths for i in ("uniform", "start 1", "start 2")]
    plot.plot_ternary(paths, labels=names, ax=left)
    target = plot.simplex_xy(np.exp(np.asarray(jax.nn.log_softmax(s / T))))
    left.plot(*target, "*", color="k", markersize=12, zorder=6)
    left.annotate("softmax(s/T)", target, xytext=(8, -4), textcoords="offset points")
    left.set_title(f"(R) and (E) on s = {np.asarray(s).tolist()}, T = {T:g}, t ≤ 4")

    t1 = 60.0
    sol = rx.solve(
        rx.EntropicReplicator(rx.Payoff(rps), 0.9 * T_c),
        t1=t1,
        y0=jnp.array([[0.5, 0.3, 0.2]]),
        saveat=rx.SaveAt(ts=jnp.linspace(0.0, t1, 3000)),
        method=rx.ODE(rtol=1e-8, atol=1e-8, max_steps=100_000),
    )
    plot.plot_ternary(sol.log_p, corner_labels=("rock", "paper", "scissors"), ax=right)
    right.set_title(f"(E) on rock-paper-scissors (l={l:g}, w={w:g}), T = 0.9 T_c")
    fig.savefig(HERE / "ternary.png", dpi=90)


def phase_portrait():
    fig, axes = figure(2)
    for ax, factor in zip(axes, (1.2, 0.9), strict=True):
        plot.plot_phase_portrait(
            rps,
            factor * T_c,
            grid=13,
            starts=[[0.5, 0.3, 0.2], [0.34, 0.33, 0.33]],
            t1=40.0,
            times=2000,
            corner_labels=("rock", "paper", "scissors"),
            ax=ax,
        )
        ax.set_title(f"(E), rock-paper-scissors, T = {factor:g} T_c")
    fig.savefig(HERE / "phase_portrait.png", dpi=90)


if __name__ == "__main__":
    ternary()
    phase_portrait()
    for name in ("ternary.png", "phase_portrait.png"):
        print(HERE / name, (HERE / name).stat().st_size // 1024, "kB")
