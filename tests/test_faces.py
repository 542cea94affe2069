"""Faces of the simplex (THEORY §3) against Hugging Face `transformers`' logits warpers.

The references are the real warpers (`TemperatureLogitsWarper` first, then top-k, top-p,
min-p, typical, epsilon, eta), run by torch in float32 on the same float32 logits. Two
facts about the reference are handled explicitly rather than by loosening tolerances:

- `torch.sort` (used by `TopPLogitsWarper` and `TypicalLogitsWarper`) is not stable and
  `torch.topk` (used by `MinPLogitsWarper` for `min_tokens_to_keep`) does not pick the
  lowest index among ties. When a run of tied logits straddles the top-p boundary,
  transformers keeps an arbitrary (but deterministic) subset of the tied tokens;
  replicax breaks ties by index (a stable sort). So replicax is compared with the
  warpers run with a stable `torch.sort` / `torch.topk` on every row, and with the stock
  warpers on every row up to a permutation of tied tokens (the same face on every row
  without a split run of ties).
- torch's float32 CPU softmax over 50,257 tokens is itself off by up to ~2e-6 from the
  exact softmax of the same float32 scores (its float32 normaliser), so the softmax of
  the warped float32 scores is taken in float64. The face (which tokens survive) is what
  transformers decides, in float32, and it is compared exactly.
"""

import contextlib
import functools
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

import replicax as rx
from replicax import _solve

from .helpers import FLOWS

RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)
TOL32 = 1e-6  # max abs error of probabilities, float32
TOL64 = 1e-12  # float64
TEMPERATURES = (0.3, 0.7, 1.0, 1.5)
SMALL_V = 37
LARGE_V = 50_257
METHODS = ("exact", "ode")


# --------------------------------------------------------------------------------------
# Test data and the transformers reference


def _logit_rows(seed: int, vocab: int, kinds: tuple[str, ...]) -> np.ndarray:
    """float32 logits, one row per kind: "plain" (distinct values), "ties" (rounded to
    a grid of 1.0, so that many values repeat) and/or "masked" (~30% `-inf`)."""
    rng = np.random.default_rng(seed)
    rows = []
    for kind in kinds:
        x = 3.0 * rng.standard_normal(vocab)
        if "ties" in kind:
            x = np.round(x)
        if "masked" in kind:
            masked = rng.random(vocab) < 0.3
            masked[np.argmax(x)] = False
            x[masked] = -np.inf
        rows.append(x.astype(np.float32))
    return np.stack(rows)


SMALL_KINDS = ("plain", "plain", "ties", "ties", "masked", "ties masked")
LARGE_KINDS = ("plain", "ties masked")


@contextlib.contextmanager
def _stable_torch_sort():
    """`torch.sort` / `torch.topk` that break ties by index (lowest first among equal
    values), as `jnp.argsort(stable=True)` and `jax.lax.top_k` do."""
    sort, topk = torch.sort, torch.topk

    def stable_sort(input, dim=-1, descending=False, stable=False, **kwargs):
        del stable
        return sort(input, dim=dim, descending=descending, stable=True, **kwargs)

    def stable_topk(input, k, dim=-1, largest=True, sorted=True):
        del sorted
        values, indices = sort(input, dim=dim, descending=largest, stable=True)
        return torch.return_types.topk(
            (values.narrow(dim, 0, k), indices.narrow(dim, 0, k))
        )

    torch.sort, torch.topk = stable_sort, stable_topk
    try:
        yield
    finally:
        torch.sort, torch.topk = sort, topk


def _hf_scores(logits, processors, *, stable=False, dtype=np.float32) -> np.ndarray:
    """The scores a `LogitsProcessorList` of transformers warpers leaves, computed by
    torch in `dtype` (float32 unless asked)."""
    scores = torch.tensor(np.asarray(logits, dtype))
    input_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    with _stable_torch_sort() if stable else contextlib.nullcontext():
        out = LogitsProcessorList(processors)(input_ids, scores)
    assert out.dtype == scores.dtype
    return out.numpy()


def _softmax64(scores) -> np.ndarray:
    """The exact softmax of float32 scores (may hold `-inf`), in float64."""
    return scipy.special.softmax(np.asarray(scores, np.float64), axis=-1)


@dataclass(frozen=True)
class Family:
    """A replicax support and the transformers warper(s) it mirrors, over a parameter
    grid. `params(V)` gives tuples (one value per parameter); `to_rx(arrays, m)` builds
    the support from one array per parameter (one value per row) and
    `min_tokens_to_keep=m`; `to_hf(values, m)` builds the warpers for one tuple."""

    name: str
    params: Callable[[int], list[tuple]]
    to_rx: Callable
    to_hf: Callable
    sorts: bool  # the warper uses torch.sort / torch.topk indices (tie order matters)


