"""The rest-point method: equilibria of a flow, found by a root find in log space, with
a stability flag from the Jacobian of the full field (THEORY §4).

The rest points of a flow are the zeros of its own centred log-space field
`flow.log_rate(t, log p, aux, face)`, with the history `aux` held at rest
(`score.rest_aux(log p)`). For (E) they are exactly the quantal-response points
`p = softmax(z(p)/T)`; for (R) they are the points where the scores are constant on the
face (interior Nash points of a payoff, for instance).

The field is invariant under the gauge `θ → θ + c·1`, so its Jacobian in `θ` is singular
along `1`. The root find therefore solves

    F(θ) = log_rate(readout θ) + logsumexp_face(θ)·1   on the face,   F(θ) = θ   off it,

whose zero has `log_rate = 0` and `logsumexp_face θ = 0` (the rate is centred,
`<p, log_rate> = 0`, so `<p, F> = logsumexp θ`), and whose Jacobian `J + 1 pᵀ` is
nonsingular wherever the rest point is isolated (`J` nonsingular on the tangent space).
"""

import functools
import math
from typing import ClassVar

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import optimistix as optx
from jaxtyping import Array, Bool, Complex

from .._custom_types import RealScalarLike
from .._flows import AbstractFlow
from .._rows import (
    as_scalar,
    check_scalar,
    floats_to_arrays,
    Row,
    Rows,
    vmap_rows,
)
from .._saveat import SaveAt
from .._scores import Logits
from .._solution import RESULTS
from .base import AbstractMethod, RowEquilibrium, RowSolution
from .ode import check_max_steps, tolerances

_EIGENSOLVERS = ("auto", "dense", "arnoldi")


