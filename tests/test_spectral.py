"""Sparse syntheses (scatter, WaveFT, Fourier), LFMA's top-k mask, and the factored products."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp

SHAPE = (12, 10)


def _positions(grid, p, seed=0):
  return np.sort(np.random.default_rng(seed).choice(grid[0] * grid[1], p, replace=False)).astype(np.int32)


def test_scatter_accepts_flat_and_pair_indices():
  flat = jnp.array([0, 7, 11])
  pairs = jnp.stack([flat // 4, flat % 4], axis=1)
  values = jnp.array([1.0, -2.0, 3.0])
  expected = np.zeros(12)
  expected[[0, 7, 11]] = [1.0, -2.0, 3.0]
  np.testing.assert_array_equal(sp.scatter_coefficients(values, flat, (3, 4)), expected.reshape(3, 4))
  np.testing.assert_array_equal(sp.scatter_coefficients(values, pairs, (3, 4)), expected.reshape(3, 4))


@pytest.mark.parametrize("complex_values", [False, True])
def test_fourier_delta_matches_numpy(complex_values):
  rng = np.random.default_rng(1)
  idx = _positions(SHAPE, 15)
  values = rng.normal(size=15) + (1j * rng.normal(size=15) if complex_values else 0)
  values = values.astype(np.complex64 if complex_values else np.float32)
  dense = np.zeros(SHAPE[0] * SHAPE[1], np.complex128)
  dense[idx] = values
  expected = np.real(np.fft.ifft2(dense.reshape(SHAPE)))
  out = sp.fourier_delta(jnp.asarray(values), jnp.asarray(idx), SHAPE)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_waveft_delta_is_idwt_of_scatter():
  shape, wavelet, level = (11, 9), "db2", 1
  grid = sp.wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)
  idx = _positions(grid, 20)
  values = jnp.asarray(np.random.default_rng(2).normal(size=20), jnp.float32)
  expected = sp.idwt2(sp.scatter_coefficients(values, jnp.asarray(idx), grid), wavelet, level, shape=shape)
  # One scatter of p K^2 terms vs scatter-then-synthesise: the same sums in another order (float32).
  chex.assert_trees_all_close(sp.waveft_delta(values, jnp.asarray(idx), shape, wavelet=wavelet, level=level), expected,
                              atol=1e-6, rtol=1e-6)


def test_topk_mask_matches_numpy():
  rng = np.random.default_rng(3)
  delta_init = rng.normal(size=(16, 12)).astype(np.float32)
  magnitude = np.abs(np.fft.fft2(delta_init.astype(np.float64))).ravel()
  order = np.argsort(-magnitude, kind="stable")
  # Pick k at a clear gap between the k-th and (k+1)-th magnitudes, so rounding cannot reorder them.
  gaps = magnitude[order[:-1]] - magnitude[order[1:]]
  k = int(np.argmax(np.where(np.arange(1, gaps.size + 1) >= 10, gaps, -1.0))) + 1
  ratio = (k + 0.5) / delta_init.size
  mask = np.asarray(sp.topk_spectral_mask(jnp.asarray(delta_init), ratio))
  assert mask.shape == (k,) and mask.dtype == np.int32
  assert set(mask.tolist()) == set(order[:k].tolist())
  # Largest first.
  assert np.all(np.diff(magnitude[mask]) <= 1e-4 * magnitude.max())


def test_topk_count_is_floor():
  assert sp.topk_spectral_mask(jnp.ones((10, 10)), 0.055).shape == (5,)
  assert sp.topk_spectral_mask(jnp.ones((10, 10)), 1.0).shape == (100,)


class TestFactoredEqualsDense(chex.TestCase):

  def _check(self, fn, x, values):
    dense = self.variant(lambda x, v: fn(x, v, "dense"))
    factored = self.variant(lambda x, v: fn(x, v, "factored"))
    chex.assert_trees_all_close(factored(x, values), dense(x, values), atol=2e-5, rtol=2e-5)
    loss = lambda path: lambda x, v: jnp.sum(jnp.sin(fn(x, v, path)))  # noqa: E731
    g_dense = self.variant(jax.grad(loss("dense"), argnums=(0, 1)))(x, values)
    g_factored = self.variant(jax.grad(loss("factored"), argnums=(0, 1)))(x, values)
    chex.assert_trees_all_close(g_factored, g_dense, atol=5e-5, rtol=5e-5)

  @chex.variants(with_jit=True)
  def test_waveft(self):
    shape, wavelet, level = (26, 19), "db2", 2
    grid = sp.wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)
    idx = jnp.asarray(_positions(grid, 25))
    x = jax.random.normal(jax.random.key(0), (2, 3, shape[0]))
    values = jax.random.normal(jax.random.key(1), (25,))
    self._check(lambda x, v, path: sp.waveft_matmul(x, v, idx, shape, wavelet=wavelet, level=level, path=path), x, values)

  @chex.variants(with_jit=True)
  def test_sparse(self):
    idx = jnp.asarray(_positions(SHAPE, 25))
    x = jax.random.normal(jax.random.key(2), (4, SHAPE[0]))
    values = jax.random.normal(jax.random.key(3), (25,))
    self._check(lambda x, v, path: sp.sparse_matmul(x, v, idx, SHAPE, path=path), x, values)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fourier_complex(self):
    idx = jnp.asarray(_positions(SHAPE, 25))
    x = jax.random.normal(jax.random.key(4), (4, SHAPE[0]))
    values = jax.random.normal(jax.random.key(5), (25,), jnp.complex64)
    self._check(lambda x, v, path: sp.fourier_matmul(x, v, idx, SHAPE, path=path), x, values)


def test_auto_path_prefers_factored_for_small_batches_and_sparse_budgets():
  from spectral_peft._sparse import deltas
  costs = deltas.matmul_costs("wavelet", 8, (768, 768), 100, filter_length=2)
  assert costs["factored"] < costs["dense"]
  costs = deltas.matmul_costs("fourier", 10_000, (64, 64), 4000)
  assert costs["factored"] > costs["dense"]


def test_bad_input_errors():
  with pytest.raises(TypeError, match="`values` must be real"):
    sp.waveft_delta(jnp.ones(3, jnp.complex64), jnp.arange(3), (4, 4))
  with pytest.raises(TypeError, match="`values` must be real"):
    sp.sparse_matmul(jnp.ones((1, 4)), jnp.ones(3, jnp.complex64), jnp.arange(3), (4, 4))
  with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\]"):
    sp.topk_spectral_mask(jnp.ones((4, 4)), 0.0)
  with pytest.raises(ValueError, match=r"`ratio` must be in \(0, 1\]"):
    sp.topk_spectral_mask(jnp.ones((4, 4)), 1.5)
  with pytest.raises(ValueError, match="keeps floor"):
    sp.topk_spectral_mask(jnp.ones((4, 4)), 0.01)
  with pytest.raises(ValueError, match="`indices` must be"):
    sp.scatter_coefficients(jnp.ones(3), jnp.arange(4), (4, 4))
  with pytest.raises(TypeError, match="`indices` must be an integer array"):
    sp.scatter_coefficients(jnp.ones(3), jnp.ones(3), (4, 4))
  with pytest.raises(ValueError, match="`path` must be one of"):
    sp.fourier_matmul(jnp.ones((1, 4)), jnp.ones(3), jnp.arange(3), (4, 4), path="fast")
  with pytest.raises(ValueError, match="`x` must have shape"):
    sp.fourier_matmul(jnp.ones((1, 5)), jnp.ones(3), jnp.arange(3), (4, 4))
