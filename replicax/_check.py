"""`replicax check`: each claim of THEORY §1 measured on built-in logits, both flows.

The paper states its claims for the replicator (R); several hold only for the entropic
replicator (E) (THEORY §1, "Two flows, and which claim holds for which"). This module
measures every claim on the same logits for both flows and compares each verdict with
THEORY's. A claim *holds* for a flow when the measured deviation is at most the claim's
tolerance (`TOLERANCES`); otherwise the printed number is the gap by which it fails.

Everything is measured in float64 (JAX's 64-bit mode is switched on inside the command
only) through the public API, in one compiled function: an exact `rx.solve` over a grid
of saved times serves most claims, plus the solves a claim needs on its own (the ODE
path, the flow at T = 1 for the time rescaling, a top-p face); the observables are
`rx.entropy` and `rx.kl`, the targets `rx.target_log_p` and `rx.limit_log_p`, and
`rx.time_to` and `rx.multiplicative_weights` are checked. References that are not
replicax's own (the argmax set, transformers' top-p rule, the closed forms and the bound
used to test `time_to`) are computed here in NumPy.
"""

import argparse
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import numpy as np

import replicax as rx

# The built-in problem: synthetic LLM-like logits, one temperature per context (the
# temperatures cycle when there are more contexts).
DEFAULT_SEED = 0
DEFAULT_CONTEXTS = 4
DEFAULT_VOCAB = 2000
TEMPERATURES = (0.5, 0.7, 1.0, 1.5)
# Times at which p_T(t) = p_1(t/T) is compared (all on the saved grid).
RESCALING_TIMES = (0.5, 1.0, 2.0)
# The ODE path is compared with the closed form on [0, ODE_T1] at these tolerances.
ODE_T1 = 4.0
ODE_RTOL = ODE_ATOL = 1e-10
# Multiplicative weights: MW_STEPS steps of size MW_STEP (all on the saved grid).
MW_STEP = 0.25
MW_STEPS = 16
TOP_P = 0.9
EPS = 1e-3
# Where the flows are taken to have arrived: at least this, and long enough for (R) to
# put all but `exp(-_LIMIT_LOG_MARGIN)` of its mass on the argmax set (THEORY §1 bound).
_MIN_T_LIMIT = 60.0
# Saved times: _NUM_FINE uniform on [0, ODE_T1] (step 1/8), then geometric to t_inf.
_NUM_FINE = 33
_NUM_COARSE = 24
_LIMIT_LOG_MARGIN = 35.0

# A measured deviation at most this counts as "holds". float64 round-off of the
# quantities compared is 1e-15 to 1e-13; the tolerances sit well above it and far
# below the gaps of the claims that fail (1e-2 and more). Tests make a check fail by
# changing an entry.
TOLERANCES = {
    "simplex": 1e-12,
    "exact_vs_ode": 1e-7,  # the ODE runs at rtol = atol = 1e-10 on log p
    "passes_target_at_1": 1e-12,
    "time_rescaling": 1e-12,
    "limit_softmax": 1e-9,
    "limit_argmax": 1e-9,
    "entropy_decreases": 1e-12,
    "kl_target_decreases": 1e-12,
    "kl_limit_decreases": 1e-12,
    "kl_bound": 1e-12,
    "face_invariant": 1e-12,
    "top_p_limit": 1e-9,
    "multiplicative_weights": 1e-12,
    "time_to_eps": 1e-6,  # relative; `time_to` bisects to about this accuracy
}


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the table: a claim, what is measured, and THEORY's verdicts."""

    key: str
    text: str
    measured: str
    holds_r: bool
    holds_e: bool


