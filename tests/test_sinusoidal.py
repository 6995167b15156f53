"""Periodic sinusoidal networks: integer frequencies, SIREN init, init/apply and the Flax modules."""

from __future__ import annotations

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp


def _network(m=12, n=16, bandwidth=6, hidden=None, seed=0, out=2):
  omega = sp.integer_frequencies(jax.random.key(seed), m, bandwidth)
  return sp.periodic_siren_init(jax.random.key(seed + 1), omega, hidden or n, out)


def _numpy_apply(params, x):
  """Independent float64 reference of f(x) = C S(...S(sin(x omega + phi))) + d."""
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  h = np.sin(np.asarray(x, np.float64) @ p["omega"] + p["phi"])
  for layer in p["hidden"]:
    h = np.sin(h @ layer["kernel"] + layer["bias"])
  return h @ p["output"]["kernel"] + p["output"]["bias"]


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(
    n=st.integers(1, 40), bandwidth=st.integers(1, 6), dim=st.integers(1, 3), half=st.booleans(), seed=st.integers(0, 99)
)
def test_integer_frequencies_are_distinct_nonzero_integers_in_band(n, bandwidth, dim, half, seed):
  total = (2 * bandwidth + 1) ** dim - 1
  available = total // 2 if half else total
  hypothesis.assume(n <= available)
  omega = sp.integer_frequencies(jax.random.key(seed), n, bandwidth, dim=dim, period=3.0, half_space=half)
  k = sp.frequencies_as_integers(omega, period=3.0)
  assert k.shape == (dim, n)
  assert (np.abs(k) <= bandwidth).all()
  assert (k != 0).any(axis=0).all()
  assert len({tuple(c) for c in k.T}) == n
  if half:
    assert not {tuple(c) for c in k.T} & {tuple(-c) for c in k.T}


def test_integer_frequencies_can_fill_the_band():
  k = sp.frequencies_as_integers(sp.integer_frequencies(jax.random.key(0), 12, 2, half_space=True))
  expected = {(i, j) for i in range(-2, 3) for j in range(-2, 3) if (i, j) > (0, 0)}
  assert {tuple(c) for c in k.T} == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=4, bandwidth=0), "bandwidth"),
        (dict(n=0, bandwidth=3), "`n`"),
        (dict(n=5, bandwidth=1), "at most the number of frequencies"),  # 4 vectors up to sign in [-1, 1]^2.
        (dict(n=9, bandwidth=1, half_space=False), "holds 8 non-zero"),
        (dict(n=2, bandwidth=2, period=-1.0), "period"),
    ],
)
def test_integer_frequencies_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sp.integer_frequencies(jax.random.key(0), **kwargs)


def test_symmetric_layout_of_fig14_and_siren_init():
  omega = sp.symmetric_frequencies((1, 3, 10, 50))
  k = sp.frequencies_as_integers(omega)
  assert k.shape == (2, 64) and set(np.abs(k).ravel()) == {1, 3, 10, 50}
  assert sp.symmetric_frequencies((1, 3), half_space=True).shape == (2, 8)
  with pytest.raises(ValueError, match="distinct"):
    sp.symmetric_frequencies((1, 1))
  siren = sp.siren_frequencies(jax.random.key(0), 500, omega_0=30.0)
  assert float(jnp.abs(siren).max()) <= 15.0 and float(jnp.abs(siren).max()) > 10.0
  with pytest.raises(ValueError, match="integer multiples"):
    sp.frequencies_as_integers(siren)


@pytest.mark.parametrize("hidden,transform", [(16, lambda f: f), ((16, 8), jax.jit)], ids=["one_hidden_no_jit", "two_hidden_jit"])
def test_apply_matches_numpy_and_is_periodic(hidden, transform):
  params = _network(hidden=hidden)
  x = jax.random.uniform(jax.random.key(5), (7, 2), minval=-1.0, maxval=1.0)
  apply = transform(sp.periodic_siren_apply)
  y = apply(params, x)
  chex.assert_trees_all_close(y, _numpy_apply(params, x).astype(np.float32), atol=2e-5)
  for shift in ([2.0, 0.0], [0.0, -2.0], [4.0, 2.0]):
    chex.assert_trees_all_close(apply(params, x + jnp.array(shift)), y, atol=2e-4)
  # A SIREN (non-integer) first layer is not 2-periodic.
  siren = {**params, "omega": sp.siren_frequencies(jax.random.key(9), 12)}
  assert float(jnp.abs(apply(siren, x + 2.0) - apply(siren, x)).max()) > 1e-2


