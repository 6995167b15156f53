"""SHiRA/WaveFT's merged product: value through ``W0 + Delta W``, coefficient gradient sampled from ``x^T g``
(WaveFT's from wavelet-analysed activations)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp
from spectral_peft._sparse import deltas

METHODS = {
    "SHiRA": lambda p, **kw: sp.peft.SHiRA(p, scale=1.5, **kw),
    "WaveFT": lambda p, **kw: sp.peft.WaveFT(p, scale=1.5, **kw),
    "WaveFT-db2": lambda p, **kw: sp.peft.WaveFT(p, scale=1.5, wavelet="db2", **kw),
}


def test_sampled_product_is_x_transpose_g_at_the_positions():
  rng = np.random.default_rng(0)
  x, g = rng.normal(size=(37, 9)).astype(np.float32), rng.normal(size=(37, 11)).astype(np.float32)
  flat = np.array([0, 5, 98, 9 * 11 - 1, 9 * 11, 40, 40], np.int32)  # 9 * 11 marks a dropped position.
  want = (x.T.astype(np.float64) @ g).ravel()
  want = np.where(flat < 99, want[np.minimum(flat, 98)], 0.0)
  for chunk_elements in (2**20, 37, 1):  # one chunk, several, one position per chunk
    old = deltas._SAMPLED_CHUNK_ELEMENTS
    deltas._SAMPLED_CHUNK_ELEMENTS = chunk_elements
    try:
      for fn in (deltas.sampled_product, jax.jit(deltas.sampled_product, static_argnums=3)):
        got = np.asarray(fn(jnp.asarray(x), jnp.asarray(g), jnp.asarray(flat), 11))
        # 37 summed products of unit normals: float32 rounding well below 1e-5 of sqrt(37).
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(37))
    finally:
      deltas._SAMPLED_CHUNK_ELEMENTS = old


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("lead", [(2,), (2, 3)])  # 2 tokens: the sampled gradient; 6: x^T g (2 B (m + n) > m n)
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(14, 10), (13, 9)])  # odd sizes: WaveFT's grid is padded, its synthesis cropped
def test_value_and_gradients_equal_the_merged_dense_product(name, lead, jit, shape):
  (m, n), p = shape, 25
  keys = jax.random.split(jax.random.key(0), 4)
  auto, dense = METHODS[name](p), METHODS[name](p, path="dense")
  assert auto.runtime_factored and not auto.factored_branch and not dense.runtime_factored
  w0 = jax.random.normal(keys[0], (m, n))
  frozen = auto.init_frozen(keys[1], w0)
  values = jax.random.normal(keys[2], (p,))
  x = jax.random.normal(keys[3], lead + (m,))  # leading axes are flattened and restored

  def loss(method):
    def f(v, x, w):
      if method is dense:
        y = jnp.matmul(x, dense.merge({"values": v}, w, frozen))
      else:
        y = method.apply({"values": v}, x, w, frozen)
      return jnp.sum(jnp.sin(y) * jnp.arange(n))
    return jax.value_and_grad(f, argnums=(0, 1, 2))

  got_fn, want_fn = loss(auto), loss(dense)
  if jit:
    got_fn = jax.jit(got_fn)
  got, want = got_fn(values, x, w0), want_fn(values, x, w0)
  scale = float(np.sqrt(m * 6))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * scale)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale * float(np.max(np.abs(b))))


@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym3"])
@pytest.mark.parametrize("shape", [(14, 12), (13, 11)])
def test_waveft_sampled_cotangent_is_the_synthesis_adjoint_of_x_transpose_g(wavelet, shape):
  """Against the plain formula: the vjp of the dense one-level synthesis at ``x^T g``, in float64 numpy."""
  m, n = shape
  p = 20
  method = sp.peft.WaveFT(p, wavelet=wavelet)
  keys = jax.random.split(jax.random.key(3), 3)
  indices = method.init_frozen(keys[0], jnp.zeros((m, n)))["indices"]
  x, g = jax.random.normal(keys[1], (5, m)), jax.random.normal(keys[2], (5, n))
  outer = np.asarray(x, np.float64).T @ np.asarray(g, np.float64)
  synthesis = lambda v: deltas.waveft_delta(v, indices, (m, n), wavelet=wavelet, level=1)  # noqa: E731
  _, vjp = jax.vjp(synthesis, jnp.zeros((p,)))
  want = np.asarray(vjp(jnp.asarray(outer, jnp.float32))[0])
  for fn in (deltas.waveft_sampled_cotangent, jax.jit(deltas.waveft_sampled_cotangent, static_argnames="wavelet",
                                                       static_argnums=3)):
    got = np.asarray(fn(x, g, indices, (m, n), wavelet=wavelet))
    # Each entry sums 5 products over K^2 <= 36 filter taps of unit-scale values.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.sqrt(5 * 36) * (1 + np.max(np.abs(want))))


def test_dropped_positions_get_no_gradient_and_bfloat16_stays_in_its_dtype():
  m, n = 8, 6
  method = sp.peft.SHiRA(3)
  w0 = jnp.ones((m, n), jnp.bfloat16)
  indices = jnp.array([1, m * n + 7, 20], jnp.int32)  # traced under jit: an out-of-grid position is dropped
  values = jnp.array([1.0, 2.0, 3.0], jnp.bfloat16)
  for tokens in (1, 4):  # 1 token: the sampled gradient; 4: x^T g (2 B (m + n) > m n)
    x = jnp.ones((tokens, m), jnp.bfloat16)
    grad = jax.jit(jax.grad(lambda v, i: jnp.sum(method.apply({"values": v}, x, w0, {"indices": i}).astype(jnp.float32))))
    g = grad(values, indices)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), [tokens, 0.0, tokens])


def test_runtime_routes_linear_layers_through_the_merged_product():
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(12, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 12, rngs=nnx.Rngs(1)))
  sp.nnx.adapt(model, sp.peft.SHiRA(20), r"kernel$", key=jax.random.key(3))
  state = nnx.state(model, sp.nnx.AdapterParam)
  state = jax.tree.map(lambda v: v + 0.3, state)
  nnx.update(model, state)
  x = jax.random.normal(jax.random.key(4), (5, 12))
  merged = sp.nnx.merge_adapters(nnx.clone(model))

  def loss(m, x):
    return jnp.sum(jnp.tanh(m(x)))

  np.testing.assert_allclose(loss(model, x), loss(merged, x), rtol=1e-5)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, sp.nnx.AdapterParam))(model, x)
  flat_grads = jax.tree.leaves(grads)
  assert flat_grads and all(np.all(np.isfinite(np.asarray(g))) for g in flat_grads)


FOURIER = {
    "FourierFT": lambda **kw: sp.peft.FourierFT(20, scale=3.0, **kw),
    "LFMA": lambda **kw: sp.peft.LFMA(0.2, 3.0, delta_init="weight", **kw),
}


@pytest.mark.parametrize("name", sorted(FOURIER))
@pytest.mark.parametrize("shape", [(12, 10), (16, 9)])
@pytest.mark.parametrize("lead", [(2,), (2, 3)])  # 2 tokens: the sampled gradient; 6: x^T g (2 B (m + n) > m n)
@pytest.mark.parametrize("jit", [False, True])
def test_fourier_merged_product_equals_the_dense_product(name, shape, lead, jit):
  """FourierFT (real coefficients) and LFMA (complex, as real pairs): value and every gradient."""
  m, n = shape
  auto, dense = FOURIER[name](), FOURIER[name](path="dense")
  assert auto.runtime_factored and not auto.factored_branch and not dense.runtime_factored
  w0 = jax.random.normal(jax.random.key(0), (m, n))
  if name == "LFMA":
    params, frozen = auto.init_both(None, jax.random.key(2), w0)
  else:
    params, frozen = auto.init(jax.random.key(1), w0), auto.init_frozen(jax.random.key(2), w0)
  params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(5), a.shape), params)
  x = jax.random.normal(jax.random.key(3), lead + (m,))

  def loss(method):
    def f(params, x, w):
      y = method.apply(params, x, w, frozen) if method is auto else jnp.matmul(x, dense.merge(params, w, frozen))
      return jnp.sum(jnp.sin(y) * jnp.arange(n))
    return jax.value_and_grad(f, argnums=(0, 1, 2))

  got_fn = jax.jit(loss(auto)) if jit else loss(auto)
  got, want = got_fn(params, x, w0), loss(dense)(params, x, w0)
  scale = float(np.sqrt(m * n * 6))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5 * scale)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale * float(np.max(np.abs(b))))


@pytest.mark.parametrize("jit", [False, True])
def test_fourier_block_cotangent_off_a_mesh_is_the_cosine_sum_of_x_transpose_g(jit):
  """``sharded.fourier_cotangent`` off a mesh: ``scale / (m n) sum_jk (x^T g)[j, k] cos(2 pi (u j / m + v k / n))``."""
  from spectral_peft._sparse import sharded

  m, n, p, tokens, scale = 6, 10, 12, 5, 2.5
  rng = np.random.default_rng(3)
  x, g = rng.normal(size=(tokens, m)), rng.normal(size=(tokens, n))
  flat = np.sort(rng.choice(m * n, p, replace=False)).astype(np.int32)
  u, v = flat // n, flat % n
  phase = 2 * np.pi * (u[:, None, None] * np.arange(m)[None, :, None] / m + v[:, None, None] * np.arange(n) / n)
  want = scale / (m * n) * np.einsum("jk,ljk->l", x.T @ g, np.cos(phase))
  fn = lambda x, g, c: sharded.fourier_cotangent(x, g, c, flat, (m, n), scale)  # noqa: E731
  fn = jax.jit(fn) if jit else fn
  got = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32), jnp.zeros((p,), jnp.float32)))
  # m n terms of size |x^T g| (about sqrt(tokens)) each, float32 rounding.
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale * np.sqrt(tokens) * np.sqrt(m * n))
