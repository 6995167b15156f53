"""Core sine low-rank transforms and rank diagnostics, against dense numpy references."""

from __future__ import annotations

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp

VARIANTS = pytest.mark.parametrize("transform", [lambda f: f, jax.jit], ids=["no_jit", "jit"])


def factors(m, k, n, seed=0, dtype=jnp.float32):
  ka, kb = jax.random.split(jax.random.key(seed))
  return jax.random.normal(ka, (m, k), dtype) / math.sqrt(m), jax.random.normal(kb, (k, n), dtype)


@VARIANTS
def test_sine_lowrank_matches_numpy(transform):
  a, b = factors(12, 3, 7)
  got = transform(lambda a, b: sp.sine_lowrank(a, b, omega=40.0))(a, b)
  expected = np.sin(40.0 * np.asarray(a, np.float64) @ np.asarray(b, np.float64)) / math.sqrt(12)
  np.testing.assert_allclose(got, expected, atol=2e-5)
  np.testing.assert_allclose(transform(sp.lowrank)(a, b), np.asarray(a) @ np.asarray(b), atol=1e-6)


def test_explicit_gain_and_default_gain_is_sqrt_in_features():
  a, b = factors(9, 2, 4)
  np.testing.assert_allclose(sp.sine_lowrank(a, b, omega=3.0) * 3.0, sp.sine_lowrank(a, b, omega=3.0, gain=1.0), rtol=1e-6)
  assert sp.default_sine_gain(9) == 3.0


@pytest.mark.slow
@pytest.mark.parametrize("m,n,block", [(16, 40, 16), (16, 40, None), (8, 8, 3), (5, 1, 1)])
@VARIANTS
def test_lean_product_equals_dense_in_value_and_gradient(transform, m, n, block):
  a, b = factors(m, 2, n, seed=1)
  x = jax.random.normal(jax.random.key(2), (3, 2, m))
  target = jax.random.normal(jax.random.key(3), (3, 2, n))

  def dense_loss(a, b, x):
    return jnp.sum(jnp.sin(x @ sp.sine_lowrank(a, b, omega=20.0)) * target)

  def lean_loss(a, b, x):
    return jnp.sum(jnp.sin(sp.sine_lowrank_matmul(x, a, b, omega=20.0, block_size=block)) * target)

  np.testing.assert_allclose(
      transform(lambda *args: sp.sine_lowrank_matmul(*args, omega=20.0, block_size=block))(x, a, b),
      x @ sp.sine_lowrank(a, b, omega=20.0), atol=1e-5)
  dense = jax.grad(dense_loss, argnums=(0, 1, 2))(a, b, x)
  lean = transform(jax.grad(lean_loss, argnums=(0, 1, 2)))(a, b, x)
  chex.assert_trees_all_close(lean, dense, atol=1e-4, rtol=1e-4)


def test_lean_product_forward_mode_and_vmap():
  a, b = factors(8, 2, 12, seed=4)
  x = jax.random.normal(jax.random.key(5), (4, 8))
  tangent = jax.random.normal(jax.random.key(6), b.shape)
  _, lean_t = jax.jvp(lambda b: sp.sine_lowrank_matmul(x, a, b, omega=9.0, block_size=5), (b,), (tangent,))
  _, dense_t = jax.jvp(lambda b: x @ sp.sine_lowrank(a, b, omega=9.0), (b,), (tangent,))
  np.testing.assert_allclose(lean_t, dense_t, atol=1e-5)
  bs = jnp.stack([b, 2 * b])
  batched = jax.vmap(lambda b: sp.sine_lowrank_matmul(x, a, b, omega=9.0, block_size=5))(bs)
  np.testing.assert_allclose(batched[1], x @ sp.sine_lowrank(a, 2 * b, omega=9.0), atol=1e-5)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_lean_training_step_needs_under_a_tenth_of_dense_temporary_memory():
  """Compiled memory analysis (not a timing): m = n = 4096, k = 8, batch 256, value and grad."""
  m = n = 4096
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  args = (spec(m, 8), spec(8, n), spec(256, m))

  def step(product):
    return jax.value_and_grad(lambda a, b, x: jnp.sum(jnp.square(product(a, b, x))), argnums=(0, 1))

  dense = _temp_bytes(step(lambda a, b, x: x @ sp.sine_lowrank(a, b, omega=100.0)), *args)
  lean = _temp_bytes(step(lambda a, b, x: sp.sine_lowrank_matmul(x, a, b, omega=100.0)), *args)
  assert dense >= m * n * 4, "the dense step must hold at least the (m, n) matrix"
  assert lean <= 0.10 * dense, (lean, dense)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda a, b: sp.sine_lowrank(a, b, omega=0.0), "omega"),
        (lambda a, b: sp.sine_lowrank(a, b, omega=-1.0), "omega"),
        (lambda a, b: sp.sine_lowrank(a, b, omega=1.0, gain=0.0), "gain"),
        (lambda a, b: sp.sine_lowrank(a, b.T, omega=1.0), "rank axis"),
        (lambda a, b: sp.sine_lowrank(a[0], b, omega=1.0), "`a` must have 2 axes"),
        (lambda a, b: sp.sine_lowrank_matmul(jnp.ones((2, 5)), a, b, omega=1.0), "`x` must have shape"),
        (lambda a, b: sp.sine_lowrank_matmul(jnp.ones((2, 6)), a, b, omega=1.0, block_size=0), "block_size"),
        (lambda a, b: sp.lowrank(a.astype(jnp.int32), b), "floating"),
    ],
)
def test_bad_input_names_the_argument(call, match):
  a, b = factors(6, 2, 4)
  with pytest.raises((ValueError, TypeError), match=match):
    call(a, b)


