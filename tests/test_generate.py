"""`rx.generate`: the decoding loop against a plain numpy loop written from
transformers' documented processor semantics, its per-step records against direct
computations, the loop detector on constructed sequences, and gradients of the
differentiable mode against central finite differences (float64)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import replicax as rx
import replicax._generate as _generate

VOCAB, HIDDEN = 12, 8
# Under `jax.jit` the failed check may reach us wrapped by the callback (a ValueError).
RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, ValueError)

# Tolerances (float64). Log-probabilities, entropies and KLs are the same closed forms
# computed in a different order: agreement to rounding.
RECORD_RTOL, RECORD_ATOL = 1e-10, 1e-12
# Central differences with step `FD_STEP` (relative): truncation ~ h² and rounding
# ~ 1e-16 / h, both far below the acceptance tolerance of 1e-4.
FD_STEP, FD_RTOL = 1e-6, 1e-4
# `rx.time_to` is a bisection on the log of the distance, run to about machine precision
# in time (measured: the KL at the returned time is eps to 8e-13 relative).
TIME_TO_RTOL = 1e-9


class TinyRNN(eqx.Module):
    """Embedding + tanh recurrence + linear read-out: `logits_fn(tokens, h)` consumes a
    block of tokens per row and returns the next-token logits and the hidden state."""

    embed: jax.Array
    weight: jax.Array
    out: jax.Array

    def __init__(self, key, vocab=VOCAB, hidden=HIDDEN, scale=2.0):
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = jax.random.normal(k1, (vocab, hidden), jnp.float64)
        self.weight = jax.random.normal(k2, (hidden, hidden), jnp.float64) / hidden**0.5
        self.out = scale * jax.random.normal(k3, (hidden, vocab), jnp.float64)

    def __call__(self, tokens, h):
        def cell(h, token):
            return jnp.tanh(h @ self.weight + self.embed[token]), None

        h, _ = jax.lax.scan(cell, h, tokens.T)
        return h @ self.out, h


def numpy_rnn(model):
    """The same model in numpy: `(tokens, h) -> (logits, h)` on host arrays."""
    embed, weight, out = (np.asarray(x) for x in (model.embed, model.weight, model.out))

    def logits_fn(tokens, h):
        h = np.array(h)
        for column in np.asarray(tokens).T:
            h = np.tanh(h @ weight + embed[column])
        return h @ out, h

    return logits_fn


def _model_and_prompt():
    model = TinyRNN(jax.random.key(1))
    prompt = jnp.array([[1, 2, 3, 1], [4, 5, 6, 7], [0, 0, 9, 9]])
    h0 = jnp.zeros((prompt.shape[0], HIDDEN), jnp.float64)
    return model, prompt, h0


# --------------------------------------------------------------------------------------
# The reference: a numpy loop that reruns the model (in numpy) on the whole prefix at
# every step and applies the processors as transformers documents them.


def _ngram_bans(history, n):
    """transformers' `_get_ngrams` / `_get_generated_ngrams`: a dictionary of
    n-grams."""
    if len(history) < n:
        return []
    ngrams = {}
    for gram in zip(*[history[i:] for i in range(n)], strict=False):
        ngrams.setdefault(tuple(gram[:-1]), []).append(gram[-1])
    return ngrams.get(tuple(history[len(history) - n + 1 :]), [])


def reference(
    model,
    prompt,
    h0,
    steps,
    *,
    temperature=1.0,
    repetition=1.0,
    presence=0.0,
    frequency=0.0,
    ngram=0,
    top_k=None,
    uniforms=None,
    mask=None,
):
    prompt = np.asarray(prompt)
    batch = prompt.shape[0]
    mask = np.ones(prompt.shape, bool) if mask is None else np.asarray(mask, bool)
    history = [list(row) for row in prompt]
    generated = [[] for _ in range(batch)]
    out = dict(tokens=[], log_p=[], log_q=[], penalised=[])
    numpy_model = numpy_rnn(model)
    for t in range(steps):
        raw, _ = numpy_model(np.array(history), h0)  # the whole prefix, rerun
        s = raw.copy()
        for b in range(batch):
            seen = {tok for tok, keep in zip(history[b], mask[b], strict=False) if keep}
            seen |= set(generated[b])
            for tok in seen:  # RepetitionPenaltyLogitsProcessor
                x = s[b, tok]
                s[b, tok] = x * repetition if x < 0 else x / repetition
            count = np.bincount(generated[b], minlength=VOCAB).astype(np.float64)
            s[b] -= presence * (count > 0) + frequency * count
            if ngram:  # NoRepeatNGramLogitsProcessor
                for tok in _ngram_bans(history[b], ngram):
                    s[b, tok] = -np.inf

        def warp(x):  # TemperatureLogitsWarper, then TopKLogitsWarper (per row)
            x = x / np.reshape(temperature, (-1, 1))
            if top_k is not None:
                k = np.broadcast_to(top_k, (batch,))
                kth = np.sort(x, axis=-1)[np.arange(batch), -k][:, None]
                x = np.where(x < kth, -np.inf, x)
            return x - scipy.special.logsumexp(x, axis=-1, keepdims=True)

        log_p, log_q = warp(s), warp(raw)
        if uniforms is None:
            tokens = np.argmax(log_p, axis=-1)
        else:
            cdf = np.cumsum(np.exp(log_p), axis=-1)
            tokens = np.array(
                [
                    np.searchsorted(cdf[b], uniforms[t][b], side="right")
                    for b in range(batch)
                ]
            )
        for b in range(batch):
            history[b].append(int(tokens[b]))
            generated[b].append(int(tokens[b]))
        for k, v in zip(out, (tokens, log_p, log_q, s), strict=True):
            out[k].append(v)
    return {k: np.stack(v, axis=1) for k, v in out.items()}


def _entropy(log_p):
    p = np.exp(log_p)
    return -np.sum(p * np.where(p > 0, log_p, 0), axis=-1)


def _kl(log_p, log_q):
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):  # -inf - -inf off both faces
        gap = np.where(p > 0, log_p - log_q, 0)
    return np.sum(p * gap, axis=-1)


# --------------------------------------------------------------------------------------


def test_greedy_with_penalties_equals_reference(capsys):
    model, prompt, h0 = _model_and_prompt()
    steps = 12
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])  # left padding
    options = dict(repetition_penalty=1.7, no_repeat_ngram_size=2, attention_mask=mask)
    gen = rx.generate(model, prompt, h0, max_new_tokens=steps, **options)
    ref = reference(model, prompt, h0, steps, repetition=1.7, ngram=2, mask=mask)
    np.testing.assert_array_equal(gen.tokens, ref["tokens"])
    chosen = np.take_along_axis(ref["log_p"], ref["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(gen.log_prob, chosen, rtol=RECORD_RTOL, atol=RECORD_ATOL)
    # The penalties change the path here, or the test proves little.
    plain = reference(model, prompt, h0, steps)
    assert np.any(plain["tokens"] != ref["tokens"])
    assert gen.repeated_ngrams.shape == (3,)

    # The host loop, with a model that is not JAX (numpy in, numpy out): same tokens.
    host = rx.generate(
        numpy_rnn(model), prompt, h0, max_new_tokens=steps, jit=False, **options
    )
    np.testing.assert_array_equal(host.tokens, gen.tokens)
    np.testing.assert_allclose(host.log_prob, gen.log_prob, rtol=RECORD_RTOL)

    # The jitted loop with a progress bar (a host callback per step): same tokens, and
    # the bar reaches every step.
    capsys.readouterr()
    shown = rx.generate(
        model, prompt, h0, max_new_tokens=steps, progress=True, **options
    )
    np.testing.assert_array_equal(shown.tokens, gen.tokens)
    assert f"{steps}/{steps}" in capsys.readouterr().err


def test_sampling_equals_reference_and_records():
    """(E) run to its limit samples from softmax(s'/T) on the face: the reference, with
    the same uniform draws, picks the same tokens; the records equal direct
    computations; sampling is reproducible; new values do not recompile."""
    model, prompt, h0 = _model_and_prompt()
    steps, temperature, eps = 10, 0.8, 1e-3
    key = jax.random.key(7)
    options = dict(
        temperature=temperature,
        support=rx.TopK(6),
        presence_penalty=0.4,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        save_log_p=True,
        time_to_eps=eps,
    )
    gen = rx.generate(model, prompt, h0, max_new_tokens=steps, key=key, **options)
    keys = jax.random.split(key, steps)
    uniforms = [np.asarray(jax.random.uniform(k, (3,), jnp.float64)) for k in keys]
    ref = reference(
        model,
        prompt,
        h0,
        steps,
        temperature=temperature,
        repetition=1.2,
        presence=0.4,
        frequency=0.3,
        top_k=6,
        uniforms=uniforms,
    )
    np.testing.assert_array_equal(gen.tokens, ref["tokens"])
    close = dict(rtol=RECORD_RTOL, atol=RECORD_ATOL)
    np.testing.assert_allclose(np.exp(gen.log_p), np.exp(ref["log_p"]), **close)
    chosen = np.take_along_axis(ref["log_p"], ref["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(gen.log_prob, chosen, **close)
    np.testing.assert_allclose(gen.entropy, _entropy(ref["log_p"]), **close)
    kl = _kl(ref["log_p"], ref["log_q"])
    finite = np.isfinite(kl)
    assert finite.sum() > 10  # most steps keep the same top-k face
    np.testing.assert_allclose(gen.kl[finite], kl[finite], **close)
    assert np.all(np.isinf(np.asarray(gen.kl)[~finite]))
    # Time to eps: from uniform on the face, (E) is at softmax((1 - e^{-t}) s'/T)
    # (THEORY §1); at the recorded time its KL to softmax(s'/T) is eps.
    x = ref["log_p"] - np.max(ref["log_p"], axis=-1, keepdims=True)  # s'/T + const
    t = np.asarray(gen.time_to)[..., None]
    with np.errstate(invalid="ignore"):  # -inf * (1 - e^{-t}) off the face
        at_t = scipy.special.log_softmax(-np.expm1(-t) * x, axis=-1)
    np.testing.assert_allclose(_kl(at_t, ref["log_p"]), eps, rtol=TIME_TO_RTOL)

    # Same key: same tokens. New values of every dynamic argument: no new trace.
    traces = eqx.debug.get_num_traces(_generate._generate_scan)
    again = rx.generate(model, prompt, h0, max_new_tokens=steps, key=key, **options)
    np.testing.assert_array_equal(again.tokens, gen.tokens)
    other = dict(
        options,
        temperature=1.3,
        presence_penalty=0.1,
        frequency_penalty=0.05,
        repetition_penalty=1.05,
        support=rx.TopK(4),
        time_to_eps=1e-4,
    )
    rx.generate(model, prompt, h0, max_new_tokens=steps, key=jax.random.key(8), **other)
    assert eqx.debug.get_num_traces(_generate._generate_scan) == traces


def test_replicator_at_time_one_samples_softmax():
    """From uniform, (R) passes softmax(s/T) at t = 1 (THEORY §1): sampling at t1 = 1
    equals the reference's softmax sampling with the same draws. Temperature and top-k
    are given one per row."""
    model, prompt, h0 = _model_and_prompt()
    steps, key = 8, jax.random.key(3)
    temperature, top_k = np.array([0.6, 0.9, 1.3]), np.array([3, 5, VOCAB])
    gen = rx.generate(
        model,
        prompt,
        h0,
        max_new_tokens=steps,
        key=key,
        flow=rx.Replicator,
        t1=1.0,
        temperature=jnp.asarray(temperature),
        support=rx.TopK(jnp.asarray(top_k)),
        save_log_p=True,
    )
    keys = jax.random.split(key, steps)
    uniforms = [np.asarray(jax.random.uniform(k, (3,), jnp.float64)) for k in keys]
    ref = reference(
        model,
        prompt,
        h0,
        steps,
        temperature=temperature,
        top_k=top_k,
        uniforms=uniforms,
    )
    np.testing.assert_array_equal(gen.tokens, ref["tokens"])
    np.testing.assert_allclose(
        np.exp(gen.log_p), np.exp(ref["log_p"]), rtol=1e-9, atol=RECORD_ATOL
    )
    # No penalty: the penalised and unpenalised flows are the same.
    np.testing.assert_allclose(gen.kl, 0, atol=RECORD_ATOL)


def test_differentiable_mode_matches_finite_differences_and_loop_detector():
    """Expected counts with teacher forcing through 8 steps: the gradient of a loss of
    every record with respect to temperature, the penalty strengths, t1 and the model's
    parameters (along a random direction) against central differences in float64.

    The targets are constructed sequences, so the same run checks the loop detector."""
    model, prompt, h0 = _model_and_prompt()
    targets = jnp.array(
        [
            [3, 4, 5, 3, 4, 5, 3, 4],  # period 3 in the tail; 3 repeated trigrams
            [1, 2, 3, 4, 5, 6, 7, 8],  # no loop
            [9, 1, 2, 1, 2, 1, 2, 1],  # period 2 after one stray token
        ]
    )

    def run(temperature, repetition, presence, frequency, t1, model):
        return rx.generate(
            model,
            prompt,
            h0,
            max_new_tokens=8,
            targets=targets,
            counts="expected",
            flow=rx.EntropicReplicator,
            t1=t1,
            temperature=temperature,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            loop_window=6,
        )

    def loss(*args):
        gen = run(*args)
        value = -jnp.sum(gen.log_prob) + 0.5 * jnp.sum(gen.entropy) + jnp.sum(gen.kl)
        return value, (gen.tokens, gen.cycle_length, gen.repeated_ngrams)

    # One compiled program gives the value (for the differences) and the gradient.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))
    value = lambda *a: float(value_and_grad(*a)[0][0])  # noqa: E731
    args = (0.9, 1.4, 0.3, 0.2, 2.5)
    (_, (tokens, cycle_length, repeated)), grads = value_and_grad(*args, model)
    np.testing.assert_array_equal(tokens, targets)
    np.testing.assert_array_equal(cycle_length, [3, 0, 2])
    np.testing.assert_array_equal(repeated, [3, 0, 3])

    names = ("temperature", "repetition", "presence", "frequency", "t1")
    for i, name in enumerate(names):
        h = FD_STEP * max(abs(args[i]), 1.0)
        up = list(args)
        down = list(args)
        up[i] += h
        down[i] -= h
        fd = (value(*up, model) - value(*down, model)) / (2 * h)
        assert abs(float(grads[i])) > 1e-3, name  # a gradient that can be wrong
        np.testing.assert_allclose(float(grads[i]), fd, rtol=FD_RTOL, err_msg=name)

    # The model's parameters along a random direction.
    leaves, treedef = jax.tree_util.tree_flatten(model)
    keys = jax.random.split(jax.random.key(11), len(leaves))
    direction = jax.tree_util.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
    along = sum(
        jnp.sum(g * d)
        for g, d in zip(
            jax.tree_util.tree_leaves(grads[5]),
            jax.tree_util.tree_leaves(direction),
            strict=True,
        )
    )
    shifted = lambda h: jax.tree_util.tree_map(  # noqa: E731
        lambda x, d: x + h * d, model, direction
    )
    fd = (value(*args, shifted(FD_STEP)) - value(*args, shifted(-FD_STEP))) / (
        2 * FD_STEP
    )
    np.testing.assert_allclose(float(along), fd, rtol=FD_RTOL)

    # Traced values out of range are refused at run time, naming the argument.
    bad = [(0, -0.5, "`temperature` must be finite and > 0"),
           (1, 0.0, "`repetition_penalty` must be finite and > 0"),
           (4, -1.0, "`t1` must be finite and >= 0")]
    for i, value, match in bad:
        wrong = list(args)
        wrong[i] = value
        with pytest.raises(RUNTIME_ERRORS, match=match):
            jax.block_until_ready(value_and_grad(*wrong, model))


def test_bad_arguments():
    model, prompt, h0 = _model_and_prompt()
    call = lambda **kw: rx.generate(  # noqa: E731
        model, kw.pop("prompt", prompt), h0, **{"max_new_tokens": 4, **kw}
    )
    # Our own checks, with their messages.
    cases = [
        (dict(max_new_tokens=0), "`max_new_tokens` must be an int >= 1"),
        (dict(temperature=0.0), "`temperature` must be finite and > 0"),
        (dict(temperature=jnp.ones(5)), "`temperature` must be a scalar or one value"),
        (dict(repetition_penalty=-1.0), "`repetition_penalty` must be finite and > 0"),
        (dict(presence_penalty=float("nan")), "`presence_penalty` must be finite"),
        (dict(t1=-1.0), "`t1` must be finite and >= 0"),
        (dict(time_to_eps=0.0), "`time_to_eps` must be finite and > 0"),
        (dict(no_repeat_ngram_size=-2), "`no_repeat_ngram_size` must be an int >= 0"),
        (dict(loop_window=9), "`loop_window` must be an int in"),
        (dict(flow=lambda s, T: s), "`flow` must be a flow class"),
        (dict(flow=int), "`flow` must be a flow class"),
        (dict(key=jax.random.key(0), targets=jnp.zeros((3, 4), int)),
         "at most one of `key`"),
        (dict(targets=jnp.zeros((3, 5), int)), "`targets` must be integers of shape"),
        (dict(targets=jnp.full((3, 4), VOCAB)), "`targets` must be token ids"),
        (dict(support="top_k"), "`support` must be a replicax support"),
        (dict(flow=lambda s, T: rx.Replicator(
            rx.Logits(s) + rx.SelfReinforcement(0.5), T)), "needs a constant score"),
    ]
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            call(**kwargs)
    # Under the tests' run-time type checking jaxtyping (a TypeError) may speak first;
    # without it, replicax's own message does. Either names the argument.
    typed = [
        (dict(prompt=jnp.array([1, 2])), "prompt"),
        (dict(prompt=jnp.ones((3, 2))), "prompt"),
        (dict(attention_mask=jnp.ones((3, 2), bool)), "attention_mask"),
        (dict(flow=rx.Replicator(jnp.zeros(3))), "flow"),
        (dict(key=jnp.zeros(3)), "key"),
        (dict(counts="soft"), "counts"),
    ]
    for kwargs, match in typed:
        with pytest.raises((ValueError, TypeError), match=match):
            call(**kwargs)
    with pytest.raises(TypeError, match="logits_fn"):
        rx.generate(3, prompt, h0, max_new_tokens=2)

    # A model that raises while traced, on the prompt or on the one-token steps.
    for one_token, what in ((False, "the prompt"), (True, "one token per row")):

        def fails(x, h, one_token=one_token):
            if (x.shape[1] == 1) == one_token:
                raise ValueError("unsupported length")
            return jnp.zeros((3, 4)), h

        with pytest.raises(TypeError, match=f"failed on {what}, tokens of shape"):
            rx.generate(fails, prompt, h0, max_new_tokens=2)
    with pytest.raises(ValueError, match="`logits_fn` must return next-token logits"):
        rx.generate(
            lambda x, h: (jnp.zeros((3, 2, 4)), h), prompt, h0, max_new_tokens=2
        )
    with pytest.raises(ValueError, match="same shapes whatever the number of tokens"):
        rx.generate(
            lambda x, h: (jnp.zeros((3, 4)), jnp.zeros(x.shape)), prompt, h0,
            max_new_tokens=2,
        )