def test_sub_period_is_visible_in_the_network_too():
  # All-odd integer frequencies: f(x + (1, 1)) == f(x) for period 2 (Fig. 7).
  omega = sp.symmetric_frequencies((1, 3, 5))
  params = sp.periodic_siren_init(jax.random.key(0), omega, 8, 1)
  x = jax.random.uniform(jax.random.key(1), (6, 2), minval=-1.0, maxval=1.0)
  chex.assert_trees_all_close(sp.periodic_siren_apply(params, x + 1.0), sp.periodic_siren_apply(params, x), atol=2e-4)


def test_first_layer_is_frozen_and_parameter_count():
  params = _network(m=4, n=3, bandwidth=2, out=1)
  x = jnp.ones((3, 2)) * 0.2
  grads = jax.grad(lambda p: jnp.sum(sp.periodic_siren_apply(p, x) ** 2))(params)
  assert float(jnp.abs(grads["omega"]).max()) == 0.0
  assert float(jnp.abs(grads["hidden"][0]["kernel"]).max()) > 0.0
  assert sp.periodic_siren_num_parameters(params) == 4 + 12 + 3 + 3 + 1
  assert sp.periodic_siren_num_parameters(params, include_frequencies=True) == 23 + 8


def test_init_and_apply_bad_input():
  omega = sp.integer_frequencies(jax.random.key(0), 4, 2)
  with pytest.raises(ValueError, match="hidden_features"):
    sp.periodic_siren_init(jax.random.key(0), omega, 0, 1)
  with pytest.raises(ValueError, match="hidden width"):
    sp.periodic_siren_init(jax.random.key(0), omega, (), 1)
  params = sp.periodic_siren_init(jax.random.key(0), omega, 3, 1)
  with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
    sp.periodic_siren_apply(params, jnp.ones((3, 3)))
  with pytest.raises(ValueError, match="periodic SIREN parameter dict"):
    sp.periodic_siren_apply({"omega": omega}, jnp.ones((3, 2)))


def test_nnx_module_equals_core():
  omega = sp.integer_frequencies(jax.random.key(0), 8, 4)
  model = sp.nnx.PeriodicSiren(omega, (8, 4), 3, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (5, 2), minval=-1.0, maxval=1.0)
  chex.assert_trees_all_close(model(x), sp.periodic_siren_apply(model.as_dict(), x), atol=1e-6)
  expected = sp.periodic_siren_init(nnx.Rngs(0).params(), omega, (8, 4), 3)
  chex.assert_trees_all_close(model.as_dict(), expected)
  # omega is not a Param: the optimizer's view excludes it.
  assert not any(leaf.shape == (2, 8) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert any(leaf.shape == (2, 8) for leaf in jax.tree.leaves(nnx.state(model, sp.nnx.Frequencies)))
  assert model(x.astype(jnp.bfloat16)).dtype == jnp.float32
  assert sp.nnx.PeriodicSiren(omega, 4, 1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x).dtype == jnp.bfloat16


def test_linen_module_equals_core():
  omega = sp.integer_frequencies(jax.random.key(0), 8, 4)
  model = sp.linen.PeriodicSiren(omega, 6, 2)
  x = jax.random.uniform(jax.random.key(1), (5, 2), minval=-1.0, maxval=1.0)
  variables = model.init(jax.random.key(2), x)
  assert "omega" not in variables["params"]
  params = sp.linen.periodic_siren_dict(variables)
  chex.assert_trees_all_close(model.apply(variables, x), sp.periodic_siren_apply(params, x), atol=1e-6)
  assert math.isclose(float(jnp.abs(params["phi"]).max()), float(jnp.abs(params["phi"]).max()))
  assert float(jnp.abs(params["phi"]).max()) <= math.pi
  assert float(jnp.abs(params["hidden"][0]["kernel"]).max()) <= math.sqrt(6.0 / 8)
  chex.assert_trees_all_close(model.apply(variables, x + 2.0), model.apply(variables, x), atol=2e-4)
