"""The exact method: the closed forms of THEORY §1 (constant scores)."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._kernels import KERNELS, affine_moments, affine_trajectory, check_block_v
from .._rows import Row, Rows
from .._saveat import SaveAt
from .._solution import RESULTS
from .._statistics import path_statistics, statistics_from_moments
from .base import AbstractMethod, RowSolution, no_steps, save_along

_KERNEL_CHOICES = ("auto",) + KERNELS


class Exact(AbstractMethod):
    """The closed form of the flow (`flow.closed_form`), for constant scores: exact to
    rounding at every time, no steps, and differentiable without a tape.

    From a uniform start each saved time costs one reduction (the normaliser) and one
    write per token. `solve` picks this method itself for constant scores
    (`method="auto"`).

    **Arguments:**

    - `kernel`: how the saved `log_p` is computed, for flows whose closed form is affine
        in the start and the scores (`flow.closed_form_coefficients`, both built-in
        flows):
        - `"auto"` (default): `flow.closed_form` at each saved time, vmapped over the
            times (XLA fuses it). For now the same everywhere: `"pallas"` stays opt-in
            until it is measured on a GPU (`benchmarks/` will decide when "auto" picks
            it).
        - `"jnp"`: the plain-jnp reference of the fused path: every normaliser from one
            reduction over the vocabulary, then one write of the `(times, vocab)` block.
        - `"pallas"`: the same as two Pallas kernels (one pass for all the normalisers,
            an online logsumexp per saved time; one write pass), lowered with Triton
            when the program is lowered for a CUDA GPU. Elsewhere (CPU, TPU) they run
            in Pallas's interpreter, which is correct but slow: use it there for
            testing only. Gradients (forward and
            reverse mode) come from a JVP written in jnp on the saved output; no kernel
            runs in the backward pass.

        With `SaveAt(fn=rx.path_statistics)` no kernel writes `log p`: every kernel
        computes those statistics for all saved times from one read of the logits
        (`"pallas"` in its normaliser kernel, the others in jnp). With any other
        `SaveAt(fn=...)` every kernel falls back to the `"auto"` path (which never
        stores the `(times, vocab)` block these kernels write).
    - `block_v`: the block of the vocabulary of the Pallas kernels, a power of two;
        default `min(1024, next power of two of V)`. Ignored by the other kernels.

    **Raises:**

    `ValueError` for an unknown `kernel` or a bad `block_v` (when constructed), for a
    score that is not constant, and for `kernel="jnp"`/`"pallas"` with a flow that has
    no affine closed form (`closed_form_coefficients` returns `None`) (in `rx.solve`).
    """

    # Checked in `__check_init__` (a clear error naming `kernel`), hence `str`.
    kernel: str = eqx.field(static=True, default="auto")
    block_v: int | None = eqx.field(static=True, default=None)

    name: ClassVar[str] = "exact"

    def __check_init__(self):
        if self.kernel not in _KERNEL_CHOICES:
            raise ValueError(
                f"`kernel` must be one of {_KERNEL_CHOICES}; received {self.kernel!r}."
            )
        check_block_v(self.block_v)

    def prepare(self, rows: Rows, saveat: SaveAt) -> "Exact":
        del saveat
        if not rows.flow.score.is_constant:
            raise ValueError(
                "`method='exact'` needs a constant score (e.g. `Logits` alone); this "
                "score depends on the state or history, so use `rx.ODE()` "
                "(`method='ode'`) or 'auto'."
            )
        if self.kernel != "auto":
            coefficients = jax.eval_shape(
                lambda flow: flow.closed_form_coefficients(jnp.zeros((), rows.dtype)),
                rows.flow,
            )
            if coefficients is None:
                raise ValueError(
                    f"`rx.Exact(kernel={self.kernel!r})` needs a flow whose closed "
                    "form is affine in the start and the scores; "
                    f"`{type(rows.flow).__name__}.closed_form_coefficients` returns "
                    "None. Use `kernel='auto'`."
                )
        return self

    def solve_row(self, row: Row, t0, t1, save_ts, saveat) -> RowSolution:
        del t1
        flow, face = row.flow, row.face
        centred = row.centred_scores()
        log_p0 = None if row.uniform else row.log_p0()
        if saveat.fn is path_statistics:
            coefficients = flow.closed_form_coefficients(save_ts - t0)
            if coefficients is not None:
                return self._statistics(row, log_p0, centred, coefficients)
        if self.kernel != "auto" and saveat.fn is None:
            a, b = flow.closed_form_coefficients(save_ts - t0)
            log_p = affine_trajectory(
                log_p0,
                centred,
                face,
                a,
                b,
                kernel=self.kernel,
                block_v=self.block_v,
            ).astype(row.dtype)
            return RowSolution(log_p, None, None, no_steps(), RESULTS.successful)

        def log_p_at(t):
            return flow.closed_form(t - t0, log_p0, centred, face)

        log_p, observables = save_along(log_p_at, save_ts, saveat, flow)
        return RowSolution(log_p, observables, None, no_steps(), RESULTS.successful)

    def _statistics(self, row, log_p0, centred, coefficients) -> RowSolution:
        # One read of (log p0, scores) for all saved times (`affine_moments`).
        a, b = coefficients
        kernel = "pallas" if self.kernel == "pallas" else "jnp"
        moments = affine_moments(
            log_p0, centred, row.face, a, b, kernel=kernel, block_v=self.block_v
        )
        score_top = jnp.max(jnp.where(row.face, row.scores(), -jnp.inf))
        statistics = statistics_from_moments(*moments, score_top)
        statistics = jax.tree.map(lambda y: y.astype(row.dtype), statistics)
        return RowSolution(None, statistics, None, no_steps(), RESULTS.successful)
