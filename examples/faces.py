"""Faces of the simplex: top-p as a function of temperature, and the switched path.

1. Nucleus size against temperature: the top-p set (transformers' rule) of softmax(s/T)
   grows with T, so the face the flows run on depends on the temperature.
2. One context on a top-p face. `rx.solve` evaluates the face once, on the logits; (E)
   converges on it to softmax(s/T) restricted to the face, exactly what transformers
   samples from after its temperature and top-p warpers. `method=rx.Switched()` re-applies
   top-p along the path to the distribution the flow has reached; the switching times are
   diffrax events. From uniform, (E) never switches, so its guarantees survive; (R) passes
   softmax(s/T) at t = 1 and then loses tokens one by one: past t = 1 the fixed face is
   not what a re-evaluating decoder sees.
"""

import jax
import jax.numpy as jnp
import numpy as np
import replicax as rx


vocab = 2_000
# A heavy-tailed, LM-like row: a Zipf profile of ranks plus noise, shuffled.
ranks = jnp.arange(1, vocab + 1, dtype=jnp.float32)
logits = -1.3 * jnp.log(ranks) + 0.5 * jax.random.normal(jax.random.key(0), (vocab,))
logits = jax.random.permutation(jax.random.key(1), logits)

temperatures = jnp.array([0.3, 0.5, 0.7, 1.0, 1.3, 1.7])
print("temperature:        ", np.asarray(temperatures))
for top_p in (0.5, 0.9):
    sizes = rx.nucleus_size(logits, temperatures, top_p)
    print(f"top-p {top_p} nucleus size:", np.asarray(sizes))

T, top_p = 1.0, 0.9
ts = jnp.linspace(0.0, 8.0, 17)
support = rx.TopP(top_p)
for flow in (rx.EntropicReplicator(logits, T), rx.Replicator(logits, T)):
    name = type(flow).__name__
    fixed = rx.solve(flow, t1=8.0, support=support, saveat=rx.SaveAt(ts=ts))
    switched = rx.solve(
        flow,
        t1=8.0,
        support=support,
        saveat=rx.SaveAt(ts=ts),
        method=rx.Switched(max_switches=256),
    )
    switches = switched.info
    n = int(switches.num_switches)
    print(f"\n{name} at T={T}, TopP({top_p}): face of {int(switches.face_size[0])} tokens;"
          f" {n} switches", end="")
    if n:
        print(f", from t = {float(switches.switch_ts[0]):.4f} to"
              f" t = {float(switches.switch_ts[n - 1]):.4f}; final face"
              f" {int(switches.face_size[n])}", end="")
    print()
    print("   t   face(switched)  max|p_switched - p_fixed|")
    for i in range(0, len(ts), 2):
        face = int(jnp.sum(switched.log_p[i] > -jnp.inf))
        gap = float(jnp.max(jnp.abs(jnp.exp(switched.log_p[i]) - jnp.exp(fixed.log_p[i]))))
        print(f"{float(ts[i]):4.1f}  {face:15d}  {gap:24.2e}")
