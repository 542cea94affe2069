"""The command line: `replicax check` (the claims table) and `replicax trajectory`."""

import re
import runpy

import numpy as np
import pytest

import replicax._check as check_module
from replicax._cli import main

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# `replicax trajectory` computes in float32 by default; p(t1) against a float64 NumPy
# closed form, max abs error (measured: 3e-8 on the logits below, |t1 s/T| < 10).
TRAJECTORY_P_ATOL = 1e-6
# Entropy and KL recomputed in float64 NumPy from the saved float32 log p.
TRAJECTORY_OBSERVABLE_ATOL = 1e-5

_VERDICT = r"(holds|does not hold)"
_ROW = re.compile(
    rf"^\s*(\d+)  (.+?)\s+{_VERDICT}\s+(\S+)\s+{_VERDICT}\s+{_VERDICT}\s+(\S+)\s+"
    rf"{_VERDICT}\s+(ok|MISMATCH)$"
)


def _claim_rows(out: str) -> dict[str, dict]:
    """The table's rows, keyed by claim text."""
    rows = {}
    for line in out.splitlines():
        match = _ROW.match(line)
        if match:
            _, text, r_got, r_value, r_want, e_got, e_value, e_want, agrees = (
                match.groups()
            )
            rows[text] = dict(
                R=(r_got == "holds", float(r_value), r_want == "holds"),
                E=(e_got == "holds", float(e_value), e_want == "holds"),
                agrees=agrees,
            )
    return rows