CLAIMS = (
    Claim(
        "simplex",
        "stays on the simplex: p >= 0, sum p = 1",
        "max |sum p - 1| over contexts and saved times (inf if p < 0 or NaN)",
        True,
        True,
    ),
    Claim(
        "exact_vs_ode",
        "closed form = ODE solution ('exact' vs 'ode')",
        f"max |p_exact - p_ode| on [0, {ODE_T1:g}], ODE at rtol = atol = {ODE_RTOL:g}",
        True,
        True,
    ),
    Claim(
        "passes_target_at_1",
        "from uniform, p(1) = softmax(s/T)",
        "max |p(1) - softmax(s/T)|",
        True,
        False,
    ),
    Claim(
        "time_rescaling",
        "temperature rescales time: p_T(t) = p_1(t/T)",
        "max |p_T(t) - p_1(t/T)| at t in "
        + "{"
        + ", ".join(f"{t:g}" for t in RESCALING_TIMES)
        + "}",
        True,
        False,
    ),
    Claim(
        "limit_softmax",
        "converges to softmax(s/T)",
        "max |p(t_inf) - softmax(s/T)|",
        False,
        True,
    ),
    Claim(
        "limit_argmax",
        "converges to the argmax token",
        "max 1 - p(t_inf)(argmax set of s)",
        True,
        False,
    ),
    Claim(
        "entropy_decreases",
        "entropy decreases monotonically from uniform",
        "largest increase of H(p(t)) between saved times",
        True,
        True,
    ),
    Claim(
        "kl_target_decreases",
        "KL(p || softmax(s/T)) decreases (F_T rises)",
        "largest increase of KL(p(t) || softmax(s/T)) between saved times",
        False,
        True,
    ),
    Claim(
        "kl_limit_decreases",
        "Lyapunov: KL(limit || p(t)) decreases",
        "largest increase of KL(limit_log_p || p(t)) between saved times",
        True,
        True,
    ),
    Claim(
        "kl_bound",
        "KL(pi_T || p(t)) <= e^-t KL(pi_T || p0)",
        "max over t of KL(pi_T || p(t)) - e^-t KL(pi_T || p0), pi_T = softmax(s/T)",
        False,
        True,
    ),
    Claim(
        "face_invariant",
        "face invariant: restrict-flow = flow-restrict",
        f"max |p on TopP({TOP_P:g}) - full p restricted to the top-p set (NumPy), "
        "renormalised|",
        True,
        True,
    ),
    Claim(
        "top_p_limit",
        f"on TopP({TOP_P:g}): converges to top-p sampling",
        "max |p(t_inf) - softmax(s/T) after transformers' top-p rule (NumPy)|",
        False,
        True,
    ),
    Claim(
        "multiplicative_weights",
        "multiplicative weights = exact time-eta map",
        f"max |MW step k - p(k eta)|, eta = {MW_STEP:g}, k <= {MW_STEPS}",
        True,
        False,
    ),
    Claim(
        "time_to_eps",
        f"time to eps={EPS:g} exact, <= the bound",
        "max relative error of the distance at rx.time_to (NumPy closed form) and "
        "relative excess over the bound (NumPy)",
        True,
        True,
    ),
)

FLOWS = (("R", rx.Replicator), ("E", rx.EntropicReplicator))


@dataclasses.dataclass(frozen=True)
class Result:
    """A claim's measured deviation for each flow, and the verdicts that follow."""

    claim: Claim
    deviation: dict[str, float]  # flow name -> measured deviation (>= 0, or inf/NaN)

    def holds(self, flow: str) -> bool:
        # NaN compares False: a measurement that went wrong never "holds".
        return bool(self.deviation[flow] <= TOLERANCES[self.claim.key])

    def expected(self, flow: str) -> bool:
        return self.claim.holds_r if flow == "R" else self.claim.holds_e

    @property
    def agrees(self) -> bool:
        return all(self.holds(name) == self.expected(name) for name, _ in FLOWS)


