"""``random_topk_spectrum``: LFMA's random mask drawn in O(k) has the law of ranking an explicit draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp

TRIALS = 3000


def _conjugate(flat, shape):
  m, n = shape
  u, v = np.divmod(flat, n)
  return ((-u) % m) * n + (-v) % n


def _explicit(shape, k, std, trials, seed):
  """The reference: rank ``|fft2(D)|`` of explicit Gaussian draws (numpy, float64)."""
  rng = np.random.default_rng(seed)
  spectra = np.fft.fft2(rng.normal(0.0, std, (trials,) + shape)).reshape(trials, -1)
  order = np.argsort(-np.abs(spectra), axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(spectra, order, axis=1)


def _sampled(shape, k, std, trials, seed):
  keys = jax.random.split(jax.random.key(seed), trials)
  indices, values = jax.vmap(lambda key: sp.random_topk_spectrum(key, shape, k, std=std))(keys)
  return np.asarray(indices), np.asarray(values)


def _class_frequencies(indices, shape):
  """How often each conjugate class (a pair, or a real bin) holds an entry, per trial."""
  classes = np.minimum(indices, _conjugate(indices, shape))
  counts = np.zeros(shape[0] * shape[1])
  np.add.at(counts, classes.ravel(), 1.0)
  return counts / indices.shape[0]


@pytest.mark.parametrize("shape,k", [((6, 8), 5), ((5, 7), 6), ((4, 9), 11), ((2, 2), 3)])
def test_law_matches_ranking_explicit_draws(shape, k):
  std = 0.7
  ref_idx, ref_val = _explicit(shape, k, std, TRIALS, seed=0)
  idx, val = _sampled(shape, k, std, TRIALS, seed=1)
  # Per conjugate class, the expected number of entries it holds: both are means of TRIALS draws of a
  # count in {0, 1, 2}; 5 standard errors of the difference bounds a false failure by ~1e-6 per class.
  ref_freq, freq = _class_frequencies(ref_idx, shape), _class_frequencies(idx, shape)
  tolerance = 5.0 * np.sqrt(2.0 * 1.0 / TRIALS)  # The variance of a {0, 1, 2} count is at most 1.
  np.testing.assert_array_less(np.abs(ref_freq - freq), tolerance)
  # The magnitudes at every rank (first and last included): means agree within 5 standard errors.
  for rank in range(k):
    a, b = np.abs(ref_val[:, rank]), np.abs(val[:, rank])
    error = 5.0 * np.sqrt((a.var() + b.var()) / TRIALS)
    assert abs(a.mean() - b.mean()) < error, (rank, a.mean(), b.mean(), error)
  # The real (self-conjugate) bins are drawn as often as in the explicit ranking.
  real = lambda i: np.mean(np.sum(i == _conjugate(i, shape), axis=1))  # noqa: E731
  assert abs(real(ref_idx) - real(idx)) < 5.0 * np.sqrt(2.0 * 4.0 / TRIALS)


@pytest.mark.parametrize("shape", [(6, 8), (5, 7), (1, 6), (7, 1), (1, 1), (2, 3)])
def test_full_mask_is_a_hermitian_spectrum(shape):
  """With ``k = m n`` every position appears once and the values are the spectrum of a real matrix."""
  m, n = shape
  for jitted in (False, True):
    fn = jax.jit(sp.random_topk_spectrum, static_argnums=(1, 2)) if jitted else sp.random_topk_spectrum
    indices, values = fn(jax.random.key(3), shape, m * n)
    indices, values = np.asarray(indices), np.asarray(values)
    assert sorted(indices.tolist()) == list(range(m * n))
    spectrum = np.zeros(m * n, np.complex128)
    spectrum[indices] = values
    matrix = np.fft.ifft2(spectrum.reshape(shape))
    scale = np.abs(matrix).max()
    np.testing.assert_allclose(matrix.imag, 0.0, atol=1e-5 * scale)
    magnitudes = np.abs(values)
    assert np.all(np.diff(magnitudes) <= 1e-5 * magnitudes.max())


def test_large_grid_distinct_positions_in_descending_order():
  shape, k = (4096, 11008), 30001
  indices, values = sp.random_topk_spectrum(jax.random.key(0), shape, k, std=1 / 64)
  indices, magnitudes = np.asarray(indices), np.abs(np.asarray(values))
  assert indices.dtype == np.int32 and len(np.unique(indices)) == k
  assert indices.min() >= 0 and indices.max() < shape[0] * shape[1]
  assert np.all(np.diff(magnitudes) <= 1e-5 * magnitudes.max())
  # Each pair's two positions are adjacent, the lower first; the odd k cuts the last pair after its lower one.
  pairs = indices[:-1].reshape(-1, 2)
  np.testing.assert_array_equal(pairs[:, 1], _conjugate(pairs[:, 0], shape))
  assert np.all(pairs[:, 0] < pairs[:, 1])
  # The top |F|^2 / (m n std^2) of 22.5M Exp(1) variables: about log(P / j) at rank j.
  power = magnitudes[::2] ** 2 / (shape[0] * shape[1] / 64**2)
  expected = np.log((shape[0] * shape[1] / 2) / np.arange(1, power.size + 1))
  assert np.all(np.abs(power[100:] - expected[100:]) < 0.5)


def test_bad_arguments_are_named():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="`k` must be at most the 4 x 4 = 16"):
    sp.random_topk_spectrum(key, (4, 4), 17)
  with pytest.raises(ValueError, match="`k` must be a positive int"):
    sp.random_topk_spectrum(key, (4, 4), 0)
  with pytest.raises(ValueError, match="`std` must be a finite positive"):
    sp.random_topk_spectrum(key, (4, 4), 2, std=0.0)
  with pytest.raises(ValueError, match="`shape` must be a pair of positive ints"):
    sp.random_topk_spectrum(key, (4, 0), 2)
  with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
    sp.random_topk_spectrum(key, (65536, 65536), 2)


def test_lfma_random_init_uses_the_law_and_is_deterministic():
  w0 = jnp.zeros((64, 48), jnp.bfloat16)
  method = sp.peft.LFMA(0.05, 1.0, value_init="spectrum")
  params, frozen = method.init_both(None, jax.random.key(5), w0)
  indices, values = sp.random_topk_spectrum(jax.random.key(5), (64, 48), method.k((64, 48)), std=1 / 8)
  np.testing.assert_array_equal(frozen["indices"], indices)
  np.testing.assert_allclose(method.coefficients(params), np.asarray(values).astype(np.complex64), rtol=1e-2)
  zeros = sp.peft.LFMA(0.05, 1.0).init_both(None, jax.random.key(5), w0)
  np.testing.assert_array_equal(zeros[1]["indices"], indices)
  assert not np.any(np.asarray(zeros[0]["values"], np.float32))
