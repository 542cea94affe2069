"""Faces of the simplex (THEORY §3) against Hugging Face `transformers`' logits warpers.

The references are the real warpers (`TemperatureLogitsWarper` first, then top-k, top-p,
min-p, typical, epsilon, eta), run by torch in float32 on the same float32 logits. Two
facts about the reference are handled explicitly rather than by loosening tolerances:

- `torch.sort` (used by `TopPLogitsWarper` and `TypicalLogitsWarper`) is not stable and
  `torch.topk` (used by `MinPLogitsWarper` for `min_tokens_to_keep`) does not pick the
  lowest index among ties. When a run of tied logits straddles the top-p boundary,
  transformers keeps an arbitrary (but deterministic) subset of the tied tokens; replicax
  breaks ties by index (a stable sort). So replicax is compared with the warpers run with
  a stable `torch.sort` / `torch.topk` on every row, and with the stock warpers on every
  row up to a permutation of tied tokens (identical face on every row without a split
  tie run).
- torch's float32 CPU softmax over 50,257 tokens is itself off by up to ~2e-6 from the
  exact softmax of the same float32 scores (its float32 normaliser), so the softmax of
  the warped float32 scores is taken in float64. The face (which tokens survive) is what
  transformers decides, in float32, and it is compared exactly.
"""

import contextlib
import itertools
import re
from dataclasses import dataclass
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx
import scipy.special
import torch
from replicax import _solve
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

from .helpers import FLOWS, random_logits, random_simplex


RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)
TOL32 = 1e-6  # max abs error of probabilities, float32
TOL64 = 1e-12  # float64
TEMPERATURES = (0.3, 0.7, 1.0, 1.5)
SMALL_V = 37
LARGE_V = 50_257
METHODS = ("exact", "ode")


# ----------------------------------------------------------------------------------------
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


def _hf_scores(logits, processors, *, stable=False) -> np.ndarray:
    """The float32 scores a `LogitsProcessorList` of transformers warpers leaves."""
    scores = torch.tensor(logits)
    input_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    with _stable_torch_sort() if stable else contextlib.nullcontext():
        out = LogitsProcessorList(processors)(input_ids, scores)
    assert out.dtype == torch.float32
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


def _reference(grid: Grid, family: Family, m: int, *, temperature_first=True, stable):
    """transformers' warped float32 scores for every row of the grid, one call per
    (temperature, parameters) group."""
    out = np.empty_like(grid.logits)
    groups = sorted(set(zip(grid.temperature.tolist(), grid.params)))
    for T, p in groups:
        rows = [
            i
            for i, (Ti, pi) in enumerate(zip(grid.temperature.tolist(), grid.params))
            if Ti == T and pi == p
        ]
        temperature = TemperatureLogitsWarper(float(T))
        warpers = family.to_hf(p, m)
        processors = (
            [temperature, *warpers] if temperature_first else [*warpers, temperature]
        )
        out[rows] = _hf_scores(grid.logits[rows], processors, stable=stable)
    return out


def _assert_matches_transformers(log_p, grid: Grid, family: Family, m: int, **kw):
    """replicax's `log_p` (rows, V) against the warpers. Returns the rows on which stock
    transformers keeps a different subset of a run of tied logits."""
    log_p = np.asarray(log_p)
    assert log_p.shape == grid.logits.shape
    assert not np.any(np.isnan(log_p))
    face = log_p > -np.inf
    p = np.exp(log_p.astype(np.float64))
    stock = _reference(grid, family, m, stable=False, **kw)
    stable = _reference(grid, family, m, stable=True, **kw) if family.sorts else stock

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
        # Every token that one keeps and the other drops ties with one the other keeps.
        assert np.all(np.isin(grid.logits[i][differ], kept_rx))
        np.testing.assert_allclose(
            np.sort(p[i]), np.sort(_softmax64(stock[i])), rtol=0, atol=TOL32
        )
    return split