FAMILIES = {
    "top_k": Family(
        "top_k",
        lambda V: [(1,), (5,), (50,), (V,)],
        lambda a, m: rx.TopK(a[0].astype(np.int32), min_tokens_to_keep=m),
        lambda v, m: [TopKLogitsWarper(int(v[0]), min_tokens_to_keep=m)],
        False,
    ),
    "top_p": Family(
        "top_p",
        lambda V: [(0.1,), (0.5,), (0.9,), (0.99,), (1.0,)],
        lambda a, m: rx.TopP(a[0], min_tokens_to_keep=m),
        lambda v, m: [TopPLogitsWarper(v[0], min_tokens_to_keep=m)],
        True,
    ),
    "min_p": Family(
        "min_p",
        lambda V: [(0.01,), (0.1,), (0.5,)],
        lambda a, m: rx.MinP(a[0], min_tokens_to_keep=m),
        lambda v, m: [MinPLogitsWarper(v[0], min_tokens_to_keep=m)],
        True,
    ),
    "typical": Family(
        "typical",
        lambda V: [(0.2,), (0.9,)],
        lambda a, m: rx.Typical(a[0], min_tokens_to_keep=m),
        lambda v, m: [TypicalLogitsWarper(v[0], min_tokens_to_keep=m)],
        True,
    ),
    "epsilon": Family(
        "epsilon",
        lambda V: [(3e-4,), (1e-2,)],
        lambda a, m: rx.Epsilon(a[0], min_tokens_to_keep=m),
        lambda v, m: [EpsilonLogitsWarper(v[0], min_tokens_to_keep=m)],
        False,
    ),
    "eta": Family(
        "eta",
        lambda V: [(3e-4,), (1e-2,)],
        lambda a, m: rx.Eta(a[0], min_tokens_to_keep=m),
        lambda v, m: [EtaLogitsWarper(v[0], min_tokens_to_keep=m)],
        False,
    ),
    # A list of supports, applied in order as a LogitsProcessorList applies warpers.
    "top_k+top_p": Family(
        "top_k+top_p",
        lambda V: [(5, 0.9), (50, 0.5), (50, 0.9), (V, 0.99)],
        lambda a, m: [
            rx.TopK(a[0].astype(np.int32), min_tokens_to_keep=m),
            rx.TopP(a[1], min_tokens_to_keep=m),
        ],
        lambda v, m: [
            TopKLogitsWarper(int(v[0]), min_tokens_to_keep=m),
            TopPLogitsWarper(v[1], min_tokens_to_keep=m),
        ],
        True,
    ),
}


@dataclass
class Grid:
    """Every (logit row, temperature, parameters) combination, one batch row each."""

    logits: np.ndarray  # (rows, V) float32
    temperature: np.ndarray  # (rows,) float32
    params: list[tuple]  # one tuple per row
    kind: list[str]  # the logit row's kind, per row

    @property
    def has_ties(self) -> np.ndarray:
        return np.array(["ties" in k for k in self.kind])


def _grid(logits: np.ndarray, kinds, params, temperatures=TEMPERATURES) -> Grid:
    combos = list(itertools.product(range(len(logits)), temperatures, params))
    return Grid(
        logits=np.stack([logits[i] for i, _, _ in combos]),
        temperature=np.array([T for _, T, _ in combos], np.float32),
        params=[p for _, _, p in combos],
        kind=[kinds[i] for i, _, _ in combos],
    )


def _param_arrays(grid: Grid) -> list[np.ndarray]:
    return [np.array([p[j] for p in grid.params]) for j in range(len(grid.params[0]))]


def _reference(
    grid: Grid,
    family: Family,
    m: int,
    *,
    temperature_first=True,
    stable,
    only=None,
    dtype=np.float32,
):
    """transformers' warped scores (torch in `dtype`) for every row of the grid (or the
    rows `only`), one call per (temperature, parameters) group."""
    out = np.full(grid.logits.shape, np.nan, dtype)
    groups = sorted(set(zip(grid.temperature.tolist(), grid.params, strict=True)))
    for T, p in groups:
        rows = [
            i
            for i, (Ti, pi) in enumerate(
                zip(grid.temperature.tolist(), grid.params, strict=True)
            )
            if Ti == T and pi == p and (only is None or i in only)
        ]
        if not rows:
            continue
        temperature = TemperatureLogitsWarper(float(T))
        warpers = family.to_hf(p, m)
        processors = (
            [temperature, *warpers] if temperature_first else [*warpers, temperature]
        )
        out[rows] = _hf_scores(
            grid.logits[rows], processors, stable=stable, dtype=dtype
        )
    return out


