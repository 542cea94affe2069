"""Every example runs as a script (under a minute on a CPU) and prints what it says.

Each example has a checker below that reads its output and compares the key figures
with a computation of its own (longdouble closed forms, a numpy top-p rule), and any
PNG an example writes must be a non-empty PNG file.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .helpers import closed_form_log_p


ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Printed figures come from float32 runs, printed to 8 significant digits: values of
# order 1 agree with the longdouble reference to float32 round-off summed over the
# vocabulary (relative), and values near 0 to float32 noise (absolute).
PRINTED_RTOL = 1e-4
PRINTED_ATOL = 1e-6


def _floats(text):
    return np.array([float(x) for x in text.split()])


def _sizes(text):
    return [int(x) for x in text.split()]


def check_quickstart(stdout):
    # The example's input, rebuilt the way it builds it (float32, key 0).
    logits = 3.0 * jax.random.normal(jax.random.key(0), (4, 32_000), jnp.float32)
    ts = np.array([0.5, 1.0, 4.0, 16.0], np.float32)
    temperature = np.float32(0.7)
    target = closed_form_log_p(False, logits, temperature, [1.0])  # softmax(s/T)
    printed = {}
    for name, entropic in (("Replicator", False), ("EntropicReplicator", True)):
        m = re.search(
            rf"^{name} KL to softmax: \[([^\]]*)\] top-1 mass: \[([^\]]*)\]$",
            stdout,
            re.MULTILINE,
        )
        assert m, f"no {name} line in:\n{stdout}"
        kl, top = _floats(m.group(1)), _floats(m.group(2))
        log_p = closed_form_log_p(entropic, logits, temperature, ts)
        p = np.exp(log_p)
        with np.errstate(invalid="ignore"):
            terms = np.where(p > 0, p * (log_p - target), 0)
        expected_kl = np.mean(np.sum(terms, -1), 0)
        expected_top = np.mean(np.max(p, -1), 0)
        np.testing.assert_allclose(
            kl, expected_kl, rtol=PRINTED_RTOL, atol=PRINTED_ATOL
        )
        np.testing.assert_allclose(top, expected_top, rtol=PRINTED_RTOL)
        printed[name] = kl, top
    # The README's claim in numbers: (R) meets softmax(s/T) at t = 1 and leaves it for
    # the argmax; (E) reaches it and stays, with the same top-1 mass (R) had at t = 1.
    (kl_r, top_r), (kl_e, top_e) = printed["Replicator"], printed["EntropicReplicator"]
    assert kl_r[1] <= PRINTED_ATOL and kl_r[3] > 0.5
    assert np.all(np.diff(top_r) > 0) and top_r[3] > 0.95
    assert np.all(np.diff(kl_e) < 0) and kl_e[3] <= PRINTED_ATOL
    assert top_e[3] == pytest.approx(top_r[1], rel=PRINTED_RTOL)
    assert re.search(r"^d entropy / d logits: \(4, 32000\)$", stdout, re.MULTILINE)


def _nucleus_size(logits, temperature, top_p):
    # Smallest number of most likely tokens of softmax(s/T) with mass >= top_p.
    p = np.exp(closed_form_log_p(False, logits, temperature, [1.0]))[0]
    mass = np.cumsum(np.sort(p)[::-1])
    return int(np.searchsorted(mass, np.longdouble(top_p))) + 1


def check_faces(stdout):
    # The example's input, rebuilt the way it builds it (float32 Zipf row, keys 0, 1).
    vocab = 2_000
    ranks = jnp.arange(1, vocab + 1, dtype=jnp.float32)
    noise = jax.random.normal(jax.random.key(0), (vocab,), jnp.float32)
    logits = -1.3 * jnp.log(ranks) + 0.5 * noise
    logits = jax.random.permutation(jax.random.key(1), logits)
    temperatures = np.array([0.3, 0.5, 0.7, 1.0, 1.3, 1.7], np.float32)

    m = re.search(r"^temperature: +\[([^\]]*)\]$", stdout, re.MULTILINE)
    assert m, stdout
    np.testing.assert_array_equal(_floats(m.group(1)).astype(np.float32), temperatures)
    for top_p in (0.5, 0.9):
        m = re.search(
            rf"^top-p {top_p} nucleus size: \[([^\]]*)\]$", stdout, re.MULTILINE
        )
        assert m, stdout
        expected = [_nucleus_size(logits, T, top_p) for T in temperatures]
        assert _sizes(m.group(1)) == expected
        assert expected == sorted(expected)  # grows with T (THEORY §3)
    face = _nucleus_size(logits, np.float32(1.0), 0.9)

    sections = re.split(r"\n\n", stdout.strip())[1:]
    assert len(sections) == 2, stdout
    names = ("EntropicReplicator", "Replicator")
    for section, name in zip(sections, names, strict=True):
        lines = section.splitlines()
        m = re.match(
            rf"^{name} at T=1\.0, TopP\(0\.9\): face of (\d+) tokens; (\d+) switches"
            r"(?:, from t = ([\d.]+) to t = ([\d.]+); final face (\d+))?$",
            lines[0],
        )
        assert m, lines[0]
        assert int(m.group(1)) == face
        switches = int(m.group(2))
        rows = np.array([[float(x) for x in line.split()] for line in lines[2:]])
        assert rows.shape == (9, 3), section
        ts, sizes, gaps = rows.T
        np.testing.assert_array_equal(ts, np.arange(0.0, 9.0))
        assert sizes[0] == face
        if name == "EntropicReplicator":
            # From uniform (E) never leaves its face: the switched path is the fixed
            # one, up to float32 round-off.
            assert switches == 0 and m.group(3) is None
            assert np.all(sizes == face)
            assert np.all(gaps <= PRINTED_ATOL)
        else:
            # (R) passes softmax(s/T) at t = 1 and then sheds tokens down to one.
            assert switches == face - 1
            assert 1.0 < float(m.group(3)) < float(m.group(4)) < 8.0
            assert int(m.group(5)) == 1
            assert np.all(np.diff(sizes) <= 0) and sizes[-1] == 1
            assert np.all(gaps[ts <= 1] <= PRINTED_ATOL)
            assert np.all(gaps[ts >= 2] > 1e-3)


CHECKERS = {"quickstart.py": check_quickstart, "faces.py": check_faces}


def test_examples_exist():
    assert EXAMPLES, "no examples found"
    # A new example needs a checker of what it prints.
    assert sorted(p.name for p in EXAMPLES) == sorted(CHECKERS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, tmp_path):
    # The examples run against this checkout's replicax, whatever is installed.
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    pythonpath = os.pathsep.join(p for p in paths if p)
    out = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    CHECKERS[path.name](out.stdout)
    # Figures: an example that saves one (a ".png" in its source) must write it, and
    # whatever it writes must be a real, non-empty PNG.
    pngs = sorted(tmp_path.rglob("*.png"))
    if ".png" in path.read_text():
        assert pngs, f"{path.name} wrote no PNG"
    for png in pngs:
        data = png.read_bytes()
        assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE), png
