"""The theory tools against their proofs: each proved inequality is checked on random instances.

The sine low-rank paper (Ji et al.) Prop. 1 (corrected by the factor 1/4 its eq. 8 drops), the sinusoidal-networks paper (Aldana et al.) Theorem 2 (Bessel
amplitude bound), the WaveFT paper Lemma 1 (rank of random sparse matrices), Lemma 3 (sparse
interpolation) and the gradient coverage of Table 1. References are numpy/scipy, never the
function under test.
"""

from __future__ import annotations

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph
import scipy.special

import spectral_peft as sp

SETTINGS = hypothesis.settings(deadline=None, max_examples=25, derandomize=True)


# -- the sine low-rank paper (Ji et al.), Prop. 1 ---------------------------------------------------------------------------
def _random_matrix(kind, m, n, seed, scale):
  rng = np.random.default_rng(seed)
  if kind == "dense":
    w = rng.normal(size=(m, n))
  elif kind == "sparse":
    w = rng.normal(size=(m, n)) * (rng.random((m, n)) < 0.05)
    w[rng.integers(m), rng.integers(n)] = 1.0  # never all zero
  elif kind == "lowrank":  # Theorem 1's setting: U, V ~ U(-1/N, 1/N)
    big_n = max(m, n)
    w = rng.uniform(-1 / big_n, 1 / big_n, (m, 2)) @ rng.uniform(-1 / big_n, 1 / big_n, (2, n))
  else:  # a single entry, the counterexample's family
    w = np.zeros((m, n))
    w[rng.integers(m), rng.integers(n)] = rng.uniform(0.1, 3.0)
  return w * scale


def _stable_rank64(w):
  s = np.linalg.svd(w, compute_uv=False)
  return float(np.sum(s**2) / s[0] ** 2)


def test_printed_prop1_is_false_and_the_corrected_bound_holds_on_the_counterexample():
  w = np.zeros((128, 128))
  w[0, 0] = 1.0
  omega = 0.999 * math.pi / 3
  result = sp.sine_rank_lower_bound(jnp.asarray(w, jnp.float32), omega)
  rank = np.linalg.matrix_rank(np.sin(omega * w))
  assert rank == 1
  assert bool(result.valid)
  np.testing.assert_allclose(float(result.paper_eq5_value), omega, rtol=1e-6)  # ~1.046 > rank 1
  assert float(result.paper_eq5_value) > rank
  np.testing.assert_allclose(float(result.bound), omega / 4, rtol=1e-6)
  assert float(result.bound) <= rank
  # The paper's eq. 8 (||sin(omega A)||_F^2 >= omega^2 A0_min^2) fails here too; eq. 15's square holds.
  frob2 = float(np.sum(np.sin(omega * w) ** 2))
  assert frob2 < omega**2 and frob2 >= omega**2 / 4


@SETTINGS
@hypothesis.given(
    kind=st.sampled_from(["dense", "sparse", "lowrank", "single"]),
    m=st.integers(2, 40), n=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-3.0, 2.0), fraction=st.floats(1e-6, 1.0))
@pytest.mark.slow
def test_corrected_prop1_never_exceeds_the_stable_rank_or_the_rank(kind, m, n, seed, log_scale, fraction):
  w = _random_matrix(kind, m, n, seed, 10.0**log_scale)
  a_min = np.min(np.abs(w[w != 0]))
  omega = fraction * math.pi / (3 * a_min)
  result = sp.sine_rank_lower_bound(jnp.asarray(w, jnp.float32), float(omega))
  assert bool(result.valid)
  s = np.sin(omega * w)
  bound = float(result.bound)
  if omega == 0:
    assert bound == 0.0
    return
  # The two lemmas of the proof, with eq. 15's factor 1/4 (float64 references).
  sqrt_op2 = np.linalg.norm(np.sqrt(np.abs(w)), 2) ** 2
  assert np.sum(s**2) >= (omega * a_min) ** 2 / 4 * (1 - 1e-9)
  assert np.linalg.norm(s, 2) ** 2 <= omega * sqrt_op2 * (1 + 1e-9)
  np.testing.assert_allclose(bound, omega * a_min**2 / sqrt_op2 / 4, rtol=2e-4, atol=1e-30)
  assert bound <= _stable_rank64(s) * (1 + 1e-4)
  assert bound <= np.linalg.matrix_rank(s)
  # Inside its range the bound is at most pi/12 (so it can never certify a rank above 1); the
  # printed value is at most pi/3.
  assert bound <= math.pi / 12 * (1 + 1e-4)
  assert float(result.paper_eq5_value) <= math.pi / 3 * (1 + 1e-4)