# -- diagnostics ---------------------------------------------------------------------------------
def test_diagnostics_match_numpy():
  w = np.asarray(jax.random.normal(jax.random.key(0), (20, 12)))
  s = np.linalg.svd(w, compute_uv=False)
  np.testing.assert_allclose(sp.singular_spectrum(jnp.asarray(w)), s, rtol=1e-5)
  np.testing.assert_allclose(sp.singular_spectrum(jnp.asarray(w), normalize=True), s / s[0], rtol=1e-5)
  np.testing.assert_allclose(sp.stable_rank(jnp.asarray(w)), np.sum(s**2) / s[0] ** 2, rtol=1e-5)
  low = w[:, :3] @ np.asarray(jax.random.normal(jax.random.key(1), (3, 12)))
  assert int(sp.numerical_rank(jnp.asarray(low, jnp.float32))) == np.linalg.matrix_rank(low.astype(np.float32)) == 3
  assert int(sp.numerical_rank(jnp.asarray(w))) == 12
  assert int(jax.jit(sp.numerical_rank)(jnp.asarray(w))) == 12


def test_prop1_bound_is_a_lower_bound_inside_its_range_and_flagged_outside():
  a, b = factors(32, 2, 32, seed=3)
  w = a @ b
  result = sp.sine_rank_lower_bound(w, 0.5 * float(sp.sine_rank_lower_bound(w, 1.0).omega_max))
  assert bool(result.valid)
  min_abs = float(jnp.min(jnp.abs(w)))
  printed = 0.5 * math.pi / (3 * min_abs) * (min_abs / np.linalg.norm(np.sqrt(np.abs(np.asarray(w))), 2)) ** 2
  np.testing.assert_allclose(result.paper_eq5_value, printed, rtol=1e-4)
  np.testing.assert_allclose(result.bound, printed / 4, rtol=1e-4)  # eq. 15: sin(x) >= x / 2, squared
  omega = 0.5 * float(result.omega_max)
  assert float(result.bound) <= int(sp.numerical_rank(jnp.sin(omega * w)))
  outside = sp.sine_rank_lower_bound(w, 2.0 * float(result.omega_max))
  assert not bool(outside.valid) and bool(jnp.isnan(outside.bound))
  with pytest.raises(ValueError, match="zero matrix"):
    sp.sine_rank_lower_bound(jnp.zeros((3, 3)), 1.0)
  with pytest.raises(ValueError, match="omega"):
    sp.sine_rank_lower_bound(w, -1.0)


@pytest.mark.slow
@hypothesis.settings(deadline=None, max_examples=12, derandomize=True)
@hypothesis.given(k=st.integers(1, 4), seed=st.integers(0, 10_000), n_size=st.sampled_from([32, 48, 64]))
def test_theorem1_rank_of_sine_exceeds_k_for_large_omega(k, seed, n_size):
  """Theorem 1: U, V ~ U(-1/N, 1/N), N > k; for omega large enough rank(sin(omega U V^T)) > k."""
  ku, kv = jax.random.split(jax.random.key(seed))
  bound = 1.0 / n_size
  u = jax.random.uniform(ku, (n_size, k), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32, -bound, bound)
  v = jax.random.uniform(kv, (n_size, k), u.dtype, -bound, bound)
  w = u @ v.T
  assert int(sp.numerical_rank(w)) <= k
  omega = 3.0 * n_size**2  # makes omega * |U V^T| of order one, where the sine is far from linear.
  assert int(sp.numerical_rank(jnp.sin(omega * w))) > k
  small = int(sp.numerical_rank(jnp.sin(1e-3 * w), rtol=1e-3))
  assert small <= k  # Remark 2: a tiny omega only rescales the matrix.
