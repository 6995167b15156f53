"""Theorem 1 / 2 expansion of a sinusoidal hidden layer, and sub-period detection (sec. 5.3)."""

from __future__ import annotations

import fractions
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp

scipy_special = pytest.importorskip("scipy.special")


def test_bessel_j_matches_scipy_including_negative_orders_and_arguments():
  orders = np.arange(-6, 7)[:, None]
  x = np.linspace(-12.0, 12.0, 49)[None, :]
  got = sp.bessel_j(orders, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, scipy_special.jv(orders, x), atol=2e-6)
  # Derivative: J_n' = (J_{n-1} - J_{n+1}) / 2.
  grad = jax.vmap(jax.grad(lambda v: sp.bessel_j(2, v)))(jnp.asarray(x[0], jnp.float32))
  np.testing.assert_allclose(grad, 0.5 * (scipy_special.jv(1, x[0]) - scipy_special.jv(3, x[0])), atol=2e-5)


def test_multi_indices_counts():
  k1 = sp.multi_indices(3, 2)
  assert len(k1) == 25 and (np.abs(k1).sum(axis=1) <= 2).all() and len({tuple(r) for r in k1}) == 25
  kinf = sp.multi_indices(2, 1, norm="linf")
  assert len(kinf) == 9 and (kinf[0] == 0).all()
  with pytest.raises(ValueError, match="norm"):
    sp.multi_indices(2, 1, norm="l2")


def _small_network(scale, seed=0, m=4, n=3):
  omega = sp.integer_frequencies(jax.random.key(seed), m, 3)
  params = sp.periodic_siren_init(jax.random.key(seed + 1), omega, n, 1)
  a = jax.random.uniform(jax.random.key(seed + 2), (m, n), minval=-scale, maxval=scale)
  return {**params, "hidden": ({"kernel": a, "bias": params["hidden"][0]["bias"]},)}


@pytest.mark.slow
def test_expansion_converges_to_the_neuron_when_a_is_small():
  params = _small_network(0.9)
  x = jax.random.uniform(jax.random.key(7), (20, 2), minval=-1.0, maxval=1.0)
  exact = sp.hidden_neurons(params, x)
  errors = []
  for order in (1, 3, 9):
    expansion = sp.harmonic_expansion(params, order=order)
    errors.append(float(jnp.abs(sp.expansion_apply(expansion, x) - exact).max()))
  assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
  assert errors[0] > 1e-2 and errors[-1] < 1e-5
  # The hidden layer equals the first hidden layer of the network (and sums to f with C, d).
  layer = sp.hidden_neurons(params, x)
  f = layer @ params["output"]["kernel"] + params["output"]["bias"]
  chex.assert_trees_all_close(f, sp.periodic_siren_apply(params, x), atol=1e-5)


def test_expansion_terms_match_a_numpy_reference():
  params = _small_network(0.7, m=2, n=2)
  e = sp.harmonic_expansion(params, order=2, norm="linf")
  a = np.asarray(params["hidden"][0]["kernel"], np.float64)
  expected = np.prod(scipy_special.jv(e.k[:, :, None], a[None]), axis=1)
  np.testing.assert_allclose(e.amplitudes, expected, atol=1e-6)
  np.testing.assert_allclose(e.frequencies, e.k @ np.asarray(params["omega"]).T, atol=1e-4)
  ints = sp.generated_frequencies(params["omega"], order=2, norm="linf")
  assert len(ints) == len(np.unique(e.k @ sp.frequencies_as_integers(params["omega"]).T, axis=0))


def test_amplitude_bound_theorem_2():
  params = _small_network(2.5, m=3, n=4)
  e = sp.harmonic_expansion(params, order=4)
  bound = sp.amplitude_bound(params["hidden"][0]["kernel"], e.k)
  assert bool((jnp.abs(e.amplitudes) <= bound + 1e-7).all())
  assert float(bound[0].min()) == 1.0  # k = 0: the empty product.
  with pytest.raises(ValueError, match="shape"):
    sp.amplitude_bound(params["hidden"][0]["kernel"], np.zeros((2, 5), int))
  # Eq. 9: with ||A||_inf < 1 the order-5 terms are tiny.
  assert float(sp.amplitude_bound(jnp.full((1, 1), 1.0), [[5]])[0, 0]) == pytest.approx(1.0 / (2**5 * 120))


def _group(generators):
  generators = [tuple(fractions.Fraction(v).limit_denominator(1000) for v in g) for g in generators]
  elements = {(fractions.Fraction(0), fractions.Fraction(0))}
  frontier = list(elements)
  while frontier and len(elements) < 1000:
    e = frontier.pop()
    for g in generators:
      new = tuple((a + b) % 1 for a, b in zip(e, g))
      if new not in elements:
        elements.add(new)
        frontier.append(new)
  return elements


@pytest.mark.parametrize(
    "k,index,shifts",
    [
        ([[1, 1], [1, 3], [3, 1], [-1, 5], [5, -3]], 2, [(0.5, 0.5)]),  # All odd (Fig. 7): diagonal repetition.
        ([[2, 0], [2, 4], [0, 2], [-4, 6]], 4, [(0.5, 0.0), (0.0, 0.5)]),  # All even (Fig. 8a): p / 2 per axis.
        ([[i, j] for i in (1, 10, 100) for j in (1, 10, 100)], 9, [(8 / 9, 1 / 9)]),  # Fig. 8b: all positive.
        ([[1, 0], [0, 1], [3, 5]], 1, []),
        ([[1, 2], [3, 1]], 5, [(0.4, 0.8)]),
    ],
)
def test_sub_period_detector_flags_fig_7_8(k, index, shifts):
  omega = math.pi * jnp.asarray(np.array(k).T, jnp.float32)  # period 2.
  result = sp.detect_sub_period(omega)
  assert result.index == index and result.has_sub_period == (index > 1) and result.rank == 2
  # Generators are not unique: compare the groups of shifts they generate (mod 1).
  assert _group(result.shifts) == _group(shifts)
  assert len(_group(result.shifts)) == index
  # Every reported shift leaves every frequency's phase unchanged mod 2 pi.
  for t in result.shifts:
    assert np.allclose(np.mod(np.array(k) @ np.array(t) + 1e-9, 1.0), 0.0, atol=1e-6)


def test_sub_period_detector_against_the_network_and_rank_deficiency():
  omega = math.pi * jnp.array([[1.0, 3.0, 5.0], [1.0, 3.0, 5.0]])
  result = sp.detect_sub_period(omega)
  assert result.has_sub_period and result.index is None and result.rank == 1
  even = sp.symmetric_frequencies((2, 4), period=3.0)
  r = sp.detect_sub_period(even, period=3.0)
  assert r.axis_periods == (1.5, 1.5) and r.index == 4
  params = sp.periodic_siren_init(jax.random.key(0), even, 6, 1)
  x = jax.random.uniform(jax.random.key(1), (5, 2), minval=-1.0, maxval=1.0)
  chex.assert_trees_all_close(
      sp.periodic_siren_apply(params, x + jnp.array([1.5, 0.0])), sp.periodic_siren_apply(params, x), atol=2e-4
  )
  random = sp.integer_frequencies(jax.random.key(3), 30, 10)
  assert not sp.detect_sub_period(random).has_sub_period
  with pytest.raises(ValueError, match="integer multiples"):
    sp.detect_sub_period(sp.siren_frequencies(jax.random.key(0), 4))
