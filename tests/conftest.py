import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest


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
