"""Bounding, decay, pruning selection, shrink and growing for periodic sinusoidal networks."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spectral_peft as sp


def _network(m=10, n=12, bandwidth=5, hidden=None, seed=0):
  omega = sp.integer_frequencies(jax.random.key(seed), m, bandwidth)
  return sp.periodic_siren_init(jax.random.key(seed + 1), omega, hidden or n, 1)


def _data(n=64, seed=3):
  x = jax.random.uniform(jax.random.key(seed), (n, 2), minval=-1.0, maxval=1.0)
  y = jnp.sin(math.pi * x[:, :1]) * jnp.cos(2 * math.pi * x[:, 1:])
  return x, y


def test_bound_matrix_matches_numpy_clip_and_block_bounds():
  a = jax.random.normal(jax.random.key(0), (3, 5)) * 2
  chex.assert_trees_all_close(sp.bound_matrix(a, 0.7), np.clip(np.asarray(a), -0.7, 0.7))
  omega = math.pi * jnp.array([[1.0, 7.0, 20.0], [0.0, -2.0, 3.0]])
  bounds = sp.block_bounds(omega, [5, 10], [1.3, 0.6, 0.05])
  chex.assert_trees_all_close(bounds, jnp.array([1.3, 0.6, 0.05]))
  chex.assert_trees_all_close(sp.bound_matrix(a, bounds), np.clip(np.asarray(a), -np.array([[1.3], [0.6], [0.05]]), np.array([[1.3], [0.6], [0.05]])))
  # A limit is inclusive on the left: max |k| = 5 falls in the second block.
  assert sp.block_index(math.pi * jnp.array([[5.0, 4.0], [0.0, 4.0]]), [5]).tolist() == [1, 0]
  assert float(sp.block_bounds(omega, [], [math.inf])[0]) == math.inf


@pytest.mark.parametrize(
    "limits,bounds,match",
    [
        ([5, 5], [1.0, 1.0, 1.0], "strictly increasing"),
        ([10, 5], [1.0, 1.0, 1.0], "strictly increasing"),
        ([-1], [1.0, 1.0], "positive"),
        ([5], [1.0], "len\\(limits\\) \\+ 1"),
        ([5], [1.0, -0.5], "non-negative"),
    ],
)
def test_block_bounds_bad_input(limits, bounds, match):
  with pytest.raises(ValueError, match=match):
    sp.block_bounds(math.pi * jnp.ones((2, 3)), limits, bounds)


def test_negative_bound_is_rejected():
  with pytest.raises(ValueError, match="non-negative"):
    sp.bounding(-0.1)
  with pytest.raises(ValueError, match="non-negative"):
    sp.bound_matrix(jnp.ones((2, 2)), -1.0)
  with pytest.raises(ValueError, match="per-frequency vector"):
    sp.bound_matrix(jnp.ones((2, 2)), jnp.ones(3))


@pytest.mark.slow
def test_bound_holds_after_optax_steps():
  params = _network()
  x, y = _data()
  # Block bounding (a per-frequency bound); the scalar bound is covered by test_fit_reduces_the_loss_and_keeps_omega.
  bound = sp.block_bounds(params["omega"], [3], [0.3, 0.05])
  tx = optax.chain(optax.adam(0.05), sp.bounding(bound))
  state = tx.init(params)
  row_bound = np.asarray(bound, np.float32).reshape(-1, 1)

  @jax.jit
  def step(params, state, tx=tx):
    grads = jax.grad(lambda p: jnp.mean((sp.periodic_siren_apply(p, x) - y) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(6):
    params, state = step(params, state)
    a = np.asarray(params["hidden"][0]["kernel"])
    assert (np.abs(a) <= row_bound * (1 + 1e-6)).all()
  assert (np.abs(a) >= row_bound * (1 - 1e-6)).any()  # Saturated: the bound was active.
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(params, state)


def test_decay_functionals_and_alpha_schedule():
  params = _network(m=4, n=3, bandwidth=2)
  a = np.asarray(params["hidden"][0]["kernel"])
  chex.assert_trees_all_close(sp.l1_weight_decay(params), np.abs(a).sum(), rtol=1e-6)
  rows = np.array([True, False, True, False])
  chex.assert_trees_all_close(sp.targeted_weight_decay(params, rows), np.abs(a[rows]).sum(), rtol=1e-6)
  cols = np.array([False, True, True])
  chex.assert_trees_all_close(sp.targeted_weight_decay(params, cols, "neurons"), np.abs(a[:, cols]).sum(), rtol=1e-6)
  chex.assert_trees_all_close(sp.targeted_weight_decay(params, np.ones(4, bool)), sp.l1_weight_decay(params))
  with pytest.raises(ValueError, match="shape \\(4,\\)"):
    sp.targeted_weight_decay(params, np.ones(3, bool))
  with pytest.raises(ValueError, match="groups"):
    sp.group_l1_norms(jnp.ones((2, 2)), "columns")
  t = np.arange(0, 101)
  got = np.asarray(jax.vmap(lambda s: sp.alpha_schedule(s, 100, scale=1.0))(t))
  expected = np.where(t <= 50, (t / 50.0) ** 2, ((t - 100) / 50.0) ** 2)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  assert float(sp.alpha_schedule(150, 100)) == 0.0
  assert math.isclose(float(sp.alpha_schedule(50, 100)), 1e-6, rel_tol=1e-5)
  assert float(sp.regularized_loss(2.0, 10.0, 0.25)) == 0.75 * 2.0 + 2.5


def test_pruning_selection_is_the_largest_set_under_a_fraction_of_the_total():
  rng = np.random.default_rng(0)
  for _ in range(20):
    a = rng.normal(size=(6, 4)) * rng.uniform(0.01, 2.0, size=(6, 1))
    fraction = rng.uniform(0.0, 1.0)
    for groups, axis in (("frequencies", 1), ("neurons", 0)):
      mask = sp.pruning_selection(jnp.asarray(a, jnp.float32), fraction, groups)
      norms = np.abs(a).sum(axis=axis)
      budget = fraction * norms.sum()  # sec. 3.2.2 / 7.1: T_p in [0, 1] of the total information
      # Brute force: the largest subset size whose sum stays below the budget.
      best = max(size for size in range(len(norms) + 1) if np.sort(norms)[:size].sum() < budget)
      assert mask.sum() == best
      assert norms[mask].sum() < budget
  a = jnp.array([[0.1, 0.0], [3.0, 1.0], [0.2, 0.2], [0.5, 0.0]])
  assert sp.pruning_selection(a, 1.0, max_groups=2).tolist() == [True, False, True, False]
  assert sp.pruning_selection(a, 1.0).tolist() == [True, False, True, True]  # all but the largest
  assert not sp.pruning_selection(a, 0.0).any()
  for bad in (-1.0, 1.5, math.inf):
    with pytest.raises(ValueError, match="threshold"):
      sp.pruning_selection(a, bad)


@pytest.mark.parametrize("hidden", [12, (12, 5)])
def test_shrunk_network_equals_masked_network(hidden):
  params = _network(hidden=hidden)
  x, _ = _data(16)
  pruned_f = np.zeros(10, bool)
  pruned_f[[1, 4, 7]] = True
  pruned_n = np.zeros(12, bool)
  pruned_n[[0, 5]] = True
  masked = sp.prune_params(sp.prune_params(params, pruned_f), pruned_n, "neurons")
  small = sp.shrink_params(masked, keep_neurons=~pruned_n)
  assert small["omega"].shape == (2, 7) and small["phi"].shape == (7,)
  assert small["hidden"][0]["kernel"].shape == (7, 10)
  chex.assert_trees_all_close(sp.periodic_siren_apply(small, x), sp.periodic_siren_apply(masked, x), atol=2e-5)
  removed = 3 * 2 + 3 + 3 * 12 + 2 * 7 + 2 + 2 * (5 if hidden != 12 else 1)
  assert sp.periodic_siren_num_parameters(small, include_frequencies=True) == (
      sp.periodic_siren_num_parameters(params, include_frequencies=True) - removed
  )
  with pytest.raises(ValueError, match="keep_neurons"):
    sp.shrink_params(params, keep_neurons=np.ones(3, bool))


@pytest.mark.slow
def test_structured_pruning_loop_removes_columns_for_real():
  params = _network(m=8, n=10, bandwidth=3)
  x, y = _data(48)
  params = sp.fit_periodic_siren(params, x, y, optax.adam(1e-2), 30).params
  small, rounds = sp.structured_pruning(
      params, x, y, optax.adam(1e-2), threshold=1.0, decay_steps=4, targeted_steps=400, finetune_steps=4,
      max_groups_per_round=2, target_pruned=4, alpha_scale=1e-3, targeted_alpha=0.5, prune_below=0.05,
      check_every=5,
  )
  assert small["omega"].shape == (2, 4) and small["hidden"][0]["kernel"].shape == (4, 10)
  assert sum(r.pruned for r in rounds) == 4 and rounds[-1].remaining == 4
  # Targeted decay ran until the selection was near zero, and stopped early.
  assert all(r.decayed_fraction <= 0.05 and 0 < r.targeted_steps < 400 for r in rounds)
  assert all(r.steps == 4 + r.targeted_steps + 4 for r in rounds)
  kept = {tuple(c) for c in sp.frequencies_as_integers(small["omega"]).T}
  assert kept <= {tuple(c) for c in sp.frequencies_as_integers(params["omega"]).T}
  assert np.isfinite([r.mse for r in rounds]).all()


def test_structured_pruning_guard_protects_groups_that_did_not_decay():
  params = _network(m=8, n=10, bandwidth=3)
  x, y = _data(48)
  # No targeted decay: every selected group keeps its norm, so the T_n guard prunes none and the loop stops.
  same, rounds = sp.structured_pruning(params, x, y, optax.adam(1e-2), threshold=0.5, decay_steps=0,
                                       targeted_steps=0, finetune_steps=2, prune_below=0.5)
  assert rounds[0].selected > 0 and rounds[0].pruned == 0 and len(rounds) == 1
  assert same["omega"].shape == params["omega"].shape
  # T_n = 1 is the abrupt cut: every selected group goes without any decay.
  cut, rounds = sp.structured_pruning(params, x, y, optax.adam(1e-2), threshold=0.5, decay_steps=0,
                                      targeted_steps=0, finetune_steps=2, prune_below=1.0, max_rounds=1)
  assert rounds[0].pruned == rounds[0].selected > 0
  assert cut["omega"].shape[1] == 8 - rounds[0].pruned
  selected = sp.pruning_selection(params["hidden"][0]["kernel"], 0.5)
  np.testing.assert_array_equal(np.asarray(cut["omega"]), np.asarray(params["omega"])[:, ~selected])
  for kw in ({"threshold": 2.0}, {"threshold": 0.5, "prune_below": -0.1}):
    with pytest.raises(ValueError, match="threshold|prune_below"):
      sp.structured_pruning(params, x, y, optax.adam(1e-2), decay_steps=0, targeted_steps=0, finetune_steps=0,
                            **{"prune_below": 0.05, **kw})


def test_fit_stops_when_the_predicate_holds():
  params = _network()
  x, y = _data()
  calls = []

  def until(p):
    calls.append(1)
    return len(calls) == 2

  fit = sp.fit_periodic_siren(params, x, y, optax.adam(1e-2), 50, until=until, check_every=5)
  assert len(fit.losses) == 10 and len(calls) == 2
  with pytest.raises(ValueError, match="check_every"):
    sp.fit_periodic_siren(params, x, y, optax.adam(1e-2), 5, until=until, check_every=0)


def test_fit_reduces_the_loss_and_keeps_omega():
  params = _network()
  x, y = _data()
  fit = sp.fit_periodic_siren(params, x, y, optax.adamw(1e-2, weight_decay=0.1), 40, bound=0.5)
  assert fit.losses[-1] < 0.5 * fit.losses[0]
  chex.assert_trees_all_close(fit.params["omega"], params["omega"])
  assert float(jnp.abs(fit.params["hidden"][0]["kernel"]).max()) <= 0.5
  with pytest.raises(ValueError, match="alpha"):
    sp.fit_periodic_siren(params, x, y, optax.adam(1e-2), 1, penalty=sp.l1_weight_decay)


def test_block_importance_matches_definition_8_1():
  omega = math.pi * jnp.array([[1.0, 2.0, 8.0], [0.0, 1.0, 3.0]])
  params = sp.periodic_siren_init(jax.random.key(0), omega, 4, 1)
  a = jnp.array([[0.5, -0.49, 0.0, 0.2], [0.1, 0.5, -0.5, 0.0], [0.05, -0.05, 0.01, 0.0]])
  params = {**params, "hidden": ({"kernel": a, "bias": params["hidden"][0]["bias"]},)}
  eps = 0.02
  got = sp.block_importance(params, [5], [0.5, 0.05], eps=eps)
  block0 = np.abs(np.asarray(a[:2]))
  block1 = np.abs(np.asarray(a[2:]))
  expected = [
      np.sum(0.5 * np.maximum(block0 - 0.5 + eps, 0)) / block0.size,
      np.sum(0.05 * np.maximum(block1 - 0.05 + eps, 0)) / block1.size,
  ]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert sp.block_importance(params, [5, 100], [0.5, 0.05, 1.0], eps=eps)[2] == 0.0  # Empty block.


def test_band_frequencies_and_grow_preserve_the_function():
  params = _network(m=6, n=8, bandwidth=2)
  new = sp.band_frequencies(jax.random.key(4), 10, 3, 6, exclude=params["omega"])
  k = sp.frequencies_as_integers(new)
  level = np.abs(k).max(axis=0)
  assert ((level >= 3) & (level < 6)).all() and len({tuple(c) for c in k.T}) == 10
  grown = sp.grow_params(jax.random.key(5), params, new)
  assert grown["hidden"][0]["kernel"].shape == (16, 8)
  x, _ = _data(16)
  chex.assert_trees_all_close(sp.periodic_siren_apply(grown, x), sp.periodic_siren_apply(params, x), atol=1e-6)
  full = sp.frequencies_as_integers(sp.integer_frequencies(jax.random.key(0), 12, 2))  # Whole band [-2, 2]^2 / sign.
  with pytest.raises(ValueError, match="at most the number of new frequencies"):
    sp.band_frequencies(jax.random.key(0), 1, 0, 3, exclude=math.pi * jnp.asarray(full, jnp.float32))
  with pytest.raises(ValueError, match="0 <= low < high"):
    sp.band_frequencies(jax.random.key(0), 1, 4, 4)


@pytest.mark.slow
def test_grow_loop_adds_frequencies_in_the_most_saturated_band():
  omega = sp.band_frequencies(jax.random.key(0), 4, 1, 3)
  params = sp.periodic_siren_init(jax.random.key(1), omega, 8, 1)
  x, y = _data(48)
  grown, rounds = sp.grow_loop(
      jax.random.key(2), params, x, y, optax.adam(2e-2), limits=[3, 6], bounds=[0.3, 0.2, 0.1],
      n_add=2, total_add=4, steps_per_round=10,
  )
  assert grown["omega"].shape == (2, 8) and len(rounds) == 2
  for r in rounds:
    assert r.block == int(np.argmax(r.importance))  # Every block has room here.
  levels = np.abs(sp.frequencies_as_integers(grown["omega"])[:, 4:]).max(axis=0)
  edges = [0, 3, 6, 9]
  for r, lv in zip(rounds, levels.reshape(2, 2)):
    assert ((lv >= max(edges[r.block], 1)) & (lv < edges[r.block + 1])).all()
  with pytest.raises(ValueError, match="multiple"):
    sp.grow_loop(jax.random.key(2), params, x, y, optax.adam(1e-2), limits=[3], bounds=[1.0, 1.0], n_add=2, total_add=3, steps_per_round=1)


@pytest.mark.slow
def test_grow_loop_passes_over_a_full_block():
  # Block 0 (|k|_inf = 1) holds all four half-space vectors already: growth goes to the most important
  # block that still has room, and a request no block can hold is refused.
  omega = math.pi * jnp.asarray([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, -1.0]])
  params = sp.periodic_siren_init(jax.random.key(1), omega, 8, 1)
  x, y = _data(48)
  grown, rounds = sp.grow_loop(
      jax.random.key(2), params, x, y, optax.adam(2e-2), limits=[2, 3], bounds=[1.0, 0.5, 0.5],
      n_add=2, total_add=4, steps_per_round=5,
  )
  assert grown["omega"].shape == (2, 8) and len(rounds) == 2
  for r in rounds:
    assert r.block != 0
    assert r.block == max((1, 2), key=lambda b: (r.importance[b], -b))
  with pytest.raises(ValueError, match="no block"):
    sp.grow_loop(jax.random.key(2), params, x, y, optax.adam(1e-2), limits=[2], bounds=[1.0, 1.0], n_add=22,
                 total_add=22, steps_per_round=1)  # Block 1, levels 2-3, holds 20.


def test_minibatch_fit_needs_a_key_and_trains():
  params = _network()
  x, y = _data(128)
  with pytest.raises(ValueError, match="key"):
    sp.fit_periodic_siren(params, x, y, optax.adam(1e-2), 1, batch_size=16)
  fit = sp.fit_periodic_siren(params, x, y, optax.adam(2e-2), 40, batch_size=32, key=jax.random.key(0))
  full = lambda p: float(jnp.mean((sp.periodic_siren_apply(p, x) - y) ** 2))  # noqa: E731
  assert full(fit.params) < 0.5 * full(params)
