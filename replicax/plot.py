"""Plots of saved observables (matplotlib, an optional dependency).

Install it with `pip install 'replicax[plot]'`. Figures are drawn on matplotlib's Agg
canvas directly (no `pyplot`, no display, no change to the global backend), so these
helpers work on headless machines and inside other programs alike.
"""

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


# KL values below this are float32 round-off (KL of two equal distributions computed in
# float32 comes out as ±1e-8 or so); they are drawn at this floor on the log axis.
KL_FLOOR = 1e-8

_LINESTYLES = ("-", "--", ":", "-.")


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "replicax's plots need matplotlib, an optional dependency. Install it with "
            "`pip install 'replicax[plot]'` (or pass `--no-plot` to `replicax demo`)."
        ) from e
    return Figure, FigureCanvasAgg


def plot_entropy_kl(
    ts: Any,
    curves: Mapping[tuple[str, float], Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    mark_time: float | None = 1.0,
) -> Path:
    """Writes a PNG with two panels: entropy against time, and KL to the target
    `softmax(s/T)` against time (log axis), one line per (flow, temperature).

    Lines of the same temperature share a colour; lines of the same flow share a line
    style. KL values below `KL_FLOOR` (float32 round-off, or exactly 0 where a path
    passes through its target) are drawn at `KL_FLOOR`.

    **Arguments:**

    - `ts`: the saved times, shape `(times,)`.
    - `curves`: a mapping `(flow name, temperature) -> {"entropy": ..., "kl": ...}`,
        each value of shape `(times,)` (e.g. a mean over the batch). The flow name is
        used in the legend as is (e.g. `"R"` or `"E"`).
    - `path`: where to write the PNG; parent folders must exist.
    - `title`: a title for the whole figure.
    - `mark_time`: draw a dotted vertical line at this time (default `1.0`, where the
        replicator from uniform passes `softmax(s/T)`); `None` for no line.

    **Returns:**

    The path written, as a `pathlib.Path`.

    **Raises:**

    `ImportError` if matplotlib is not installed; `ValueError` if `curves` is empty or a
    curve does not have the shape of `ts`.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 1:
        raise ValueError(f"`ts` must be one-dimensional; received shape {ts.shape}.")
    if not curves:
        raise ValueError("`curves` is empty: nothing to plot.")

    flows = list(dict.fromkeys(name for name, _ in curves))
    temperatures = sorted({float(temp) for _, temp in curves})
    colours = _temperature_colours(len(temperatures))

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_h, ax_kl = fig.subplots(1, 2, sharex=True)
    for (name, temperature), values in curves.items():
        entropy = np.asarray(values["entropy"], dtype=float)
        kl = np.asarray(values["kl"], dtype=float)
        for label, y in (("entropy", entropy), ("kl", kl)):
            if y.shape != ts.shape:
                raise ValueError(
                    f"curve {label!r} of ({name!r}, {temperature}) has shape "
                    f"{y.shape}; expected {ts.shape} like `ts`."
                )
        style = dict(
            color=colours[temperatures.index(float(temperature))],
            linestyle=_LINESTYLES[flows.index(name) % len(_LINESTYLES)],
            linewidth=1.6,
            label=f"{name}, T = {temperature:g}",
        )
        ax_h.plot(ts, entropy, **style)
        # NaN (no value) stays NaN, so that the line has a gap rather than a floor.
        kl_shown = np.where(np.isnan(kl), np.nan, np.maximum(kl, KL_FLOOR))
        ax_kl.plot(ts, kl_shown, **style)

    ax_h.set_xlabel("time t")
    ax_h.set_ylabel("entropy H(p(t))  [nats]")
    ax_h.set_title("Entropy")
    ax_kl.set_xlabel("time t")
    ax_kl.set_ylabel("KL(p(t) || softmax(s/T))  [nats]")
    ax_kl.set_yscale("log")
    ax_kl.set_title(f"KL to the target softmax(s/T)  (floor {KL_FLOOR:g})")
    for ax in (ax_h, ax_kl):
        if mark_time is not None and ts.size and ts[0] <= mark_time <= ts[-1]:
            ax.axvline(mark_time, color="0.5", linestyle=":", linewidth=1)
        ax.grid(True, which="major", alpha=0.3)
    if mark_time is not None and ts.size and ts[0] <= mark_time <= ts[-1]:
        ax_kl.annotate(
            f"t = {mark_time:g}",
            xy=(mark_time, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize="small",
            color="0.4",
        )
    ax_kl.legend(fontsize="small", ncol=max(1, math.ceil(len(curves) / 6)))
    if title:
        fig.suptitle(title)

    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def _temperature_colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    if n == 1:
        return [cmap(0.35)]
    # Stop short of viridis' pale yellow end, which is hard to see on white.
    return [cmap(0.9 * i / (n - 1)) for i in range(n)]


__all__ = ["KL_FLOOR", "plot_entropy_kl"]