class _References(tuple):
    """`(stock, stable)`: transformers' float32 scores for a grid (`stable`: ties
    broken by index), and `exact(rows)`: its scores on those rows with torch in
    float64 (ties by index), asked for only where a face differs."""

    def __new__(cls, stock, stable, exact):
        references = super().__new__(cls, (stock, stable))
        references.exact = exact
        return references


def _references(grid: Grid, family: Family, m: int, *, temperature_first=True):
    """The `_References` of a grid."""
    kw = dict(temperature_first=temperature_first)
    stock = _reference(grid, family, m, stable=False, **kw)
    stable = _reference(grid, family, m, stable=True, **kw) if family.sorts else stock

    def exact(rows):
        only = set(rows.tolist())
        out = _reference(
            grid, family, m, stable=True, only=only, dtype=np.float64, **kw
        )
        return out[rows]

    return _References(stock, stable, exact)


def _assert_matches_transformers(log_p, grid: Grid, references):
    """replicax's `log_p` (rows, V) against the warpers' scores. Returns the rows on
    which stock transformers keeps a different subset of a run of tied logits."""
    stock, stable = references
    log_p = np.asarray(log_p)
    assert log_p.shape == grid.logits.shape
    assert not np.any(np.isnan(log_p))
    face = log_p > -np.inf
    p = np.exp(log_p.astype(np.float64))

    # 0. A token whose probability lies within float32 rounding of a warper's
    #    threshold (eta's `min(eta, sqrt(eta) e^-H)` with a float32 entropy H; one
    #    measured 1.4e-6 relative above it) is kept or dropped by how torch and XLA
    #    round on the CPU at hand. Where replicax's face differs from transformers'
    #    float32 one, transformers run in float64 on the same logits decides: it must
    #    keep replicax's face, and is the reference on those rows.
    rounding = np.flatnonzero(np.any(face != (stable > -np.inf), axis=-1))
    if rounding.size:
        exact = references.exact(rounding)
        np.testing.assert_array_equal(
            face[rounding], exact > -np.inf, err_msg="a face differs in float64 too"
        )
        stock, stable = stock.astype(np.float64), stable.astype(np.float64)
        stock[rounding] = stable[rounding] = exact

    # 1. Transformers with ties broken by index: the same face on every row, and the
    #    same distribution to 1e-6.
    np.testing.assert_array_equal(face, stable > -np.inf)
    np.testing.assert_allclose(p, _softmax64(stable), rtol=0, atol=TOL32)

    # 2. Stock transformers: the same face except on rows where torch's unstable sort
    #    kept other members of a run of tied logits; there the kept logit values (a
    #    multiset) and so the sorted probabilities are the same.
    stock_face = stock > -np.inf
    split = np.any(face != stock_face, axis=-1)
    assert not np.any(split & ~grid.has_ties), "a face differs without ties"
    np.testing.assert_allclose(p[~split], _softmax64(stock[~split]), rtol=0, atol=TOL32)
    for i in np.flatnonzero(split):
        kept_rx = np.sort(grid.logits[i][face[i]])
        kept_hf = np.sort(grid.logits[i][stock_face[i]])
        np.testing.assert_array_equal(kept_rx, kept_hf)
        differ = face[i] != stock_face[i]
        # The tokens that one keeps and the other drops are one run of tied logits.
        assert np.unique(grid.logits[i][differ]).size == 1
        np.testing.assert_allclose(
            np.sort(p[i]), np.sort(_softmax64(stock[i])), rtol=0, atol=TOL32
        )
    return split


def _check_all(outputs: dict, grids: dict, references: dict):
    """`outputs[key]` against `references[grids_key]`, naming the output that fails."""
    for key, log_p in outputs.items():
        grid_key = key.split(":")[0]
        assert log_p.dtype == jnp.float32, key
        try:
            _assert_matches_transformers(log_p, grids[grid_key], references[grid_key])
        except AssertionError as error:
            raise AssertionError(f"{key}: {error}") from error


def _args(grid: Grid):
    """A grid as traced arguments: logits, temperatures, one array per parameter."""
    return (
        jnp.asarray(grid.logits),
        jnp.asarray(grid.temperature),
        [jnp.asarray(a) for a in _param_arrays(grid)],
    )


# Each distinct support structure and shape costs one XLA compilation (about a second
# on two CPU cores), so most tests put their replicax calls in one `jax.jit`: the
# supports are then built from traced parameters, as a user's jitted sampler would.


# --------------------------------------------------------------------------------------
# 1. The (E) equilibrium and (R) at t = 1 on the face = softmax after the warpers