def _flows(grid: Grid):
    logits = jnp.asarray(grid.logits)
    temperature = jnp.asarray(grid.temperature)
    return rx.EntropicReplicator(logits, temperature), rx.Replicator(logits, temperature)


# ----------------------------------------------------------------------------------------
# 1. The (E) equilibrium and (R) at t = 1 on the face = softmax after the warpers


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize(
    "vocab, kinds, seed", [(SMALL_V, SMALL_KINDS, 0), (LARGE_V, LARGE_KINDS, 1)]
)
def test_matches_transformers(name, vocab, kinds, seed):
    family = FAMILIES[name]
    grid = _grid(_logit_rows(seed, vocab, kinds), kinds, family.params(vocab))
    support = family.to_rx(_param_arrays(grid), 1)
    entropic, replicator = _flows(grid)
    limit = rx.limit_log_p(entropic, support=support)
    assert limit.dtype == jnp.float32
    _assert_matches_transformers(limit, grid, family, 1)
    at_one = rx.solve(replicator, t1=1.0, support=support).log_p[:, 0]
    assert at_one.dtype == jnp.float32
    _assert_matches_transformers(at_one, grid, family, 1)


def test_top_p_tie_split_is_index_order():
    # A run of tied logits straddles the top-p boundary: softmax([0, 0, 0, 0, log 4])
    # = (1/8, 1/8, 1/8, 1/8, 1/2); top_p = 0.7 needs the top token and two of the four
    # tied ones. replicax (a stable sort, ascending) drops the lowest indices first, as
    # transformers does with a stable `torch.sort`; stock transformers keeps whichever
    # two its unstable sort puts last. Either way the distribution is a permutation of
    # (1/4, 1/4, 1/2) among the tied tokens.
    logits = np.array([[0, 0, 0, 0, np.log(4)]], np.float32)
    face = rx.face(rx.Replicator(jnp.asarray(logits), 1.0), rx.TopP(0.7))
    np.testing.assert_array_equal(face, [[False, False, True, True, True]])
    stable = _hf_scores(logits, [TopPLogitsWarper(0.7)], stable=True)
    np.testing.assert_array_equal(face, stable > -np.inf)
    stock = _hf_scores(logits, [TopPLogitsWarper(0.7)])
    assert np.sum(stock > -np.inf) == 3 and stock[0, 4] > -np.inf
    np.testing.assert_allclose(np.sort(_softmax64(stock)[0])[-3:], [0.25, 0.25, 0.5])


def test_top_p_one():
    # transformers accepts top_p = 1.0 (its constructor rejects only p < 0 or p > 1) and
    # then removes the tokens whose ascending cumulative mass is <= 0: only tokens whose
    # probability is exactly 0 (masked, or underflowed). replicax uses the same rule.
    logits = _logit_rows(2, SMALL_V, ("plain", "masked"))
    TopPLogitsWarper(1.0)
    with pytest.raises(ValueError):
        TopPLogitsWarper(1.01)
    for T in TEMPERATURES:
        flow = rx.Replicator(jnp.asarray(logits), T)
        face = rx.face(flow, rx.TopP(1.0))
        ref = _hf_scores(logits, [TemperatureLogitsWarper(T), TopPLogitsWarper(1.0)])
        np.testing.assert_array_equal(face, ref > -np.inf)
        np.testing.assert_array_equal(face, np.isfinite(logits))


@pytest.mark.parametrize("name", ["top_p", "typical", "top_k+top_p"])
def test_entropic_solve_converges_to_warped_softmax(name):
    # rx.solve for a long time (closed form) lands on the same point as the limit.
    family = FAMILIES[name]
    grid = _grid(_logit_rows(3, SMALL_V, SMALL_KINDS), SMALL_KINDS, family.params(SMALL_V))
    support = family.to_rx(_param_arrays(grid), 1)
    entropic, _ = _flows(grid)
    log_p = rx.solve(entropic, t1=40.0, support=support).log_p[:, 0]
    _assert_matches_transformers(log_p, grid, family, 1)


