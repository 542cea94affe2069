"""Lock-in: self-reinforcement makes brittle attractors (THEORY §4).

Two tokens with logits `s = (0, δ)`, so token 2 is the right one, and the
self-reinforcing score `z = s + β p`:

1. Under the replicator (R), `x = p₁` has a saddle at `x* = (1 + δ/β)/2`: every start
   above it locks onto the wrong token, every start below it onto the right one.
   `rx.basins` maps where a grid of starts ends; a finer grid inside the bracket the map
   found measures the separatrix.
2. Under the entropic replicator (E) (bistable for `β > 2T`), the wrong attractor exists
   only while `δ < δ_fold = β u_f - 2T artanh(u_f)`, `u_f = √(1 - 2T/β)`. Raising `δ`
   from the wrong vertex keeps the wrong token up to `δ_fold`; lowering it from the
   right vertex keeps the right one down to `-δ_fold`: hysteresis. A start at a vertex
   ends on the branch a slow sweep of δ would hold, so both sweeps are one batch.

Every map is a batch of (δ, start) rows in one `rx.basins` call; the refinement is a
second batch of the same size, so each flow compiles once.
Writes `lock_in.png`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import replicax as rx


# Starts a few 1e-5 from a saddle and tolerances of 1e-10 want float64.
jax.config.update("jax_enable_x64", True)


def two_token_flow(flow_cls, delta, beta, T):
    """`flow_cls` with logits `(0, δ)` and self-reinforcement `β`, one row per `δ`."""
    logits = np.stack([np.zeros_like(delta), delta], axis=-1)
    return flow_cls(rx.Logits(logits) + rx.SelfReinforcement(beta), T)


def starts(x):
    """Two-token distributions with `p₁ = x`."""
    x = np.asarray(x, float)
    return jnp.asarray(np.stack([x, 1 - x], axis=-1))


def refine(lo, hi, n):
    """`n` points strictly inside each bracket `[lo, hi]` (midpoints of `n` cells)."""
    return lo[:, None] + (np.arange(n) + 0.5)[None, :] * ((hi - lo)[:, None] / n)


def switch(values, kept):
    """Midpoint between the last value where `kept` holds and the first where it does
    not, and whether it switches exactly once."""
    k = int(np.argmin(kept))
    once = kept[0] and not kept[-1] and np.all(np.diff(kept.astype(int)) <= 0)
    return (values[k - 1] + values[k]) / 2, bool(once)


method = rx.ODE(rtol=1e-10, atol=1e-10, max_steps=50_000)
# Starts: next to each vertex (p₁ = 0.001 is next to the right token) and a grid
# between, offset so that no start sits exactly on a saddle (it would never leave).
map_x = np.concatenate([[0.001], np.linspace(0.013, 0.993, 50), [0.999]])

# ----------------------------------------------------------------------------------
# 1. (R): the saddle. A map over (δ, start), then, in a second batch of the same size
# (no recompile), a fine grid of starts inside the bracket the map found, for three δ.
beta_r, T_r = 2.0, 1.0
map_delta_r = np.linspace(0.0, 1.6, 33)
grid = np.stack(np.meshgrid(map_delta_r, map_x, indexing="ij"), axis=-1).reshape(-1, 2)
flow = two_token_flow(rx.Replicator, grid[:, 0], beta_r, T_r)
found = rx.basins(flow, starts(grid[:, 1]), t1=60.0, method=method)
# Locked onto token 1 although s favours token 2.
map_wrong_r = (np.asarray(found.token) == 0).reshape(map_delta_r.size, map_x.size)
settled_r = int(np.sum(found.settled))

picked = np.array([6, 16, 28])  # δ = 0.3, 0.8, 1.4
fine_delta_r = map_delta_r[picked]
first = np.argmax(map_wrong_r[picked], axis=1)
n = grid.shape[0] // picked.size
fine_x = refine(map_x[first - 1], map_x[first], n)
found = rx.basins(
    two_token_flow(rx.Replicator, np.repeat(fine_delta_r, n), beta_r, T_r),
    starts(fine_x.ravel()),
    t1=60.0,
    method=method,
)
fine_right_r = (np.asarray(found.token) == 1).reshape(picked.size, n)
settled_r += int(np.sum(found.settled))

saddle = (1 + fine_delta_r / beta_r) / 2
print(f"1. (R), beta={beta_r}, T={T_r}: separatrix of the basins vs x* = (1 + δ/β)/2")
print(f"  {2 * grid.shape[0]} starts in two batches; settled: {settled_r}")
print("       delta    measured          x*       error    grid step")
for delta, x, right, x_star in zip(
    fine_delta_r, fine_x, fine_right_r, saddle, strict=True
):
    boundary, once = switch(x, right)  # right token below x*, wrong above
    print(
        f"  {delta:10.4f} {boundary:11.6f} {x_star:11.6f} "
        f"{abs(boundary - x_star):11.2e}"
        f" {x[1] - x[0]:11.2e}  {'one switch' if once else 'NOT ONE SWITCH'}"
    )

# ----------------------------------------------------------------------------------
# 2. (E): basins and hysteresis on a map over (δ, start); then the two folds, refined
# in a second batch of the same size inside the brackets the map's vertex columns found.
beta_e, T_e = 1.0, 0.25
u_f = np.sqrt(1 - 2 * T_e / beta_e)
delta_fold = beta_e * u_f - 2 * T_e * np.arctanh(u_f)
map_delta_e = np.linspace(-0.4, 0.4, 41)
grid = np.stack(np.meshgrid(map_delta_e, map_x, indexing="ij"), axis=-1).reshape(-1, 2)
flow = two_token_flow(rx.EntropicReplicator, grid[:, 0], beta_e, T_e)
found = rx.basins(flow, starts(grid[:, 1]), t1=400.0, method=method)
token = np.asarray(found.token).reshape(map_delta_e.size, map_x.size)
p_end = np.exp(np.asarray(found.log_p))
map_u_e = (p_end[:, 0] - p_end[:, 1]).reshape(map_delta_e.size, map_x.size)
map_wrong_e = token == 0
settled_e = int(np.sum(found.settled))

# Up the sweep (from the wrong vertex, p₁ = 0.999) the wrong token is kept up to a fold;
# down the sweep (from the right vertex) the right token is kept down to the other.
kept_up = token[:, -1] == 0
kept_down = (token[:, 0] == 1)[::-1]  # in the order of decreasing δ
k_up, k_down = int(np.argmin(kept_up)), int(np.argmin(kept_down))
lo = np.array([map_delta_e[k_up - 1], map_delta_e[::-1][k_down - 1]])
hi = np.array([map_delta_e[k_up], map_delta_e[::-1][k_down]])
n = grid.shape[0] // 2
fine_delta_e = refine(lo, hi, n)
found = rx.basins(
    two_token_flow(rx.EntropicReplicator, fine_delta_e.ravel(), beta_e, T_e),
    starts(np.repeat([0.999, 0.001], n)),
    t1=400.0,
    method=method,
)
fine_token = np.asarray(found.token).reshape(2, n)
settled_e += int(np.sum(found.settled))
fold_up, once_up = switch(fine_delta_e[0], fine_token[0] == 0)
fold_down, once_down = switch(fine_delta_e[1], fine_token[1] == 1)

print(f"\n2. (E), beta={beta_e}, T={T_e} (bistable: beta > 2T = {2 * T_e})")
print(f"  {2 * grid.shape[0]} starts in two batches; settled: {settled_e}")
print(f"  fold delta_fold theory: {delta_fold:.6f}")
print(
    f"  up the sweep (from the wrong vertex): wrong token kept up to {fold_up:.6f},"
    f" error {abs(fold_up - delta_fold):.2e}, grid step "
    f"{fine_delta_e[0, 1] - fine_delta_e[0, 0]:.2e}"
    f"{'' if once_up else ', NOT ONE SWITCH'}"
)
print(
    f"  down the sweep (from the right vertex): right token kept down to "
    f"{fold_down:.6f}, error {abs(fold_down + delta_fold):.2e}, grid step "
    f"{fine_delta_e[1, 0] - fine_delta_e[1, 1]:.2e}"
    f"{'' if once_down else ', NOT ONE SWITCH'}"
)
both = map_wrong_e[:, 0] != map_wrong_e[:, -1]  # the two vertices end apart
print(
    f"  hysteresis: on the map the two vertices end on different tokens for delta in "
    f"[{map_delta_e[both].min():.2f}, {map_delta_e[both].max():.2f}]"
)

# ----------------------------------------------------------------------------------
# The picture.
fig = Figure(figsize=(14, 4.4), layout="constrained")
axes = fig.subplots(1, 3)
cmap = "coolwarm"

ax = axes[0]
ax.pcolormesh(map_delta_r, map_x, map_wrong_r.T, cmap=cmap, shading="nearest")
ax.plot(
    map_delta_r,
    (1 + map_delta_r / beta_r) / 2,
    "k--",
    label=r"$x^* = (1 + \delta/\beta)/2$",
)
ax.set_xlabel(r"$\delta$")
ax.set_ylabel(r"start $p_1$")
ax.legend(loc="lower right")
ax.set_title(f"(R), β = {beta_r}: red locks onto the wrong token")

ax = axes[1]
ax.pcolormesh(map_delta_e, map_x, map_wrong_e.T, cmap=cmap, shading="nearest")
u_mid = np.linspace(-u_f, u_f, 201)  # the unstable middle branch
ax.plot(
    beta_e * u_mid - 2 * T_e * np.arctanh(u_mid),
    (1 + u_mid) / 2,
    "k--",
    label="unstable equilibrium",
)
ax.set_xlabel(r"$\delta$")
ax.set_ylabel(r"start $p_1$")
ax.legend(loc="lower right")
ax.set_title(f"(E), β = {beta_e}, T = {T_e}: basins")

ax = axes[2]
u = np.linspace(-0.9999, 0.9999, 2001)
d = beta_e * u - 2 * T_e * np.arctanh(u)  # every equilibrium: u = tanh((βu - δ)/2T)
ax.plot(d, u, color="0.7", lw=3, label="equilibria (THEORY §4)")
ax.plot(
    map_delta_e, map_u_e[:, -1], "o", ms=4, color="C3", label="from the wrong vertex"
)
ax.plot(
    map_delta_e, map_u_e[:, 0], "x", ms=4, color="C0", label="from the right vertex"
)
for f in (delta_fold, -delta_fold):
    ax.axvline(f, color="k", ls=":", lw=0.8)
ax.set_xlim(map_delta_e[0], map_delta_e[-1])
ax.set_xlabel(r"$\delta$")
ax.set_ylabel(r"$u = p_1 - p_2$ at the end")
ax.legend(loc="center left", fontsize=8)
ax.set_title(r"(E): hysteresis, folds at $\pm\delta_{fold}$")

fig.savefig("lock_in.png", dpi=110)
print("\nwrote lock_in.png")
