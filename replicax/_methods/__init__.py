"""The methods family: how one context is solved (exact closed form, diffrax ODE, switched
faces; later equilibria and fused kernels). `solve` prepares the rows and hands each to
the method; it calls nothing else."""

from .base import AbstractMethod as AbstractMethod, RowSolution as RowSolution
from .exact import Exact as Exact
from .ode import ODE as ODE
from .switched import Switched as Switched, Switches as Switches