# (E) also by `rx.solve` for a long time, for a subset; (R) also at V = 50,257 for one.
# (diffrax on faces: `test_restrict_then_flow_equals_flow_then_restrict` and
# `test_gradients_through_faces`.)
SOLVE_LONG = ("top_p", "typical", "top_k+top_p")
REPLICATOR_LARGE = ("top_k+top_p",)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_matches_transformers(name):
    family = FAMILIES[name]
    grids = {
        "small": _grid(
            _logit_rows(0, SMALL_V, SMALL_KINDS), SMALL_KINDS, family.params(SMALL_V)
        ),
        "large": _grid(
            _logit_rows(1, LARGE_V, LARGE_KINDS), LARGE_KINDS, family.params(LARGE_V)
        ),
    }

    @jax.jit
    def run(small, large):
        out = {}
        for key, (logits, T, params) in (("small", small), ("large", large)):
            support = family.to_rx(params, 1)
            entropic = rx.EntropicReplicator(logits, T)
            replicator = rx.Replicator(logits, T)
            out[f"{key}: (E) limit_log_p"] = rx.limit_log_p(entropic, support=support)
            if key == "small" or name in REPLICATOR_LARGE:
                sol = rx.solve(replicator, t1=1.0, support=support)
                out[f"{key}: (R) solve t1=1"] = sol.log_p[:, 0]
            if key == "small" and name in SOLVE_LONG:
                sol = rx.solve(entropic, t1=40.0, support=support)
                out[f"{key}: (E) solve t1=40"] = sol.log_p[:, 0]
        return out

    outputs = run(_args(grids["small"]), _args(grids["large"]))
    references = {key: _references(grid, family, 1) for key, grid in grids.items()}
    _check_all(outputs, grids, references)
    if name == "top_p":
        small = grids["small"]
        everything = np.array([p == (1.0,) for p in small.params])
        kept = np.asarray(outputs["small: (E) limit_log_p"]) > -np.inf
        np.testing.assert_array_equal(
            kept[everything], np.isfinite(small.logits[everything])
        )


def test_top_p_tie_split_is_index_order():
    # A run of tied logits straddles the top-p boundary: sixteen tokens of probability
    # 1/32 and one of 1/2. top_p = 0.75 keeps the top token and eight of the tied ones.
    # replicax sorts stably (ascending), so it drops the lowest indices first, as
    # transformers does with a stable `torch.sort`. Stock transformers keeps whichever
    # eight its unstable sort puts last (with torch 2.13 on CPU: tokens 0 and 2-8).
    # Either way the distribution is the same up to a permutation of the tied tokens.
    logits = np.array([[0.0] * 16 + [np.log(16)]], np.float32)
    flow = rx.EntropicReplicator(jnp.asarray(logits), 1.0)
    log_p = np.asarray(rx.target_log_p(flow, support=rx.TopP(0.75)))
    np.testing.assert_array_equal(log_p[0] > -np.inf, np.arange(17) >= 8)
    expected = [1 / 24] * 8 + [2 / 3]
    np.testing.assert_allclose(np.exp(log_p[0, 8:]), expected, rtol=0, atol=TOL32)
    stable = _hf_scores(logits, [TopPLogitsWarper(0.75)], stable=True)
    np.testing.assert_array_equal(log_p > -np.inf, stable > -np.inf)
    stock = _hf_scores(logits, [TopPLogitsWarper(0.75)])
    assert np.sum(stock > -np.inf) == 9 and stock[0, 16] > -np.inf
    np.testing.assert_allclose(np.sort(_softmax64(stock)[0])[-9:], expected, rtol=1e-6)


def test_top_p_one_is_accepted_by_transformers():
    # transformers accepts top_p = 1.0 (its constructor rejects only p < 0 or p > 1; it
    # even accepts 0) and then removes the tokens whose ascending cumulative mass is
    # <= 0: only tokens of probability exactly 0 (masked, or underflowed). replicax uses
    # the same rule (the grid of `test_matches_transformers` has top_p = 1.0, and there
    # it keeps every finite logit at V = 37) and rejects top_p = 0.
    TopPLogitsWarper(1.0)
    TopPLogitsWarper(0.0)
    with pytest.raises(ValueError):
        TopPLogitsWarper(1.01)
    with pytest.raises(ValueError, match="top_p"):
        rx.TopP(0.0)


# Strong truncations, so that min_tokens_to_keep = 3 decides the face on many rows.
STRONG = {
    "top_k": [(1,), (2,)],
    "top_p": [(0.1,), (0.5,)],
    "min_p": [(0.5,), (0.1,)],
    "typical": [(0.2,), (0.9,)],
    "epsilon": [(1e-2,), (0.1,)],
    "eta": [(1e-2,), (0.1,)],
    "top_k+top_p": [(1, 0.1), (2, 0.5)],
}