def test_check_table(capsys):
    code = main(["check"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = _claim_rows(out)
    # Every claim has a row, with both flows measured.
    assert list(rows) == [claim.text for claim in check_module.CLAIMS]
    for claim in check_module.CLAIMS:
        row = rows[claim.text]
        tolerance = check_module.TOLERANCES[claim.key]
        for name, expected in (("R", claim.holds_r), ("E", claim.holds_e)):
            holds, value, printed_expected = row[name]
            assert printed_expected == expected
            assert holds == expected, (claim.key, name, value)
            # The printed number is the one the verdict was made from. Claims that
            # fail do so by a wide margin, not by round-off.
            assert (value <= tolerance) == holds
            if not holds:
                assert value > 1e-2, (claim.key, name, value)
        assert row["agrees"] == "ok"
    # The claims the brief names, by flow: softmax for (E) only, argmax for (R) only,
    # temperature as time for (R) only.
    assert rows["converges to softmax(s/T)"]["R"][0] is False
    assert rows["converges to softmax(s/T)"]["E"][0] is True
    assert rows["converges to the argmax token"]["R"][0] is True
    assert rows["temperature rescales time: p_T(t) = p_1(t/T)"]["E"][0] is False
    assert "All 14 claims behave as THEORY §1 says" in out
    assert "wall time:" in out


def test_paper_claims_example(capsys):
    """examples/paper_claims.py, run here (in this process, after `test_check_table`,
    whose compiled program it reuses) rather than as a subprocess by test_examples.py;
    checked by that file's checker."""
    from .test_examples import check_paper_claims, ROOT

    runpy.run_path(str(ROOT / "examples" / "paper_claims.py"), run_name="__main__")
    check_paper_claims(capsys.readouterr().out)


def test_check_fails_when_a_verdict_differs(capsys, monkeypatch):
    # The test hook is the module's table of tolerances. A negative tolerance makes a
    # claim that holds fail for both flows; an infinite one makes (R) "converge to
    # softmax(s/T)", which THEORY says it does not. (Same shapes as above: no compile.)
    monkeypatch.setitem(check_module.TOLERANCES, "simplex", -1.0)
    monkeypatch.setitem(check_module.TOLERANCES, "limit_softmax", np.inf)
    code = main(["check"])
    out = capsys.readouterr().out
    assert code == 1
    rows = _claim_rows(out)
    simplex = rows["stays on the simplex: p >= 0, sum p = 1"]
    assert simplex["R"][0] is False and simplex["E"][0] is False
    assert simplex["agrees"] == "MISMATCH"
    softmax = rows["converges to softmax(s/T)"]
    assert softmax["R"][:1] == (True,) and softmax["agrees"] == "MISMATCH"
    assert [row["agrees"] for row in rows.values()].count("MISMATCH") == 2
    assert "MISMATCH with THEORY §1 for 2 claim(s): simplex, limit_softmax." in out


@pytest.mark.parametrize(
    "options, message",
    [
        (["--vocab", "1"], r"--vocab must be >= 2; received 1\."),
        (["--contexts", "0"], r"--contexts must be >= 1; received 0\."),
    ],
)
def test_check_bad_options(capsys, options, message):
    code = main(["check", *options])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert re.fullmatch(r"replicax check: error: " + message + r"\n", captured.err)


def _log_softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _entropy(log_p):
    return -np.sum(np.exp(log_p) * _finite(log_p), axis=-1)


def _finite(log_p):
    # log p with 0 in place of -inf (masked tokens, where p log p = 0).
    return np.where(np.isfinite(log_p), log_p, 0)


def test_trajectory_npz_and_png(tmp_path, capsys):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 40)).astype(np.float32)
    logits[1, 5] = -np.inf  # a masked token: the flows run on the other 39
    path = tmp_path / "logits.npy"
    np.save(path, logits)
    out_npz, png = tmp_path / "paths.npz", tmp_path / "plot.png"
    t1, temperatures = 2.0, (0.7, 1.0)
    code = main([
        "trajectory", "--logits", str(path), "--out", str(out_npz), "--png", str(png),
        "--temperatures", *map(str, temperatures), "--t1", str(t1), "--times", "5",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert f"results written to {out_npz}" in out and f"plot written to {png}" in out
    assert png.read_bytes()[:8] == _PNG_MAGIC and png.stat().st_size > 1000

    with np.load(out_npz) as data:
        results = dict(data)
    np.testing.assert_allclose(results["ts"], np.linspace(0, t1, 5), rtol=1e-6)
    np.testing.assert_array_equal(results["temperatures"], temperatures)
    assert list(results["flows"]) == ["R", "E"]
    np.testing.assert_array_equal(results["logits"], logits)
    s = logits.astype(np.float64)
    for i, temperature in enumerate(temperatures):
        # THEORY §1 closed forms from uniform, in float64.
        expected = {
            "R": _log_softmax(t1 * s / temperature),
            "E": _log_softmax(-np.expm1(-t1) * s / temperature),
        }
        target = _log_softmax(s / temperature)
        np.testing.assert_allclose(
            np.exp(results["target_log_p"][i]), np.exp(target), atol=TRAJECTORY_P_ATOL
        )
        for name in ("R", "E"):
            log_p = results[f"{name}_log_p"]
            assert log_p.shape == (2, 2, 5, 40)
            p_t1 = np.exp(log_p[i, :, -1])
            np.testing.assert_allclose(
                p_t1, np.exp(expected[name]), rtol=0, atol=TRAJECTORY_P_ATOL
            )
            assert np.all(log_p[i, 1, :, 5] == -np.inf)  # the mask stays a face
            reference_log_p = log_p[i].astype(np.float64)
            np.testing.assert_allclose(
                results[f"{name}_entropy"][i],
                _entropy(reference_log_p),
                atol=TRAJECTORY_OBSERVABLE_ATOL,
            )
            kl = np.sum(
                np.exp(reference_log_p)
                * (_finite(reference_log_p) - _finite(target[:, None])),
                axis=-1,
            )
            np.testing.assert_allclose(
                results[f"{name}_kl"][i], kl, atol=TRAJECTORY_OBSERVABLE_ATOL
            )
        # Limits: the argmax token for (R), softmax(s/T) for (E).
        argmax = np.argmax(s, axis=-1)
        np.testing.assert_array_equal(
            np.exp(results["R_limit_log_p"][i]), np.eye(40)[argmax]
        )
        np.testing.assert_allclose(
            np.exp(results["E_limit_log_p"][i]), np.exp(target), atol=TRAJECTORY_P_ATOL
        )


def test_trajectory_top_p_observables_only(tmp_path, capsys):
    logits = np.random.default_rng(1).standard_normal((3, 30)).astype(np.float32)
    path = tmp_path / "logits.npy"
    np.save(path, logits)
    out_npz = tmp_path / "paths.npz"
    code = main([
        "trajectory", "--logits", str(path), "--out", str(out_npz), "--flow", "E",
        "--top-p", "0.8", "--no-log-p", "--t1", "30", "--times", "3",
    ])  # fmt: skip
    capsys.readouterr()
    assert code == 0
    with np.load(out_npz) as data:
        results = dict(data)
    assert set(results) == {
        "ts", "temperatures", "flows", "logits", "target_log_p",
        "E_entropy", "E_kl", "E_limit_log_p",
    }  # fmt: skip
    # transformers' top-p rule at T = 1, written out: sort ascending, drop the tokens
    # whose cumulative probability is <= 1 - top_p.
    order = np.argsort(logits, axis=-1, kind="stable")
    cumulative = np.cumsum(np.exp(_log_softmax(np.sort(logits, axis=-1))), axis=-1)
    keep = np.zeros_like(logits, dtype=bool)
    np.put_along_axis(keep, order, cumulative > 1 - 0.8, axis=-1)
    np.testing.assert_array_equal(np.isfinite(results["target_log_p"][0]), keep)
    # (E) on the face ends at softmax on the face: KL(p(30) || target) ~ 0.
    assert np.all(results["E_kl"][0, :, -1] < 1e-6)
    assert np.all(results["E_kl"][0, :, 0] > 1e-3)


def _save(array):
    return lambda path: np.save(path, array)


def _nan_logits(path):
    logits = np.zeros((2, 4), np.float32)
    logits[1, 3] = np.nan
    np.save(path, logits)


# Bad files (messages from `replicax.datasets.load_logits` or the operating system) and
# bad options (the command's own checks, the supports' checks, or argparse's), each in
# one line on stderr with exit status 2.
@pytest.mark.parametrize(
    "make, options, message",
    [
        (None, [], r"\[Errno 2\] No such file or directory: .*bad\.npy'"),
        (_save(np.zeros((2, 3, 4))), [], r".*bad\.npy has shape \(2, 3, 4\); .*"),
        (_save(np.zeros((3, 1))), [], r".*bad\.npy has shape \(3, 1\); .*2 tokens\."),
        (_nan_logits, [], r".*bad\.npy contains NaN \(first at row 1, token 3;.*"),
        (
            _save(np.zeros(4)),
            ["--temperatures", "1", "-0.5"],
            r"--temperatures must be finite and > 0; received -0\.5\.",
        ),
        (_save(np.zeros(4)), ["--t1", "-1"], r"--t1 must be finite and > 0; .*-1\."),
        (_save(np.zeros(4)), ["--t1", "nan"], r"--t1 must be finite and > 0; .*nan\."),
        (
            _save(np.zeros(4)),
            ["--flow", "replicator"],
            r"--flow must be one of R, E, both; received 'replicator'\.",
        ),
        (_save(np.zeros(4)), ["--times", "1"], r"--times must be >= 2; received 1\."),
        (
            _save(np.zeros(4)),
            ["--top-p", "1.5"],
            r"`top_p` must be in \(0, 1\]; received 1\.5\.",
        ),
        (
            _save(np.zeros(4)),
            ["--t1", "abc"],
            r"argument --t1: invalid float value: 'abc' \(see .*--help`\)",
        ),
        (
            _save(np.zeros(4)),
            ["--png", "no/such/folder/plot.png"],
            r"--png: folder no/such/folder does not exist\.",
        ),
    ],
)
def test_trajectory_bad_input(tmp_path, capsys, make, options, message):
    path = tmp_path / "bad.npy"
    if make is not None:
        make(path)
    out_npz = tmp_path / "never.npz"
    argv = ["trajectory", "--logits", str(path), "--out", str(out_npz), *options]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (here: not a number)
        code = e.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert re.fullmatch(
        r"replicax trajectory: error: " + message + r"\n", captured.err
    ), captured.err
    assert not out_npz.exists()


def test_trajectory_out_must_be_npz(tmp_path, capsys):
    path = tmp_path / "logits.npy"
    np.save(path, np.zeros(4))
    code = main(["trajectory", "--logits", str(path), "--out", str(tmp_path / "x.txt")])
    captured = capsys.readouterr()
    assert code == 2
    assert re.fullmatch(
        r"replicax trajectory: error: --out must name an \.npz file; .*\n", captured.err
    )
