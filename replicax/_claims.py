"""`check_claims`: the measurements of `replicax check` as a function."""

import dataclasses

from jaxtyping import ArrayLike, Float


@dataclasses.dataclass(frozen=True)
class ClaimCheck:
    """What `check_claims` returns.

    **Fields:**

    - `keys`: each claim's short name (e.g. `"limit_softmax"`), in table order.
    - `claims`: each claim in words.
    - `deviation`: per flow (`"R"`, `"E"`), the measured deviation of each claim (an
        error where it holds, the gap where it does not).
    - `holds`: per flow, whether each claim holds (deviation within its tolerance).
    - `expected`: per flow, THEORY §1's verdict for each claim.
    - `agrees`: whether every measured verdict is THEORY's.
    - `t_inf`: the time taken as the limit.
    - `table`: the table `replicax check` prints, with its footnotes.
    """

    keys: tuple[str, ...]
    claims: tuple[str, ...]
    deviation: dict[str, tuple[float, ...]]
    holds: dict[str, tuple[bool, ...]]
    expected: dict[str, tuple[bool, ...]]
    agrees: bool
    t_inf: float
    table: str


def check_claims(
    logits: Float[ArrayLike, "contexts vocab"] | None = None,
    *,
    seed: int = 0,
    contexts: int = 4,
    vocab: int = 2000,
) -> ClaimCheck:
    """Measures each claim of THEORY §1 for both flows, as `replicax check` does.

    Every claim (stays on the simplex, passes `softmax(s/T)` at `t = 1`, converges to
    `softmax(s/T)` or to the argmax, monotone entropy and KL, the KL bound, face
    invariance, the top-p limit, multiplicative weights, `time_to`) is measured in
    float64 on the same logits for the replicator (R) and the entropic replicator (E),
    from uniform, and its verdict compared with THEORY's. The temperature of context
    `i` cycles through 0.5, 0.7, 1.0, 1.5.

    **Arguments:**

    - `logits`: the logits to measure on, shape `(contexts, vocab)`; default: the
        synthetic logits `rx.datasets.synthetic_logits(seed, contexts, vocab)`, the
        problem `replicax check` runs.
    - `seed`, `contexts`, `vocab`: the synthetic logits when `logits` is `None`.

    **Returns:**

    A `ClaimCheck`: per-claim deviations and verdicts for each flow, whether all agree
    with THEORY, and the printed table.

    **Raises:**

    `ValueError` if `logits` is not of shape `(contexts, vocab)` with `vocab >= 2`, or
    if `contexts < 1` or `vocab < 2`.
    """
    # Imported here: the checks module uses the public API of the package, which is
    # still being imported when this module is.
    import numpy as np

    from . import datasets
    from ._check import FLOWS, format_table, run_checks

    if logits is None:
        for name, value, low in (("contexts", contexts, 1), ("vocab", vocab, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"`{name}` must be an int >= {low}; received {value!r}."
                )
        logits = datasets.synthetic_logits(seed, contexts, vocab)
    shape = np.shape(logits)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 2:
        raise ValueError(
            "`logits` must have shape (contexts, vocab) with vocab >= 2; received "
            f"shape {shape}."
        )
    results, t_inf = run_checks(logits)
    names = [name for name, _ in FLOWS]
    return ClaimCheck(
        keys=tuple(r.claim.key for r in results),
        claims=tuple(r.claim.text for r in results),
        deviation={n: tuple(float(r.deviation[n]) for r in results) for n in names},
        holds={n: tuple(r.holds(n) for r in results) for n in names},
        expected={n: tuple(r.expected(n) for r in results) for n in names},
        agrees=all(r.agrees for r in results),
        t_inf=float(t_inf),
        table=format_table(results),
    )