class RestPoint(AbstractMethod):
    """Find a rest point of the flow from each context's start (for `rx.equilibrium`).

    The root find is `optimistix.root_find` on `F(θ)` above (module docstring), started
    from the context's start; its gradients come from the implicit function theorem
    (as with `optimistix.ImplicitAdjoint`): they cost one linear solve with the
    Jacobian at the root, whatever the number of iterations, and they do not depend on
    the start.

    Stability is read from the Jacobian of the *full* field, on the log-weights and the
    history (`log_rate` and `score.aux_rate`), at the rest point, restricted to the
    tangent space: `θ` on the face with the gauge direction `1` removed (projected with
    `P = I - 11ᵀ/n` on the face; off-face `θ` removed), the history kept whole. Its
    eigenvalue with the largest real part is `leading_eigenvalue` (of a complex pair,
    the one with positive imaginary part), and the rest point is `stable` when that real
    part is `< -stability_tol`: a Hopf point (real part ≈ 0) is not stable.

    **Arguments:**

    - `rtol`, `atol`: tolerances of the default root finder `optimistix.Newton`: it
        stops when the Newton step is below `atol + rtol·|θ|` and `|F| <= atol`. Default
        `eps^(3/4)` of the dtype (about `2e-12` in float64, `6e-6` in float32). Dynamic.
    - `max_steps`: iteration budget of the root find (static).
    - `throw`: raise if the root find fails; with `False`, failures are reported per row
        in `Equilibrium.result` (`RESULTS.rest_point_not_found`). Dynamic: switching it
        does not recompile.
    - `root_finder`: an `optimistix` root finder to use instead of Newton (then give it
        its own tolerances, not `rtol`/`atol`).
    - `linear_solver`: the `lineax` solver of the Newton steps and of the implicit
        gradient. Default: `lineax.LU()` (the `V x V` Jacobian formed with `V` `jvp`s)
        up to `V = dense_max`; above, matrix-free `lineax.BiCGStab` at the root-find
        tolerances (one `jvp` per iteration, memory `O(V)`, no restart basis; it
        compiles about three times faster than `lineax.GMRES`, which you can pass
        instead where BiCGStab stalls). With `jax_enable_x64` off (float32 only),
        matrix-free `lineax.GMRES(restart=20)` at `sqrt(eps)` instead: lineax's
        BiCGStab then takes negative intermediate scalars for a breakdown and stops
        at its first iteration on these non-symmetric Jacobians.
    - `adjoint`: an `optimistix` adjoint; default the implicit function theorem with
        `linear_solver`, as `optimistix.ImplicitAdjoint` but with no run-time check in
        the linear solves of its tangent and transpose (see `ImplicitAdjoint` in this
        module).
    - `eigensolver`: `"dense"` forms the tangent Jacobian with `jax.jacfwd` and takes
        all its eigenvalues (`jnp.linalg.eigvals`); `"arnoldi"` never forms it:
        `krylov_dim` steps of Arnoldi on `jvp`s, returning the Ritz value with the
        largest real part (approximate: exact once the Krylov space holds the leading
        eigenvector, e.g. for a low-rank payoff, and otherwise an estimate that can miss
        a leading eigenvalue inside a dense cluster); `"auto"` (default): dense when the
        state (log-weights and history) has at most `dense_max` entries. Static.
    - `dense_max`: the threshold of both automatic choices above (static, default 512).
    - `krylov_dim`: the Krylov dimension of Arnoldi (static, default 64).
    - `stability_tol`: the margin of `stable` on the leading real part. Default
        `sqrt(eps)` of the dtype (`1.5e-8` in float64, `3.5e-4` in float32). Dynamic.

    The field is evaluated at `t = 0` (the scores of replicax do not depend on time).
    Where a search failed (`throw=False`), `log_p` and its gradients are not meaningful.
    The eigensolvers call `jnp.linalg.eigvals` (of the tangent Jacobian, or of Arnoldi's
    small Hessenberg matrix), which JAX implements on CPU and GPU.

    `RestPoint` is not a method of `rx.solve` (it computes no path): use it through
    `rx.equilibrium`.
    """

    name: ClassVar[str] = "rest_point"
    rtol: RealScalarLike | None = None
    atol: RealScalarLike | None = None
    max_steps: int = eqx.field(static=True, default=256)
    throw: bool | Bool[Array, ""] = True
    root_finder: optx.AbstractRootFinder | None = None
    linear_solver: lx.AbstractLinearSolver | None = None
    adjoint: optx.AbstractAdjoint | None = None
    eigensolver: str = eqx.field(static=True, default="auto")
    dense_max: int = eqx.field(static=True, default=512)
    krylov_dim: int = eqx.field(static=True, default=64)
    stability_tol: RealScalarLike | None = None

    def __check_init__(self):
        check_max_steps(self.max_steps, allow_none=False)
        for name in ("dense_max", "krylov_dim"):
            check_max_steps(getattr(self, name), name, allow_none=False)
        throw = self.throw
        if not isinstance(throw, bool) and not (
            eqx.is_array(throw) and throw.shape == () and throw.dtype == bool
        ):
            raise TypeError(f"`throw` must be a bool; received {self.throw!r}.")
        if self.eigensolver not in _EIGENSOLVERS:
            raise ValueError(
                "`eigensolver` must be 'auto', 'dense' or 'arnoldi'; received "
                f"{self.eigensolver!r}."
            )
        if self.root_finder is not None:
            if not isinstance(self.root_finder, optx.AbstractRootFinder):
                raise TypeError(
                    "`root_finder` must be an optimistix root finder (e.g. "
                    f"`optx.Newton(...)`); received {type(self.root_finder).__name__}."
                )
            if self.rtol is not None or self.atol is not None:
                raise ValueError(
                    "`rtol` and `atol` configure the default root finder; with your "
                    "own `root_finder`, give them to it instead."
                )
        if self.linear_solver is not None and not isinstance(
            self.linear_solver, lx.AbstractLinearSolver
        ):
            raise TypeError(
                "`linear_solver` must be a lineax solver (e.g. `lx.LU()`); received "
                f"{type(self.linear_solver).__name__}."
            )
        if self.adjoint is not None and not isinstance(
            self.adjoint, optx.AbstractAdjoint
        ):
            raise TypeError(
                "`adjoint` must be an optimistix adjoint (e.g. "
                f"`optx.ImplicitAdjoint()`); received {type(self.adjoint).__name__}."
            )

    # -- not a method of `solve` ------------------------------------------------------

    def prepare(self, rows: Rows, saveat: SaveAt) -> "RestPoint":
        del rows, saveat
        raise ValueError(_NOT_A_PATH)

    def solve_row(self, row, t0, t1, save_ts, saveat) -> RowSolution:
        del row, t0, t1, save_ts, saveat
        raise ValueError(_NOT_A_PATH)

    # -- rest points ------------------------------------------------------------------

    def prepare_rest_point(self, rows: Rows) -> "RestPoint":
        flow = rows.flow
        if flow.score.is_constant and _ignores_state(flow):
            raise ValueError(
                f"`flow`: {type(flow).__name__} with a constant score has no isolated "
                "rest point (its field does not depend on the state: the replicator "
                "(R) moves every start towards the argmax set of the scores, where "
                "every distribution is at rest). Use its closed-form limit, "
                "`rx.limit_log_p(flow, y0=...)`."
            )
        # A history without a rest (cumulative counts) is refused now, from shapes.
        jax.eval_shape(
            lambda r: vmap_rows(lambda row: row.flow.score.rest_aux(row.log_p0()), r),
            rows,
        )
        dtype = rows.dtype
        eps = float(jnp.finfo(dtype).eps)
        if self.root_finder is None:
            rtol, atol = tolerances(self.rtol, self.atol, dtype, eps**0.75)
            root_finder = None
        else:
            rtol = atol = None
            root_finder = floats_to_arrays(self.root_finder, dtype)
        tol = self.stability_tol
        tol = check_scalar(
            as_scalar(math.sqrt(eps) if tol is None else tol, "stability_tol", dtype),
            "stability_tol",
            positive=True,
            allow_zero=True,
        )
        return eqx.tree_at(
            lambda m: (m.rtol, m.atol, m.root_finder, m.stability_tol, m.throw),
            self,
            (rtol, atol, root_finder, tol, jnp.asarray(self.throw, bool)),
            is_leaf=lambda x: x is None,
        )

    def rest_point_row(self, row: Row) -> RowEquilibrium:
        flow, face, dtype = row.flow, row.face, row.dtype
        vocab = face.shape[-1]
        t = jnp.zeros((), dtype)

        def rest_field(theta, args):
            flow, face = args
            log_p = flow.readout(theta, face)
            rate = flow.log_rate(t, log_p, flow.score.rest_aux(log_p), face)
            lse = jax.nn.logsumexp(jnp.where(face, theta, -jnp.inf))
            return jnp.where(face, rate + lse, theta)

        linear_solver = self.linear_solver
        if linear_solver is None:
            if vocab <= self.dense_max:
                linear_solver = lx.LU()
            elif jax.config.jax_enable_x64:
                default = jnp.asarray(jnp.finfo(dtype).eps ** 0.75, dtype)
                rtol = default if self.rtol is None else self.rtol
                atol = default if self.atol is None else self.atol
                linear_solver = lx.BiCGStab(rtol=rtol, atol=atol)
            else:
                # With x64 disabled, lineax's BiCGStab takes a negative `alpha`,
                # `omega` or `rho` (common for these non-symmetric Jacobians) for a
                # breakdown: every Newton step failed at its first iteration. GMRES
                # at sqrt(eps) (inexact Newton; float32 matvecs do not reach eps^0.75
                # on every row) converges.
                loose = jnp.asarray(jnp.finfo(dtype).eps ** 0.5, dtype)
                linear_solver = lx.GMRES(rtol=loose, atol=loose, restart=20)
        root_finder = self.root_finder
        if root_finder is None:
            root_finder = optx.Newton(
                rtol=self.rtol, atol=self.atol, linear_solver=linear_solver
            )
        adjoint = self.adjoint
        if adjoint is None:
            adjoint = ImplicitAdjoint(linear_solver)
        sol = optx.root_find(
            rest_field,
            root_finder,
            row.theta0(),
            args=(flow, face),
            max_steps=self.max_steps,
            adjoint=adjoint,
            throw=False,
        )
        log_p = flow.readout(sol.value, face)
        aux = flow.score.rest_aux(log_p)
        rate = flow.log_rate(t, log_p, aux, face)
        residual = jnp.max(jnp.where(face, jnp.abs(rate), 0))
        finite = jnp.all(jnp.where(face, jnp.isfinite(log_p), True))
        ok = (sol.result == optx.RESULTS.successful) & finite & jnp.isfinite(residual)
        result = RESULTS.where(ok, RESULTS.successful, RESULTS.rest_point_not_found)

        # The eigenvalue carries no gradient: eigenvalue derivatives are undefined at
        # repeated eigenvalues, which a multi-stage memory always has (the memory's
        # component along 1 is a Jordan block decoupled from the state), and the
        # gradient of `log_p` must not pay for an eigendecomposition's derivative.
        # It is taken at a finite point even where the search failed (those rows report
        # NaN), so that the eigensolver never sees NaN.
        safe_log_p = jnp.where(face & ok, log_p, jnp.where(face, 0, -jnp.inf))
        safe_log_p = jax.lax.stop_gradient(jax.nn.log_softmax(safe_log_p))
        frozen = jtu.tree_map(
            lambda x: jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, flow
        )
        leading = self._leading_eigenvalue(frozen, face, t, safe_log_p)
        leading = jnp.where(ok, leading, jnp.nan)
        stable = ok & (jnp.real(leading) < -self.stability_tol)
        steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        return RowEquilibrium(log_p, stable, leading, residual, result, steps)

    def _leading_eigenvalue(self, flow, face, t, log_p) -> Complex[Array, ""]:
        """The eigenvalue with the largest real part of the tangent Jacobian of the full
        field (log-weights and history) at the rest point `log_p`."""
        vocab = face.shape[-1]
        aux = flow.score.rest_aux(log_p)
        has_aux = len(jtu.tree_leaves(aux)) > 0
        if has_aux:
            aux_flat, unravel = jfu.ravel_pytree(aux)
            aux_flat = aux_flat.astype(log_p.dtype)
        else:
            aux_flat, unravel = jnp.zeros((0,), log_p.dtype), None

        def field(x):
            a = unravel(x[vocab:]) if has_aux else aux
            rate, a_rate = flow.state_rate(t, x[:vocab], a, face)
            if not has_aux:
                return rate
            a_rate, _ = jfu.ravel_pytree(a_rate)
            return jnp.concatenate([rate, a_rate.astype(rate.dtype)])

        n = jnp.sum(face).astype(log_p.dtype)

        def project(x):
            # P = I - 11ᵀ/n on the face, 0 off it (the gauge and off-face directions
            # are no directions of the simplex); the history is kept.
            theta = jnp.where(face, x[:vocab], 0)
            theta = jnp.where(face, theta - jnp.sum(theta) / n, 0)
            return jnp.concatenate([theta, x[vocab:]])

        x = jnp.concatenate([jnp.where(face, log_p, 0), aux_flat])
        size = x.shape[0]
        dense = self.eigensolver == "dense" or (
            self.eigensolver == "auto" and size <= self.dense_max
        )
        if dense:
            leading = _dense_leading(field, project, x)
        else:
            leading = _arnoldi_leading(field, project, x, min(self.krylov_dim, size))
        if not has_aux:
            # A face of one token has no tangent direction: nothing can move.
            leading = jnp.where(n > 1, leading, -jnp.inf)
        return leading


