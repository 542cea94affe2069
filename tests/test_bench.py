"""`replicax bench`: the suite runs every case, its correctness checks pass, and a
failed check gives a non-zero exit status. Timings are reported, never asserted."""

import json
import math

import pytest

from replicax import _bench
from replicax._cli import main


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    code = main(
        [
            "bench",
            "--quick",
            "--json",
            str(paths["json"]),
            "--markdown",
            str(paths["markdown"]),
        ]
    )
    return code, json.loads(paths["json"].read_text()), paths["markdown"].read_text()


def test_quick_suite_passes(quick):
    code, results, _ = quick
    failed = [c for c in results["checks"] if not c["passed"]]
    assert not failed, failed
    assert results["all_checks_passed"]
    assert code == 0


def test_quick_suite_covers_every_case(quick):
    _, results, text = quick
    rows = results["rows"]
    assert results["copy_bandwidth_GBps"] > 0
    assert {r["case"] for r in rows} == set(_bench.CASES)
    assert all(r["status"] == "ok" for r in rows), [
        r for r in rows if r["status"] != "ok"
    ]
    for case in _bench.CASES:
        kinds = {r["kind"] for r in rows if r["case"] == case}
        assert {"floor", "baseline", "replicax"} <= kinds, (case, kinds)
    for r in rows:
        assert r["time_s"] > 0 and math.isfinite(r["time_s"]), r
        if r["kind"] != "floor":
            assert r["compile_s"] >= 0, r
            assert r["ratio_to_floor"] > 0, r
        if r["kind"] == "replicax":
            assert r["ratio_to_baseline"] > 0, r
            assert r["error"] is not None and r["error"] >= 0, r
    # Every case checks its error: one check per replicax row.
    assert len(results["checks"]) == sum(r["kind"] == "replicax" for r in rows)
    assert results["device"]["platform"] and results["versions"]["jax"]
    assert results["date"]
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) > len(rows)  # header and one line per row, then the targets


def test_failed_check_gives_nonzero_exit(quick, tmp_path, monkeypatch, capsys):
    # After the quick run (so nothing new to compile for replicax): one size of case
    # (a), with a tolerance no float32 result can meet.
    del quick
    monkeypatch.setitem(_bench.TOLERANCES, "closed_form_p", 0.0)
    path = tmp_path / "bench.json"
    options = ["--quick", "--cases", "a", "--batch", "8", "--vocab", "4096", "--repeats", "1"]
    code = main(["bench", *options, "--json", str(path)])
    assert code == 1
    results = json.loads(path.read_text())
    assert not results["all_checks_passed"]
    assert [c["passed"] for c in results["checks"]] == [False]
    assert "check failed: a B=8 V=4096 max abs error in p" in capsys.readouterr().err


@pytest.mark.parametrize(
    "message, code, status",
    [
        ("something broke", 1, "error: RuntimeError: something broke"),
        (
            "RESOURCE_EXHAUSTED: Out of memory allocating 9 GiB",
            0,
            "out of memory (RESOURCE_EXHAUSTED)",
        ),
    ],
)
def test_a_case_that_raises_is_reported(tmp_path, monkeypatch, message, code, status):
    # The suite never crashes on one case: an out-of-memory error is a row of the
    # table, anything else also a failed check.
    def broken(self, batch, vocab):
        raise RuntimeError(message)

    monkeypatch.setattr(_bench.Suite, "case_e", broken)
    path = tmp_path / "bench.json"
    assert (
        main(["bench", "--cases", "e", "--repeats", "1", "--json", str(path)]) == code
    )
    results = json.loads(path.read_text())
    assert [r["status"] for r in results["rows"]] == [status]
    assert results["all_checks_passed"] == (code == 0)


def test_field_script_counts_and_agrees():
    # `benchmarks/field.py`: the fused field equals its definition (float32, relative to
    # the largest rate) and XLA's program is parsed into passes and reductions.
    from benchmarks import field

    table = field.main(["--batch", "2", "--vocab", "512", "--repeats", "2"])
    assert len(table) == 4
    for row in table:
        assert row["relative_difference"] <= 1e-5, row
        assert 2 <= row["reductions"] <= row["passes"], row
        # The fused field: one reduction for both maxima, one for both sums.
        assert row["field"] != "fused" or row["reductions"] == 2, row
