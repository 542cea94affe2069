"""Sharding over 8 CPU devices: batch (data parallel), vocabulary and 2-D shardings of
the logits give results equal to one device's and keep the input's sharding, with no
input gathered onto one device by XLA ("involuntary full rematerialization"): the closed
forms (solve, faces, observables, `rx.path_statistics`, gradients), the ODE path (with
and without shared steps, its observables and gradient), `rx.Switched`, `rx.time_to`,
`rx.lyapunov_exponents`, `rx.equilibrium`, `rx.flip_margin` and `rx.curl`; and
`rx.generate` (batch, vocabulary and 2-D sharding, its gradient, and a mesh of `Auto`
axes) (issue: GPU performance and scale, item 4).

The device count is fixed when JAX starts, so the checks run in one subprocess started
with `--xla_force_host_platform_device_count=8`.
"""

import os
import pathlib
import subprocess
import sys
import textwrap


ROOT = pathlib.Path(__file__).parent.parent

# What XLA's SPMD partitioner logs when it must replicate a sharded array (e.g. one
# passed through a `cond` placed on a single device) and split it again.
REMATERIALIZATION = "Involuntary full rematerialization"

SCRIPT = textwrap.dedent(
    """
    import diffrax, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import replicax as rx

    # float32, as a user runs on accelerators; results equal one device's to 1e-6.
    TOL = 1e-6
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("d",))
    mesh_2d = jax.make_mesh((2, 4), ("b", "v"))
    logits = 3.0 * jax.random.normal(jax.random.key(0), (16, 64), jnp.float32)
    ts = jnp.linspace(0.0, 2.0, 5)
    fn = lambda t, log_p, flow: rx.entropy(log_p)
    score_scale = float(jnp.max(jnp.abs(logits)))
    worst = {}

    def check(name, a, b, spec):
        # `spec`: the expected sharding of `a`, axis by axis (`None`: not checked).
        got, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(got, b, rtol=TOL, atol=TOL, err_msg=name)
        finite = np.isfinite(b)
        worst[name] = float(np.max(np.abs(got[finite] - b[finite])
                                   / np.maximum(np.abs(b[finite]), 1)))
        if spec is not None:
            got = tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
            assert got == spec, (name, a.sharding)

    def loss(s):
        return jnp.sum(rx.entropy(rx.solve(rx.EntropicReplicator(s, 0.7), t1=2.0).log_p))

    def everything(s):
        # One program per sharding (compiling is what takes the time here).
        out = {
            "Replicator": rx.solve(rx.Replicator(s, 0.7), t1=2.0,
                                   saveat=rx.SaveAt(ts=ts)),
            "EntropicReplicator": rx.solve(rx.EntropicReplicator(s, 0.7), t1=2.0,
                                           saveat=rx.SaveAt(ts=ts)),
            # A face sorts each row: it is computed on whole rows and split again.
            "TopK": rx.solve(rx.Replicator(s, 0.7), t1=2.0, saveat=rx.SaveAt(ts=ts),
                             support=rx.TopK(5)),
            "TopP": rx.solve(rx.EntropicReplicator(s, 0.7), t1=2.0,
                             saveat=rx.SaveAt(ts=ts), support=rx.TopP(0.9)),
        }
        out = {name: solution.log_p for name, solution in out.items()}
        out["observables"] = rx.solve(rx.EntropicReplicator(s, 0.7), t1=2.0,
                                      saveat=rx.SaveAt(ts=ts, fn=fn)).observables
        out["grad"] = jax.grad(loss)(s)
        # The one-read statistics and their custom VJP.
        stats = lambda s: rx.solve(rx.Replicator(s, 0.7), t1=2.0, saveat=rx.SaveAt(
            ts=ts, fn=rx.path_statistics)).observables
        out["statistics"] = stats(s)
        out["statistics grad"] = jax.grad(lambda s: jnp.sum(stats(s).entropy))(s)
        return out

    one = jax.jit(everything)(logits)
    un_jitted = lambda s: rx.solve(rx.Replicator(s, 0.7), t1=1.0).log_p
    one_un_jitted = un_jitted(logits)

    # Batch (data parallel), vocabulary (large V) and both on a 2-D mesh, with the mesh
    # in context as explicit sharding wants it.
    for case, m, (rows, vocab) in (
        ("batch", mesh, ("d", None)),
        ("vocab", mesh, (None, "d")),
        ("2-D", mesh_2d, ("b", "v")),
    ):
        sharded = jax.device_put(logits, NamedSharding(m, P(rows, vocab)))
        with jax.set_mesh(m):
            got = jax.jit(everything)(sharded)
            for name in ("Replicator", "EntropicReplicator", "TopK", "TopP"):
                check(f"{case} {name}", got[name], one[name], (rows, None, vocab))
            check(f"{case} observables", got["observables"], one["observables"],
                  (rows, None))
            check(f"{case} grad", got["grad"], one["grad"], (rows, vocab))
            for field in ("entropy", "top_prob"):
                check(f"{case} statistics {field}", getattr(got["statistics"], field),
                      getattr(one["statistics"], field), (rows, None))
            # A mean of scores rounds relative to the scores, not to itself: compared
            # in units of the largest logit.
            mean_score = got["statistics"].mean_score
            check(f"{case} statistics mean_score / max |logit|",
                  mean_score / score_scale,
                  one["statistics"].mean_score / score_scale, None)
            assert mean_score.sharding.spec[0] == rows, mean_score.sharding
            check(f"{case} statistics grad", got["statistics grad"],
                  one["statistics grad"], (rows, vocab))
            check(f"{case} un-jitted", un_jitted(sharded), one_un_jitted,
                  (rows, None, vocab))
            # The run-time checks still fire on sharded inputs, naming the batch index
            # (and no device is left waiting for the one that raised).
            bad = jax.device_put(logits.at[3, 40].set(jnp.nan), sharded.sharding)
            try:
                jax.block_until_ready(un_jitted(bad))
                raise AssertionError("no error for NaN logits")
            except Exception as error:
                assert "at batch index (3,)" in str(error), str(error)

    # The ODE path and `rx.time_to` run their nested solvers (diffrax, optimistix)
    # with the mesh's axes made `Auto` (`with_auto_axes`). Adaptive steps and a
    # bisection read sums taken in another order, so they agree with one device to
    # their own tolerance (1e-6 in `log p` for the solver, relative), compared here in
    # `p` and relative to 1.
    penalised = lambda s: rx.Replicator(
        rx.Logits(s) + rx.FrequencyPenalty(0.3, tau=1.0), 0.7
    )

    # The gradient through the ODE path, with Heun's method at a constant step (a
    # smaller program to compile than Tsit5's adaptive loop; the backward pass is
    # partitioned the same way).
    heun = rx.ODE(solver=diffrax.Heun(), stepsize_controller=diffrax.ConstantStepSize(),
                  dt0=0.125, max_steps=8)

    def ode_loss(s):
        return jnp.sum(rx.entropy(rx.solve(penalised(s), t1=1.0, method=heun).log_p))

    starts = jax.nn.softmax(jax.random.normal(jax.random.key(1), logits.shape))
    factors = jax.random.normal(jax.random.key(2), (2, logits.shape[1], 4))
    reinforced = lambda s: rx.EntropicReplicator(
        rx.Logits(s) + rx.SelfReinforcement(1.0), 0.7
    )

    def rest_loss(s):
        return jnp.sum(starts * jnp.exp(rx.equilibrium(reinforced(s)).log_p))

    solvers = {
        # `SaveAt(fn=...)` observables, from logits of shape (vocab,) shared by a batch
        # of unsharded starts.
        "ODE observables": lambda s: rx.solve(
            penalised(s[0]), y0=starts, t1=2.0, saveat=rx.SaveAt(ts=ts, fn=fn)
        ).observables,
        "ODE shared steps": lambda s: rx.solve(
            penalised(s), t1=2.0, saveat=rx.SaveAt(ts=ts), shared_steps=True
        ).p,
        "ODE grad": jax.grad(ode_loss),
        "time_to": lambda s: rx.time_to(rx.EntropicReplicator(s, 0.7), eps=1e-3),
        # A top-p face re-evaluated along the path (diffrax, switching times).
        "Switched": lambda s: rx.solve(
            rx.Replicator(s, 0.7), t1=1.0, support=rx.TopP(0.9), method=rx.Switched(),
        ).p,
        # Exponents of shape (rows, k): not sharded along the vocabulary.
        "Lyapunov exponents": lambda s: rx.lyapunov_exponents(
            penalised(s), t1=1.0, k=2
        ).exponents,
        # Newton's method with LAPACK's LU (one context at a time on each device),
        # compared in `p`: a root find stops within its tolerance of the root.
        "equilibrium": lambda s: jnp.exp(rx.equilibrium(reinforced(s)).log_p),
        "equilibrium grad": jax.grad(rest_loss),
        # The flip margin (a search along the path's gradient) and the curl of a
        # payoff (a Jacobian per context) also run their rows with the axes `Auto`.
        "flip margin": lambda s: rx.flip_margin(
            rx.EntropicReplicator(s, 0.7), t1=2.0
        ).margin,
        "curl": lambda s: rx.curl(
            rx.Replicator(rx.Logits(s) + rx.LowRankPayoff(factors[0], factors[1]), 0.7),
            jnp.log(starts),
        ),
    }
    # Compiles are what take the time: the batch sharding (no communication) is
    # checked on the ODE path with one step size for the batch, the rest-point gradient
    # and the curl (both failed under batch sharding before), the vocabulary sharding
    # on the others.
    single = {}
    for case, (rows, vocab), names in (
        ("batch", ("d", None), ("ODE shared steps", "equilibrium grad", "curl")),
        ("vocab", (None, "d"), [n for n in solvers if "shared" not in n]),
    ):
        sharded = jax.device_put(logits, NamedSharding(mesh, P(rows, vocab)))
        for name in names:
            if name not in single:
                single[name] = jax.jit(solvers[name])(logits)
            with jax.set_mesh(mesh):
                value = jax.jit(solvers[name])(sharded)
            spec = (rows,) + (None,) * (value.ndim - 2) + (vocab,) * (value.ndim > 1)
            if name in ("ODE observables", "Lyapunov exponents"):
                spec = (rows, None)  # (rows, times) and (rows, k)
            check(f"{case} {name}", value, single[name], spec)
    # A failed solve raises on every device, naming the batch index (no device is left
    # waiting at a collective for the one that raised).
    with jax.set_mesh(mesh):
        try:
            jax.block_until_ready(rx.solve(penalised(sharded), t1=2.0, max_steps=2))
            raise AssertionError("no error for max_steps=2")
        except Exception as error:
            assert "The ODE solve failed at batch index (0,)" in str(error), error
            assert "max_steps" in str(error), error
        # So does a failed rest-point search (one context at a time on each device).
        try:
            method = rx.RestPoint(max_steps=1)
            jax.block_until_ready(rx.equilibrium(reinforced(sharded), method=method))
            raise AssertionError("no error for max_steps=1")
        except Exception as error:
            assert "`rx.equilibrium`" in str(error), error
            assert "batch index (0,)" in str(error), error
    print("worst relative error:", max(worst.values()), worst)

    # On a mesh of `Auto` axes (no mesh in context), XLA partitions the program itself.
    auto_mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    auto = jax.device_put(logits, NamedSharding(auto_mesh, P(None, "d")))
    ode = lambda s: rx.solve(penalised(s), t1=2.0, shared_steps=True).p
    check("ODE on an Auto mesh", jax.jit(ode)(auto), ode(logits), None)
    # Inputs on an `Auto` mesh carry no sharding in their types under `jit`:
    # `rx.equilibrium` maps the contexts one at a time whenever there are several CPU
    # devices (vmapped, this hung in LAPACK's LU).
    rest = lambda s: jnp.exp(rx.equilibrium(reinforced(s)).log_p)
    check("equilibrium on an Auto mesh", jax.jit(rest)(auto), rest(logits), None)

    # `rx.generate`. The model: one-hot rows of the last token times a table of
    # next-token logits, less a per-row memory of the tokens read so far (a state that
    # is sharded as the batch, or as the vocabulary).
    def model(tokens, state):
        table, memory = state
        memory = memory + jnp.sum(jax.nn.one_hot(tokens, 64), axis=1)
        next_logits = jax.nn.one_hot(tokens[:, -1], 64) @ table - 0.2 * memory
        return next_logits, (table, memory)

    prompt = jax.random.randint(jax.random.key(3), (16, 3), 0, 64)
    targets = jax.random.randint(jax.random.key(5), (16, 4), 0, 64)
    table = logits[:4].repeat(16, 0)  # (64, 64)
    memory = jnp.zeros((16, 64), jnp.float32)
    sample = dict(max_new_tokens=4, key=jax.random.key(4), frequency_penalty=0.3,
                  no_repeat_ngram_size=2, support=rx.TopK(8), save_log_p=True)
    greedy = dict(max_new_tokens=4, repetition_penalty=1.3, save_log_p=True)

    def decoded(name, got, want, rows, vocab):
        assert np.array_equal(np.asarray(got.tokens), np.asarray(want.tokens)), name
        check(f"{name} tokens", got.tokens, want.tokens, (rows, None))
        for field in ("log_prob", "entropy", "kl"):
            check(f"{name} {field}", getattr(got, field), getattr(want, field),
                  (rows, None))
        check(f"{name} log_p", got.log_p, want.log_p, (rows, None, vocab))

    put = lambda x, m, *spec: jax.device_put(x, NamedSharding(m, P(*spec)))
    with jax.set_mesh(mesh):
        # The prompt and the model's memory sharded over the batch (data parallel).
        got = rx.generate(model, put(prompt, mesh, "d", None),
                          (table, put(memory, mesh, "d", None)), **sample)
    decoded("generate, batch", got, rx.generate(model, prompt, (table, memory),
                                                **sample), "d", None)
    with jax.set_mesh(mesh):
        # The table and the memory sharded over the vocabulary; the host loop.
        got = rx.generate(model, prompt, (put(table, mesh, None, "d"),
                                          put(memory, mesh, None, "d")),
                          jit=False, **greedy)
    decoded("generate, vocabulary, host loop", got,
            rx.generate(model, prompt, (table, memory), **greedy), None, "d")

    # Teacher forcing with expected counts (the differentiable mode): the gradient of
    # the negative log-likelihood with respect to the table, on a 2-D mesh.
    def nll(table, temperature, prompt, memory, targets):
        out = rx.generate(model, prompt, (table, memory), max_new_tokens=4,
                          targets=targets, counts="expected", temperature=temperature,
                          frequency_penalty=0.3)
        return -jnp.sum(out.log_prob)

    grad = jax.jit(jax.grad(nll, argnums=(0, 1)))
    want = grad(table, 0.8, prompt, memory, targets)
    with jax.set_mesh(mesh_2d):
        got = grad(put(table, mesh_2d, None, "v"), 0.8, put(prompt, mesh_2d, "b", None),
                   put(memory, mesh_2d, "b", "v"), put(targets, mesh_2d, "b", None))
    scale = float(np.max(np.abs(np.asarray(want[0]))))
    check("generate gradient, table", got[0] / scale, want[0] / scale, (None, "v"))
    check("generate gradient, temperature", got[1], want[1], None)

    # On a mesh of `Auto` axes (no mesh in context) XLA partitions the whole loop.
    with jax.set_mesh(auto_mesh):
        got = rx.generate(model, prompt, (put(table, auto_mesh, None, "d"), memory),
                          **greedy)
    want = rx.generate(model, prompt, (table, memory), **greedy)
    assert np.array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    print("worst relative error of generate:",
          max(v for k, v in worst.items() if k.startswith("generate")))
    print("all ok")
    """
)


def test_sharding_on_eight_cpu_devices(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = {
        **os.environ,
        "XLA_FLAGS": flags.strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "all ok" in out.stdout
    assert REMATERIALIZATION not in out.stderr, out.stderr[-3000:]
