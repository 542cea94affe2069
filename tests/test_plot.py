"""replicax.plot: every function writes a PNG and returns a Figure; what is drawn is
checked against closed forms (barycentric coordinates, the replicator velocity of a
payoff, transformers' top-p rule); bad input raises a ValueError naming the argument."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import replicax as rx


pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

from replicax import plot  # noqa: E402


XY_ATOL = 1e-12  # coordinates are a linear map of the inputs: float64 round-off
FIELD_ATOL = 1e-10  # velocities from the flow's log rate against the closed form
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 1024

# Rock-paper-scissors (THEORY §4), just below the Hopf temperature of (E).
RPS_L, RPS_W = 1.0, 0.4
RPS_A = np.array([[0.0, -RPS_L, RPS_W], [RPS_W, 0.0, -RPS_L], [-RPS_L, RPS_W, 0.0]])
RPS_T = 0.9 * (RPS_L - RPS_W) / 6


def _check_png(fig, path):
    assert isinstance(fig, Figure)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > MIN_PNG_BYTES


def _closed_form_paths(logits, ts):
    """(R) from uniform: p(t) = softmax(t s), shape (rows, times, vocab)."""
    logits = np.asarray(logits, float)
    z = ts[None, :, None] * logits[:, None, :]
    return z - np.log(np.sum(np.exp(z), -1, keepdims=True))


def test_simplex_xy_corners_and_centre():
    xy = plot.simplex_xy(np.vstack([np.eye(3), np.full(3, 1 / 3)]))
    expected = [[0, 0], [1, 0], [0.5, np.sqrt(3) / 2], [0.5, np.sqrt(3) / 6]]
    np.testing.assert_allclose(xy, expected, atol=XY_ATOL)


def test_ternary_three_tokens(tmp_path):
    ts = np.linspace(0, 2, 30)
    log_p = _closed_form_paths([[0.0, 1.0, 2.0], [1.5, 0.0, -1.0]], ts)
    fig = plot.plot_ternary(
        {"R": log_p, "E": log_p[:, ::-1]}, path=tmp_path / "t.png", title="t"
    )
    _check_png(fig, tmp_path / "t.png")
    (ax,) = fig.axes
    expected = plot.simplex_xy(np.exp(log_p[0]))
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(ts)]
    assert len(lines) == 4  # two rows of two sets
    np.testing.assert_allclose(lines[0].get_xydata(), expected, atol=XY_ATOL)


def test_ternary_top_two_and_rest(tmp_path):
    ts = np.linspace(0, 2, 20)
    logits = [[0.0, 2.0, -1.0, 1.0, 0.5]]  # ends on tokens 1 then 3
    log_p = _closed_form_paths(logits, ts)
    fig = plot.plot_ternary(log_p, path=tmp_path / "t.png")
    _check_png(fig, tmp_path / "t.png")
    p = np.exp(log_p[0])
    corners = np.stack([p[:, 1], p[:, 3], 1 - p[:, 1] - p[:, 3]], -1)
    (line,) = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == len(ts)]
    np.testing.assert_allclose(line.get_xydata(), plot.simplex_xy(corners), atol=1e-9)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"token 1", "token 3", "rest"} <= texts
    # three chosen tokens of five: the distribution conditioned on them
    fig = plot.plot_ternary(log_p, tokens=(0, 1, 4))
    (line,) = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == len(ts)]
    kept = p[:, [0, 1, 4]] / p[:, [0, 1, 4]].sum(-1, keepdims=True)
    np.testing.assert_allclose(line.get_xydata(), plot.simplex_xy(kept), atol=1e-9)


def test_observables(tmp_path):
    ts = np.linspace(0, 1, 25)
    entropy = np.stack([np.exp(-ts), np.exp(-2 * ts)])
    kl = np.stack([np.zeros_like(ts), ts**2])
    fig = plot.plot_observables(
        ts, entropy=entropy, kl=kl, speed=ts, labels=None, path=tmp_path / "o.png"
    )
    _check_png(fig, tmp_path / "o.png")
    ax_h, ax_kl, ax_v = fig.axes
    assert ax_kl.get_yscale() == "log" and ax_h.get_yscale() == "linear"
    # zeros on the log axis are drawn at the floor
    np.testing.assert_array_equal(ax_kl.get_lines()[0].get_ydata(), plot.KL_FLOOR)
    np.testing.assert_allclose(ax_h.get_lines()[1].get_ydata(), entropy[1])


def _rps_velocity(p, A, T):
    """(E) on a payoff: ṗ = p (g - <p, g>), g = A p / T - log p (THEORY §4)."""
    g = p @ A.T / T - np.log(p)
    return p * (g - np.sum(p * g, -1, keepdims=True))


def test_phase_portrait_field_and_rest_point(tmp_path):
    points = plot._simplex_grid(5)
    flow = rx.EntropicReplicator(rx.Payoff(jnp.asarray(RPS_A)), RPS_T)
    np.testing.assert_allclose(
        plot.simplex_velocity(flow, points),
        _rps_velocity(points, RPS_A, RPS_T),
        atol=FIELD_ATOL,
    )
    fig = plot.plot_phase_portrait(
        RPS_A,
        RPS_T,
        grid=5,
        starts=[[0.5, 0.3, 0.2]],
        t1=5.0,
        times=50,
        path=tmp_path / "pp.png",
    )
    _check_png(fig, tmp_path / "pp.png")
    ax = fig.axes[0]
    (quiver,) = [c for c in ax.collections if hasattr(c, "U")]
    d = plot.simplex_xy(_rps_velocity(points, RPS_A, RPS_T))
    d /= np.hypot(d[:, :1], d[:, 1:])
    np.testing.assert_allclose(np.c_[quiver.U, quiver.V], d, atol=FIELD_ATOL)
    # The centre is the only rest point; below T_c it is unstable (hollow marker).
    centre = plot.simplex_xy(np.full(3, 1 / 3))
    marks = [ln for ln in ax.get_lines() if ln.get_markersize() == 8]
    assert len(marks) == 1
    np.testing.assert_allclose(marks[0].get_xydata()[0], centre, atol=1e-6)
    assert marks[0].get_markerfacecolor() == "white"


def test_basins(tmp_path):
    y0 = plot._simplex_grid(6)
    labels = np.argmax(y0, -1)
    fig = plot.plot_basins(y0, labels, path=tmp_path / "b.png")
    _check_png(fig, tmp_path / "b.png")
    settled = labels != 2
    result = types.SimpleNamespace(token=labels, settled=settled)
    fig = plot.plot_basins(y0, result, path=tmp_path / "b2.png")
    _check_png(fig, tmp_path / "b2.png")
    drawn = {c.get_label(): len(c.get_offsets()) for c in fig.axes[0].collections}
    assert drawn == {
        "token 0": int(np.sum(labels == 0)),
        "token 1": int(np.sum(labels == 1)),
        "not settled": int(np.sum(~settled)),
    }


def _top_p_size(logits, T, top_p):
    """transformers' TopP: drop the tokens whose ascending cumulative mass is
    <= 1 - top_p (keeping at least one)."""
    p = np.exp(logits / T - np.max(logits / T))
    p = np.sort(p / p.sum())
    return max(len(p) - int(np.sum(np.cumsum(p) <= 1 - top_p)), 1)


def test_nucleus_size(tmp_path):
    logits = np.random.default_rng(0).normal(size=(2, 40))
    temps = np.geomspace(0.2, 5.0, 5)
    fig = plot.plot_nucleus_size(
        logits, temps, 0.9, labels=["a", "b"], path=tmp_path / "n.png"
    )
    _check_png(fig, tmp_path / "n.png")
    for row, line in zip(logits, fig.axes[0].get_lines(), strict=True):
        expected = [_top_p_size(row, T, 0.9) for T in temps]
        np.testing.assert_array_equal(line.get_ydata(), expected)


def _generation(steps=6, time_to=True):
    rng = np.random.default_rng(1)
    shape = (2, steps)
    return types.SimpleNamespace(
        tokens=rng.integers(0, 5, shape),
        entropy=rng.uniform(0, 1, shape),
        kl=rng.uniform(0, 1, shape),
        log_prob=-rng.uniform(0, 2, shape),
        time_to=rng.uniform(0, 3, shape) if time_to else None,
    )


def test_generation(tmp_path):
    gen = _generation()
    fig = plot.plot_generation(gen, decode="abcde".__getitem__, path=tmp_path / "g.png")
    _check_png(fig, tmp_path / "g.png")
    panels, strip = fig.axes[:4], fig.axes[4]
    assert [ax.get_title() for ax in panels][3] == "time to ε"
    np.testing.assert_allclose(panels[0].get_lines()[1].get_ydata(), gen.entropy[1])
    words = [t.get_text() for t in strip.texts]
    assert words == ["abcde"[i] for i in np.asarray(gen.tokens).reshape(-1)]
    # long decodes have no strip; time_to absent: three panels
    fig = plot.plot_generation(_generation(50, False), max_annotated=40)
    assert len(fig.axes) == 3


def test_generation_from_generate(tmp_path):
    """The real `rx.Generation` has what `plot_generation` reads."""
    table = jax.random.normal(jax.random.key(0), (5, 5))

    def logits_fn(tokens, state):
        return table[tokens[:, -1]], state

    gen = rx.generate(logits_fn, jnp.array([[1], [2]]), max_new_tokens=3)
    fig = plot.plot_generation(gen, path=tmp_path / "g.png")
    _check_png(fig, tmp_path / "g.png")


def test_bad_inputs():
    with pytest.raises(ValueError, match="`log_p`.*at least 3 tokens"):
        plot.plot_ternary(np.log(np.full((4, 2), 0.5)))
    with pytest.raises(ValueError, match="`log_p`.*at least 2 dimension"):
        plot.plot_ternary(np.log(np.full(3, 1 / 3)))
    with pytest.raises(ValueError, match="`tokens`"):
        plot.plot_ternary(np.log(np.full((4, 3), 1 / 3)), tokens=(0, 0))
    with pytest.raises(ValueError, match="series `kl`"):
        plot.plot_observables(np.arange(3.0), kl=np.zeros(4))
    with pytest.raises(ValueError, match="`ts`"):
        plot.plot_observables(np.zeros((2, 3)), kl=np.zeros(3))
    with pytest.raises(ValueError, match="no series"):
        plot.plot_observables(np.arange(3.0))
    with pytest.raises(ValueError, match="`flow`.*shape \\(3, 3\\)"):
        plot.plot_phase_portrait(np.zeros((2, 2)), 1.0)
    with pytest.raises(ValueError, match="`temperature`"):
        plot.plot_phase_portrait(RPS_A)
    with pytest.raises(ValueError, match="`kind`"):
        plot.plot_phase_portrait(RPS_A, 1.0, kind="X")
    with pytest.raises(ValueError, match="`flow` must be an unbatched flow"):
        plot.simplex_velocity(rx.Replicator(jnp.zeros(4)), np.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="`y0`"):
        plot.plot_basins(np.full((3, 4), 0.25), np.zeros(3, int))
    with pytest.raises(ValueError, match="`basins`"):
        plot.plot_basins(np.full((3, 3), 1 / 3), np.zeros(2, int))
    with pytest.raises(ValueError, match="`temperatures`"):
        plot.plot_nucleus_size(np.zeros((2, 5)), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="`top_p`"):
        plot.plot_nucleus_size(np.zeros((2, 5)), np.array([1.0]), top_p=1.5)
    gen = _generation()
    gen.kl = gen.kl[:, :2]
    with pytest.raises(ValueError, match="`gen.kl`"):
        plot.plot_generation(gen)