def test_min_tokens_to_keep():
    logits = _logit_rows(5, SMALL_V, SMALL_KINDS)
    grids = {
        name: _grid(logits, SMALL_KINDS, params) for name, params in STRONG.items()
    }

    @jax.jit
    def run(args):
        out = {}
        for name, (s, T, params) in args.items():
            support = FAMILIES[name].to_rx(params, 3)
            out[f"{name}: (E) limit_log_p"] = rx.limit_log_p(
                rx.EntropicReplicator(s, T), support=support
            )
        return out

    outputs = run({name: _args(grid) for name, grid in grids.items()})
    references = {
        name: _references(grid, FAMILIES[name], 3) for name, grid in grids.items()
    }
    _check_all(outputs, grids, references)
    for name, grid in grids.items():
        kept = np.sum(
            np.asarray(outputs[f"{name}: (E) limit_log_p"]) > -np.inf, axis=-1
        )
        finite = np.sum(np.isfinite(grid.logits), axis=-1)
        assert np.all(kept >= np.minimum(3, finite))
        # Without min_tokens_to_keep, transformers keeps fewer than 3 on some rows.
        alone, _ = _references(grid, FAMILIES[name], 1)
        assert np.any(np.sum(alone > -np.inf, axis=-1) < 3), name


# --------------------------------------------------------------------------------------
# 7. temperature_first=False: supports on the raw logits, then the temperature


def test_temperature_last():
    names = ("top_p", "min_p", "typical", "eta")
    logits = _logit_rows(6, SMALL_V, SMALL_KINDS)
    grids = {
        name: _grid(logits, SMALL_KINDS, FAMILIES[name].params(SMALL_V))
        for name in names
    }

    @jax.jit
    def run(args):
        out = {}
        for name, (s, T, params) in args.items():
            support = FAMILIES[name].to_rx(params, 1)
            out[f"{name}: (E) limit_log_p, temperature_first=False"] = rx.limit_log_p(
                rx.EntropicReplicator(s, T), support=support, temperature_first=False
            )
        return out

    outputs = run({name: _args(grid) for name, grid in grids.items()})
    references = {
        name: _references(grid, FAMILIES[name], 1, temperature_first=False)
        for name, grid in grids.items()
    }
    _check_all(outputs, grids, references)
    for name, grid in grids.items():
        # The order matters (THEORY §3): temperature-first faces differ on some rows.
        first, _ = _references(grid, FAMILIES[name], 1)
        assert np.any((first > -np.inf) != (references[name][0] > -np.inf)), name


# --------------------------------------------------------------------------------------
# 2. Face invariance: restrict-then-flow = flow-then-restrict (float64)


def _restrict(log_p, mask):
    """I-projection of `log p` onto the face `mask`: `p|_S / p(S)`."""
    log_p = jnp.where(mask, log_p, -jnp.inf)
    return log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)


@pytest.mark.parametrize("flow_cls", FLOWS)
def test_restrict_then_flow_equals_flow_then_restrict(flow_cls):
    rng = np.random.default_rng(8)
    logits = 3 * rng.standard_normal((4, 9))
    top6 = np.argsort(logits, axis=-1)[:, -6:]
    mask = rng.random((4, 9)) < 0.5
    mask[np.arange(4), top6[:, -1]] = True
    face = np.zeros((4, 9), bool)
    np.put_along_axis(face, top6, True, axis=-1)
    face &= mask  # a fixed face: top-6 (temperature-free), then an explicit mask
    y0 = rng.dirichlet(np.ones(9), 4)
    ts = jnp.array([0.0, 0.3, 1.0, 2.5, 6.0])

    @jax.jit
    def run(logits, mask, y0):
        flow = flow_cls(logits, 0.7)
        support = [rx.TopK(6), rx.Mask(mask)]
        kw = dict(t1=6.0, saveat=rx.SaveAt(ts=ts))
        ode = dict(rtol=1e-13, atol=1e-13, max_steps=20_000)
        kept = rx.face(flow, support)
        # Restricting first the other way: -inf logits off the face, start I-projected.
        masked = flow_cls(jnp.where(kept, logits, -jnp.inf), 0.7)
        log_y0 = _restrict(jnp.log(y0), kept)
        return kept, {
            "uniform": (
                rx.solve(flow, support=support, **kw).log_p,
                rx.solve(flow, **kw).log_p,
                rx.solve(masked, **kw).log_p,
            ),
            "y0": (
                rx.solve(flow, support=support, y0=y0, **kw).log_p,
                rx.solve(flow, y0=y0, **kw).log_p,
                rx.solve(masked, log_y0=log_y0, **kw).log_p,
            ),
            # The invariance is a property of the vector field: diffrax on the face
            # against the closed form on the full simplex, then restricted.
            "y0, ode on the face": (
                rx.solve(flow, support=support, y0=y0, method="ode", **ode, **kw).log_p,
                rx.solve(flow, y0=y0, **kw).log_p,
                rx.solve(masked, log_y0=log_y0, **kw).log_p,
            ),
        }

    kept, out = run(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(y0))
    np.testing.assert_array_equal(kept, face)
    for on_face, full, restricted_first in out.values():
        # Invariance: nothing ever leaves the face (the start is I-projected onto it).
        np.testing.assert_array_equal(
            on_face > -jnp.inf, np.broadcast_to(face[:, None], on_face.shape)
        )
        then_restricted = _restrict(full, face[:, None, :])
        np.testing.assert_allclose(
            jnp.exp(on_face), jnp.exp(then_restricted), rtol=0, atol=TOL64
        )
        np.testing.assert_allclose(
            jnp.exp(on_face), jnp.exp(restricted_first), rtol=0, atol=TOL64
        )