def check_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of `replicax check` to `parser`.

    The defaults are the problem the verdicts are made for. Very small problems can make
    a claim that fails in general hold by coincidence (e.g. a top-p set of one token,
    where both flows end on that token), and the command then reports the mismatch.
    """
    add = parser.add_argument
    add(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the synthetic logits (default: %(default)s)",
    )
    add(
        "--contexts",
        type=int,
        default=DEFAULT_CONTEXTS,
        help="number of contexts; temperatures cycle through "
        f"{', '.join(map(str, TEMPERATURES))} (default: %(default)s)",
    )
    add(
        "--vocab",
        type=int,
        default=DEFAULT_VOCAB,
        help="vocabulary size, >= 2 (default: %(default)s); with a few tokens only, "
        "a claim that fails in general can hold by coincidence (a top-p set of one "
        "token)",
    )


def check_main(args: argparse.Namespace) -> int:
    """Runs `replicax check` for parsed options; returns the exit status: 0 when every
    measured verdict is THEORY's, 1 otherwise."""
    start = time.perf_counter()
    if args.contexts < 1:
        raise ValueError(f"--contexts must be >= 1; received {args.contexts}.")
    if args.vocab < 2:
        raise ValueError(f"--vocab must be >= 2; received {args.vocab}.")
    logits = rx.datasets.synthetic_logits(args.seed, args.contexts, args.vocab)
    results, t_limit = run_checks(logits)
    print(
        f"replicax check: {args.contexts} context{'s' if args.contexts != 1 else ''} x "
        f"{args.vocab} tokens, synthetic logits (seed {args.seed}), float64; T per "
        f"context cycles through {', '.join(map(str, TEMPERATURES))}; uniform start."
    )
    print(
        "R = Replicator (theta' = s/T), E = EntropicReplicator (theta' = s/T - theta); "
        f"t_inf = {t_limit:.4g}."
    )
    print()
    print(format_table(results))
    print()
    mismatches = [r for r in results if not r.agrees]
    if mismatches:
        names = ", ".join(r.claim.key for r in mismatches)
        print(f"MISMATCH with THEORY §1 for {len(mismatches)} claim(s): {names}.")
    else:
        print(f"All {len(results)} claims behave as THEORY §1 says, for both flows.")
    print(f"wall time: {time.perf_counter() - start:.1f} s (including JAX compilation)")
    return 1 if mismatches else 0


def run_checks(logits: Any) -> tuple[list[Result], float]:
    """Measures every claim of `CLAIMS` for both flows on `logits` (shape `(B, V)`).

    Returns the results, in the order of `CLAIMS`, and the time `t_inf` taken as the
    limit.
    """
    with jax.enable_x64(True):
        s = np.asarray(logits, np.float64)
        temperatures = np.resize(np.asarray(TEMPERATURES, np.float64), s.shape[0])
        t_limit = _limit_time(s, temperatures)
        grid = _grid(t_limit)
        # p_1(t/T) is saved at every context's own times together, then picked out.
        scaled_times = np.asarray(RESCALING_TIMES)[None, :] / temperatures[:, None]
        union = np.unique(scaled_times)
        # One compilation for everything: the command is compile-bound.
        arrays = _solve_all(s, temperatures, grid, union)
        arrays = jax.tree_util.tree_map(np.asarray, arrays)
    deviations = {
        name: _deviations(
            name, arrays[name], s, temperatures, grid, union, scaled_times
        )
        for name, _ in FLOWS
    }
    results = [
        Result(claim, {name: deviations[name][claim.key] for name, _ in FLOWS})
        for claim in CLAIMS
    ]
    return results, t_limit


def _limit_time(s, temperatures):
    # (R) from uniform: 1 - p(K) <= (V/|K|) exp(-gap t/T), gap = top score minus the
    # best score outside the argmax set K (THEORY §1, time to eps).
    top = s.max(axis=-1, keepdims=True)
    below = np.where(s == top, -np.inf, s).max(axis=-1)
    gap = top[:, 0] - below  # +inf when every token ties
    need = temperatures / gap * (math.log(s.shape[-1]) + _LIMIT_LOG_MARGIN)
    return float(max(_MIN_T_LIMIT, 1.25 * np.max(need)))


def _grid(t_limit):
    # A fine uniform part on [0, 4] (it contains t = 1, the rescaling times and the
    # multiplicative-weights times exactly), then geometric up to t_inf. Its length is
    # fixed, so another t_inf does not recompile.
    fine = np.linspace(0.0, ODE_T1, _NUM_FINE)
    coarse = np.geomspace(ODE_T1, t_limit, _NUM_COARSE + 1)[1:]
    return np.concatenate([fine, coarse])


def _index(grid, t):
    (i,) = np.flatnonzero(np.isclose(grid, t, rtol=0, atol=1e-12))
    return int(i)


def _increase(values):
    """Largest increase between consecutive saved times (0 if non-increasing)."""
    return float(max(np.max(np.diff(values, axis=-1)), 0.0))