_NOT_A_PATH = (
    "`rx.RestPoint` finds rest points, not paths: use it with "
    "`rx.equilibrium(flow, y0=..., method=rx.RestPoint(...))`, and `rx.solve` with "
    "`rx.ODE()` (or 'auto')."
)


def _leading(eigenvalues: Complex[Array, " n"]) -> Complex[Array, ""]:
    """The eigenvalue with the largest real part; of a conjugate pair, `Im >= 0`."""
    i = jnp.argmax(jnp.real(eigenvalues))
    return jax.lax.complex(jnp.real(eigenvalues[i]), jnp.abs(jnp.imag(eigenvalues[i])))


def _dense_leading(field, project, x) -> Complex[Array, ""]:
    size = x.shape[0]
    jac = jax.jacfwd(field)(x)
    eye = jnp.eye(size, dtype=x.dtype)
    proj = jax.vmap(project, in_axes=1, out_axes=1)(eye)  # symmetric
    k = proj @ jac @ proj
    # The directions removed by P (gauge, off-face) would add eigenvalues 0 that are no
    # eigenvalues of the flow: move them to -sigma, left of the whole spectrum of k
    # (|λ| <= the largest absolute row sum).
    sigma = 1 + jnp.max(jnp.sum(jnp.abs(k), axis=1))
    k = k - sigma * (eye - proj)
    return _leading(jnp.linalg.eigvals(k))