def test_entropic_ode_converges_to_warped_softmax():
    # The same with diffrax (float32, tight tolerances on log p).
    family = FAMILIES["top_p"]
    grid = _grid(_logit_rows(4, SMALL_V, SMALL_KINDS), SMALL_KINDS, [(0.5,), (0.9,)])
    support = family.to_rx(_param_arrays(grid), 1)
    entropic, _ = _flows(grid)
    sol = rx.solve(entropic, t1=40.0, support=support, method="ode", rtol=1e-7, atol=1e-7)
    assert sol.method == "ode"
    _assert_matches_transformers(sol.log_p[:, 0], grid, family, 1)


@pytest.mark.parametrize("name", ["top_k", "top_p", "min_p", "typical", "epsilon", "eta"])
def test_min_tokens_to_keep(name):
    # Strong truncations (top-k 1, top-p 0.1, min-p 0.5, ...) so that min_tokens_to_keep
    # = 3 decides the face on most rows.
    family = FAMILIES[name]
    params = family.params(SMALL_V)[:2]
    grid = _grid(_logit_rows(5, SMALL_V, SMALL_KINDS), SMALL_KINDS, params)
    support = family.to_rx(_param_arrays(grid), 3)
    entropic, _ = _flows(grid)
    limit = rx.limit_log_p(entropic, support=support)
    assert np.all(np.sum(np.asarray(limit) > -np.inf, axis=-1) >= 3)
    _assert_matches_transformers(limit, grid, family, 3)


# ----------------------------------------------------------------------------------------
# 7. temperature_first=False: supports on the raw logits, then the temperature


@pytest.mark.parametrize("name", ["top_p", "min_p", "typical", "eta"])
def test_temperature_last(name):
    family = FAMILIES[name]
    grid = _grid(_logit_rows(6, SMALL_V, SMALL_KINDS), SMALL_KINDS, family.params(SMALL_V))
    support = family.to_rx(_param_arrays(grid), 1)
    entropic, _ = _flows(grid)
    last = rx.limit_log_p(entropic, support=support, temperature_first=False)
    _assert_matches_transformers(last, grid, family, 1, temperature_first=False)
    # The order matters (THEORY §3): on these rows some faces differ.
    first = rx.limit_log_p(entropic, support=support)
    assert np.any(np.isfinite(first) != np.isfinite(last))


# ----------------------------------------------------------------------------------------
# 2. Face invariance: restrict-then-flow = flow-then-restrict (float64)


def _restrict(log_p, mask):
    """I-projection of `log p` onto the face `mask`: `p|_S / p(S)`."""
    log_p = jnp.where(mask, log_p, -jnp.inf)
    return log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("method", METHODS)
def test_restrict_then_flow_equals_flow_then_restrict(getkey, flow_cls, method):
    logits = random_logits(getkey(), (3, 9))
    mask = jax.random.bernoulli(getkey(), 0.5, (3, 9)).at[:, 0].set(True)
    y0 = random_simplex(getkey(), (3, 9))
    ts = jnp.array([0.0, 0.3, 1.0, 2.5, 6.0])
    saveat = rx.SaveAt(ts=ts)
    kwargs = dict(t1=6.0, saveat=saveat, method=method)
    if method == "ode":
        kwargs.update(rtol=1e-13, atol=1e-13, max_steps=100_000)
    # TopK(4): a fixed face as well (top-k does not depend on the temperature).
    top4 = rx.face(flow_cls(logits, 0.7), rx.TopK(4))
    assert np.all(np.sum(top4, axis=-1) == 4)
    for support, face in ((rx.Mask(mask), mask), (rx.TopK(4), top4)):
        for start in (dict(), dict(y0=y0)):
            flow = flow_cls(logits, 0.7)
            on_face = rx.solve(flow, support=support, **start, **kwargs).log_p
            full = rx.solve(flow, **start, **kwargs).log_p
            then_restricted = _restrict(full, face[:, None, :])
            # Invariance: nothing ever leaves the face, and the start is I-projected.
            assert jnp.all((on_face > -jnp.inf) == face[:, None, :])
            np.testing.assert_allclose(
                jnp.exp(on_face), jnp.exp(then_restricted), rtol=0, atol=TOL64
            )
            # The other way to restrict first: -inf logits off the face, start on it.
            masked = flow_cls(jnp.where(face, logits, -jnp.inf), 0.7)
            start_on_face = (
                dict(log_y0=_restrict(jnp.log(y0), face)) if start else dict()
            )
            restricted_first = rx.solve(masked, **start_on_face, **kwargs).log_p
            np.testing.assert_allclose(
                jnp.exp(on_face), jnp.exp(restricted_first), rtol=0, atol=TOL64
            )


