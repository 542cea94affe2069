"""What `solve` keeps of a trajectory."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float


class SaveAt(eqx.Module):
    """Which times `solve` saves, and what it saves at them.

    Saved times are, in this order: `t0` (if `t0=True`), the entries of `ts`, and `t1`
    (if `t1=True`). With none of them given, only `t1` is saved.

    **Arguments:**

    - `t0`: save the initial time.
    - `t1`: save the final time.
    - `ts`: an increasing array of times in `[t0, t1]` to save at. Dynamic: changing its
        values does not recompile (its length does).
    - `fn`: `fn(t, log_p, flow) -> PyTree` of one context, called at every saved time
        instead of saving `log_p`. `flow` is that context's flow (its own logits and
        temperature), so that e.g. `lambda t, lp, flow: rx.entropy(lp)` keeps a scalar per
        saved time and the `(len(ts), *batch, vocab)` array is never built.
    """

    t0: bool = eqx.field(default=False, static=True)
    t1: bool = eqx.field(default=False, static=True)
    ts: Float[Array, " times"] | None = None
    fn: Callable | None = eqx.field(default=None, static=True)

    def __init__(
        self,
        *,
        t0: bool = False,
        t1: bool = False,
        ts: Float[ArrayLike, " times"] | None = None,
        fn: Callable | None = None,
    ):
        if ts is not None:
            ts = jnp.asarray(ts)
            if ts.ndim != 1:
                raise ValueError(
                    f"`SaveAt(ts=...)` must be one-dimensional; received shape {ts.shape}."
                )
        if not t0 and not t1 and ts is None:
            t1 = True
        self.t0 = t0
        self.t1 = t1
        self.ts = ts
        self.fn = fn

    @property
    def num_times(self) -> int:
        return int(self.t0) + int(self.t1) + (0 if self.ts is None else self.ts.shape[0])