def _arnoldi_leading(field, project, x, krylov_dim: int) -> Complex[Array, ""]:
    """The Ritz value with the largest real part after `krylov_dim` Arnoldi steps on
    `v -> P J P v` (J by `jvp`), started in the range of `P`."""
    size = x.shape[0]
    dtype = x.dtype
    _, jvp = jax.linearize(field, x)

    def op(v):
        return project(jvp(project(v)))

    # A fixed, generic start (no randomness: the same answer on every call): a hash
    # of the index, which no eigenvector of a flow is orthogonal to in practice.
    index = jnp.arange(1, size + 1, dtype=dtype)
    v0 = project(jnp.modf(jnp.sin(index * 12.9898) * 43758.5453)[0] - 0.25)
    basis = jnp.zeros((krylov_dim + 1, size), dtype)
    basis = basis.at[0].set(v0 / jnp.linalg.norm(v0))
    hess = jnp.zeros((krylov_dim + 1, krylov_dim), dtype)
    small = jnp.finfo(dtype).eps ** 0.75
    rows = jnp.arange(krylov_dim + 1, dtype=jnp.int32)

    def step(j, carry):
        basis, hess, alive, count = carry
        w = op(basis[j])
        scale = jnp.linalg.norm(w)
        known = rows <= jnp.asarray(j, jnp.int32)
        # Classical Gram-Schmidt twice: orthogonal to rounding.
        h = jnp.where(known, basis @ w, 0)
        w = w - h @ basis
        h2 = jnp.where(known, basis @ w, 0)
        w = w - h2 @ basis
        h = h + h2
        # Back into the range of P: rounding leaves components along the removed
        # directions (the gauge `1`: `1ᵀJ` can be large), which a small `beta` would
        # blow up into a spurious basis vector with Ritz value 0.
        w = project(w)
        beta = jnp.linalg.norm(w)
        # Breakdown: the Krylov space is invariant (all of it is known).
        go_on = alive & (beta > small * scale)
        column = jnp.where(alive, h, 0).at[j + 1].set(jnp.where(go_on, beta, 0))
        hess = hess.at[:, j].set(column)
        basis = basis.at[j + 1].set(jnp.where(go_on, w / jnp.where(go_on, beta, 1), 0))
        return basis, hess, go_on, count + alive.astype(jnp.int32)

    carry = (basis, hess, jnp.linalg.norm(v0) > 0, jnp.zeros((), jnp.int32))
    _, hess, _, count = jax.lax.fori_loop(0, krylov_dim, step, carry)
    h = hess[:krylov_dim]
    # Columns past a breakdown carry no information: give them eigenvalues -sigma
    # (the matrix is block upper triangular there), left of every Ritz value.
    unused = jnp.arange(krylov_dim, dtype=jnp.int32) >= count
    sigma = 1 + jnp.max(jnp.sum(jnp.abs(h), axis=1))
    h = jnp.where(unused[None, :], 0, h) - jnp.diag(jnp.where(unused, sigma, 0))
    return _leading(jnp.linalg.eigvals(h))


