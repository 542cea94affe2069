"""Loops: path-dependent scores that make the next-token distribution cycle (THEORY §4).

1. Rock-paper-scissors payoff `z = A p` under the entropic replicator (E): above the
   Hopf temperature `T_c = (l - w)/6` the path spirals into the centre; below it, it
   settles on a limit cycle whose period near onset is `2π T_c / ω₀`,
   `ω₀ = (l + w)√3/6` (in replicax's time, where (E) is `θ̇ = z/T - θ`).
2. A frequency penalty with a fading two-stage memory (time constant `tau`), `s = 0`,
   from a slightly perturbed uniform start under the replicator (R): below
   `α_c = 2 V T / tau` the perturbation dies out; above it the tokens oscillate with a
   growing amplitude, period `2π tau` at onset. The threshold is measured from a sweep
   of `alpha` (where the amplitude stops decaying).
3. The cumulative frequency penalty (counts `ċ = p`): under (R) it is Hamiltonian, so
   its round robin never damps (the energy `frequency_penalty_hamiltonian` stays put);
   under (E) the same round robin damps and the count gaps settle at `(s_i - s_j)/α`.

Every experiment is a row of one batch: the rows share one score,
`Logits + Payoff + FrequencyPenalty(fading) + FrequencyPenalty(cumulative)`, and each
row switches off the terms it does not use (a payoff of zeros, an `alpha` of 0). So
there is one `solve` (one compile) per flow, and `rx.detect_cycle` reads every row at
once.
Writes `loops.png`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import replicax as rx


jax.config.update("jax_enable_x64", True)  # the energy check wants float64

V = 3
t1 = 300.0
ts = jnp.linspace(0.0, t1, 6001)
method = rx.ODE(rtol=1e-9, atol=1e-9, max_steps=100_000)
zero_A = np.zeros((V, V))

# Rock-paper-scissors: losses l, wins w.
l, w = 1.0, 0.4
rps = np.array([[0.0, -l, w], [w, 0.0, -l], [-l, w, 0.0]])
T_c, omega = (l - w) / 6, (l + w) * np.sqrt(3) / 6
# Fading memory: s = 0, two stages.
T_fade, tau = 0.5, 1.0
alpha_c = 2 * V * T_fade / tau
# Cumulative counts.
T_count, alpha_count = 0.8, 0.7
s_count = np.array([0.0, 0.3, 0.6])


def batch(rows):
    """Stack rows given as dicts into the per-row parameters of one flow."""
    get = lambda k: jnp.asarray(np.stack([r[k] for r in rows]))
    score = (
        rx.Logits(get("s"))
        + rx.Payoff(get("A"))
        + rx.FrequencyPenalty(get("fade"), tau=get("tau"), stages=2)
        + rx.FrequencyPenalty(get("count"))
    )
    return score, get("T"), get("y0")


def row(*, y0, s=None, A=zero_A, fade=0.0, count=0.0, T=1.0):
    """One experiment: its start, logits, payoff, penalties and temperature."""
    s = np.zeros(V) if s is None else s
    return dict(s=s, A=A, fade=fade, tau=tau, count=count, T=T, y0=y0)


rps_start = np.array([0.5, 0.3, 0.2])
# Off the uniform rest point, small enough to stay in the linear regime near alpha_c.
kick = np.array([1e-3, 0.0, -1e-3])
count_start = np.array([0.6, 0.3, 0.1])
entropic_rows = [
    row(A=rps, T=1.05 * T_c, y0=rps_start),
    row(A=rps, T=0.95 * T_c, y0=rps_start),
    row(s=s_count, count=alpha_count, T=T_count, y0=count_start),
]
fade_factors = (0.9, 0.95, 1.05, 1.1)  # alpha / alpha_c
replicator_rows = [
    row(fade=f * alpha_c, T=T_fade, y0=np.full(V, 1 / V) + kick) for f in fade_factors
] + [row(s=s_count, count=alpha_count, T=T_count, y0=count_start)]
COUNT = len(fade_factors)  # the cumulative row of the (R) batch

paths = {}
for name, flow_cls, rows in (
    ("E", rx.EntropicReplicator, entropic_rows),
    ("R", rx.Replicator, replicator_rows),
):
    score, T, y0 = batch(rows)
    sol = rx.solve(
        flow_cls(score, T), t1=t1, y0=y0, saveat=rx.SaveAt(ts=ts), method=method
    )
    paths[name] = sol, rx.detect_cycle(sol)

sol_e, cyc_e = paths["E"]
sol_r, cyc_r = paths["R"]


def verdict(c, i):
    if c.is_cycle[i] or c.converged[i]:
        kind = "cycle" if c.is_cycle[i] else "rest"
    else:
        kind = "decaying" if c.amplitude_ratio[i] < 1 else "growing"
    return (
        f"{kind:>8}  period {float(c.period[i]):9.6f}  amplitude "
        f"{float(c.amplitude[i]):.3e}  "
        f"amplitude ratio {float(c.amplitude_ratio[i]):.4f}"
    )


print(
    f"1. rock-paper-scissors (l={l}, w={w}) under (E): T_c = {T_c:.6f}, "
    f"onset period 2πT_c/ω₀ = {2 * np.pi * T_c / omega:.6f}"
)
for i, f in enumerate((1.05, 0.95)):
    print(f"  T = {f:.2f} T_c: {verdict(cyc_e, i)}")

print(
    "\n2. fading two-stage frequency penalty under (R) "
    f"(V={V}, T={T_fade}, tau={tau}): "
    f"alpha_c = {alpha_c:.6f}, onset period 2π tau = {2 * np.pi * tau:.6f}"
)
for i, f in enumerate(fade_factors):
    print(f"  alpha = {f:.2f} alpha_c: {verdict(cyc_r, i)}")
# The threshold where the amplitude stops decaying: log(amplitude ratio) crosses 0,
# interpolated linearly between the two rows nearest alpha_c.
log_ratio = np.log(np.asarray(cyc_r.amplitude_ratio[1:3]))
measured = alpha_c * np.interp(0.0, log_ratio, fade_factors[1:3])
print(
    f"  measured alpha_c: {measured:.6f} (theory {alpha_c:.6f}, "
    f"relative error {abs(measured / alpha_c - 1):.2e})"
)

# The energy of the cumulative rows under (R) and (E); the counts are the aux of the
# last term.
energy = {}
row_of = {"R": COUNT, "E": 2}
for name, sol in (("R", sol_r), ("E", sol_e)):
    energy[name] = np.asarray(
        rx.frequency_penalty_hamiltonian(
            sol.log_p[row_of[name]],
            sol.aux[3][row_of[name]],
            s_count,
            T_count,
            alpha_count,
        )
    )
drift = np.max(np.abs(energy["R"] - energy["R"][0])) / abs(energy["R"][0])
counts_e = np.asarray(sol_e.aux[3][2, -1])
print(
    f"\n3. cumulative frequency penalty (alpha={alpha_count}, T={T_count}, s={s_count})"
)
print(f"  (R): {verdict(cyc_r, COUNT)}")
print(f"  (R): energy relative drift over [0, {t1:g}]: {drift:.3e}")
print(f"  (E): {verdict(cyc_e, 2)}")
print(f"  (E): energy {energy['E'][0]:.6f} -> {energy['E'][-1]:.6f}")
print(
    f"  (E): count gaps c1-c2, c1-c3 at t={t1:g}: "
    f"{counts_e[0] - counts_e[1]:.6f} {counts_e[0] - counts_e[2]:.6f}"
    f"  theory (s_i - s_j)/alpha: {(s_count[0] - s_count[1]) / alpha_count:.6f} "
    f"{(s_count[0] - s_count[2]) / alpha_count:.6f}"
)

# ----------------------------------------------------------------------------------
# The picture.
fig = Figure(figsize=(11, 8.5), layout="constrained")
axes = fig.subplots(2, 2)
tt = np.asarray(ts)
p_e, p_r = np.exp(np.asarray(sol_e.log_p)), np.exp(np.asarray(sol_r.log_p))

ax = axes[0, 0]
corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
ax.plot(*np.vstack([corners, corners[:1]]).T, color="0.6", lw=0.8)
for i, (f, colour) in enumerate(((1.05, "C0"), (0.95, "C3"))):
    xy = p_e[i] @ corners
    ax.plot(*xy.T, color=colour, lw=0.8, label=f"T = {f:.2f} $T_c$")
for k, label in enumerate(("rock", "paper", "scissors")):
    ax.annotate(label, corners[k], ha="center", va="top" if k < 2 else "bottom")
ax.set_aspect("equal")
ax.set_axis_off()
ax.legend(loc="upper right", frameon=False)
ax.set_title("rock-paper-scissors under (E): spiral vs limit cycle")

ax = axes[0, 1]
for i, (f, colour) in ((0, (0.9, "C0")), (3, (1.1, "C3"))):
    ax.plot(tt, p_r[i, :, 0], color=colour, lw=0.8, label=rf"$\alpha$ = {f} $\alpha_c$")
ax.set_xlim(0, t1)
ax.set_xlabel("t")
ax.set_ylabel("$p_1$")
ax.legend(frameon=False)
ax.set_title("fading two-stage frequency penalty under (R)")

panels = (
    (axes[1, 0], p_r[COUNT], "(R): undamped"),
    (axes[1, 1], p_e[2], "(E): damped"),
)
for ax, p, name in panels:
    for k in range(V):
        ax.plot(tt, p[:, k], lw=0.8, label=f"$p_{k + 1}$")
    ax.set_xlim(0, 60)
    ax.set_xlabel("t")
    ax.legend(frameon=False, loc="upper right")
    ax.set_title(f"cumulative frequency penalty {name}")

fig.savefig("loops.png", dpi=110)
print("\nwrote loops.png")
