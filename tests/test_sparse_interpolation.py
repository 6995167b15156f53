"""sparse_least_squares against per-column numpy.linalg.lstsq, and random_support."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp


def _reference(x, y, mask):
  delta = np.zeros(mask.shape)
  residual = np.zeros(mask.shape[1])
  for j in range(mask.shape[1]):
    rows = np.flatnonzero(mask[:, j])
    if rows.size:
      c, *_ = np.linalg.lstsq(x[:, rows], y[:, j], rcond=None)
      delta[rows, j] = c
    residual[j] = np.sum((x @ delta[:, j] - y[:, j]) ** 2)
  return delta, residual


class SparseLeastSquaresTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_lstsq(self):
    rng = np.random.default_rng(0)
    k, n_in, n_out = 4, 12, 9
    x = rng.normal(size=(k, n_in))
    y = rng.normal(size=(k, n_out))
    mask = rng.random((n_in, n_out)) < 0.3  # some columns under-determined, some exact
    mask[:, 0] = False  # an empty column keeps all of its target as residual
    with jax.enable_x64():
      fit = self.variant(sp.sparse_least_squares)(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))
      delta, residual = _reference(x, y, mask)
      np.testing.assert_allclose(np.asarray(fit.residual), residual, atol=1e-10)
      np.testing.assert_allclose(np.asarray(fit.delta), delta, atol=1e-8)  # the min-norm solution
      np.testing.assert_allclose(float(fit.mse), residual.sum() / y.size, rtol=1e-10)
    self.assertTrue(np.all(np.asarray(fit.delta)[~mask] == 0))
    self.assertGreater(residual[0], 0.0)
    self.assertTrue(np.any(residual[1:] < 1e-10) and np.any(residual[1:] > 1e-3))

  def test_dense_support_interpolates(self):
    kx, ky = jax.random.split(jax.random.key(1))
    x, y = jax.random.normal(kx, (5, 40)), jax.random.normal(ky, (5, 30))
    fit = sp.sparse_least_squares(x, y, jnp.ones((40, 30), bool))
    self.assertLess(float(fit.mse), 1e-9)
    np.testing.assert_allclose(np.asarray(x @ fit.delta), np.asarray(y), atol=1e-4)

  def test_random_support_counts_and_determinism(self):
    a = sp.random_support(jax.random.key(3), (7, 11), 20)
    b = sp.random_support(jax.random.key(3), (7, 11), 20)
    self.assertEqual(a.dtype, jnp.bool_)
    self.assertEqual(int(a.sum()), 20)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_errors(self):
    x, y = jnp.ones((2, 3)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match="`mask` must have shape"):
      sp.sparse_least_squares(x, y, jnp.ones((4, 3), bool))
    with pytest.raises(ValueError, match="`y` must have one row"):
      sp.sparse_least_squares(x, jnp.ones((3, 4)), jnp.ones((3, 4), bool))
    with pytest.raises(TypeError, match="`x` must have a floating dtype"):
      sp.sparse_least_squares(jnp.ones((2, 3), jnp.int32), y, jnp.ones((3, 4), bool))
    with pytest.raises(ValueError, match="`p` must be at most"):
      sp.random_support(jax.random.key(0), (2, 2), 5)