# ----------------------------------------------------------------------------------------
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
    with pytest.raises(RUNTIME_ERRORS, match=r"`Mask` is all False at batch index \(1,\)"):
        rx.solve(flow, t1=1.0, support=rx.Mask(empty))
    run = jax.jit(lambda m: rx.solve(flow, t1=1.0, support=rx.Mask(m)).log_p)
    with pytest.raises(RUNTIME_ERRORS, match=r"`Mask` is all False at batch index \(1,\)"):
        jax.block_until_ready(run(empty))
    # A mask that only keeps masked (-inf) tokens leaves nothing either.
    masked = logits.at[:, :2].set(-jnp.inf)
    only_masked = jnp.zeros((2, 5), bool).at[:, :2].set(True)
    with pytest.raises(RUNTIME_ERRORS, match="`support` leaves no token"):
        rx.solve(rx.Replicator(masked, 1.0), t1=1.0, support=rx.Mask(only_masked))
    with pytest.raises(TypeError, match="support"):
        rx.solve(flow, t1=1.0, support="top_k")


@pytest.mark.parametrize(
    "make, value, name",
    [
        (rx.TopK, jnp.array([3, 0, 2], jnp.int32), r"`top_k` must be >= 1.*\(1,\)"),
        (rx.TopP, jnp.array([0.5, 0.9, 1.5]), r"`top_p` must be in \(0, 1\].*\(2,\)"),
        (rx.TopP, jnp.array([0.0, 0.9, 0.5]), r"`top_p` must be in \(0, 1\].*\(0,\)"),
        (rx.MinP, jnp.array([0.1, 0.0, 0.5]), r"`min_p` must be in \(0, 1\].*\(1,\)"),
        (rx.MinP, jnp.array([0.1, 1.5, 0.5]), r"`min_p` must be in \(0, 1\].*\(1,\)"),
        (rx.Typical, jnp.array([0.1, 0.5, 1.0]), r"`mass` must be in \(0, 1\)"),
        (rx.Epsilon, jnp.array([0.0, 0.5, 0.1]), r"`epsilon` must be in \(0, 1\)"),
    ],
)
def test_bad_traced_parameters(make, value, name):
    logits = random_logits(jax.random.key(0), (3, 6))
    run = jax.jit(
        lambda v: rx.solve(rx.Replicator(logits, 1.0), t1=1.0, support=make(v)).log_p
    )
    with pytest.raises(RUNTIME_ERRORS, match=name):
        jax.block_until_ready(run(value))


# ----------------------------------------------------------------------------------------
# 4. Dynamic parameters: per-row values, no recompilation