# --------------------------------------------------------------------------------------
# 3. Bad input


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: rx.TopK(0), "top_k"),
        (lambda: rx.TopK(-3), "top_k"),
        (lambda: rx.TopK(np.array([3, 0])), "top_k"),
        (lambda: rx.TopK(2.5), "top_k"),
        (lambda: rx.TopP(0.0), "top_p"),
        (lambda: rx.TopP(-0.1), "top_p"),
        (lambda: rx.TopP(1.5), "top_p"),
        (lambda: rx.TopP(np.array([0.5, np.nan])), "top_p"),
        (lambda: rx.MinP(0.0), "min_p"),
        (lambda: rx.MinP(1.01), "min_p"),
        (lambda: rx.Typical(1.0), "mass"),
        (lambda: rx.Epsilon(0.0), "epsilon"),
        (lambda: rx.Eta(1.0), "epsilon"),
        (lambda: rx.TopP(0.9, min_tokens_to_keep=0), "min_tokens_to_keep"),
        (lambda: rx.Mask(np.ones(5, np.int32)), "mask"),
    ],
)
def test_bad_parameters_at_construction(make, name):
    # jaxtyping's run-time check (a TypeError) may speak before replicax's ValueError;
    # both name the argument.
    with pytest.raises((ValueError, TypeError), match=re.compile(name, re.IGNORECASE)):
        make()


def test_bad_mask():
    logits = jnp.zeros((2, 5))
    flow = rx.Replicator(logits, 1.0)
    with pytest.raises(ValueError, match=r"`Mask` must have shape \(\*batch, 5\)"):
        rx.solve(flow, t1=1.0, support=rx.Mask(jnp.ones(6, bool)))
    empty = jnp.ones((2, 5), bool).at[1].set(False)
    with pytest.raises(
        RUNTIME_ERRORS, match=r"`Mask` is all False at batch index \(1,\)"
    ):
        rx.solve(flow, t1=1.0, support=rx.Mask(empty))
    run = jax.jit(lambda m: rx.solve(flow, t1=1.0, support=rx.Mask(m)).log_p)
    with pytest.raises(
        RUNTIME_ERRORS, match=r"`Mask` is all False at batch index \(1,\)"
    ):
        jax.block_until_ready(run(empty))
    # A mask that only keeps masked (-inf) tokens leaves nothing either.
    masked = logits.at[:, :2].set(-jnp.inf)
    only_masked = jnp.zeros((2, 5), bool).at[:, :2].set(True)
    with pytest.raises(RUNTIME_ERRORS, match="`support` leaves no token"):
        jax.block_until_ready(_run_masked(masked, only_masked))
    with pytest.raises(TypeError, match="support"):
        rx.solve(flow, t1=1.0, support="top_k")


def _run_masked(logits, mask):
    return rx.solve(rx.Replicator(logits, 1.0), t1=1.0, support=rx.Mask(mask)).log_p


