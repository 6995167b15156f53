"""The Flax low-rank modules are thin: each equals its core function exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp

X = jax.random.normal(jax.random.key(3), (4, 2, 12))


@pytest.mark.parametrize("lean", [False, True])
def test_nnx_sine_lowrank_dense_equals_core(lean):
  layer = sp.nnx.SineLowRankDense(12, 10, rank=3, omega=25.0, memory_lean=lean, block_size=4, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.arange(10.0)
  expected = sp.sine_lowrank_dense(X, layer.a[...], layer.b[...], layer.bias[...], omega=25.0,
                                   memory_lean=lean, block_size=4)
  np.testing.assert_array_equal(layer(X), expected)
  np.testing.assert_allclose(layer(X), X @ sp.sine_lowrank(layer.a[...], layer.b[...], omega=25.0) + jnp.arange(10.0), atol=1e-5)
  assert layer(X).shape == (4, 2, 10)


def test_nnx_lowrank_dense_equals_core_and_is_jittable():
  layer = sp.nnx.LowRankDense(12, 10, rank=3, use_bias=False, rngs=nnx.Rngs(1))
  assert layer.bias is None
  np.testing.assert_array_equal(layer(X), sp.lowrank_dense(X, layer.a[...], layer.b[...]))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, X), layer(X), atol=1e-6)
  kernel = layer.a[...] @ layer.b[...]
  assert np.linalg.matrix_rank(np.asarray(kernel)) == 3
  # Default inits give kernel entries of variance about 1 / in_features, like nnx.Linear.
  big = sp.nnx.LowRankDense(256, 256, rank=64, rngs=nnx.Rngs(2))
  np.testing.assert_allclose(jnp.var(big.a[...] @ big.b[...]), 1 / 256, rtol=0.15)


@pytest.mark.parametrize("lean", [False, True])
def test_linen_modules_equal_core(lean):
  module = sp.linen.SineLowRankDense(features=10, rank=3, omega=25.0, memory_lean=lean, block_size=4)
  variables = module.init(jax.random.key(0), X)
  p = variables["params"]
  assert p["a"].shape == (12, 3) and p["b"].shape == (3, 10) and p["bias"].shape == (10,)
  expected = sp.sine_lowrank_dense(X, p["a"], p["b"], p["bias"], omega=25.0, memory_lean=lean, block_size=4)
  np.testing.assert_array_equal(module.apply(variables, X), expected)
  plain = sp.linen.LowRankDense(features=10, rank=3)
  v = plain.init(jax.random.key(1), X)
  np.testing.assert_array_equal(plain.apply(v, X), sp.lowrank_dense(X, v["params"]["a"], v["params"]["b"], v["params"]["bias"]))


def test_dtype_promotion_follows_flax():
  layer = sp.nnx.SineLowRankDense(12, 10, rank=2, omega=5.0, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer(X).dtype == jnp.bfloat16
  assert layer.a[...].dtype == jnp.float32


def test_modules_reject_bad_hyperparameters():
  with pytest.raises(ValueError, match="`rank` must be at most"):
    sp.nnx.LowRankDense(4, 10, rank=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`omega`"):
    sp.nnx.SineLowRankDense(12, 10, rank=2, omega=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`rank` must be at most"):
    sp.linen.LowRankDense(features=2, rank=3).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="`x` must have shape"):
    sp.nnx.LowRankDense(5, 10, rank=2, rngs=nnx.Rngs(0))(X)


def test_sine_layers_default_to_the_reference_init_and_a_paper_range_omega():
  """Kaiming-uniform(a = sqrt 5) factors, U(+-1/sqrt(fan_in)), and omega outside the linear regime."""
  in_features, out_features, rank = 256, 192, 8
  linen_p = sp.linen.SineLowRankDense(features=out_features, rank=rank).init(
      jax.random.key(0), jnp.ones((1, in_features)))["params"]
  nnx_layer = sp.nnx.SineLowRankDense(in_features, out_features, rank=rank, rngs=nnx.Rngs(0))
  for a, b in ((linen_p["a"], linen_p["b"]), (nnx_layer.a[...], nnx_layer.b[...])):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.abs(a).max() <= 1 / np.sqrt(in_features) and np.abs(b).max() <= 1 / np.sqrt(rank)
    # Uniform on [-c, c]: variance c^2 / 3 = 1 / (3 fan_in); the extremes come close to the bound.
    np.testing.assert_allclose(a.var(), 1 / (3 * in_features), rtol=0.1)
    np.testing.assert_allclose(b.var(), 1 / (3 * rank), rtol=0.1)
    assert np.abs(a).max() > 0.95 / np.sqrt(in_features)
  assert sp.linen.SineLowRankDense(features=4, rank=1).omega == nnx_layer.omega == 100.0
  # Remark 2: at omega = 1 the sine is linear (no rank gain); the default omega raises the rank.
  a, b = nnx_layer.a[...], nnx_layer.b[...]
  assert int(sp.numerical_rank(sp.sine_lowrank(a, b, omega=1.0), rtol=1e-3)) <= rank
  assert int(sp.numerical_rank(sp.sine_lowrank(a, b, omega=nnx_layer.omega), rtol=1e-3)) > 4 * rank
  # The plain low-rank layer keeps LeCun normal (variance 1 / fan_in, like nnx.Linear).
  plain = sp.nnx.LowRankDense(in_features, out_features, rank=rank, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.var(np.asarray(plain.a[...])), 1 / in_features, rtol=0.1)


def test_sine_layer_with_explicit_inits_still_equals_core():
  init = nnx.initializers.normal(0.3)
  layer = sp.nnx.SineLowRankDense(12, 10, rank=3, a_init=init, b_init=init, rngs=nnx.Rngs(4))
  np.testing.assert_allclose(np.std(np.asarray(layer.a[...])), 0.3, rtol=0.5)
  np.testing.assert_array_equal(layer(X), sp.sine_lowrank_dense(X, layer.a[...], layer.b[...], layer.bias[...], omega=100.0))
  module = sp.linen.SineLowRankDense(features=10, rank=3, a_init=init, b_init=init)
  v = module.init(jax.random.key(5), X)
  p = v["params"]
  np.testing.assert_array_equal(module.apply(v, X), sp.sine_lowrank_dense(X, p["a"], p["b"], p["bias"], omega=100.0))
