"""The paper's claims, measured: which hold for the replicator (R) and which for the
entropic replicator (E).

Runs `rx.check_claims()` (what `replicax check` prints) on the built-in synthetic
logits, 4 contexts of 2,000 tokens in float64, and prints its table: for each claim, the
measured deviation for each flow, whether the claim holds, and THEORY §1's verdict.
"""

import replicax as rx

check = rx.check_claims(contexts=4, vocab=2000)
print(check.table)
print()
for key, r_holds, e_holds in zip(
    check.keys, check.holds["R"], check.holds["E"], strict=True
):
    print(f"claim {key}: R {'holds' if r_holds else 'fails'}, "
          f"E {'holds' if e_holds else 'fails'}")
print(f"t_inf = {check.t_inf:.6g}")
print("agrees with THEORY:", check.agrees)