@pytest.mark.parametrize(
    "make, value, name",
    [
        (rx.TopK, jnp.array([3, 0, 2], jnp.int32), r"`top_k` must be >= 1.*\(1,\)"),
        (rx.TopP, jnp.array([0.5, 0.9, 1.5]), r"`top_p` must be in \(0, 1\].*\(2,\)"),
        (rx.MinP, jnp.array([0.1, 0.0, 0.5]), r"`min_p` must be in \(0, 1\].*\(1,\)"),
        (rx.Typical, jnp.array([0.1, 0.5, 1.0]), r"`mass` must be in \(0, 1\).*\(2,\)"),
        (
            rx.Epsilon,
            jnp.array([0.0, 0.5, 0.1]),
            r"`epsilon` must be in \(0, 1\).*\(0,\)",
        ),
    ],
)
def test_bad_traced_parameters(make, value, name):
    logits = jnp.asarray(np.random.default_rng(9).standard_normal((3, 6)))
    run = jax.jit(
        lambda v: rx.solve(rx.Replicator(logits, 1.0), t1=1.0, support=make(v)).log_p
    )
    with pytest.raises(RUNTIME_ERRORS, match=name):
        jax.block_until_ready(run(value))


# --------------------------------------------------------------------------------------
# 4. Dynamic parameters: per-row values, no recompilation


@pytest.mark.parametrize(
    "flow_cls, make, values, new_values",
    [
        (
            rx.EntropicReplicator,
            lambda p: rx.TopP(p),
            [np.array([0.5, 0.9, 0.99])],
            [np.array([0.3, 0.6, 0.95])],
        ),
        (
            rx.Replicator,
            lambda k, min_p, mass, eps, eta: [
                rx.TopK(k),
                rx.MinP(min_p),
                rx.Typical(mass),
                rx.Epsilon(eps),
                rx.Eta(eta),
            ],
            [
                np.array([11, 3, 7], np.int32),
                np.array([0.05, 0.2, 0.01]),
                np.array([0.95, 0.6, 0.9]),
                np.array([1e-3, 1e-2, 5e-2]),
                np.array([1e-3, 1e-2, 5e-2]),
            ],
            [
                np.array([9, 2, 12], np.int32),
                np.array([0.3, 0.01, 0.1]),
                np.array([0.5, 0.99, 0.3]),
                np.array([3e-2, 1e-4, 1e-2]),
                np.array([5e-2, 1e-3, 1e-2]),
            ],
        ),
    ],
    ids=["top_p", "top_k+min_p+typical+epsilon+eta"],
)
def test_per_row_parameters_equal_row_by_row_without_recompiling(
    flow_cls, make, values, new_values
):
    logits = 3 * np.random.default_rng(10).standard_normal((3, 12))
    logits[0, 4] = -np.inf
    logits = jnp.asarray(logits)
    temperature = jnp.array([0.5, 1.0, 1.7])
    flow = flow_cls(logits, temperature)
    traces = lambda: eqx.debug.get_num_traces(_solve._solve_rows)  # noqa: E731
    for i, params in enumerate((values, new_values)):
        batched = rx.solve(flow, t1=1.3, support=make(*params)).log_p[:, 0]
        assert not np.all(batched > -jnp.inf)  # the faces are not trivial
        for row in range(3):
            one = rx.solve(
                flow_cls(logits[row], temperature[row]),
                t1=1.3,
                support=make(*(p[row] for p in params)),
            ).log_p[0]
            if i == 0 and row == 0:
                before = traces()  # both shapes are compiled by now
            np.testing.assert_array_equal(batched[row] > -jnp.inf, one > -jnp.inf)
            np.testing.assert_allclose(jnp.exp(batched[row]), jnp.exp(one), atol=TOL64)
    # New values of k / p / eps / ... (and of the temperature) reuse the compilation.
    rx.solve(flow_cls(logits, 1.1 * temperature), t1=2.0, support=make(*new_values))
    assert traces() == before


# --------------------------------------------------------------------------------------
# 5. Gradients through faces


