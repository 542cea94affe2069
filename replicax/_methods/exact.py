"""The exact method: the closed forms of THEORY §1 (constant scores)."""

from typing import ClassVar

from .._rows import Row, Rows
from .._saveat import SaveAt
from .._solution import RESULTS
from .base import AbstractMethod, no_steps, RowSolution, save_along


class Exact(AbstractMethod):
    """The closed form of the flow (`flow.closed_form`), for constant scores: exact to
    rounding at every time, no steps, and differentiable without a tape.

    From a uniform start each saved time costs one reduction (the normaliser) and one
    write per token. `solve` picks this method itself for constant scores
    (`method="auto"`).
    """

    name: ClassVar[str] = "exact"

    def prepare(self, rows: Rows, saveat: SaveAt) -> "Exact":
        del saveat
        if not rows.flow.score.is_constant:
            raise ValueError(
                "`method='exact'` needs a constant score (e.g. `Logits` alone); this "
                "score depends on the state or history, so use `rx.ODE()` "
                "(`method='ode'`) or 'auto'."
            )
        return self

    def solve_row(self, row: Row, t0, t1, save_ts, saveat) -> RowSolution:
        del t1
        flow, face = row.flow, row.face
        centred = row.centred_scores()
        log_p0 = None if row.uniform else row.log_p0()

        def log_p_at(t):
            return flow.closed_form(t - t0, log_p0, centred, face)

        log_p, observables = save_along(log_p_at, save_ts, saveat, flow)
        return RowSolution(log_p, observables, None, no_steps(), RESULTS.successful)
