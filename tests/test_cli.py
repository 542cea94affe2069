"""The command line: `replicax demo` (and `python -m replicax`)."""

import re
import subprocess
import sys

import numpy as np
import pytest
import replicax as rx
from replicax._cli import main


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table_rows(out: str) -> dict[tuple[str, str], list[float]]:
    """The numeric cells of the demo's table, keyed by (flow, temperature)."""
    rows = {}
    for line in out.splitlines():
        match = re.match(r"^(R|E)\s+(\d\S*)\s+(.*)$", line)
        if match:
            flow, temperature, rest = match.groups()
            rows[(flow, temperature)] = [float(x) for x in rest.split()]
    return rows


# Column order of the table (after flow and T).
T_EPS, H1, KL1, KL_T1, TOP1, LIMIT_TARGET, LIMIT_ARGMAX, RESCALING = range(8)


def test_demo_synthetic(tmp_path, capsys):
    png = tmp_path / "demo.png"
    code = main(["demo", "--out", str(png), "--temperatures", "0.7", "1.0"])
    out = capsys.readouterr().out
    assert code == 0
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == _PNG_MAGIC
    assert f"plot written to {png}" in out
    assert "wall time:" in out
    assert "8 contexts x 32000 tokens" in out

    rows = _table_rows(out)
    assert sorted(rows) == [("E", "0.7"), ("E", "1.0"), ("R", "0.7"), ("R", "1.0")]
    for temperature in ("0.7", "1.0"):
        r, e = rows[("R", temperature)], rows[("E", temperature)]
        assert all(len(v) == 8 for v in (r, e))
        # (R) passes softmax(s/T) at t = 1 and ends on the argmax; the rescaling
        # identity holds up to float32 round-off.
        assert abs(r[KL1]) < 1e-5
        assert r[LIMIT_ARGMAX] < 1e-6
        assert r[LIMIT_TARGET] > 1e-2
        assert r[RESCALING] < 1e-5
        assert r[TOP1] > 0.9
        # (E) ends on softmax(s/T), not on the argmax.
        assert e[LIMIT_TARGET] < 1e-5
        assert e[LIMIT_ARGMAX] > 1e-2
        assert e[KL_T1] < 1e-4 < e[KL1]
        # Both are at softmax(s/T) by t1 or on the way: times to eps are positive.
        assert r[T_EPS] > 0 and e[T_EPS] > 0
    # Temperature is a time rescaling for (R) only: at T = 1 the identity is trivial for
    # both, elsewhere (E) breaks it at order one.
    assert rows[("E", "0.7")][RESCALING] > 1e-2
    # (R)'s time to eps scales with T: t_eps(T) = T t_eps(1).
    ratio = rows[("R", "0.7")][T_EPS] / rows[("R", "1.0")][T_EPS]
    assert ratio == pytest.approx(0.7, rel=2e-2)


def test_demo_logits_file(tmp_path, capsys, monkeypatch):
    logits = np.random.default_rng(0).standard_normal((2, 50)).astype(np.float32)
    logits[1, 7] = -np.inf  # a masked token is allowed
    path = tmp_path / "logits.npy"
    np.save(path, logits)
    png = tmp_path / "out.png"
    options = ["--logits", str(path), "--eps", "1e-2", "--temperatures", "0.7", "1"]
    code = main(["demo", *options, "--out", str(png)])
    out = capsys.readouterr().out
    assert code == 0
    assert png.is_file() and png.stat().st_size > 0
    assert "2 contexts x 50 tokens" in out
    rows = _table_rows(out)
    assert set(rows) == {(f, t) for f in "RE" for t in ("0.7", "1.0")}
    assert all(np.isfinite(v).all() for v in rows.values())
    assert rows[("R", "1.0")][LIMIT_ARGMAX] < 1e-6
    assert rows[("E", "1.0")][LIMIT_TARGET] < 1e-6

    # --no-plot: the same table, no file (the default --out is in the working folder).
    monkeypatch.chdir(tmp_path)
    code = main(["demo", *options, "--no-plot"])
    out_no_plot = capsys.readouterr().out
    assert code == 0
    assert "plot written" not in out_no_plot
    assert not (tmp_path / "replicax-demo.png").exists()
    assert _table_rows(out_no_plot) == rows


def _nan_file(path):
    logits = np.zeros((2, 50), np.float32)
    logits[1, 3] = np.nan
    np.save(path, logits)


def _bad_ndim_file(path):
    np.save(path, np.zeros((2, 3, 50), np.float32))


def _not_npy_file(path):
    path.write_text("this is not a .npy file\n")


def _posinf_file(path):
    logits = np.zeros((2, 50), np.float32)
    logits[0, 0] = np.inf
    np.save(path, logits)


def _all_masked_file(path):
    logits = np.zeros((2, 50), np.float32)
    logits[1] = -np.inf
    np.save(path, logits)