class ImplicitAdjoint(optx.AbstractAdjoint):
    """Gradients of a root find from the implicit function theorem: at the root `y*` of
    `F(y, x) = 0`, `dy* = -(∂F/∂y)⁻¹ (∂F/∂x) dx`, one linear solve whatever the number
    of iterations (what `optimistix.ImplicitAdjoint` computes).

    The solve goes through `jax.lax.custom_linear_solve`, with lineax's solver called
    with `throw=False` for the tangent and for its transpose. lineax's own transpose
    rule checks its solution for non-finite values (`throw=True`, fixed there) in a
    `cond` with a host callback; in a program sharded along the vocabulary XLA places
    that `cond` on one device and gathers a vector there ("involuntary full
    rematerialization"). A singular Jacobian at the root shows as non-finite
    gradients; the search itself reports a failed or non-isolated rest point.
    """

    linear_solver: lx.AbstractLinearSolver

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        # The last input is the loop the solver runs (optimistix's convention); a plain
        # `lax.while_loop` here, as the gradient never goes through the iterations.
        inputs = inputs + (functools.partial(eqxi.while_loop, kind="lax"),)
        root, residual = _implicit_root(
            primal_fn, rewrite_fn, inputs, tags, self.linear_solver
        )
        return root, jtu.tree_map(eqxi.nondifferentiable_backward, residual)


