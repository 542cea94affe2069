import os
import random


# The suite is compile-bound (hundreds of small XLA programs, each run a few times):
# LLVM's optimisations of the generated CPU code cost more than they save here. Measured
# on tests/test_transforms.py: 24% less CPU time. Set before JAX starts its backend; the
# examples run by the tests inherit it. Benchmarks never run under it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, seeded per test (no seed hunting: seed 0)."""
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    return lambda: next(keys)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)


def pytest_configure(config):
    del config
    jnp.zeros(())  # initialise the backend once, outside any test's timing


# The test files that take longest (CPU seconds on the 2-core CI machine, 2026-11-30),
# heaviest first. pytest-xdist hands whole files to workers in collection order; starting
# the long ones first keeps one worker from running a long file alone at the end.
HEAVY_FIRST = (
    "test_gradients.py",
    "test_bench.py",
    "test_transforms.py",
    "test_examples.py",
    "test_faces.py",
    "test_ode_path.py",
    "test_scores.py",
    "test_observables_discrete.py",
    "test_bad_inputs.py",
    "test_time_to.py",
    "test_sharding.py",
    "test_kernels.py",
    "test_dispatch.py",
    "test_adapter.py",
    "test_cli_check.py",
    "test_properties.py",
    "test_analysis.py",
    "test_switched.py",
    "test_closed_forms.py",
)


def pytest_collection_modifyitems(config, items):
    del config
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