def _text_dtype_file(path):
    np.save(path, np.array(["a", "b"]))


def _folder(path):
    path.mkdir()


# The messages come from `replicax.datasets.load_logits` (or, for a missing file, from
# the operating system); each names the file.
@pytest.mark.parametrize(
    "make, message",
    [
        (None, r"\[Errno 2\] No such file or directory: .*bad\.npy"),
        (_folder, r"\[Errno 21\] Is a directory: .*bad\.npy"),
        (_nan_file, r".*bad\.npy contains NaN \(first at row 1, token 3"),
        (_posinf_file, r".*bad\.npy contains \+inf .*-inf to mask"),
        (_bad_ndim_file, r".*bad\.npy has shape \(2, 3, 50\); .*\(V,\) or \(B, V\)"),
        (_not_npy_file, r"cannot read .*bad\.npy as a \.npy array"),
        (_all_masked_file, r"row 1 of .*bad\.npy is all -inf"),
        (_text_dtype_file, r".*bad\.npy has dtype <U1; logits must be real numbers"),
    ],
)
def test_demo_bad_logits_file(tmp_path, capsys, make, message):
    path = tmp_path / "bad.npy"
    if make is not None:
        make(path)
    png = tmp_path / "never.png"
    code = main(["demo", "--logits", str(path), "--out", str(png)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert re.fullmatch(r"replicax demo: error: " + message + r".*\n", captured.err), (
        captured.err
    )
    assert not png.exists()


# Temperatures and eps are checked by the library (`Replicator`, `time_to`), which names
# the argument; the other checks are the demo's own.
@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--temperatures", "0"],
            r"`temperature` must be finite and > 0; received 0\.0\. Greedy decoding",
        ),
        (["--temperatures", "1", "-1"], r"`temperature` must be .*; received -1\.0"),
        (["--temperatures", "inf"], r"`temperature` must be .*; received inf"),
        (["--temperatures", "1", "1"], r"--temperatures has repeated values"),
        (["--eps", "-1"], r"`eps` must be finite and > 0.*; received -1\.0"),
        (["--eps", "nan"], r"`eps` must be finite and > 0.*; received nan"),
        (["--t1", "0.5"], r"--t1 must be finite and >= 1"),
        (["--out", "no/such/folder/x.png"], r"--out: folder .* does not exist"),
    ],
)
def test_demo_bad_options(capsys, options, message):
    code = main(["demo", *options])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert re.fullmatch(r"replicax demo: error: " + message + r".*\n", captured.err), (
        captured.err
    )


def test_demo_error_raised_on_device(capsys, monkeypatch):
    # Logits that bypass the file checks reach the library's own check, made on device
    # (`eqx.error_if`) inside a compiled function: the CLI prints that message alone.
    logits = np.zeros((2, 5), np.float32)
    logits[1, 2] = np.nan
    monkeypatch.setattr(rx.datasets, "synthetic_logits", lambda seed: logits)
    code = main(["demo", "--no-plot", "--temperatures", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    expected = (
        "replicax demo: error: `logits` contains NaN or +inf at batch index (1,). Use "
        "-inf to mask a token.\n"
    )
    assert captured.err == expected


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "demo" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "replicax", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--logits", "--temperatures", "--eps", "--t1", "--out", "--no-plot"):
        assert option in result.stdout


def test_plot_needs_matplotlib(tmp_path, monkeypatch):
    from replicax.plot import plot_entropy_kl

    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    ts = np.linspace(0, 1, 5)
    curves = {("R", 1.0): {"entropy": ts, "kl": ts}}
    with pytest.raises(ImportError, match=r"pip install 'replicax\[plot\]'"):
        plot_entropy_kl(ts, curves, tmp_path / "x.png")


def test_plot_entropy_kl(tmp_path):
    from replicax.plot import plot_entropy_kl

    ts = np.linspace(0, 4, 41)
    curves = {
        ("R", 1.0): {"entropy": np.exp(-ts), "kl": np.abs(ts - 1)},  # KL = 0 at t = 1
        ("E", 1.0): {"entropy": 1 + np.exp(-ts), "kl": np.exp(-2 * ts)},
        ("E", 0.5): {"entropy": 0.5 + np.exp(-ts), "kl": np.full_like(ts, np.nan)},
    }
    path = plot_entropy_kl(ts, curves, tmp_path / "p.png", title="test")
    assert path == tmp_path / "p.png"
    assert path.read_bytes()[:8] == _PNG_MAGIC
    with pytest.raises(ValueError, match="expected"):
        plot_entropy_kl(ts, {("R", 1.0): {"entropy": ts[:-1], "kl": ts}}, path)
    with pytest.raises(ValueError, match="empty"):
        plot_entropy_kl(ts, {}, path)
