"""Every example runs as a script (under a minute on a CPU) and prints what it says.

Each example has a checker below that reads its output and compares the key figures
with a computation of its own (longdouble closed forms, a numpy top-p rule), and any
PNG an example writes must be a non-empty PNG file.
"""

import json
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


def _verdict(line):
    m = re.search(
        r"(cycle|rest|decaying|growing)  period +(\S+)  amplitude (\S+)  "
        r"amplitude ratio (\S+)$",
        line,
    )
    assert m, line
    return m.group(1), *(float(x) for x in m.groups()[1:])


def _line(stdout, pattern):
    m = re.search(pattern, stdout, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{stdout}"
    return m


def check_loops(stdout):
    # Every expected figure is recomputed here from the parameters the example prints.
    # The Hopf period: the acceptance tolerance (the cycle at 0.95 T_c is past onset).
    PERIOD_RTOL = 0.05
    THRESHOLD_RTOL = 0.03  # the acceptance tolerance on alpha_c
    ENERGY_RTOL = 1e-6  # relative drift of the Hamiltonian under (R), float64
    GAP_ATOL = 1e-6  # (E) count gaps at t = 300, decayed like e^{-t}

    # 1. Rock-paper-scissors under (E): T_c = (l - w)/6, onset period 2π T_c / ω₀.
    m = _line(
        stdout,
        r"^1\. rock-paper-scissors \(l=(\S+), w=(\S+)\) under \(E\): "
        r"T_c = (\S+), onset period .* = (\S+)$",
    )
    l, w, T_c, onset = (float(x) for x in m.groups())
    assert T_c == pytest.approx((l - w) / 6, rel=1e-6)
    expected_onset = 2 * np.pi * (l - w) / 6 / ((l + w) * np.sqrt(3) / 6)
    assert onset == pytest.approx(expected_onset, rel=1e-6)
    above = _verdict(_line(stdout, r"^  T = 1\.05 T_c: .*$").group(0))
    below = _verdict(_line(stdout, r"^  T = 0\.95 T_c: .*$").group(0))
    assert above[0] == "decaying" and above[3] < 0.5  # a spiral into the centre
    assert below[0] == "cycle" and below[2] > 0.05  # a limit cycle of finite size
    assert below[1] == pytest.approx(expected_onset, rel=PERIOD_RTOL)

    # 2. Fading two-stage memory under (R): alpha_c = 2 V T / tau, period 2π tau.
    m = _line(
        stdout,
        r"^2\. fading two-stage .*\(V=(\d+), T=(\S+), tau=(\S+)\): "
        r"alpha_c = (\S+), onset period 2π tau = (\S+)$",
    )
    V, T, tau, alpha_c, onset = (float(x) for x in m.groups())
    assert alpha_c == pytest.approx(2 * V * T / tau, rel=1e-6)
    assert onset == pytest.approx(2 * np.pi * tau, rel=1e-6)
    rows = re.findall(r"^  alpha = (\S+) alpha_c: (.*)$", stdout, re.MULTILINE)
    assert len(rows) >= 2, stdout
    for factor, rest in rows:
        kind, period, _, _ = _verdict(rest)
        assert kind == ("decaying" if float(factor) < 1 else "growing"), rest
        if 1 < float(factor) <= 1.05:  # just past onset
            assert period == pytest.approx(2 * np.pi * tau, rel=PERIOD_RTOL)
    m = _line(stdout, r"^  measured alpha_c: (\S+) \(theory (\S+),")
    assert float(m.group(2)) == pytest.approx(2 * V * T / tau, rel=1e-6)
    assert float(m.group(1)) == pytest.approx(2 * V * T / tau, rel=THRESHOLD_RTOL)

    # 3. Cumulative counts: conserved energy and undamped loops under (R); damping to
    # count gaps (s_i - s_j)/alpha under (E).
    m = _line(
        stdout,
        r"^3\. cumulative frequency penalty \(alpha=(\S+), T=(\S+), "
        r"s=\[([^\]]*)\]\)$",
    )
    alpha, s = float(m.group(1)), _floats(m.group(3))
    kind, _, amplitude, ratio = _verdict(
        _line(stdout, r"^  \(R\): +\w+  period.*$").group(0)
    )
    assert kind != "rest" and amplitude > 0.1 and ratio == pytest.approx(1, abs=0.05)
    drift = float(_line(stdout, r"^  \(R\): energy relative drift .*: (\S+)$").group(1))
    assert drift <= ENERGY_RTOL
    kind, _, _, _ = _verdict(_line(stdout, r"^  \(E\): +\w+  period.*$").group(0))
    assert kind == "rest"
    m = _line(stdout, r"^  \(E\): energy (\S+) -> (\S+)$")
    assert float(m.group(2)) < float(m.group(1))
    m = _line(stdout, r"^  \(E\): count gaps .*: (\S+) (\S+)  theory .*: (\S+) (\S+)$")
    gaps, theory = _floats(" ".join(m.groups()[:2])), _floats(" ".join(m.groups()[2:]))
    expected = (s[0] - s[1:]) / alpha
    np.testing.assert_allclose(theory, expected, atol=1e-6)
    np.testing.assert_allclose(gaps, expected, atol=GAP_ATOL)
    assert re.search(r"^wrote loops\.png$", stdout, re.MULTILINE)


def check_lock_in(stdout):
    # The saddle and the folds are recomputed here from the printed parameters.
    SADDLE_ATOL = 1e-3  # the acceptance tolerance; the fine grid resolves 3.5e-5
    FOLD_ATOL = 1e-3  # the acceptance tolerance; the fine grid resolves 1.9e-5

    # 1. (R): the measured separatrix is x* = (1 + δ/β)/2.
    m = _line(stdout, r"^1\. \(R\), beta=(\S+), T=(\S+): separatrix")
    beta = float(m.group(1))
    m = _line(stdout, r"^  (\d+) starts in two batches; settled: (\d+)$")
    assert m.group(1) == m.group(2)  # every start of (R) came to rest
    rows = re.findall(
        r"^ +(\S+) +(\S+) +(\S+) +(\S+) +(\S+)  (one switch|NOT ONE SWITCH)$",
        stdout,
        re.MULTILINE,
    )
    assert len(rows) == 3, stdout
    for delta, measured, x_star, _, _, once in rows:
        expected = (1 + float(delta) / beta) / 2
        assert float(x_star) == pytest.approx(expected, abs=1e-6)
        assert once == "one switch"
        assert abs(float(measured) - expected) <= SADDLE_ATOL

    # 2. (E): the folds at ±δ_fold, δ_fold = β u_f - 2T artanh(u_f), u_f = √(1 - 2T/β).
    m = _line(stdout, r"^2\. \(E\), beta=(\S+), T=(\S+) \(bistable")
    beta, T = float(m.group(1)), float(m.group(2))
    assert beta > 2 * T
    u_f = np.sqrt(1 - 2 * T / beta)
    delta_fold = beta * u_f - 2 * T * np.arctanh(u_f)
    m = _line(stdout, r"^  fold delta_fold theory: (\S+)$")
    assert float(m.group(1)) == pytest.approx(delta_fold, abs=1e-6)
    m = _line(stdout, r"^  up the sweep .*kept up to (\S+), error \S+, grid step \S+$")
    assert abs(float(m.group(1)) - delta_fold) <= FOLD_ATOL
    m = _line(
        stdout, r"^  down the sweep .*kept down to (\S+), error \S+, grid step \S+$"
    )
    assert abs(float(m.group(1)) + delta_fold) <= FOLD_ATOL
    # Hysteresis on the coarse map (δ step 0.02): the window between the folds.
    m = _line(stdout, r"^  hysteresis: .*delta in \[(\S+), (\S+)\]$")
    assert float(m.group(1)) == pytest.approx(-delta_fold, abs=0.02)
    assert float(m.group(2)) == pytest.approx(delta_fold, abs=0.02)
    assert re.search(r"^wrote lock_in\.png$", stdout, re.MULTILINE)


def check_sensitivity(stdout):
    # The example's input, rebuilt: the flip margin of constant logits under (E) from
    # uniform is half the gap between the two top logits (L∞), the token the argmax.
    import replicax as rx

    logits = np.asarray(rx.datasets.synthetic_logits(0, 8, 32_000), np.float64)
    order = np.argsort(logits, axis=-1)
    lines = re.findall(
        r"^context (\d+): token (\d+) margin (\S+) half-gap \S+ rival (\d+) "
        r"converged (\w+) rivals (.*)$",
        stdout,
        re.M,
    )
    assert len(lines) == 8
    for i, token, margin, rival, converged, rivals in lines:
        i = int(i)
        top, second = order[i, -1], order[i, -2]
        assert int(token) == top and int(rival) == second and converged == "True"
        gap = logits[i, top] - logits[i, second]
        assert abs(float(margin) - gap / 2) <= 1e-6 * gap
        # Every rival's margin is its own half-gap, rivals by probability at t1.
        pairs = [r.split(":") for r in rivals.split()]
        assert [int(j) for j, _ in pairs] == list(order[i, -2:-6:-1])
        for j, m in pairs:
            assert abs(float(m) - (logits[i, top] - logits[i, int(j)]) / 2) <= 1e-5
    # The equilibrium: p = softmax((s + beta p)/T) from the printed numbers, and the
    # Jacobian formula's residual printed by the script.
    beta, T = (float(x) for x in re.search(r"beta (\S+), T (\S+):", stdout).groups())
    p = _floats(re.search(r"^equilibrium p: (.*)$", stdout, re.M).group(1))
    s = _floats(re.search(r"^logits s: (.*)$", stdout, re.M).group(1))
    z = (s + beta * p) / T
    np.testing.assert_allclose(p, np.exp(z - z.max()) / np.exp(z - z.max()).sum(),
                               rtol=1e-10)
    error = float(re.search(r"\(I - beta G/T\)\^-1 G/T\| = (\S+)", stdout).group(1))
    assert error <= 1e-10
    assert "stable True" in stdout


def _repeated_ngrams(tokens, n):
    # Positions whose n-gram already occurred at an earlier position.
    grams = [tuple(tokens[j : j + n]) for j in range(len(tokens) - n + 1)]
    return sum(g in grams[:j] for j, g in enumerate(grams))


def _cycle_length(tokens, window):
    # The smallest period p <= window // 2 of the last `window` tokens, else 0.
    tail = tokens[len(tokens) - window :]
    for p in range(1, window // 2 + 1):
        if all(tail[i] == tail[i - p] for i in range(p, window)):
            return p
    return 0


def check_real_model(stdout):
    # THEORY §1 on a real decoding loop: (R) at t = 1 passes (E)'s limit softmax(s/T)
    # (float64 round-off of the two closed forms); (R) later is sharper, entropy below
    # (E)'s at every step; KL >= 0. The loop detector is recounted from the tokens.
    PASS_ATOL = 1e-6
    m = _line(stdout, r"^model: .*TopK\((\d+)\).*vocab (\d+)$")
    top_k, vocab = int(m.group(1)), int(m.group(2))
    m = _line(stdout, r"^\(R\) at t1 = 1 vs \(E\) limit: max \|p_R - p_E\| = (\S+)$")
    assert float(m.group(1)) <= PASS_ATOL
    sections = re.split(r"\n\nprompt \d+: ", stdout)[1:]
    assert len(sections) == 3, stdout
    for section in sections:
        fields = dict(
            line.split(": ", 1) for line in section.splitlines()[1:] if ": " in line
        )
        tokens = _sizes(fields["tokens"])
        assert tokens and all(0 <= t < vocab for t in tokens)
        entropy_e = _floats(fields["entropy E"])
        entropy_r = _floats(fields["entropy R(t1=3)"])
        kl = _floats(fields["KL(R(t1=3) || E)"])
        assert len(entropy_e) == len(entropy_r) == len(kl) == len(tokens)
        assert np.all((entropy_e >= 0) & (entropy_e <= np.log(top_k) + 1e-4))
        assert np.all(entropy_r < entropy_e) and np.all(kl > 0)
        m = re.match(
            r"repeated trigrams (\d+), cycle length (\d+)$", fields["loop detector"]
        )
        assert m, section
        assert int(m.group(1)) == _repeated_ngrams(tokens, 3)
        assert int(m.group(2)) == _cycle_length(tokens, len(tokens))
    assert re.search(r"^wrote real_model\.png$", stdout, re.MULTILINE)


def check_sharded(stdout):
    # Several devices (8 simulated CPU ones here); the entropy path of context 0 against
    # the longdouble closed form; every sharded result within the 1e-6 of one
    # device (float32), on the inputs' sharding; the sampled tokens equal.
    SHARDED_TOL = 1e-6
    m = _line(stdout, r"^devices: (\d+) \((\w+)\), mesh b=(\d+) v=(\d+)$")
    devices, batch_axis, vocab_axis = int(m.group(1)), int(m.group(3)), int(m.group(4))
    assert devices > 1 and batch_axis * vocab_axis == devices
    m = _line(stdout, r"^entropy of context 0 at t = \[([^\]]*)\] : (.*)$")
    ts = np.array([float(x) for x in m.group(1).split(",")])
    keys = jax.random.split(jax.random.key(0), 6)
    logits = 3.0 * jax.random.normal(keys[5], (1, 32_000), jnp.float32)
    log_p = closed_form_log_p(False, np.asarray(logits), np.float32(0.7), ts)[0]
    p = np.exp(log_p)
    entropy = -np.sum(np.where(p > 0, p * log_p, 0), axis=-1)
    np.testing.assert_allclose(
        _floats(m.group(2)), entropy.astype(float), rtol=PRINTED_RTOL, atol=PRINTED_ATOL
    )
    m = _line(stdout, r"^solve: entropy (\S+) from one device, sharded (.*)$")
    assert float(m.group(1)) <= SHARDED_TOL and m.group(2) == "('b', None)"
    m = _line(stdout, r"^solve: gradient (\S+) from one device, sharded (.*)$")
    assert float(m.group(1)) <= SHARDED_TOL and m.group(2) == "('b', 'v')"
    m = _line(
        stdout,
        r"^generate: tokens equal to one device: (\w+); log_prob and entropy (\S+) "
        r"from one device; tokens sharded (.*), hidden state (.*)$",
    )
    assert m.group(1) == "True" and float(m.group(2)) <= SHARDED_TOL
    assert m.group(3) == m.group(4) == "('b', None)"
    m = _line(stdout, r"^generate: mean entropy per step: (.*)$")
    entropy = _floats(m.group(1))
    assert entropy.size == 12 and np.all((entropy > 0) & (entropy < np.log(32_000)))
    m = _line(
        stdout, r"^generate: gradient of the NLL (\S+) from one device, sharded (.*)$"
    )
    assert float(m.group(1)) <= SHARDED_TOL and m.group(2) == "(None, 'v')"


def check_paper_claims(stdout):
    # The verdicts are THEORY §1's table (the claims list of `replicax check`); each
    # printed verdict line must equal the table's "measured" column and THEORY's.
    from replicax._check import CLAIMS

    verdicts = dict(
        re.findall(r"^claim (\w+): (R (?:holds|fails), E (?:holds|fails))$", stdout,
                   re.MULTILINE)
    )
    assert list(verdicts) == [c.key for c in CLAIMS], stdout
    for claim in CLAIMS:
        expected = (
            f"R {'holds' if claim.holds_r else 'fails'}, "
            f"E {'holds' if claim.holds_e else 'fails'}"
        )
        assert verdicts[claim.key] == expected, claim.key
    rows = [line for line in stdout.splitlines() if line.strip().endswith(" ok")]
    assert len(rows) == len(CLAIMS), stdout
    assert "MISMATCH" not in stdout
    assert re.search(r"^agrees with THEORY: True$", stdout, re.MULTILINE)


CHECKERS = {
    "real_model.py": check_real_model,
    "paper_claims.py": check_paper_claims,
    "sensitivity.py": check_sensitivity,
    "quickstart.py": check_quickstart,
    "faces.py": check_faces,
    "loops.py": check_loops,
    "lock_in.py": check_lock_in,
    "sharded.py": check_sharded,
}


def test_examples_exist():
    assert EXAMPLES, "no examples found"
    # A new example needs a checker of what it prints.
    assert sorted(p.name for p in EXAMPLES) == sorted(CHECKERS)


# Examples run in-process by another test file, next to the test that compiles the same
# program (so that it is compiled once): paper_claims.py in tests/test_cli_check.py.
RUN_ELSEWHERE = ("paper_claims.py",)


# The examples run as scripts (`__main__`, each in a working folder of its own) in one
# Python process, rather than one process each: Python, JAX, replicax, matplotlib and
# torch start once instead of once per example (about 3 CPU seconds each). An example
# that switches float64 on (a global JAX setting) runs after those that do not, so that
# each sees the configuration it would see alone.
RUNNER = """
import contextlib, io, json, os, runpy, sys, traceback

out = {}
for path, folder in json.loads(sys.argv[1]):
    stdout, stderr = io.StringIO(), io.StringIO()
    sys.argv = [path]
    os.chdir(folder)
    ok = True
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exit:
            ok = exit.code in (None, 0)
        except BaseException:
            traceback.print_exc()
            ok = False
    out[path] = dict(ok=ok, stdout=stdout.getvalue(), stderr=stderr.getvalue())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def example_runs(request, tmp_path_factory):
    # The examples whose test was collected (all, unless a selection was made).
    selected = {
        item.callspec.params["path"]
        for item in request.session.items
        if item.originalname == "test_example_runs"
    }
    paths = [p for p in EXAMPLES if p in selected]
    paths.sort(key=lambda p: "jax_enable_x64" in p.read_text())  # float64 last
    folders = {p.name: tmp_path_factory.mktemp(p.stem) for p in paths}
    # The examples run against this checkout's replicax, whatever is installed.
    pythonpath = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            json.dumps([(str(p), str(folders[p.name])) for p in paths]),
        ],
        cwd=tmp_path_factory.mktemp("runner"),
        env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=300 * len(paths),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.splitlines()[-1])
    return {pathlib.Path(p).name: (run, folders[pathlib.Path(p).name])
            for p, run in runs.items()}


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if p.name not in RUN_ELSEWHERE], ids=lambda p: p.name
)
def test_example_runs(path, example_runs):
    run, folder = example_runs[path.name]
    assert run["ok"], run["stderr"][-3000:]
    CHECKERS[path.name](run["stdout"])
    # Figures: an example that saves one (a ".png" in its source) must write it, and
    # whatever it writes must be a real, non-empty PNG.
    pngs = sorted(folder.rglob("*.png"))
    if ".png" in path.read_text():
        assert pngs, f"{path.name} wrote no PNG"
    for png in pngs:
        data = png.read_bytes()
        assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE), png