@eqx.filter_custom_jvp
def _implicit_root(primal_fn, rewrite_fn, inputs, tags, linear_solver):
    del rewrite_fn, tags, linear_solver
    return jtu.tree_map(jnp.asarray, primal_fn(inputs))


def _is_none(x) -> bool:
    return x is None


def _rewrite_at(root, args):
    rewrite_fn, residual, inputs = args
    return rewrite_fn(root, residual, inputs)


@_implicit_root.def_jvp
def _implicit_root_jvp(primals, tangents):
    primal_fn, rewrite_fn, inputs, tags, linear_solver = primals
    t_inputs = tangents[2]
    root, residual = _implicit_root(primal_fn, rewrite_fn, inputs, tags, linear_solver)
    # `∂F/∂x · dx` over the inputs that carry a tangent.
    untangented = jtu.tree_map(_is_none, t_inputs, is_leaf=_is_none)
    fixed, varied = eqx.partition(inputs, untangented, is_leaf=_is_none)
    _, rhs = jax.jvp(
        lambda v: rewrite_fn(root, residual, eqx.combine(v, fixed)),
        (varied,),
        (t_inputs,),
    )
    operator = lx.JacobianLinearOperator(
        _rewrite_at, root, (rewrite_fn, residual, inputs), tags=tags
    )

    def solve(_, b):
        return lx.linear_solve(operator, b, linear_solver, throw=False).value

    def transpose_solve(_, b):
        transposed = operator.transpose()
        return lx.linear_solve(transposed, b, linear_solver, throw=False).value

    t_root = jax.lax.custom_linear_solve(operator.mv, rhs, solve, transpose_solve)
    t_root = jtu.tree_map(jnp.negative, t_root)
    t_residual = jax.custom_derivatives.zero_from_primal(residual, symbolic_zeros=True)
    return (root, residual), (t_root, t_residual)


def _ignores_state(flow: AbstractFlow) -> bool:
    """Whether the flow's field, for a constant score, does not depend on the state
    along the tangent space (as (R): `θ̇ = s/T`), so that its rest points are not
    isolated. Probed on a three-token problem, at trace time."""
    with jax.ensure_compile_time_eval():
        dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
        probe = eqx.tree_at(
            lambda f: (f.score, f.temperature),
            flow,
            (Logits(jnp.asarray([0.0, 0.5, 1.0], dtype)), jnp.ones((), dtype)),
        )
        face = jnp.ones((3,), bool)
        t = jnp.zeros((), dtype)

        def rate(theta):
            return probe.log_rate(t, probe.readout(theta, face), None, face)

        theta = jnp.log(jnp.asarray([0.2, 0.3, 0.5], dtype))
        tangent = jnp.asarray([1.0, -1.0, 0.0], dtype)
        _, out = jax.jvp(rate, (theta,), (tangent,))
        out = out - jnp.mean(out)
        return bool(jnp.max(jnp.abs(out)) < 1e-6)

