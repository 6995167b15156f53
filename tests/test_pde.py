"""Tests for the forward-mode Laplacian and the Poisson benchmark (spectral_peft._lrnn.pde)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import spectral_peft as sp


def _hessian_trace(fn, x):
  """Reference: trace of jax.hessian (reverse-over-forward) per point."""
  hess = jax.vmap(jax.hessian(lambda p: jnp.reshape(fn(p[None]), ())))(x)
  return jnp.trace(hess, axis1=-2, axis2=-1)


class LaplacianTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_lrnn_laplacian_equals_hessian_trace(self):
    params = sp.lrnn_init(jax.random.key(0), 2, (6, 5), 1, projection_width=4, omega=6.0)
    fn = functools.partial(sp.lrnn_apply, params, omega=6.0)
    x = jax.random.uniform(jax.random.key(1), (7, 2), minval=-1, maxval=1)
    got = self.variant(sp.laplacian, static_argnums=0)(fn, x)
    chex.assert_shape(got, (7,))
    chex.assert_trees_all_close(got, _hessian_trace(fn, x), rtol=2e-4, atol=2e-3)

  def test_polynomial_in_three_dimensions(self):
    fn = lambda p: p[..., 0] ** 3 * p[..., 1] + jnp.sin(p[..., 2]) * p[..., 0] ** 2
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    a, b, c = x[..., 0], x[..., 1], x[..., 2]
    want = 6 * a * b + 2 * jnp.sin(c) - jnp.sin(c) * a**2
    chex.assert_trees_all_close(sp.laplacian(fn, x), want, rtol=1e-5, atol=1e-5)

  def test_bad_input(self):
    with pytest.raises(ValueError, match="`fn` must map points"):
      sp.laplacian(lambda p: p, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="`x` must have shape"):
      sp.laplacian(lambda p: p, jnp.ones(()))
    with pytest.raises(TypeError, match="floating"):
      sp.laplacian(lambda p: p[..., 0], jnp.ones((4, 2), jnp.int32))


class PoissonTest(parameterized.TestCase):

  def test_app_g_formulas_at_n1(self):
    xy = jax.random.uniform(jax.random.key(0), (20, 2), minval=-1, maxval=1)
    x, y = xy[:, 0], xy[:, 1]
    pi = jnp.pi
    f = -(pi**2) * (1 + 4 * y**2) * jnp.sin(pi * x) * jnp.sin(pi * y**2) + 2 * pi * jnp.sin(pi * x) * jnp.cos(pi * y**2)
    chex.assert_trees_all_close(sp.poisson_source(xy), f, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(sp.poisson_exact_solution(xy), jnp.sin(pi * x) * jnp.sin(pi * y**2), rtol=1e-6)

  @parameterized.parameters(1, 2, 4)
  def test_source_is_laplacian_of_solution(self, n):
    xy = jax.random.uniform(jax.random.key(n), (50, 2), minval=-1, maxval=1, dtype=jnp.float32)
    lap = sp.laplacian(lambda p: sp.poisson_exact_solution(p, frequency=n), xy)
    scale = float(jnp.max(jnp.abs(sp.poisson_source(xy, frequency=n))))
    np.testing.assert_allclose(lap, sp.poisson_source(xy, frequency=n), atol=2e-5 * scale)
    _, boundary = sp.poisson_grid(9)
    np.testing.assert_allclose(sp.poisson_exact_solution(boundary, frequency=n), 0.0, atol=1e-5)

  def test_grid(self):
    interior, boundary = sp.poisson_grid(41)
    chex.assert_shape(interior, (39 * 39, 2))
    chex.assert_shape(boundary, (160, 2))
    assert float(jnp.max(jnp.abs(interior))) < 1.0
    assert bool(jnp.all(jnp.max(jnp.abs(boundary), axis=-1) == 1.0))
    with pytest.raises(ValueError, match="`size` must be at least 3"):
      sp.poisson_grid(2)

  def test_loss(self):
    interior, boundary = sp.poisson_grid(11)
    exact = lambda p: sp.poisson_exact_solution(p, frequency=2)
    loss, parts = sp.poisson_loss(exact, interior, boundary, frequency=2)
    source_power = float(jnp.mean(sp.poisson_source(interior, frequency=2) ** 2))
    assert float(loss) < 1e-8 * source_power
    zero = lambda p: jnp.zeros(p.shape[:-1] + (1,))
    loss, parts = sp.poisson_loss(zero, interior, boundary, frequency=2, alpha=0.01)
    np.testing.assert_allclose(parts["interior"], source_power, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.01 * source_power, rtol=1e-5)
    one = lambda p: jnp.ones(p.shape[:-1])
    _, parts = sp.poisson_loss(one, interior, boundary, frequency=2)
    np.testing.assert_allclose(parts["boundary"], 1.0)
    with pytest.raises(ValueError, match="`xy` must have shape"):
      sp.poisson_loss(zero, interior[:, :1], boundary)
    with pytest.raises(ValueError, match="frequency"):
      sp.poisson_source(interior, frequency=0)

  def test_relative_l2_error(self):
    target = jnp.array([3.0, 4.0])
    np.testing.assert_allclose(sp.relative_l2_error(target * 1.1, target), 0.1, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
      sp.relative_l2_error(target, target[:1])
