"""The methods family: how one context is solved (exact closed form, diffrax ODE,
switched faces; rest points for `rx.equilibrium`; later fused kernels). `solve` prepares
the rows and hands each to the method; it calls nothing else."""

from .base import (
    AbstractMethod as AbstractMethod,
    RowEquilibrium as RowEquilibrium,
    RowSolution as RowSolution,
)
from .exact import Exact as Exact
from .ode import ODE as ODE
from .rest_point import RestPoint as RestPoint
from .switched import Switched as Switched, Switches as Switches