def test_gradients_through_faces():
    # Row 0: top-1 (one token survives); rows 1, 2: -inf logits and top-p / min-p faces.
    logits = 3 * np.random.default_rng(11).standard_normal((3, 8))
    logits[0, 1] = logits[1, :3] = logits[2, 5] = -np.inf
    logits = jnp.asarray(logits)
    temperature = jnp.array([0.6, 1.0, 1.4])
    t1 = 1.5
    weights = jnp.arange(8, dtype=jnp.float64)

    def loss(flow_cls, method, s, T):
        sol = rx.solve(
            flow_cls(s, T),
            t1=t1,
            support=[rx.TopK(jnp.array([1, 8, 6])), rx.MinP(0.02), rx.TopP(0.95)],
            method=rx.Exact() if method == "exact" else rx.ODE(rtol=1e-10, atol=1e-10),
        )
        log_p = sol.log_p[:, 0]
        value = jnp.sum(jnp.exp(log_p) * weights[None]) + jnp.sum(rx.entropy(log_p))
        return value, log_p

    @jax.jit
    def run(s, T):
        grads = {}
        for flow_cls in FLOWS:
            for method in METHODS:
                grad = jax.grad(
                    functools.partial(loss, flow_cls, method),
                    argnums=(0, 1),
                    has_aux=True,
                )
                grads[f"{flow_cls.__name__} {method}"] = grad(s, T)
        return grads

    s = np.asarray(logits)
    T = np.asarray(temperature)
    for key, ((d_logits, d_temperature), log_p) in run(logits, temperature).items():
        name, method = key.split()
        flow_cls = getattr(rx, name)
        d_logits, d_temperature, log_p = map(
            np.asarray, (d_logits, d_temperature, log_p)
        )
        assert np.all(np.isfinite(d_logits)) and np.all(np.isfinite(d_temperature))
        face = log_p > -np.inf
        assert np.all(np.sum(face, axis=-1) < np.sum(np.isfinite(s), axis=-1))
        assert np.sum(face[0]) == 1
        # Closed form (THEORY §5): log p = c s + const on the face, c = t/T for (R) and
        # (1 - e^{-t})/T for (E); the face is a discrete choice and carries no gradient.
        p = np.exp(log_p)
        g = np.where(face, np.asarray(weights) - np.where(face, log_p, 0) - 1, 0)
        u = p * (g - np.sum(p * g, axis=-1, keepdims=True))
        c = (t1 if flow_cls is rx.Replicator else -np.expm1(-t1)) / T
        expected_logits = np.where(face, c[:, None] * u, 0)
        s_face = np.where(face, s, 0)
        expected_temperature = -(c / T) * np.sum(u * s_face, axis=-1)
        tol = 1e-12 if method == "exact" else 1e-7
        np.testing.assert_allclose(d_logits, expected_logits, rtol=0, atol=tol)
        np.testing.assert_allclose(
            d_temperature, expected_temperature, rtol=0, atol=tol
        )
        assert np.all(d_logits[~face] == 0)
        assert np.all(d_logits[0] == 0) and d_temperature[0] == 0  # p = 1: no gradient


# --------------------------------------------------------------------------------------
# 6. Face observables


def test_discarded_mass_and_projection_cost_known_example():
    # p = (1/2, 1/4, 1/8, 1/16, 1/16); top-p 0.7 keeps {1/2, 1/4}: p(S) = 3/4.
    log_p = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.0625, 0.0625]))

    @jax.jit
    def run(log_p):
        flow = rx.EntropicReplicator(log_p, 1.0)
        face = rx.face(flow, rx.TopP(0.7))
        on_face = rx.target_log_p(flow, support=rx.TopP(0.7))
        # Batched, with the whole simplex as a second face: nothing is discarded.
        both = jnp.stack([log_p, log_p])
        faces = jnp.stack([face, jnp.ones(5, bool)])
        return dict(
            face=face,
            discarded=rx.discarded_mass(both, faces),
            cost=rx.projection_cost(both, faces),
            on_face=on_face,
            kl=rx.kl(on_face, log_p),
        )

    out = run(log_p)
    np.testing.assert_array_equal(out["face"], [True, True, False, False, False])
    np.testing.assert_allclose(out["discarded"], [0.25, 0], rtol=0, atol=TOL64)
    np.testing.assert_allclose(out["cost"], [-np.log(0.75), 0], rtol=0, atol=TOL64)
    # The restriction is the I-projection p|_S / p(S), and it costs KL = -log p(S).
    np.testing.assert_allclose(
        jnp.exp(out["on_face"]), [2 / 3, 1 / 3, 0, 0, 0], rtol=0, atol=TOL64
    )
    np.testing.assert_allclose(out["kl"], -np.log(0.75), rtol=0, atol=TOL64)


def test_nucleus_size_grows_with_temperature_and_counts_transformers_survivors():
    logits = _logit_rows(
        7, SMALL_V, ("plain", "plain", "ties", "masked", "ties masked")
    )
    temperatures = np.array([0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 2.0, 3.0], np.float32)
    for top_p in (0.5, 0.9):
        sizes = np.asarray(rx.nucleus_size(jnp.asarray(logits), temperatures, top_p))
        assert sizes.shape == (len(logits), len(temperatures))
        assert np.all(np.diff(sizes, axis=-1) >= 0)
        assert np.any(np.diff(sizes, axis=-1) > 0)
        for j, T in enumerate(temperatures.tolist()):
            warped = _hf_scores(
                logits, [TemperatureLogitsWarper(T), TopPLogitsWarper(top_p)]
            )
            np.testing.assert_array_equal(
                sizes[:, j], np.sum(warped > -np.inf, axis=-1)
            )