@pytest.mark.parametrize(
    "make, values",
    [
        (rx.TopK, np.array([1, 3, 7], np.int32)),
        (rx.TopP, np.array([0.5, 0.9, 0.99])),
        (rx.MinP, np.array([0.05, 0.2, 0.6])),
        (rx.Typical, np.array([0.2, 0.6, 0.95])),
        (rx.Epsilon, np.array([1e-3, 1e-2, 5e-2])),
        (rx.Eta, np.array([1e-3, 1e-2, 5e-2])),
    ],
)
def test_per_row_parameters_equal_row_by_row(getkey, make, values):
    logits = random_logits(getkey(), (3, 12)).at[0, 4].set(-jnp.inf)
    temperature = jnp.array([0.5, 1.0, 1.7])
    for flow_cls in FLOWS:
        flow = flow_cls(logits, temperature)
        batched = rx.solve(flow, t1=1.3, support=make(values)).log_p
        for i in range(3):
            row = rx.solve(
                flow_cls(logits[i], temperature[i]), t1=1.3, support=make(values[i])
            ).log_p
            np.testing.assert_array_equal(batched[i] > -jnp.inf, row > -jnp.inf)
            np.testing.assert_allclose(jnp.exp(batched[i]), jnp.exp(row), atol=TOL64)
        assert not np.all(batched[0] > -jnp.inf)  # the faces are not trivial


def test_no_recompile_when_parameter_values_change(getkey):
    logits = random_logits(getkey(), (2, 10))
    cases = [
        [rx.TopK(3), rx.TopK(7)],
        [rx.TopP(0.5), rx.TopP(0.95)],
        [rx.MinP(0.1), rx.MinP(0.6)],
        [rx.Typical(0.3), rx.Typical(0.9)],
        [rx.Epsilon(1e-3), rx.Epsilon(3e-2)],
        [rx.Eta(1e-3), rx.Eta(3e-2)],
        [rx.TopP(jnp.array([0.5, 0.9])), rx.TopP(jnp.array([0.7, 0.2]))],
        [[rx.TopK(5), rx.TopP(0.9)], [rx.TopK(2), rx.TopP(0.3)]],
    ]
    for flow_cls in FLOWS:
        for first, *others in cases:
            rx.solve(flow_cls(logits, 0.7), t1=1.0, support=first)
            before = eqx.debug.get_num_traces(_solve._solve_rows)
            faces = []
            for support in others:
                for T in (0.7, 1.3):
                    sol = rx.solve(flow_cls(logits, T), t1=1.0, support=support)
                    faces.append(sol.log_p > -jnp.inf)
            assert eqx.debug.get_num_traces(_solve._solve_rows) == before


# ----------------------------------------------------------------------------------------
# 5. Gradients through faces


def _face_loss(flow_cls, method, support):
    def loss(logits, temperature):
        sol = rx.solve(
            flow_cls(logits, temperature),
            t1=1.5,
            support=support,
            method=method,
            saveat=rx.SaveAt(ts=jnp.array([0.5, 1.5])),
            rtol=1e-10,
            atol=1e-10,
        )
        weights = jnp.broadcast_to(
            jnp.arange(sol.log_p.shape[-1], dtype=sol.log_p.dtype), sol.log_p.shape
        )
        return jnp.sum(jnp.exp(sol.log_p) * weights) + jnp.sum(rx.entropy(sol.log_p))

    return loss


