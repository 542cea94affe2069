#!/usr/bin/env bash
# Everything that needs a GPU, as one command for a session that is lent one (run from the
# repository root; nothing is installed: jax with CUDA, diffrax, equinox and pytest must be
# there already). About 9½ minutes at most; every step writes its results under
# ${OUT:-device_out} as it goes, so a step cut short by its timeout keeps what it wrote.
#
# 1. The Pallas kernels compiled by Triton and run on the GPU (`rx.Exact(kernel="pallas")`
#    through `rx.solve`, the trajectory and the one-read statistics, forward and
#    gradient) against the jnp reference and the default path.
# 2. The closed-form cases of the suite at DESIGN sizes, with the Pallas rows that only a
#    GPU times.
# 3. The ODE path (per-context steps and `shared_steps=True`) and its compile study
#    (`FAST_COMPILE_OPTIONS`: the autotuner off) at one size: a default compile may take
#    minutes there.
# 4. The ODE field, fused against its definition: kernels, reductions and time
#    (`benchmarks/field.py`), to see whether XLA fuses the two pairs of reductions.
set -u
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
timeout 130 python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_kernels.py tests/test_statistics.py >"$out/kernels.log" 2>&1
echo "kernel tests: exit $?"
tail -3 "$out/kernels.log"
timeout 240 python -m benchmarks --cases a b d e --batch 1 64 256 --vocab 32000 128256 \
    --repeats 5 --json "$out/bench_abde.json" --markdown "$out/bench_abde.md" \
    >"$out/bench_abde.log" 2>&1
echo "bench a b d e: exit $?"
timeout 150 python -m benchmarks --cases c --batch 64 --vocab 128256 --repeats 3 \
    --json "$out/bench_c.json" --markdown "$out/bench_c.md" >"$out/bench_c.log" 2>&1
echo "bench c: exit $?"
timeout 40 python benchmarks/field.py --batch 64 --vocab 128256 >"$out/field.md" 2>&1
echo "field: exit $?"
