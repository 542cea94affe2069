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


def _times(ts) -> np.ndarray:
    """`ts` as a one-dimensional float array; `ValueError` naming it otherwise."""
    ts = np.asarray(ts, dtype=float)
    if ts.ndim != 1:
        raise ValueError(f"`ts` must be one-dimensional; received shape {ts.shape}.")
    return ts


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
    ts = _times(ts)
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


# --------------------------------------------------------------------------------------
# The simplex of three tokens
#
# Barycentric coordinates (p0, p1, p2) go to the plane with token 0 at (0, 0), token 1
# at (1, 0) and token 2 at (1/2, √3/2): x = p1 + p2/2, y = (√3/2) p2.

_SQRT3_2 = math.sqrt(3) / 2
_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, _SQRT3_2]])


def simplex_xy(p: Any) -> np.ndarray:
    """Cartesian coordinates in the triangle of probabilities over three tokens.

    **Arguments:**

    - `p`: probabilities, shape `(..., 3)` (each row summing to 1).

    **Returns:**

    A NumPy array of shape `(..., 2)`: token 0 at `(0, 0)`, token 1 at `(1, 0)` and
    token 2 at `(1/2, √3/2)`.
    """
    p = np.asarray(p, dtype=float)
    if p.shape[-1:] != (3,):
        raise ValueError(f"`p` must have a last axis of 3; received shape {p.shape}.")
    return np.stack([p[..., 1] + 0.5 * p[..., 2], _SQRT3_2 * p[..., 2]], axis=-1)


def _new_figure(figsize, ax):
    Figure, FigureCanvasAgg = _import_matplotlib()
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _finish(fig, path, title, ax=None):
    if title:
        (ax.set_title if ax is not None else fig.suptitle)(title)
    if path is not None:
        fig.savefig(Path(path), format="png", dpi=120)
    return fig