def _max_abs(x, y):
    return float(np.max(np.abs(np.asarray(x) - np.asarray(y))))


def _log_softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def _softmax(x):
    return np.exp(_log_softmax(x))


def _top_p_reference(s, temperatures, top_p):
    """transformers' sampling distribution after its temperature and top-p warpers,
    written from its rule: sort ascending, drop tokens whose cumulative probability is
    `<= 1 - top_p`, keep at least one."""
    scaled = s / temperatures[:, None]
    order = np.argsort(scaled, axis=-1, kind="stable")
    sorted_scaled = np.take_along_axis(scaled, order, axis=-1)
    cumulative = np.cumsum(_softmax(sorted_scaled), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[:, -1] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return _softmax(np.where(remove, -np.inf, scaled)), ~remove


def _distance_at(name, s, temperatures, t):
    """Distance to where the flow ends at time `t` per context, from the closed forms of
    THEORY §1 from uniform (NumPy): `1 - p(K)` for (R), `KL(p || softmax(s/T))` for
    (E)."""
    scaled = s / temperatures[:, None]
    if name == "R":
        x = t[:, None] * (scaled - scaled.max(axis=-1, keepdims=True))
        off_top = np.sum(np.where(x == 0, 0, np.exp(x)), axis=-1)
        return off_top / np.sum(np.exp(x), axis=-1)
    log_p = _log_softmax(-np.expm1(-t)[:, None] * scaled)
    return np.sum(np.exp(log_p) * (log_p - _log_softmax(scaled)), axis=-1)


def _time_bound(name, s, temperatures):
    """THEORY §1's closed-form bound on the time to `EPS` from uniform, per context:
    `(T/gap) log((1 - p0(K)) / (p0(K) eps))` for (R), `½ log(R² / (8 eps))` with
    `R = range(log p0 - s/T) = range(s)/T` for (E)."""
    vocab = s.shape[-1]
    top = s.max(axis=-1, keepdims=True)
    in_k = np.sum(s == top, axis=-1)
    if name == "R":
        gap = top[:, 0] - np.where(s == top, -np.inf, s).max(axis=-1)
        p0_k = in_k / vocab
        return temperatures / gap * np.log((1 - p0_k) / (p0_k * EPS))
    spread = (top[:, 0] - s.min(axis=-1)) / temperatures
    return 0.5 * np.log(spread**2 / (8 * EPS))


# The command is compile-bound (its arrays are small): LLVM's optimisation of the
# generated CPU code costs more than it saves (measured: 11 s -> 8 s of compilation,
# 0.3 s -> 0.8 s of running).
@functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
def _solve_all(s, temperatures, grid, union):
    """Everything the claims need from replicax, for both flows (device arrays)."""
    support = rx.TopP(TOP_P)
    saveat = rx.SaveAt(ts=grid)
    out = {}
    for name, cls in FLOWS:
        flow = cls(s, temperatures)
        log_p = rx.solve(flow, t1=grid[-1], saveat=saveat).log_p  # (B, times, V)
        log_target = rx.target_log_p(flow)  # (B, V)
        log_limit = rx.limit_log_p(flow)
        ode = rx.solve(
            flow,
            t1=ODE_T1,
            saveat=rx.SaveAt(ts=grid[:_NUM_FINE]),
            method="ode",
            rtol=ODE_RTOL,
            atol=ODE_ATOL,
            max_steps=100_000,
        )
        flow_one = cls(s, jax.numpy.ones_like(temperatures))
        p_one = rx.solve(flow_one, t1=union[-1], saveat=rx.SaveAt(ts=union)).p
        out[name] = {
            "log_p": log_p,
            "target": jax.numpy.exp(log_target),
            "p_ode": ode.p,
            "p_one": p_one,
            "entropy": rx.entropy(log_p),
            "kl_target": rx.kl(log_p, log_target[:, None]),
            "kl_limit": rx.kl(log_limit[:, None], log_p),
            "kl_from_target": rx.kl(log_target[:, None], log_p),
            "p_face": rx.solve(flow, t1=grid[-1], saveat=saveat, support=support).p,
            "p_mw": jax.numpy.exp(rx.multiplicative_weights(flow, MW_STEP, MW_STEPS)),
            "t_eps": rx.time_to(flow, EPS),
        }
    return out


def _deviations(
    name, a, s, temperatures, grid, union, scaled_times
) -> dict[str, float]:
    """The deviation of every claim for one flow, from its arrays `a`."""
    log_p = a["log_p"]
    p = np.exp(log_p)
    target = a["target"]
    out = {}

    finite = np.all(np.isfinite(p)) and np.all(p >= 0)
    out["simplex"] = _max_abs(p.sum(-1), 1.0) if finite else math.inf
    out["exact_vs_ode"] = _max_abs(p[:, :_NUM_FINE], a["p_ode"])
    out["passes_target_at_1"] = _max_abs(p[:, _index(grid, 1.0)], target)

    columns = np.searchsorted(union, scaled_times)
    p_one = np.take_along_axis(a["p_one"], columns[:, :, None], axis=1)
    p_rescaled = p[:, [_index(grid, t) for t in RESCALING_TIMES]]
    out["time_rescaling"] = _max_abs(p_rescaled, p_one)

    p_end = p[:, -1]
    out["limit_softmax"] = _max_abs(p_end, target)
    argmax_set = s == s.max(axis=-1, keepdims=True)
    out["limit_argmax"] = float(np.max(np.sum(np.where(argmax_set, 0, p_end), -1)))

    out["entropy_decreases"] = _increase(a["entropy"])
    out["kl_target_decreases"] = _increase(a["kl_target"])
    out["kl_limit_decreases"] = _increase(a["kl_limit"])
    kl_from_target = a["kl_from_target"]
    bound = np.exp(-grid) * kl_from_target[:, :1]
    out["kl_bound"] = float(max(np.max(kl_from_target - bound), 0.0))

    reference, face = _top_p_reference(s, temperatures, TOP_P)
    restricted = np.where(face[:, None], p, 0)
    restricted /= restricted.sum(-1, keepdims=True)
    out["face_invariant"] = _max_abs(a["p_face"], restricted)
    out["top_p_limit"] = _max_abs(a["p_face"][:, -1], reference)

    at_steps = [_index(grid, k * MW_STEP) for k in range(MW_STEPS + 1)]
    out["multiplicative_weights"] = _max_abs(a["p_mw"], p[:, at_steps])

    t_eps = a["t_eps"]
    t_bound = _time_bound(name, s, temperatures)
    distance = _distance_at(name, s, temperatures, t_eps)
    excess = np.maximum(t_eps - t_bound, 0) / t_bound
    out["time_to_eps"] = float(max(np.max(np.abs(distance / EPS - 1)), np.max(excess)))
    return out


def format_table(results: list[Result]) -> str:
    """The table `replicax check` prints, with a footnote per claim saying what its
    number measures."""

    def verdict(holds):
        return "holds" if holds else "does not hold"

    headers = ["#", "claim"]
    for name, _ in FLOWS:
        headers += [f"{name} measured", f"{name} error/gap", f"{name} expected"]
    headers.append("agrees")
    body = []
    for i, r in enumerate(results, 1):
        cells = [str(i), r.claim.text]
        for name, _ in FLOWS:
            cells += [
                verdict(r.holds(name)),
                f"{r.deviation[name]:.1e}",
                verdict(r.expected(name)),
            ]
        cells.append("ok" if r.agrees else "MISMATCH")
        body.append(cells)
    widths = [max(map(len, column)) for column in zip(headers, *body, strict=True)]
    right = {0, 3, 6}

    def line(cells):
        return "  ".join(
            c.rjust(w) if j in right else c.ljust(w)
            for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(cells) for cells in body]
    out.append("")
    out.append(
        "R = replicator, E = entropic replicator; expected = THEORY §1. error/gap: the "
        "measured deviation,"
    )
    out.append(
        "an error where the claim holds (<= its tolerance), the gap where it does not:"
    )
    for i, r in enumerate(results, 1):
        tolerance = TOLERANCES[r.claim.key]
        out.append(f"{i:>3}. {r.claim.measured} (tolerance {tolerance:g})")
    return "\n".join(out)
