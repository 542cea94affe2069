"""Flows and decoding on several devices: batch and vocabulary sharding.

How a user runs replicax on a multi-GPU host or a TPU slice, shown on whatever devices
JAX sees. A machine with a single CPU device reruns this script with 8 simulated CPU
devices (`--xla_force_host_platform_device_count=8`), the usual way to try sharding
without accelerators.

1. `rx.solve` on logits of shape (8, 32,000) sharded over a 2-D mesh (`"b"` splits the
   batch, `"v"` the vocabulary): the entropy of the saved path of (R) through
   `rx.path_statistics` (one read of the logits per saved time; the normalisers are
   all-reduced over the vocabulary's devices), and its gradient with respect to the
   logits, both compared with the same calls on one device.
2. `rx.generate` with a small recurrent JAX language model whose output layer is
   sharded over the vocabulary and whose prompts and hidden states are sharded over the
   batch: top-p sampling with a frequency penalty, then the gradient of a continuation's
   negative log-likelihood with respect to the output layer (`counts="expected"`), each
   compared with one device.

Every output keeps the inputs' sharding; the script prints where each lives.
"""

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import replicax as rx

BATCH, VOCAB, HIDDEN = 8, 32_000, 64
TEMPERATURE = 0.7
TS = jnp.array([0.25, 1.0, 4.0])
STEPS = 12
SIMULATED = 8  # CPU devices when the machine shows one


def rerun_with_simulated_devices() -> None:
    """Run this script again in a fresh Python with 8 CPU devices, and pass on what it
    prints (JAX fixes its device count when it starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={SIMULATED}",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:]],
        env=env,
        capture_output=True,
        text=True,
    )
    print(out.stdout, end="")
    print(out.stderr, end="", file=sys.stderr)
    sys.exit(out.returncode)


def make_mesh() -> jax.sharding.Mesh:
    """A (batch, vocabulary) mesh of every device: 2 along the batch when it can."""
    count = jax.device_count()
    along_batch = 2 if count % 2 == 0 and BATCH % 2 == 0 else 1
    return jax.make_mesh((along_batch, count // along_batch), ("b", "v"))


def place(x, mesh, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def spec(x) -> str:
    return str(tuple(x.sharding.spec))


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# --------------------------------------------------------------------------------------
# 1. Solving


def entropy_path(logits):
    flow = rx.Replicator(logits, TEMPERATURE)
    saveat = rx.SaveAt(ts=TS, fn=rx.path_statistics)
    return rx.solve(flow, t1=TS[-1], saveat=saveat).observables.entropy


def solving(mesh, logits):
    loss = lambda s: jnp.sum(entropy_path(s))  # noqa: E731
    one_device = entropy_path(logits), jax.grad(loss)(logits)
    sharded_logits = place(logits, mesh, "b", "v")
    with jax.set_mesh(mesh):
        entropy = jax.jit(entropy_path)(sharded_logits)
        grad = jax.jit(jax.grad(loss))(sharded_logits)
    print("entropy of context 0 at t =", np.asarray(TS).tolist(), ":",
          " ".join(f"{x:.8g}" for x in np.asarray(entropy)[0]))
    print(f"solve: entropy {relative(entropy, one_device[0]):.1e} from one device, "
          f"sharded {spec(entropy)}")
    print(f"solve: gradient {relative(grad, one_device[1]):.1e} from one device, "
          f"sharded {spec(grad)}")


# --------------------------------------------------------------------------------------
# 2. Decoding


class Recurrent(eqx.Module):
    """h' = tanh(h A + E[token]); next-token logits h' W. The state is h."""

    embed: jax.Array  # (vocab, hidden), replicated
    mix: jax.Array  # (hidden, hidden), replicated
    out: jax.Array  # (hidden, vocab): sharded over the vocabulary

    def __call__(self, tokens, hidden):
        for i in range(tokens.shape[1]):  # the prompt, then one token per call
            # A one-hot product rather than `embed[ids]`: under explicit sharding JAX
            # asks an integer lookup of a batch-sharded index for its output sharding.
            x = jax.nn.one_hot(tokens[:, i], VOCAB, dtype=hidden.dtype) @ self.embed
            hidden = jnp.tanh(hidden @ self.mix + x)
        return 4.0 * hidden @ self.out, hidden


def decoding(mesh, keys):
    model = Recurrent(
        jax.random.normal(keys[0], (VOCAB, HIDDEN)),
        jax.random.normal(keys[1], (HIDDEN, HIDDEN)) / HIDDEN**0.5,
        jax.random.normal(keys[2], (HIDDEN, VOCAB)) / HIDDEN**0.5,
    )
    prompt = jax.random.randint(keys[3], (BATCH, 5), 0, VOCAB)
    hidden = jnp.zeros((BATCH, HIDDEN))
    decode = dict(max_new_tokens=STEPS, key=keys[4], temperature=TEMPERATURE,
                  support=rx.TopP(0.9), frequency_penalty=0.5)

    out_layer = place(model.out, mesh, None, "v")
    sharded_model = eqx.tree_at(lambda m: m.out, model, out_layer)
    sharded_prompt = place(prompt, mesh, "b", None)
    sharded_hidden = place(hidden, mesh, "b", None)
    one_device = rx.generate(model, prompt, hidden, **decode)
    with jax.set_mesh(mesh):
        gen = rx.generate(sharded_model, sharded_prompt, sharded_hidden, **decode)
    same = bool(np.array_equal(np.asarray(gen.tokens), np.asarray(one_device.tokens)))
    records = max(relative(getattr(gen, f), getattr(one_device, f))
                  for f in ("log_prob", "entropy"))
    print(f"generate: tokens equal to one device: {same}; log_prob and entropy "
          f"{records:.1e} from one device; tokens sharded {spec(gen.tokens)}, "
          f"hidden state {spec(gen.state)}")
    print("generate: mean entropy per step:",
          " ".join(f"{x:.4f}" for x in np.asarray(gen.entropy.mean(0))))

    # The differentiable mode: the negative log-likelihood of the sampled tokens as a
    # continuation, and its gradient with respect to the output layer.
    def nll(out, model, prompt, hidden, targets):
        model = eqx.tree_at(lambda m: m.out, model, out)
        gen = rx.generate(model, prompt, hidden, max_new_tokens=STEPS, targets=targets,
                          counts="expected", temperature=TEMPERATURE,
                          frequency_penalty=0.5)
        return -jnp.sum(gen.log_prob)

    grad = jax.jit(jax.grad(nll))
    want = grad(model.out, model, prompt, hidden, one_device.tokens)
    with jax.set_mesh(mesh):
        got = grad(sharded_model.out, sharded_model, sharded_prompt, sharded_hidden,
                   place(one_device.tokens, mesh, "b", None))
    print(f"generate: gradient of the NLL {relative(got, want):.1e} from one device, "
          f"sharded {spec(got)}")


def main():
    mesh = make_mesh()
    print(f"devices: {jax.device_count()} ({jax.default_backend()}), mesh "
          f"b={mesh.shape['b']} v={mesh.shape['v']}")
    keys = jax.random.split(jax.random.key(0), 6)
    solving(mesh, 3.0 * jax.random.normal(keys[5], (BATCH, VOCAB)))
    decoding(mesh, keys)


if __name__ == "__main__":
    if jax.device_count() == 1 and jax.default_backend() == "cpu":
        rerun_with_simulated_devices()
    main()
