"""Decoding a transformers causal LM with a flow per token.

Builds a tiny GPT-2 with random weights and a word-level tokenizer in memory (no
download), wraps it with `replicax.adapters.transformers`, and decodes three prompts
with `rx.generate`:

1. (E) to its limit (`t1=None`): `softmax(s'/T)` on the top-k face, the distribution
   transformers samples from; sampled with an explicit key, with a repetition penalty
   and a no-repeat-bigram rule.
2. (R) at `t1 = 1` on the same tokens (teacher forcing): THEORY §1 says it passes the
   same distribution, which the script measures.
3. (R) at a later time `t1 = 3` on the same tokens: sharper than (E) (entropy lower at
   every step), and its KL to (E)'s distribution per step.

It prints per-step entropy and KL, the loop detector, and writes `real_model.png` when
matplotlib is installed.

A downloaded model instead of the tiny one: `python real_model.py --model gpt2` (any
causal LM name or local path), which replaces the tiny model by

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("gpt2")
    tokenizer = AutoTokenizer.from_pretrained("gpt2")
"""

import argparse

import jax
import numpy as np
import torch

import replicax as rx
import replicax.adapters.transformers as rxt

WORDS = ["<pad>", "<eos>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
WORDS += [".", "and", "big", "red", "hat"]
PROMPTS = ["the cat sat", "a dog ran far on the mat .", "dog"]
STEPS = 12
TEMPERATURE = 0.8
TOP_K = 8
T1_LATE = 3.0


def tiny_model():
    """A 2-layer GPT-2 with random weights and a tokenizer of 12 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=len(WORDS), n_positions=64,
        initializer_range=0.3, bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval(), tokenizer


def downloaded_model(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name)
    return model, AutoTokenizer.from_pretrained(name)


def decode(model, tokenizer, ids, mask, **kwargs):
    fn, state0 = rxt.logits_fn(model, tokenizer, mask)
    return rx.generate(
        fn, ids, state0, max_new_tokens=STEPS, jit=False, attention_mask=mask,
        temperature=TEMPERATURE, support=rx.TopK(TOP_K), repetition_penalty=1.3,
        no_repeat_ngram_size=2, save_log_p=True, progress=False, **kwargs,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a causal LM to load instead of the tiny one")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: threads only wait for each other
    model, tokenizer = tiny_model() if args.model is None else downloaded_model(
        args.model
    )
    ids, mask = rxt.encode(tokenizer, PROMPTS)

    # 1. (E) to its limit, sampled; 2. and 3. (R) at t1 = 1 and t1 = 3 on its tokens.
    e = decode(model, tokenizer, ids, mask, key=jax.random.key(0))
    r1 = decode(model, tokenizer, ids, mask, targets=e.tokens, flow=rx.Replicator,
                t1=1.0)
    r3 = decode(model, tokenizer, ids, mask, targets=e.tokens, flow=rx.Replicator,
                t1=T1_LATE)
    p_e, p_r1 = np.exp(np.asarray(e.log_p)), np.exp(np.asarray(r1.log_p))
    kl_r3_e = np.asarray(rx.kl(r3.log_p, e.log_p))  # KL(p_R(3) || p_E) per step

    print(f"model: {args.model or 'tiny random GPT-2'}, T = {TEMPERATURE}, "
          f"TopK({TOP_K}), repetition penalty 1.3, no repeated bigrams, "
          f"vocab {e.log_p.shape[-1]}")
    print(f"(R) at t1 = 1 vs (E) limit: max |p_R - p_E| = "
          f"{np.max(np.abs(p_r1 - p_e)):.3e}")
    for row, prompt in enumerate(PROMPTS):
        print(f"\nprompt {row}: {prompt!r}")
        print("tokens:", " ".join(map(str, np.asarray(e.tokens[row]))))
        print("text:", tokenizer.decode(np.asarray(e.tokens[row])))
        print("entropy E:", " ".join(f"{x:.4f}" for x in np.asarray(e.entropy[row])))
        print(f"entropy R(t1={T1_LATE:g}):",
              " ".join(f"{x:.4f}" for x in np.asarray(r3.entropy[row])))
        print(f"KL(R(t1={T1_LATE:g}) || E):",
              " ".join(f"{x:.4f}" for x in kl_r3_e[row]))
        kl_raw = np.asarray(e.kl[row])
        print("KL E to unpenalised:", " ".join(f"{x:.4f}" for x in kl_raw))
        print(f"loop detector: repeated trigrams {int(e.repeated_ngrams[row])}, "
              f"cycle length {int(e.cycle_length[row])}")

    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("\nmatplotlib not installed: no figure")
        return
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    steps = np.arange(1, STEPS + 1)
    for row in range(len(PROMPTS)):
        (line,) = axes[0].plot(
            steps, np.asarray(e.entropy[row]), label=f"E, prompt {row}"
        )
        axes[0].plot(steps, np.asarray(r3.entropy[row]), "--", color=line.get_color(),
                     label=f"R(t1={T1_LATE:g}), prompt {row}")
        axes[1].plot(steps, kl_r3_e[row], color=line.get_color())
    axes[0].set(xlabel="step", ylabel="entropy (nats)", title="per-step entropy")
    axes[1].set(xlabel="step", ylabel="nats", title=f"KL(R(t1={T1_LATE:g}) ‖ E)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig("real_model.png", dpi=100)
    print("\nwrote real_model.png")


if __name__ == "__main__":
    main()
