"""sp.dwt2 / sp.idwt2 against PyWavelets (periodization, coeffs_to_array layout), and their checks."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

import spectral_peft as sp

WAVELETS = ("haar", "db2", "sym3", "coif1")
TOL = {np.float32: 2e-5, np.float64: 1e-11}


def _padded(x, level, wavelet):
  big = sp.wavelet_coefficient_shape(x.shape, wavelet=wavelet, level=level)
  out = np.zeros(big, x.dtype)
  out[: x.shape[0], : x.shape[1]] = x
  return out


def _pywt_dwt2(x, wavelet, level):
  return pywt.coeffs_to_array(pywt.wavedec2(_padded(x, level, wavelet), wavelet, "periodization", level=level))


def _pywt_idwt2(coeffs, wavelet, level, shape):
  slices = pywt.coeffs_to_array(pywt.wavedec2(np.zeros(coeffs.shape), wavelet, "periodization", level=level))[1]
  rec = pywt.waverec2(pywt.array_to_coeffs(coeffs, slices, output_format="wavedec2"), wavelet, "periodization")
  return rec[: shape[0], : shape[1]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("level", [1, 2, 3])
def test_dwt2_and_idwt2_match_pywavelets(wavelet, level, dtype):
  shape = (45, 70)  # odd and not a power of two; level 3 is valid for every wavelet here
  rng = np.random.default_rng(level)
  x = rng.normal(size=shape).astype(dtype)
  with jax.enable_x64(dtype == np.float64):
    ours = np.asarray(sp.dwt2(jnp.asarray(x), wavelet, level))
    coeffs = rng.normal(size=ours.shape).astype(dtype)
    rec = np.asarray(sp.idwt2(jnp.asarray(coeffs), wavelet, level, shape=shape))
  assert ours.dtype == dtype and rec.dtype == dtype
  np.testing.assert_allclose(ours, _pywt_dwt2(x.astype(np.float64), wavelet, level)[0], atol=TOL[dtype])
  np.testing.assert_allclose(rec, _pywt_idwt2(coeffs.astype(np.float64), wavelet, level, shape), atol=TOL[dtype])


@pytest.mark.parametrize("shape", [(13, 21), (8, 8), (6, 33)])
def test_small_and_odd_shapes_match_pywavelets(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  with jax.enable_x64(True):
    ours = np.asarray(sp.dwt2(jnp.asarray(x), "db2", 1))
    np.testing.assert_allclose(ours, _pywt_dwt2(x, "db2", 1)[0], atol=1e-12)
    np.testing.assert_allclose(np.asarray(sp.idwt2(jnp.asarray(ours), "db2", 1, shape=shape)), x, atol=1e-12)


class TestExactPair(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_adjoint_identity_and_inverse(self):
    shape, wavelet, level = (13, 10), "sym3", 1
    big = sp.wavelet_coefficient_shape(shape, wavelet=wavelet, level=level)
    kc, kx = jax.random.split(jax.random.key(0))
    c = jax.random.normal(kc, big)
    x = jax.random.normal(kx, shape)
    synth = self.variant(lambda c: sp.idwt2(c, wavelet, level, shape=shape))
    analysis = self.variant(lambda x: sp.dwt2(x, wavelet, level))
    # <IDWT(C), X> = <C, IDWT^T(X)> with IDWT^T = dwt2 for orthogonal wavelets (padding included).
    scale = float(jnp.linalg.norm(c) * jnp.linalg.norm(x))
    np.testing.assert_allclose(jnp.vdot(synth(c), x), jnp.vdot(c, analysis(x)), atol=1e-6 * scale)
    # The transpose computed by autodiff is dwt2 too.
    _, vjp = jax.vjp(synth, c)
    chex.assert_trees_all_close(vjp(x)[0], analysis(x), atol=1e-5)
    chex.assert_trees_all_close(synth(analysis(x)), x, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batched_axes(self):
    x = jax.random.normal(jax.random.key(1), (3, 8, 12))
    out = self.variant(lambda x: sp.dwt2(x, "haar", 2))(x)
    chex.assert_trees_all_close(out[1], sp.dwt2(x[1], "haar", 2), atol=1e-6)


def test_biorthogonal_is_perfect_reconstruction():
  x = jax.random.normal(jax.random.key(2), (16, 12))
  rec = sp.idwt2(sp.dwt2(x, "bior2.2", 1), "bior2.2", 1)
  np.testing.assert_allclose(rec, x, atol=1e-5)


def test_coefficient_shape_rounds_up():
  assert sp.wavelet_coefficient_shape((30, 17), wavelet="db2", level=2) == (32, 20)
  assert sp.wavelet_coefficient_shape((16, 16), wavelet="haar", level=3) == (16, 16)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="`wavelet` must be a discrete PyWavelets wavelet"):
    sp.dwt2(jnp.ones((8, 8)), "morl")
  with pytest.raises(ValueError, match="`wavelet`"):
    sp.idwt2(jnp.ones((8, 8)), "nope")
  with pytest.raises(ValueError, match="`level` 3 is too deep"):
    sp.dwt2(jnp.ones((8, 8)), "db2", 3)
  with pytest.raises(TypeError, match="`level` must be a positive int"):
    sp.dwt2(jnp.ones((8, 8)), "haar", 1.5)
  with pytest.raises(TypeError, match="floating"):
    sp.dwt2(jnp.ones((8, 8), jnp.int32))
  with pytest.raises(ValueError, match="do not match `shape`"):
    sp.idwt2(jnp.ones((8, 8)), "haar", 1, shape=(5, 5))