def test_prop1_bound_under_jit_matches_eager():
  w = jnp.asarray(_random_matrix("dense", 8, 6, 0, 1.0), jnp.float32)
  eager = sp.sine_rank_lower_bound(w, 0.3)
  jitted = jax.jit(sp.sine_rank_lower_bound, static_argnums=1)(w, 0.3)
  np.testing.assert_allclose(float(eager.bound), float(jitted.bound), rtol=1e-6)
  np.testing.assert_allclose(float(eager.paper_eq5_value), 4 * float(eager.bound), rtol=1e-6)


# -- the sinusoidal-networks paper (Aldana et al.), Theorem 2 -------------------------------------------------------------------------
@SETTINGS
@hypothesis.given(m=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), amplitude=st.floats(0.01, 4.0))
def test_theorem2_amplitude_bound_dominates_the_bessel_product(m, seed, amplitude):
  rng = np.random.default_rng(seed)
  a = rng.uniform(-amplitude, amplitude, (m, 3))
  k = rng.integers(-5, 6, (16, m))
  exact = np.prod(scipy.special.jv(k[:, :, None], a[None]), axis=1)  # alpha_k(a_j), (T, n)
  bound = np.asarray(sp.amplitude_bound(jnp.asarray(a, jnp.float64 if jax.config.jax_enable_x64 else jnp.float32), k))
  assert np.all(np.abs(exact) <= bound * (1 + 1e-5) + 1e-12)


def test_theorem2_bound_is_tight_for_small_arguments():
  """Near 0, J_k(a) ~ (a/2)^k / k!: the bound is the leading term, not a loose constant times it."""
  a = np.array([[1e-2], [2e-2]])
  k = np.array([[3, 2], [0, 4], [-2, 1]])
  exact = np.abs(np.prod(scipy.special.jv(k[:, :, None], a[None]), axis=1))
  bound = np.asarray(sp.amplitude_bound(jnp.asarray(a, jnp.float32), k))
  np.testing.assert_allclose(exact / bound, 1.0, atol=1e-3)


def test_harmonic_expansion_amplitudes_are_bessel_products():
  omega = sp.integer_frequencies(jax.random.key(0), 3, 2)
  params = sp.bound_params(sp.periodic_siren_init(jax.random.key(1), omega, 4, 1), 1.5)
  e = sp.harmonic_expansion(params, order=3)
  a = np.asarray(params["hidden"][0]["kernel"], np.float64)
  exact = np.prod(scipy.special.jv(np.asarray(e.k)[:, :, None], a[None]), axis=1)
  np.testing.assert_allclose(np.abs(np.asarray(e.amplitudes)), np.abs(exact), atol=2e-6)
  assert np.all(np.abs(exact) <= np.asarray(sp.amplitude_bound(jnp.asarray(a, jnp.float32), e.k)) + 1e-7)


# -- the WaveFT paper, Lemma 1 ---------------------------------------------------------------------------
def _structural_rank(positions, m, n):
  rows, cols = np.divmod(np.asarray(positions), n)
  graph = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(m, n))
  match = scipy.sparse.csgraph.maximum_bipartite_matching(graph, perm_type="column")
  return int(np.sum(match >= 0))


@hypothesis.settings(deadline=None, max_examples=10, derandomize=True)
@hypothesis.given(m=st.integers(2, 24), n=st.integers(2, 24), density=st.floats(0.01, 0.4), seed=st.integers(0, 1000))
def test_sparse_rank_is_the_maximum_matching_of_the_positions(m, n, density, seed):
  """Random values on a fixed pattern have the pattern's structural rank (Lemma 1's mechanism)."""
  p = max(1, int(density * m * n))
  key = jax.random.key(seed)
  ranks = np.asarray(sp.sparse_rank_curve((m, n), [p], key, trials=2))
  for t in range(2):
    k_pos, _ = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 0), t))
    positions = sp.sparse_positions(k_pos, (m, n), p)
    assert ranks[0, t] == _structural_rank(positions, m, n)


def test_lemma1_full_rank_probability_at_the_threshold():
  """P(full rank) at p = n (ln n + c) is near exp(-2 exp(-c)) (the lemma's limit) for n = 128."""
  n, trials = 128, 300
  for c in (0.0, 2.0):
    p = round(sp.lemma1_threshold(n, c))
    assert p == round(n * (math.log(n) + c))
    full = [_structural_rank(sp.sparse_positions(jax.random.key(1000 * int(c) + t), (n, n), p), n, n) == n
            for t in range(trials)]
    limit = math.exp(-2 * math.exp(-c))
    sd = math.sqrt(limit * (1 - limit) / trials)
    assert abs(np.mean(full) - limit) < 4 * sd + 0.03, (c, np.mean(full), limit)


