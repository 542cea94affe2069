"""The benchmark scripts of replicax; `python -m benchmarks` runs `replicax bench`."""
