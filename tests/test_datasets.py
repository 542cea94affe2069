"""`replicax.datasets`: synthetic logits and `.npy` logits files."""

import re

import numpy as np
import pytest
import replicax as rx


def test_synthetic_logits_values():
    # Pinned values: the generator must not drift (the demo's table depends on it). They
    # were computed without x64 and the tests run with it, so this also checks that x64
    # mode changes nothing. The tolerance allows for transcendental functions rounding
    # differently on another backend or CPU, relative to the logits' scale: a logit
    # near 0 is a difference of terms of order 1 (on an Intel CPU the entry 0.0525
    # came out 6e-8 away, 1.1e-6 of itself, after passing on an AMD one).
    rtol = 1e-6
    atol = rtol * 5.0  # the largest |logit| here is 4.8
    expected = [
        [-2.5998029708862305, -1.751626968383789, -3.223798990249634,
         0.05252420902252197, -1.3646042346954346],
        [3.7606019973754883, 4.013967037200928, 4.824844837188721,
         2.8865785598754883, 4.253705024719238],
    ]  # fmt: skip
    logits = rx.datasets.synthetic_logits(0, batch=2, vocab=5)
    assert logits.shape == (2, 5) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, np.float32(expected), rtol=rtol, atol=atol)


def test_synthetic_logits_deterministic_and_peaked():
    # The demo's size (8 x 32000), so that the compiled generator is reused.
    a = rx.datasets.synthetic_logits(0)
    b = rx.datasets.synthetic_logits(0)
    c = rx.datasets.synthetic_logits(1)
    assert a.shape == (8, 32_000) and a.dtype == np.float32
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A few tokens dominate: the top 10 of 32000 hold most of the mass.
    p = np.exp(a - a.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top10 = np.sort(p, axis=1)[:, -10:].sum(axis=1)
    assert np.median(top10) > 0.5


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype=np.int64),
        np.linspace(-3.0, 2.0, 6),
        np.ones((3, 6), np.float16),
        np.array([[0.0, -np.inf, 1.0, 2.0, 3.0, 4.0]]),  # -inf masks a token
    ],
)
def test_load_logits_shapes(tmp_path, array):
    path = tmp_path / "l.npy"
    np.save(path, array)
    for where in (path, str(path)):
        logits = rx.datasets.load_logits(where)
        assert logits.shape == (array.size // 6, 6) and logits.dtype == np.float32
        np.testing.assert_array_equal(logits, np.atleast_2d(array).astype(np.float32))


def _save(array):
    return lambda path: np.save(path, array)


def _with(index, value):
    logits = np.zeros((2, 50), np.float32)
    logits[index] = value
    return _save(logits)


def _npz(path):
    with open(path, "wb") as f:
        np.savez(f, a=np.zeros(3), b=np.ones(3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("not a .npy file\n"), r"cannot read .* as a \.npy"),
        (lambda p: p.write_bytes(b""), r"cannot read .* as a \.npy array"),
        (_npz, r"holds several arrays \(\.npz\)"),
        (_save(np.array(["a", "b"])), r"has dtype <U1; logits must be real numbers"),
        (_save(np.array([1j, 2.0])), r"has dtype complex128; logits must be real"),
        (_save(np.zeros((2, 3, 5))), r"has shape \(2, 3, 5\); .* \(V,\) or \(B, V\)"),
        (_save(np.zeros(())), r"has shape \(\); .* \(V,\) or \(B, V\)"),
        (_save(np.zeros((0, 5))), r"has shape \(0, 5\); .* at least one context"),
        (_save(np.zeros((3, 1))), r"has shape \(3, 1\); .* at least 2 tokens"),
        (_with((1, 3), np.nan), r"contains NaN \(first at row 1, token 3; 1 bad"),
        (_with((0, 7), np.inf), r"contains \+inf \(first at row 0, token 7.*-inf to"),
        (_with(1, -np.inf), r"row 1 of .* is all -inf"),
    ],
)
def test_load_logits_errors(tmp_path, make, message):
    path = tmp_path / "bad.npy"
    make(path)
    with pytest.raises(ValueError, match=message) as info:
        rx.datasets.load_logits(path)
    text = str(info.value)
    assert "\n" not in text
    assert re.search(re.escape(str(path)), text)


def test_load_logits_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "no.npy"))):
        rx.datasets.load_logits(tmp_path / "no.npy")
    with pytest.raises(OSError):
        rx.datasets.load_logits(tmp_path)  # a folder
