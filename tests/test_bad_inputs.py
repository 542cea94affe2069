"""No silent NaN under jit / vmap (DESIGN "Bad input").

One table of bad or extreme inputs, each run three ways: called plainly, under `jax.jit`
and under `jax.vmap`. Under jit and vmap every value an entry point reads (logits,
temperature, start, times, step size, tolerances, penalty strengths, face parameters,
eps) is a traced argument, so that the checks made on device are the ones exercised;
only options, callables and types (which cannot be traced) are closed over.

Every case ends in one of two ways:

- a named error: `pytest.raises(match=...)` on a message naming the argument and, for a
    value given one per row, the batch index of the bad row (always row 1 here). A host
    value or a static problem (shape, dtype, option) gives `ValueError` / `TypeError`
    when the function is called; a traced value gives `equinox.EquinoxRuntimeError` (or
    the JAX runtime error wrapping it under `jax.jit`);
- for legitimate extreme input, finite output on the simplex: every probability finite
    and non-negative, total mass 1, no NaN and no `+inf` in `log p`.

Each entry point is one function of a dictionary of arrays of fixed shapes (V = 5, two
rows), so that it compiles once per mode and dtype and every case reuses it.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import replicax as rx


RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)
CALL_TIME_ERRORS = (ValueError, TypeError)
MODES = ("plain", "jit", "vmap")

# Total mass of an output: one rounding per token and a normalisation.
MASS_TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float64): 1e-12}

V = 5
ROW1 = r".*batch index \(1,\)"


# ----------------------------------------------------------------------------------------
# The values every entry point reads, legal, per dtype. Token 4 is masked in row 1, so
# that a start with all its mass there has none on the face.


def _good(dtype) -> dict[str, jax.Array]:
    logits = (jnp.arange(2 * V, dtype=dtype).reshape(2, V) / 7).astype(dtype)
    row = lambda x: jnp.full(2, x, dtype)  # noqa: E731 - one value per row
    scalar = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return dict(
        logits=logits.at[1, 4].set(-jnp.inf),
        temperature=row(1.0),
        y0=jnp.full((2, V), 1 / V, dtype),
        t0=scalar(0.0),
        t1=scalar(1.0),
        ts=jnp.array([0.25, 0.5], dtype),
        step_size=scalar(0.5),
        eps=row(1e-3),
        rtol=scalar(1e-6),
        atol=scalar(1e-6),
        alpha=row(0.0),
        beta=row(0.0),
        top_k=jnp.full(2, 3, jnp.int32),
        top_p=row(0.9),
        min_p=row(0.05),
        mass=row(0.95),
        epsilon=row(1e-3),
        eta=row(1e-3),
        mask=jnp.ones((2, V), bool),
    )


GOOD = {jnp.dtype(d): _good(d) for d in (jnp.float32, jnp.float64)}


# ----------------------------------------------------------------------------------------
# Entry points: each a function of such a dictionary, returning log-probabilities. The
# start is given only where the dictionary holds one (a case may remove it).


def _solve(a):
    sol = rx.solve(
        rx.Replicator(a["logits"], a["temperature"]),
        t0=a["t0"],
        t1=a["t1"],
        y0=a.get("y0"),
        saveat=rx.SaveAt(ts=a["ts"], t1=True),
    )
    return sol.log_p


def _ode(a):
    # Penalty strengths need the ODE path; with them in the score, one compile serves
    # the logits, the start, the times, the tolerances and the penalties.
    score = rx.Logits(a["logits"]) + rx.FrequencyPenalty(a["alpha"])
    score = score + rx.SelfReinforcement(a["beta"])
    method = rx.ODE(rtol=a["rtol"], atol=a["atol"])
    flow = rx.Replicator(score, a["temperature"])
    return rx.solve(flow, t1=a["t1"], y0=a.get("y0"), method=method).log_p


def _switched(a):
    method = rx.Switched(rtol=a["rtol"], atol=a["atol"])
    flow = rx.Replicator(a["logits"], a["temperature"])
    support = rx.TopP(a["top_p"])
    sol = rx.solve(flow, t1=a["t1"], y0=a.get("y0"), support=support, method=method)
    return sol.log_p


def _discrete(map_fn):
    def run(a):
        flow = rx.Replicator(a["logits"], a["temperature"])
        return map_fn(flow, a["step_size"], 8, y0=a.get("y0"))

    return run


def _faces(a):
    # Every face in one chain (each keeps at least one token), the mask first.
    support = [
        rx.Mask(a["mask"]),
        rx.TopK(a["top_k"]),
        rx.TopP(a["top_p"]),
        rx.MinP(a["min_p"]),
        rx.Typical(a["mass"]),
        rx.Epsilon(a["epsilon"]),
        rx.Eta(a["eta"]),
    ]
    flow = rx.Replicator(a["logits"], a["temperature"])
    return rx.solve(flow, t1=a["t1"], support=support).log_p


def _time_to(a):
    flow = rx.Replicator(a["logits"], a["temperature"])
    return rx.time_to(flow, a["eps"], y0=a.get("y0"))


ENTRIES: dict[str, Callable[[dict], Any]] = {
    "solve": _solve,
    "ode": _ode,
    "switched": _switched,
    "mw": _discrete(rx.multiplicative_weights),
    "mirror": _discrete(rx.entropic_mirror_map),
    "faces": _faces,
    "time_to": _time_to,
}
# The entry points that run a flow from a start.
FLOWS_FROM_START = ("solve", "ode", "switched", "mw", "mirror")
# The switched program is by far the slowest to compile (about 10 s of CPU per mode, a
# third of the file): it runs plainly and under vmap, which traces every value as jit
# does; its checks are the shared ones that the other entry points run under jit too.
ENTRY_MODES = {"switched": ("plain", "vmap")}
NO_START = object()  # a case's value for `y0` that removes it (uniform start)


class Case(NamedTuple):
    """One bad or extreme input.

    - `entry`: the name of an entry point, or a function of no argument (for options,
        callables and types, which are closed over).
    - `values`: the values that replace the legal ones (as given plainly: a Python float
        is a host value). Under jit and vmap each is cast to the dtype of the legal value
        and, when it is a scalar standing for one value per row, broadcast to every row.
    - `match`: a regex the error must contain; `None` for legal extreme input, whose
        output must be finite on the simplex.
    - `static`: the problem is known from shapes, dtypes or options, so it is refused when
        the function is called, traced or not.
    - `dtype`: of the legal values.
    """

    entry: str | Callable[[], Any]
    values: dict[str, Any]
    match: str | None
    static: bool = False
    dtype: Any = jnp.float64


CASES: dict[str, Case] = {}


def _add(name: str, case: Case) -> None:
    assert name not in CASES, name
    CASES[name] = case


def _row1(good, bad, dtype=jnp.float64):
    """One value per row, row 1 bad."""
    return jnp.array([good, bad], dtype)


# ----------------------------------------------------------------------------------------
# The table: bad input ends in a named error


# Times: NaN and ±inf as host values (refused at call time) and traced.
for _bad in (np.nan, np.inf, -np.inf):
    for _t in ("t0", "t1"):
        _add(f"{_t}={_bad}", Case("solve", {_t: _bad}, f"`{_t}` must be finite"))
_add("t1<t0", Case("solve", {"t1": -1.0}, "`t1` must be >= `t0`"))

# Saved times: NaN, decreasing, outside [t0, t1] (traced; host arrays refused at once).
for _name, _ts in (
    ("nan", [0.25, np.nan]),
    ("decreasing", [0.5, 0.25]),
    ("above-t1", [0.5, 2.0]),
    ("below-t0", [-0.5, 0.5]),
):
    _add(
        f"ts={_name}",
        Case(
            "solve",
            {"ts": jnp.array(_ts)},
            r"`SaveAt\(ts=...\)` must be finite, non-decreasing and within \[t0, t1\]",
        ),
    )

# Temperature: 0, negative, NaN, inf (a host scalar, and traced one per row) in every
# entry point that runs a flow; 1e-45 is a float32 subnormal, below the smallest normal.
_T = "`temperature` must be finite and > 0"
for _entry in FLOWS_FROM_START:
    for _bad in (0.0, -1.0, np.nan, np.inf):
        _add(f"{_entry}:temperature={_bad}", Case(_entry, {"temperature": _bad}, _T))
        _add(
            f"{_entry}:temperature={_bad}:row1",
            Case(_entry, {"temperature": _row1(1.0, _bad)}, _T + ROW1),
        )
_add(
    "temperature=1e-45:float32:row1",
    Case(
        "solve",
        {"temperature": _row1(1.0, 1e-45, jnp.float32)},
        r"`temperature` must be at least 1.18e-38 \(the smallest normal float32\)" + ROW1,
        dtype=jnp.float32,
    ),
)

# Logits: NaN, +inf, a row all -inf (traced; row 1 bad), in every entry point.
_L = GOOD[jnp.dtype(jnp.float64)]["logits"]
for _entry in ENTRIES:
    for _name, _logits, _match in (
        ("nan", _L.at[1, 2].set(jnp.nan), r"`logits` contains NaN or \+inf"),
        ("+inf", _L.at[1, 2].set(jnp.inf), r"`logits` contains NaN or \+inf"),
        ("all-inf", _L.at[1].set(-jnp.inf), "`logits` is all -inf"),
    ):
        _case = Case(_entry, {"logits": _logits}, _match + ROW1)
        _add(f"{_entry}:logits={_name}", _case)

# Starts: negative, NaN, not summing to 1, all mass on a masked token, wrong shape.
for _entry in FLOWS_FROM_START:
    for _name, _row, _match in (
        ("negative", [0.5, 0.6, -0.1, 0.0, 0.0], "`y0` has a negative or NaN entry"),
        ("nan", [0.5, np.nan, 0.5, 0.0, 0.0], "`y0` has a negative or NaN entry"),
        ("sum!=1", [0.5, 0.2, 0.2, 0.0, 0.0], "`y0` must sum to 1"),
        ("masked", [0.0, 0.0, 0.0, 0.0, 1.0], "`y0` puts no mass on any token allowed"),
    ):
        _y0 = jnp.array([[0.2] * V, _row])
        _add(f"{_entry}:y0={_name}", Case(_entry, {"y0": _y0}, _match + ROW1))
    _add(
        f"{_entry}:y0=wrong-shape",
        Case(
            _entry,
            {"y0": jnp.full((2, V - 1), 1 / (V - 1))},
            r"`y0` must have shape \(\*batch, 5\).*received shape \(2, 4\)",
            static=True,
        ),
    )

# Step sizes of the discrete maps (host scalars; traced).
_MAPS = (("mw", "multiplicative_weights"), ("mirror", "entropic_mirror_map"))
for _entry, _fname in _MAPS:
    # A host value: "`step_size` must be finite"; traced: "... of `<map>` must be finite".
    _match = f"`step_size`( of `{_fname}`)? must be finite"
    for _bad in (np.nan, np.inf, 0.0, -1.0):
        _add(f"{_entry}:step_size={_bad}", Case(_entry, {"step_size": _bad}, _match))

# A step size so large that the log-weights overflow: the mirror step diverges for
# step_size > 2 (|1 - step_size| > 1 each step); multiplicative weights overflow once
# step_size * |logits| / temperature passes the largest float.
_TOO_LARGE = r"`step_size` is too large for `{}`: its iterates overflowed at batch index"
_add(
    "mirror:step_size=1e100",
    Case("mirror", {"step_size": 1e100}, _TOO_LARGE.format("entropic_mirror_map")),
)
_add(
    "mw:step_size=1e308:row1",
    Case(
        "mw",
        {"step_size": 1e308, "temperature": jnp.array([1e10, 0.1])},
        _TOO_LARGE.format("multiplicative_weights") + r" \(1,\)",
    ),
)

# `eps` of time_to: not finite, not positive, or below the smallest normal float64
# (1e-310 is subnormal), which `time_to` cannot resolve. Small concrete arrays are
# checked at call time ("received ..."), traced ones on device (naming the row).
_EPS = r"`eps` must be finite and > 0, and at least 2.225e-308"
for _bad in (0.0, -1.0, np.nan, np.inf, 1e-310):
    _add(f"time_to:eps={_bad}", Case("time_to", {"eps": _bad}, _EPS))
    _case = Case("time_to", {"eps": _row1(1e-3, _bad)}, _EPS + r".*(received|\(1,\))")
    _add(f"time_to:eps={_bad}:row1", _case)

# Penalty strengths: the message names them, not the solver's step budget.
for _name, _bad, _match in (
    ("alpha", -1.0, r"`alpha` must be in \[0, inf\)"),
    ("alpha", np.nan, r"`alpha` must be in \[0, inf\)"),
    ("beta", np.nan, r"`beta` must be in \(-inf, inf\)"),
    ("beta", np.inf, r"`beta` must be in \(-inf, inf\)"),
):
    _add(f"{_name}={_bad}", Case("ode", {_name: _bad}, _match))
    _add(f"{_name}={_bad}:row1", Case("ode", {_name: _row1(0.5, _bad)}, _match + ROW1))

# Tolerances of the ODE and switched methods.
for _entry in ("ode", "switched"):
    for _name in ("rtol", "atol"):
        for _bad in (np.nan, -1.0, 0.0):
            _match = f"`{_name}` must be finite(; received| and > 0)"
            _add(f"{_entry}:{_name}={_bad}", Case(_entry, {_name: _bad}, _match))

# Face parameters: host values (refused when the face is built) and traced one per row.
for _name, _values, _match in (
    ("TopK(0)", {"top_k": 0}, "`top_k` must be"),
    ("TopP(0)", {"top_p": 0.0}, r"`top_p` must be in \(0, 1\]"),
    ("TopP(1.5)", {"top_p": 1.5}, r"`top_p` must be in \(0, 1\]"),
    ("MinP(nan)", {"min_p": np.nan}, r"`min_p` must be in \(0, 1\]"),
    ("Typical(1.0)", {"mass": 1.0}, r"`mass` must be in \(0, 1\)"),
    ("Epsilon(-1)", {"epsilon": -1.0}, r"`epsilon` must be in \(0, 1\)"),
    ("Eta(nan)", {"eta": np.nan}, r"`epsilon` must be in \(0, 1\)"),
):
    ((_key, _bad),) = _values.items()
    _good_value = GOOD[jnp.dtype(jnp.float64)][_key]
    _add(_name, Case("faces", _values, _match))
    _add(
        f"{_name}:row1",
        Case("faces", {_key: _good_value.at[1].set(_bad)}, _match + ROW1),
    )
# A non-integer top_k is refused from its dtype, traced or not.
_add("TopK(2.5)", Case("faces", {"top_k": 2.5}, r"\btop_k\b", static=True))
_add(
    "TopK(2.5):row1",
    Case("faces", {"top_k": jnp.array([2.0, 2.5])}, r"\btop_k\b", static=True),
)
_add(
    "Mask:all-false:row1",
    Case(
        "faces",
        {"mask": jnp.ones((2, V), bool).at[1].set(False)},
        "`Mask` is all False" + ROW1,
    ),
)
_add(
    "Mask:batch-does-not-broadcast",
    Case(
        "faces",
        {"mask": jnp.ones((3, V), bool)},
        r"batch shapes do not broadcast.*Mask \(3,\)",
        static=True,
    ),
)


# Options, callables and types: closed over (they cannot be traced); refused at call time.
def _solve_with(**options):
    flow = rx.Replicator(GOOD[jnp.dtype(jnp.float64)]["logits"], 1.0)
    return lambda: rx.solve(**{"flow": flow, "t1": 1.0, **options})


_SAVEAT_FN = r"`SaveAt\(fn=...\)`"
_LOGITS = GOOD[jnp.dtype(jnp.float64)]["logits"]
for _name, _call, _match in (
    (
        "saveat.fn=two-arguments",
        _solve_with(saveat=rx.SaveAt(fn=lambda t, log_p: log_p)),
        _SAVEAT_FN + " must be a function `fn\\(t, log_p, flow\\)`",
    ),
    (
        "saveat.fn=returns-str",
        _solve_with(saveat=rx.SaveAt(fn=lambda t, log_p, flow: "p")),
        _SAVEAT_FN + " must be a function `fn\\(t, log_p, flow\\)`",
    ),
    (
        "saveat.fn=returns-None",
        _solve_with(saveat=rx.SaveAt(fn=lambda t, log_p, flow: None)),
        _SAVEAT_FN + " returned no array",
    ),
    # The tests' run-time type checking refuses it as `SaveAt` is built; without it,
    # `solve` does ("must be callable").
    (
        "saveat.fn=3",
        lambda: rx.solve(rx.Replicator(_LOGITS), t1=1.0, saveat=rx.SaveAt(fn=3)),
        r"(?s)SaveAt.*\bfn\b",
    ),
    ("saveat=dict", _solve_with(saveat={"t1": True}), "saveat"),
    ("flow=dict", _solve_with(flow={"logits": _LOGITS}), "flow"),
    ("flow=array", _solve_with(flow=_LOGITS), "flow"),
    ("method=bogus", _solve_with(method="bogus"), "method"),
    (
        "method=exact+rtol",
        _solve_with(method="exact", rtol=1e-3),
        "`method='exact'` uses no ODE solver; do not pass `rtol`",
    ),
    (
        "method=Exact()+atol",
        _solve_with(method=rx.Exact(), atol=1e-3),
        "`atol` configure the ODE path",
    ),
    (
        "method=Switched()+TopK",
        _solve_with(method=rx.Switched(), support=rx.TopK(2)),
        r"`method=rx.Switched\(\)` re-evaluates one threshold rule.*received TopK",
    ),
    (
        "method=Switched()+no-support",
        _solve_with(method=rx.Switched()),
        r"`method=rx.Switched\(\)` re-evaluates one threshold rule.*received none",
    ),
    ("support=str", _solve_with(support="top_p"), "support"),
    ("mw:flow=dict", lambda: rx.multiplicative_weights({"s": _LOGITS}, 0.5, 3), "flow"),
    ("mirror:flow=array", lambda: rx.entropic_mirror_map(_LOGITS, 0.5, 3), "flow"),
    ("time_to:flow=dict", lambda: rx.time_to({"logits": _LOGITS}, 1e-3), "flow"),
):
    _add(_name, Case(_call, {}, _match, static=True))


# ----------------------------------------------------------------------------------------
# The table: extreme but legal values end in finite output on the simplex


for _entry in FLOWS_FROM_START:
    for _T in (1e-6, 1e6):
        _add(f"{_entry}:temperature={_T:g}", Case(_entry, {"temperature": _T}, None))
for _entry in ("solve", "ode", "switched"):
    _add(f"{_entry}:t1=1e6", Case(_entry, {"t1": 1e6}, None))


def _huge_logits(dtype):
    row = np.array([1e30, -1e30, 0.0, 1e30, -1e30])
    return jnp.array(np.stack([row, -row]), dtype)


_Y0 = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.3, 0.25, 0.2, 0.15, 0.1]])
# float32 on `solve` only: each entry point and dtype is one more compile per mode (and
# `switched` cannot run in float32 under x64: see test_switched_float32_under_x64).
for _dtype, _entries in ((jnp.float64, FLOWS_FROM_START), (jnp.float32, ("solve",))):
    _dname = jnp.dtype(_dtype).name
    for _entry in _entries:
        _values = {"logits": _huge_logits(_dtype), "y0": _Y0}
        _case = Case(_entry, _values, None, dtype=_dtype)
        _add(f"{_entry}:logits=+-1e30+y0:{_dname}", _case)
    # From uniform the closed form takes its own branch; the other entry points start
    # from `log p0` either way.
    _values = {"logits": _huge_logits(_dtype), "y0": NO_START}
    _add(f"solve:logits=+-1e30:{_dname}", Case("solve", _values, None, dtype=_dtype))


# ----------------------------------------------------------------------------------------
# The runner


@functools.cache
def _jitted(fn):
    return jax.jit(fn)


@functools.cache
def _vmapped(fn):
    return jax.vmap(fn)


def _as_given(value, good, mode: str, static: bool, legal: bool):
    """`value` as passed in `mode`. Plainly, a bad Python number stays a host value (to
    be refused at call time); arrays take `good`'s dtype. Traced (and legal values
    always, so that they reuse the compiled function), a scalar standing for a per-row
    value is broadcast to the rows. A static case keeps its own dtype (it is what is
    wrong with it)."""
    if mode == "plain" and isinstance(value, int | float) and not legal:
        return value
    value = jnp.asarray(value)
    if not static:
        value = value.astype(good.dtype)
    if (mode != "plain" or legal) and value.ndim == 0:
        value = jnp.broadcast_to(value, good.shape)
    return value


def _arguments(case: Case, mode: str) -> dict:
    args = dict(GOOD[jnp.dtype(case.dtype)])
    for key, value in case.values.items():
        if value is NO_START:
            del args[key]
        else:
            legal = case.match is None
            args[key] = _as_given(value, args[key], mode, case.static, legal)
    return args


def _run(case: Case, mode: str):
    if callable(case.entry):  # options: nothing to trace
        if mode == "plain":
            return case.entry()
        if mode == "jit":
            return jax.jit(case.entry)()
        return jax.vmap(lambda _: case.entry())(jnp.zeros(2))
    fn = ENTRIES[case.entry]
    args = _arguments(case, mode)
    if mode == "plain":
        return jax.block_until_ready(fn(args))
    if mode == "jit":
        return jax.block_until_ready(_jitted(fn)(args))
    # Row 0 of the mapped axis holds the legal values, row 1 the case's.
    # (A static case's value may not stack with the legal one: then it fills both rows.)
    good = GOOD[jnp.dtype(case.dtype)]
    legal = {
        k: good[k] if (good[k].shape, good[k].dtype) == (v.shape, v.dtype) else v
        for k, v in args.items()
    }
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), legal, args)
    return jax.block_until_ready(_vmapped(fn)(stacked))


def _assert_on_simplex(log_p):
    log_p = np.asarray(log_p)
    assert not np.any(np.isnan(log_p)), "NaN in log p"
    assert not np.any(log_p == np.inf), "+inf in log p"
    p = np.exp(log_p)
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1, atol=MASS_TOL[log_p.dtype])


def _params():
    for name, case in CASES.items():
        named = isinstance(case.entry, str)
        for mode in ENTRY_MODES.get(case.entry, MODES) if named else MODES:
            yield pytest.param(case, mode, id=f"{name}-{mode}")


@pytest.mark.parametrize("case, mode", list(_params()))
def test_bad_input(case: Case, mode: str):
    if case.match is None:
        _assert_on_simplex(_run(case, mode))
        return
    if case.static or mode == "plain":
        expected = CALL_TIME_ERRORS + RUNTIME_ERRORS
    else:
        expected = RUNTIME_ERRORS
    with pytest.raises(expected, match=case.match) as info:
        _run(case, mode)
    if case.static:  # known from shapes, dtypes or options: refused at call time
        assert isinstance(info.value, CALL_TIME_ERRORS), type(info.value)


def test_switched_float32_under_x64():
    # diffrax pairs the event value with a Python `0.0` in a `lax.cond` (float64 under
    # x64): `rx.Switched` gives its event value in JAX's default float dtype, so that
    # float32 runs under x64 too, and agrees with float64 to float32 rounding.
    a = GOOD[jnp.dtype(jnp.float32)]
    got = _switched(a)
    assert got.dtype == jnp.float32
    _assert_on_simplex(got)
    wide = dict(GOOD[jnp.dtype(jnp.float64)], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.exp(got), np.exp(_switched(wide)), atol=1e-5)