def test_large_grid_positions_are_distinct_deterministic_and_uniform():
  """Above 2**16 entries the O(p) draw: distinct, in range, jit == eager, rows and columns uniform."""
  grid, p = (300, 301), 3000
  draws = [np.asarray(sp.sparse_positions(jax.random.key(i), grid, p)) for i in range(40)]
  for x in draws:
    assert len(np.unique(x)) == p and x.min() >= 0 and x.max() < grid[0] * grid[1]
    assert np.all(np.diff(x) > 0)
  jitted = jax.jit(sp.sparse_positions, static_argnums=(1, 2))(jax.random.key(3), grid, p)
  np.testing.assert_array_equal(jitted, draws[3])
  assert not np.array_equal(draws[0], draws[1])
  x = np.concatenate(draws)
  for counts in (np.bincount(x // grid[1], minlength=grid[0]), np.bincount(x % grid[1], minlength=grid[1])):
    expected = len(x) / len(counts)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    dof = len(counts) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # chi2 has mean dof, sd sqrt(2 dof).


def test_large_grid_positions_reproduce_lemma1():
  """The O(p) draw's joint law: P(full rank) at p = n (ln n + 2) near exp(-2 exp(-2)) on a 300 x 300 grid."""
  n, trials, c = 300, 150, 2.0
  p = round(sp.lemma1_threshold(n, c))
  full = [_structural_rank(sp.sparse_positions(jax.random.key(t), (n, n), p), n, n) == n for t in range(trials)]
  limit = math.exp(-2 * math.exp(-c))
  sd = math.sqrt(limit * (1 - limit) / trials)
  assert abs(np.mean(full) - limit) < 4 * sd + 0.03, (np.mean(full), limit)


def test_sparse_positions_refuses_grids_past_int32():
  with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
    sp.sparse_positions(jax.random.key(0), (65536, 65536), 4)


# -- the WaveFT paper, Lemma 3 ---------------------------------------------------------------------------
@hypothesis.settings(deadline=None, max_examples=10, derandomize=True)
@hypothesis.given(k=st.integers(1, 4), n_in=st.integers(6, 14), n_out=st.integers(3, 9), seed=st.integers(0, 10_000))
def test_lemma3_support_with_a_common_invertible_block_interpolates(k, n_in, n_out, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(k, n_in))  # the k inputs as rows (Flax layout: y = x @ delta)
  changed = rng.random(n_out) < 0.6
  changed[0] = True
  z = rng.normal(size=(k, n_out)) * changed  # columns outside R need no change
  common = rng.choice(n_in, k, replace=False)  # C, with X_C invertible almost surely
  mask = rng.random((n_in, n_out)) < 0.2
  mask[np.ix_(common, np.flatnonzero(changed))] = True
  with jax.enable_x64():
    fit = sp.sparse_least_squares(jnp.asarray(x), jnp.asarray(z), jnp.asarray(mask))
    delta = np.asarray(fit.delta)
  assert float(fit.mse) < 1e-18
  assert np.all(delta[~mask] == 0)
  np.testing.assert_allclose(x @ delta, z, atol=1e-9)
  assert np.linalg.matrix_rank(delta) >= np.linalg.matrix_rank(z[:, changed])
  # Hypothesis 2 violated for one changed column (only k - 1 positions): it can no longer be fitted.
  mask[:, 0] = False
  mask[common[: k - 1], 0] = True
  with jax.enable_x64():
    broken = sp.sparse_least_squares(jnp.asarray(x), jnp.asarray(z), jnp.asarray(mask))
  assert float(broken.residual[0]) > 1e-8


# -- the WaveFT paper, Table 1: gradient coverage -------------------------------------------------------
@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_gradient_coverage_matches_the_gradient_through_idwt(wavelet):
  """Fraction of wavelet coefficients with a non-zero gradient when a fraction rho of weights has one."""
  m = n = 64
  rho = 0.1
  fractions = []
  for t in range(4):
    kg, km = jax.random.split(jax.random.key(t))
    grad_w = jax.random.normal(kg, (m, n)) * (jax.random.uniform(km, (m, n)) < rho)
    _, vjp = jax.vjp(lambda c: sp.idwt2(c, wavelet, 1), jnp.zeros((m, n)))
    (grad_c,) = vjp(grad_w)
    fractions.append(float(jnp.mean(jnp.abs(grad_c) > 1e-6)))
  predicted = float(sp.gradient_coverage(rho, sp.receptive_field_size(wavelet, 1)))
  assert abs(np.mean(fractions) - predicted) < 0.03, (np.mean(fractions), predicted)