@pytest.mark.parametrize("flow_cls", FLOWS)
@pytest.mark.parametrize("method", METHODS)
def test_gradients_through_faces(getkey, flow_cls, method):
    logits = random_logits(getkey(), (3, 8))
    logits = logits.at[0, 1].set(-jnp.inf).at[1, :3].set(-jnp.inf)
    logits = logits.at[2, 0].set(-jnp.inf).at[2, 1].set(jnp.max(logits[2]) + 1)
    temperature = jnp.array([0.6, 1.0, 1.4])
    supports = [
        rx.TopK(1),  # one token survives
        rx.TopK(jnp.array([3, 8, 1], jnp.int32)),
        rx.TopP(0.7),
        rx.MinP(0.2),
        [rx.TopK(5), rx.Eta(0.05)],
        rx.Mask(jnp.ones((3, 8), bool).at[:, 2:4].set(False)),
    ]
    for support in supports:
        loss = _face_loss(flow_cls, method, support)
        d_logits, d_temperature = jax.grad(loss, argnums=(0, 1))(logits, temperature)
        assert jnp.all(jnp.isfinite(d_logits)) and jnp.all(jnp.isfinite(d_temperature))
        face = rx.face(flow_cls(logits, temperature), support)
        assert jnp.all(jnp.where(face, True, d_logits == 0))
        # The face is a discrete choice: the gradient is that of the flow whose logits
        # are -inf off it.
        restricted = jnp.where(face, logits, -jnp.inf)
        loss_off = _face_loss(flow_cls, method, None)
        ref_logits, ref_temperature = jax.grad(loss_off, argnums=(0, 1))(
            restricted, temperature
        )
        np.testing.assert_allclose(d_logits, ref_logits, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(d_temperature, ref_temperature, rtol=1e-8, atol=1e-8)
    # One surviving token: p = 1 whatever the logits, so no gradient at all.
    loss = _face_loss(flow_cls, method, rx.TopK(1))
    d_logits, d_temperature = jax.grad(loss, argnums=(0, 1))(logits, temperature)
    assert jnp.all(d_logits == 0) and jnp.all(d_temperature == 0)


# ----------------------------------------------------------------------------------------
# 6. Face observables


def test_discarded_mass_and_projection_cost_known_example():
    # p = (1/2, 1/4, 1/8, 1/16, 1/16); top-p 0.7 keeps {1/2, 1/4}: p(S) = 3/4.
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    flow = rx.EntropicReplicator(jnp.log(jnp.asarray(p)), 1.0)
    face = rx.face(flow, rx.TopP(0.7))
    np.testing.assert_array_equal(face, [True, True, False, False, False])
    np.testing.assert_array_equal(face, rx.face(flow, rx.TopK(2)))
    log_p = rx.target_log_p(flow)
    np.testing.assert_allclose(rx.discarded_mass(log_p, face), 0.25, rtol=0, atol=TOL64)
    np.testing.assert_allclose(
        rx.projection_cost(log_p, face), -np.log(0.75), rtol=0, atol=TOL64
    )
    # The restriction is the I-projection p|_S / p(S), and it costs KL = -log p(S).
    on_face = rx.target_log_p(flow, support=rx.TopP(0.7))
    np.testing.assert_allclose(
        jnp.exp(on_face), [2 / 3, 1 / 3, 0, 0, 0], rtol=0, atol=TOL64
    )
    np.testing.assert_allclose(
        rx.kl(on_face, log_p), -np.log(0.75), rtol=0, atol=TOL64
    )
    # Batched, with the whole simplex as a face: nothing is discarded.
    both = jnp.stack([log_p, log_p])
    faces = jnp.stack([face, jnp.ones(5, bool)])
    np.testing.assert_allclose(rx.discarded_mass(both, faces), [0.25, 0], atol=TOL64)
    np.testing.assert_allclose(
        rx.projection_cost(both, faces), [-np.log(0.75), 0], atol=TOL64
    )


def test_nucleus_size_grows_with_temperature_and_counts_transformers_survivors():
    logits = _logit_rows(7, SMALL_V, ("plain", "plain", "ties", "masked", "ties masked"))
    temperatures = np.array([0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 2.0, 3.0], np.float32)
    for top_p in (0.5, 0.9):
        sizes = np.asarray(rx.nucleus_size(jnp.asarray(logits), temperatures, top_p))
        assert sizes.shape == (len(logits), len(temperatures))
        assert np.all(np.diff(sizes, axis=-1) >= 0)
        assert np.any(np.diff(sizes, axis=-1) > 0)
        for j, T in enumerate(temperatures.tolist()):
            warped = _hf_scores(logits, [TemperatureLogitsWarper(T), TopPLogitsWarper(top_p)])
            np.testing.assert_array_equal(sizes[:, j], np.sum(warped > -np.inf, axis=-1))
