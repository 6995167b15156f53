"""Shared fixtures: a tiny Flax transformer block whose kernels the adapter tests target."""

from __future__ import annotations

import os

# Tests run on the CPU unless the caller chose a platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles thousands of small programs: XLA:CPU's backend optimisations (LLVM -O2) cost more
# there than they save. Numerics are IEEE float either way (tolerances account for reassociation); a
# caller's own XLA_FLAGS setting wins. The notebooks run as users run them (see test_notebooks.py).
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAG).strip()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

EMBED, HEADS, SEQ, BATCH = 16, 2, 5, 3


class TinyBlock(nn.Module):
  """Self-attention (DenseGeneral query/key/value/out kernels) followed by a 2-layer MLP."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(h, h)
    x = x + h
    h = nn.Dense(2 * EMBED, name="mlp_in")(x)
    return x + nn.Dense(EMBED, name="mlp_out")(nn.gelu(h))


@pytest.fixture(scope="session")
def block():
  return TinyBlock()


@pytest.fixture(scope="session")
def inputs():
  return jax.random.normal(jax.random.key(1), (BATCH, SEQ, EMBED))


@pytest.fixture(scope="session")
def base_params(block, inputs):
  return block.init(jax.random.key(0), inputs)["params"]
