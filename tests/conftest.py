"""Strict JAX settings for every test, set before any JAX operation."""

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Tests measure correctness, not speed: skipping most XLA optimisation passes
# cuts the suite's compile time by about a third (measured on 2 cores).
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled (for float64 references)."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def rng():
  """A seeded NumPy generator: every test's randomness is reproducible."""
  return np.random.default_rng(0)