def _draw_triangle(ax, labels):
    ax.plot(*np.vstack([_CORNERS, _CORNERS[:1]]).T, color="0.3", linewidth=1)
    offsets = ((-0.03, -0.05, "right"), (0.03, -0.05, "left"), (0.0, 0.03, "center"))
    for (x, y), (dx, dy, ha), label in zip(_CORNERS, offsets, labels, strict=True):
        ax.text(x + dx, y + dy, label, ha=ha, va="bottom" if dy > 0 else "top")
    ax.set_xlim(-0.12, 1.12)
    ax.set_ylim(-0.1, _SQRT3_2 + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")


def _rows_of(x, name, tail):
    """Flattens leading batch axes of `x` into rows, keeping `tail` trailing axes."""
    x = np.asarray(x, dtype=float)
    if x.ndim < tail:
        raise ValueError(
            f"`{name}` must have at least {tail} dimension(s); received shape "
            f"{x.shape}."
        )
    return x.reshape((-1,) + x.shape[x.ndim - tail :])


def _three_corners(p, tokens, name):
    """Reduces probabilities of shape `(rows, times, V)` to three corners."""
    vocab = p.shape[-1]
    if vocab < 3:
        raise ValueError(
            f"`{name}` must have a vocabulary of at least 3 tokens for the triangle; "
            f"received {vocab} (shape {p.shape})."
        )
    if tokens is None:
        if vocab == 3:
            tokens = (0, 1, 2)
        else:
            # The two most probable tokens at the end (mean over rows); the rest lumped.
            order = np.argsort(-np.mean(p[:, -1, :], axis=0), kind="stable")
            tokens = (int(order[0]), int(order[1]))
    tokens = tuple(int(i) for i in tokens)
    if len(tokens) not in (2, 3) or len(set(tokens)) != len(tokens):
        raise ValueError(
            f"`tokens` must be 2 or 3 distinct token ids; received {tokens}."
        )
    if any(not 0 <= i < vocab for i in tokens):
        raise ValueError(f"`tokens` must lie in [0, {vocab}); received {tokens}.")
    if len(tokens) == 2:
        kept = p[..., list(tokens)]
        rest = np.clip(1 - kept.sum(-1, keepdims=True), 0, 1)
        return np.concatenate([kept, rest], axis=-1), [f"token {i}" for i in tokens] + [
            "rest"
        ]
    kept = p[..., list(tokens)]
    if vocab > 3:  # the distribution conditioned on the three tokens
        kept = kept / kept.sum(-1, keepdims=True)
    return kept, [f"token {i}" for i in tokens]


def plot_ternary(
    log_p: Any,
    tokens: Any = None,
    *,
    labels: Any = None,
    corner_labels: Any = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    ax: Any = None,
) -> Any:
    """Paths of next-token distributions on the triangle of three tokens, one line per
    row, the start marked with a circle and the end with a square.

    With more than three tokens the corners are the two tokens most probable at the
    end (mean over the rows) and "rest" (the mass of every other token); pass `tokens`
    to choose.

    **Arguments:**

    - `log_p`: log-probabilities along the paths, shape `(*batch, times, vocab)` (e.g.
        `rx.solve(...).log_p`), or a mapping `name -> array` to draw several sets of
        paths (say, one per flow) with their own line style.
    - `tokens`: two token ids (third corner "rest"), or three (the distribution
        conditioned on those three when `vocab > 3`); default as above.
    - `labels`: a name per row for the legend (rows of all sets in order).
    - `corner_labels`: three strings for the corners (e.g. the decoded tokens).
    - `title`: a title; `path`: where to write a PNG (parent folders must exist).
    - `ax`: a matplotlib `Axes` to draw into instead of a new figure.

    **Returns:**

    The matplotlib `Figure`.

    **Raises:**

    `ImportError` without matplotlib; `ValueError` for `log_p` with fewer than three
    tokens or fewer than two dimensions, sets of different vocabularies, or bad
    `tokens`, `labels` or `corner_labels`.
    """
    sets = dict(log_p) if isinstance(log_p, Mapping) else {None: log_p}
    if not sets:
        raise ValueError("`log_p` is an empty mapping: nothing to plot.")
    fig, ax = _new_figure((5.2, 4.8), ax)
    paths = {name: np.exp(_rows_of(v, "log_p", 2)) for name, v in sets.items()}
    vocabs = {v.shape[-1] for v in paths.values()}
    if len(vocabs) != 1:
        raise ValueError(f"`log_p`: every set needs the same vocabulary; got {vocabs}.")
    stacked = np.concatenate([v[:, -1:, :] for v in paths.values()])
    _, names = _three_corners(stacked, tokens, "log_p")
    if tokens is None and next(iter(vocabs)) > 3:
        order = np.argsort(-np.mean(stacked[:, -1, :], axis=0), kind="stable")
        tokens = (int(order[0]), int(order[1]))
    if corner_labels is not None:
        names = [str(c) for c in corner_labels]
        if len(names) != 3:
            raise ValueError(
                f"`corner_labels` must be three strings; received {corner_labels!r}."
            )
    num_rows = sum(v.shape[0] for v in paths.values())
    if labels is not None and len(labels) != num_rows:
        raise ValueError(
            f"`labels` must name each of the {num_rows} rows; received {len(labels)}."
        )
    _draw_triangle(ax, names)
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    k = 0
    for j, (name, p) in enumerate(paths.items()):
        corners, _ = _three_corners(p, tokens, "log_p")
        xy = simplex_xy(corners)
        for r in range(xy.shape[0]):
            colour = cmap(k % 10)
            label = labels[k] if labels is not None else None
            if label is None and name is not None:
                label = f"{name}, row {r}" if xy.shape[0] > 1 else str(name)
            ax.plot(
                xy[r, :, 0],
                xy[r, :, 1],
                color=colour,
                linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                linewidth=1.4,
                label=label,
            )
            ax.plot(*xy[r, 0], "o", color=colour, markersize=5)
            ax.plot(*xy[r, -1], "s", color=colour, markersize=5)
            k += 1
    if labels is not None or any(n is not None for n in paths):
        ax.legend(fontsize="small", loc="upper right")
    return _finish(fig, path, title, ax)


# --------------------------------------------------------------------------------------
# Observables against time


def plot_observables(
    ts: Any,
    /,
    *,
    log: Any = ("kl",),
    labels: Any = None,
    title: str | None = None,
    path: str | os.PathLike | None = None,
    **series: Any,
) -> Any:
    """Named observables against time, one panel per name, one line per row: e.g.
    `plot_observables(sol.ts, entropy=rx.entropy(sol.log_p), kl=..., speed=...)`.

    **Arguments:**

    - `ts`: the times, shape `(times,)`.
    - `**series`: each a name and its values, shape `(*batch, times)`.
    - `log`: the names drawn on a log axis (default `("kl",)`), or `True` for all;
        values below `KL_FLOOR` there are drawn at `KL_FLOOR` (NaN stays a gap).
    - `labels`: a name per row for the legend.
    - `title`: a title; `path`: where to write a PNG.

    **Returns:**

    The matplotlib `Figure`.

    **Raises:**

    `ImportError` without matplotlib; `ValueError` when no series is given, `ts` is not
    one-dimensional, a series does not end with the length of `ts`, or `labels` does
    not name each row.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    ts = _times(ts)
    if not series:
        raise ValueError("no series given: pass them as keywords, e.g. `entropy=...`.")
    log_names = set(series) if log is True else set(() if log is False else log)
    fig = Figure(figsize=(4.2 * len(series) + 0.6, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(series), sharex=True))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        values = _rows_of(values, name, 1)
        if values.shape[-1] != ts.shape[0]:
            raise ValueError(
                f"series `{name}` has shape {values.shape} after flattening its batch; "
                f"its last axis must have the {ts.shape[0]} times of `ts`."
            )
        if labels is not None and len(labels) != values.shape[0]:
            raise ValueError(
                f"`labels` must name each of the {values.shape[0]} rows of `{name}`; "
                f"received {len(labels)}."
            )
        if name in log_names:
            values = np.where(np.isnan(values), np.nan, np.maximum(values, KL_FLOOR))
            ax.set_yscale("log")
        for r, y in enumerate(values):
            ax.plot(ts, y, linewidth=1.5, label=None if labels is None else labels[r])
        ax.set_xlabel("time t")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    if labels is not None:
        axes[-1].legend(fontsize="small")
    return _finish(fig, path, title)


# --------------------------------------------------------------------------------------
# Phase portraits and basins of three-token flows


def _simplex_grid(n: int) -> np.ndarray:
    """Interior points `(a, b, c)/n` with positive integers `a + b + c = n`."""
    pts = [(a, b, n - a - b) for a in range(1, n) for b in range(1, n - a)]
    return np.asarray(pts, dtype=float) / n


def _flow_of(flow, temperature, kind):
    from ._flows import AbstractFlow, EntropicReplicator, Replicator
    from ._scores import Payoff

    if isinstance(flow, AbstractFlow):
        if temperature is not None:
            raise ValueError(
                "`temperature` is taken from `flow` when a flow is given; pass None."
            )
        return flow
    if kind not in ("E", "R"):
        raise ValueError(f"`kind` must be 'E' or 'R'; received {kind!r}.")
    if temperature is None:
        raise ValueError("`temperature` is needed to build a flow from `flow`.")
    if callable(flow):
        return flow(temperature)
    A = np.asarray(flow, dtype=float)
    if A.shape != (3, 3):
        raise ValueError(
            "`flow` must be a flow, a callable `temperature -> flow`, or a payoff "
            f"matrix of shape (3, 3); received an array of shape {A.shape}."
        )
    cls = EntropicReplicator if kind == "E" else Replicator
    return cls(Payoff(A), temperature)


def simplex_velocity(flow: Any, p: Any, t: float = 0.0) -> np.ndarray:
    """The velocity `ṗ` of a flow on three tokens at interior points, from the flow's
    log rate: `ṗ_i = p_i (θ̇_i - <p, θ̇>)` (THEORY §1, §4).

    **Arguments:**

    - `flow`: an unbatched flow on three tokens whose score carries no history.
    - `p`: interior probabilities, shape `(points, 3)`.
    - `t`: the time at which the score is read.

    **Returns:**

    A NumPy array of shape `(points, 3)`, each row summing to zero.

    **Raises:**

    `ValueError` when `p` is not of shape `(points, 3)` with positive entries, or when
    the flow is batched or not on three tokens.
    """
    import jax
    import jax.numpy as jnp

    p = np.asarray(p, dtype=float)
    if p.ndim != 2 or p.shape[-1] != 3 or not np.all(p > 0):
        raise ValueError(
            f"`p` must be interior points of shape (points, 3); received {p.shape}."
        )
    log_p = jax.nn.log_softmax(jnp.log(jnp.asarray(p)), axis=-1)
    face = jnp.ones(3, dtype=bool)
    t = jnp.asarray(t, log_p.dtype)

    def one(lp):
        aux = flow.score.init_aux(lp)
        return flow.log_rate(t, lp, aux, face)

    try:
        rate = np.asarray(jax.vmap(one)(log_p))
    except (TypeError, ValueError) as e:
        raise ValueError(
            "`flow` must be an unbatched flow on three tokens (one temperature, one "
            f"score); evaluating its rate failed: {e}"
        ) from e
    if rate.shape != p.shape:
        raise ValueError(
            "`flow` must be an unbatched flow on three tokens; its rate has shape "
            f"{rate.shape[1:]} per point."
        )
    q = np.exp(np.asarray(log_p))
    return q * (rate - np.sum(q * rate, axis=-1, keepdims=True))


def plot_phase_portrait(
    flow: Any,
    temperature: float | None = None,
    *,
    kind: str = "E",
    grid: int = 14,
    starts: Any = None,
    t1: float = 30.0,
    times: int = 600,
    rest_points: bool = True,
    method: Any = "auto",
    corner_labels: Any = ("token 0", "token 1", "token 2"),
    title: str | None = None,
    path: str | os.PathLike | None = None,
    ax: Any = None,
) -> Any:
    """The vector field of a flow on three tokens (arrows of the velocity `ṗ`,
    coloured by the Fisher–Rao speed `rx.speed`), a few paths from `rx.solve` and the
    rest points from `rx.equilibrium` (filled: stable, hollow: unstable). THEORY §4.

    **Arguments:**

    - `flow`: an unbatched flow on three tokens with a score without history (e.g.
        `rx.EntropicReplicator(rx.Payoff(A), T)`); or a callable `temperature -> flow`;
        or a payoff matrix `A` of shape `(3, 3)`, run under (E) or (R) (see `kind`).
    - `temperature`: the temperature, with a callable or a matrix; `None` with a flow.
    - `kind`: `"E"` (entropic replicator, default) or `"R"` (replicator), for a matrix.
    - `grid`: arrows at the interior points `(a, b, c)/grid`.
    - `starts`: starts of the paths, probabilities of shape `(paths, 3)`; default three
        points; an empty array for none.
    - `t1`, `times`: the paths run on `[0, t1]`, saved at `times` points.
    - `method`: passed to `rx.solve` for the paths (e.g. `rx.ODE(rtol=1e-8)`).
    - `rest_points`: search rest points from the starts and a few more; skipped for
        flows without isolated rest points.
    - `corner_labels`, `title`, `path`, `ax`: as in `plot_ternary`.

    **Returns:**

    The matplotlib `Figure`.

    **Raises:**

    `ImportError` without matplotlib; `ValueError` for a matrix not of shape `(3, 3)`,
    a missing or superfluous `temperature`, a bad `kind`, `grid < 3`, `starts` not of
    shape `(paths, 3)`, or a batched flow or one not on three tokens.
    """
    import jax.numpy as jnp

    from ._equilibrium import equilibrium
    from ._observables import speed
    from ._saveat import SaveAt
    from ._solution import RESULTS
    from ._solve import solve

    flow = _flow_of(flow, temperature, kind)
    if not isinstance(grid, int) or grid < 3:
        raise ValueError(f"`grid` must be an integer >= 3; received {grid!r}.")
    if starts is None:
        starts = np.array([[0.7, 0.2, 0.1], [0.1, 0.15, 0.75], [0.2, 0.6, 0.2]])
    starts = (
        np.asarray(starts, dtype=float).reshape(-1, 3)
        if np.size(starts)
        else (np.zeros((0, 3)))
    )
    if np.size(starts) and (np.any(starts < 0) or not np.allclose(starts.sum(-1), 1)):
        raise ValueError("`starts` must be probabilities of shape (paths, 3).")

    points = _simplex_grid(grid)
    velocity = simplex_velocity(flow, points)
    fig, ax = _new_figure((5.6, 5.0), ax)
    _draw_triangle(ax, [str(c) for c in corner_labels])
    dxy = simplex_xy(velocity)  # linear map: velocities transform like points
    norm = np.hypot(dxy[:, 0], dxy[:, 1])
    direction = dxy / np.where(norm > 0, norm, 1)[:, None]
    rate = np.asarray(speed(flow, jnp.log(jnp.asarray(points))))
    xy = simplex_xy(points)
    arrows = ax.quiver(
        xy[:, 0],
        xy[:, 1],
        direction[:, 0],
        direction[:, 1],
        rate,
        cmap="viridis",
        angles="xy",
        scale_units="xy",
        scale=1.6 * grid,
        width=0.004,
    )
    fig.colorbar(arrows, ax=ax, shrink=0.7, label="speed ‖ṗ‖ (Fisher–Rao)")
    if len(starts):
        ts = jnp.linspace(0.0, t1, times)
        sol = solve(
            flow, t1=t1, y0=jnp.asarray(starts), saveat=SaveAt(ts=ts), method=method
        )
        paths = simplex_xy(np.exp(np.asarray(sol.log_p)))
        for r in range(paths.shape[0]):
            ax.plot(
                paths[r, :, 0], paths[r, :, 1], color="C3", linewidth=0.8, alpha=0.8
            )
            ax.plot(*paths[r, 0], "o", color="C3", markersize=4)
    if rest_points:
        seeds = np.concatenate([starts, [[1 / 3] * 3], _simplex_grid(4)])
        try:
            eq = equilibrium(flow, y0=jnp.asarray(seeds))
        except ValueError:  # no isolated rest points, e.g. (R) with constant scores
            eq = None
        if eq is not None:
            ok = np.asarray(eq.result == RESULTS.successful)
            found = np.exp(np.asarray(eq.log_p))[ok]
            stable = np.asarray(eq.stable)[ok]
            seen = []
            for q, s in zip(found, stable, strict=True):
                if any(np.max(np.abs(q - r)) < 1e-4 for r in seen):
                    continue
                seen.append(q)
                ax.plot(
                    *simplex_xy(q),
                    "o",
                    markersize=8,
                    markeredgecolor="k",
                    markerfacecolor="k" if s else "white",
                    zorder=5,
                )
    return _finish(fig, path, title, ax)


def plot_basins(
    y0: Any,
    basins: Any,
    *,
    corner_labels: Any = ("token 0", "token 1", "token 2"),
    title: str | None = None,
    path: str | os.PathLike | None = None,
    ax: Any = None,
) -> Any:
    """A basin map on the triangle of three tokens: each start coloured by the token
    its path locks onto; starts that have not settled are drawn as grey crosses.

    **Arguments:**

    - `y0`: the starts, probabilities of shape `(*batch, 3)` (as given to `rx.basins`).
    - `basins`: the `rx.Basins` returned by `rx.basins(flow, y0, ...)` (its `token`
        and `settled`), or integer labels of shape `batch` (all taken as settled).
    - `corner_labels`, `title`, `path`, `ax`: as in `plot_ternary`.

    **Returns:**

    The matplotlib `Figure`.

    **Raises:**

    `ImportError` without matplotlib; `ValueError` for `y0` not of shape `(*batch, 3)`
    or labels not of shape `batch`.
    """
    y0 = np.asarray(y0, dtype=float)
    if y0.ndim < 1 or y0.shape[-1] != 3:
        raise ValueError(
            f"`y0` must be probabilities over 3 tokens, shape (*batch, 3); received "
            f"shape {y0.shape}."
        )
    token = getattr(basins, "token", basins)
    token = np.asarray(token)
    settled = np.asarray(getattr(basins, "settled", np.ones(token.shape, dtype=bool)))
    if token.shape != y0.shape[:-1] or settled.shape != token.shape:
        raise ValueError(
            f"`basins` must have one label per start, shape {y0.shape[:-1]}; received "
            f"shape {token.shape}."
        )
    if not np.issubdtype(token.dtype, np.integer):
        raise ValueError(f"`basins` labels must be integers; received {token.dtype}.")
    fig, ax = _new_figure((5.2, 4.8), ax)
    names = [str(c) for c in corner_labels]
    _draw_triangle(ax, names)
    xy = simplex_xy(y0.reshape(-1, 3))
    token, settled = token.reshape(-1), settled.reshape(-1)
    size = max(4.0, 4000.0 / max(len(xy), 1))
    for k in np.unique(token[settled]):
        pick = settled & (token == k)
        label = names[k] if 0 <= k < 3 else f"token {k}"
        ax.scatter(xy[pick, 0], xy[pick, 1], s=size, color=f"C{k % 10}", label=label)
    if np.any(~settled):
        ax.scatter(
            xy[~settled, 0],
            xy[~settled, 1],
            s=size,
            color="0.5",
            marker="x",
            label="not settled",
        )
    ax.legend(fontsize="small", loc="upper right", title="locks onto")
    return _finish(fig, path, title, ax)


# --------------------------------------------------------------------------------------
# Nucleus size and decoding records


def plot_nucleus_size(
    logits: Any,
    temperatures: Any,
    top_p: float = 0.9,
    *,
    min_tokens_to_keep: int = 1,
    labels: Any = None,
    log_x: bool = True,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """The size of the top-p nucleus of `softmax(logits / T)` (`rx.nucleus_size`)
    against the temperature, one line per row (THEORY §3).

    **Arguments:**

    - `logits`: shape `(*batch, vocab)`.
    - `temperatures`: positive temperatures, shape `(temperatures,)`.
    - `top_p`, `min_tokens_to_keep`: as in `rx.TopP`.
    - `labels`: a name per row; `log_x`: a log temperature axis (default).
    - `title`, `path`: as in `plot_ternary`.

    **Returns:**

    The matplotlib `Figure`.

    **Raises:**

    `ImportError` without matplotlib; `ValueError` for `logits` without a vocabulary
    axis, `temperatures` not one-dimensional, empty or not positive, or `top_p`
    outside `(0, 1]`.
    """
    from ._observables import nucleus_size

    Figure, FigureCanvasAgg = _import_matplotlib()
    logits = np.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(
            f"`logits` must have shape (*batch, vocab); received {logits.shape}."
        )
    temps = np.asarray(temperatures, dtype=float)
    if temps.ndim != 1 or temps.size == 0 or not np.all(temps > 0):
        raise ValueError(
            "`temperatures` must be a non-empty one-dimensional array of positive "
            f"values; received shape {temps.shape}."
        )
    if not 0 < float(top_p) <= 1:
        raise ValueError(f"`top_p` must lie in (0, 1]; received {top_p}.")
    rows = logits.reshape(-1, logits.shape[-1])
    if labels is not None and len(labels) != rows.shape[0]:
        raise ValueError(
            f"`labels` must name each of the {rows.shape[0]} rows; received "
            f"{len(labels)}."
        )
    import jax.numpy as jnp

    sizes = np.asarray(
        nucleus_size(
            jnp.asarray(rows),
            jnp.asarray(temps, rows.dtype),
            float(top_p),
            min_tokens_to_keep=min_tokens_to_keep,
        )
    )
    fig = Figure(figsize=(5.6, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r, n in enumerate(sizes):
        ax.plot(
            temps,
            n,
            drawstyle="steps-post",
            marker=".",
            linewidth=1.4,
            label=labels[r] if labels is not None else None,
        )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("temperature T")
    ax.set_ylabel(f"nucleus size (top_p = {float(top_p):g})")
    ax.grid(True, alpha=0.3)
    if labels is not None:
        ax.legend(fontsize="small")
    return _finish(fig, path, title)


def plot_generation(
    gen: Any,
    *,
    decode: Any = None,
    max_annotated: int = 40,
    title: str | None = None,
    path: str | os.PathLike | None = None,
) -> Any:
    """The per-step records of a decode (`rx.Generation`): entropy, KL to the
    unpenalised distribution (log axis), the chosen token's log-probability and, when
    recorded, the time to ε, against the step, one line per row. With at most
    `max_annotated` steps the tokens are written on a strip below.

    **Arguments:**

    - `gen`: what `rx.generate` returns (any object with `tokens`, `entropy`, `kl`,
        `log_prob` of shape `(batch, steps)` and `time_to` of that shape or `None`).
    - `decode`: a callable `token id -> str` for the strip (default: the ids).
    - `max_annotated`: the longest decode whose tokens are written out.
    - `title`, `path`: as in `plot_ternary`.

    **Returns:**

    The matplotlib `Figure`.

    **Raises:**

    `ImportError` without matplotlib; `ValueError` when a record is missing or not of
    the shape of `gen.tokens`, `(batch, steps)`.
    """
    Figure, FigureCanvasAgg = _import_matplotlib()
    records = {}
    for name in ("tokens", "entropy", "kl", "log_prob", "time_to"):
        if not hasattr(gen, name):
            raise ValueError(f"`gen` has no `{name}`: pass what `rx.generate` returns.")
        value = getattr(gen, name)
        if value is not None:
            records[name] = np.asarray(value)
    tokens = records.pop("tokens")
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(
            f"`gen.tokens` must have shape (batch, steps); received {tokens.shape}."
        )
    for name, value in records.items():
        if value.shape != tokens.shape:
            raise ValueError(
                f"`gen.{name}` has shape {value.shape}; expected {tokens.shape} like "
                "`gen.tokens`."
            )
    batch, steps = tokens.shape
    strip = steps <= max_annotated
    fig = Figure(
        figsize=(max(6.0, 3.4 * len(records)), 3.6 + (0.3 * batch + 0.4) * strip),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    shape = (2, len(records)) if strip else (1, len(records))
    heights = (3.0, 0.3 * batch + 0.4) if strip else (1.0,)
    grid = fig.add_gridspec(*shape, height_ratios=heights)
    step = np.arange(1, steps + 1)
    names = {
        "entropy": "entropy [nats]",
        "kl": "KL to unpenalised [nats]",
        "log_prob": "log p(chosen token)",
        "time_to": "time to ε",
    }
    for j, (name, value) in enumerate(records.items()):
        ax = fig.add_subplot(grid[0, j])
        value = value.astype(float)
        if name == "kl":
            value = np.where(np.isnan(value), np.nan, np.maximum(value, KL_FLOOR))
            ax.set_yscale("log")
        for r in range(batch):
            ax.plot(step, value[r], marker=".", linewidth=1.2, label=f"row {r}")
        ax.set_title(names[name])
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if j == 0 and batch > 1:
            ax.legend(fontsize="small")
    if strip:
        # A table of the chosen tokens: one line per row, one column per step.
        ax = fig.add_subplot(grid[1, :])
        text = decode if decode is not None else str
        for r in range(batch):
            for s in range(steps):
                ax.text(
                    s + 1,
                    batch - r,
                    text(int(tokens[r, s])),
                    ha="center",
                    va="center",
                    fontsize="small",
                    color=f"C{r % 10}",
                )
        ax.set_xlim(0.5, steps + 0.5)
        ax.set_ylim(0.5, batch + 0.5)
        ax.set_xticks(step if steps <= 20 else step[:: math.ceil(steps / 20)])
        ax.set_yticks(np.arange(1, batch + 1), [f"row {r}" for r in range(batch)][::-1])
        ax.set_xlabel("step: chosen token")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    return _finish(fig, path, title)


__all__ = [
    "KL_FLOOR",
    "plot_basins",
    "plot_entropy_kl",
    "plot_generation",
    "plot_nucleus_size",
    "plot_observables",
    "plot_phase_portrait",
    "plot_ternary",
    "simplex_velocity",
    "simplex_xy",
]
