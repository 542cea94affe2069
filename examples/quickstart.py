"""Quick start: the path of the next-token distribution under both flows.

Shows the README's claim in numbers: from uniform, the replicator (R) passes
softmax(s/T) at t = 1 and goes on to the argmax, while the entropic replicator (E)
stops at softmax(s/T); and gradients flow through the trajectory.
"""

import jax
import jax.numpy as jnp
import replicax as rx

logits = 3.0 * jax.random.normal(jax.random.key(0), (4, 32_000))  # 4 contexts
ts = jnp.array([0.5, 1.0, 4.0, 16.0])
for flow in (rx.Replicator(logits, 0.7), rx.EntropicReplicator(logits, 0.7)):
    sol = rx.solve(flow, t1=16.0, saveat=rx.SaveAt(ts=ts))  # exact path, picked itself
    kl = rx.kl(sol.log_p, rx.target_log_p(flow)[:, None, :])  # KL(p(t) ‖ softmax(s/T))
    top = jnp.exp(jnp.max(sol.log_p, axis=-1))  # mass on the most likely token
    print(type(flow).__name__, "KL to softmax:", kl.mean(0), "top-1 mass:", top.mean(0))

# Gradient of the entropy at t = 1 with respect to the logits, through the flow.
grad = jax.grad(lambda s: rx.entropy(rx.solve(rx.Replicator(s, 0.7), t1=1.0).log_p).sum())
print("d entropy / d logits:", grad(logits).shape)
