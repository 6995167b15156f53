"""The generic adapter functions: targets, pytree kinds, reshape rules, combinations, errors."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spectral_peft as sp

KEY = jax.random.key(0)


def dense_params():
  k1, k2, k3 = jax.random.split(KEY, 3)
  return {
      "encoder": {
          "layers": [
              {"query": {"kernel": jax.random.normal(k1, (8, 6)), "bias": jnp.zeros(6)}},
              {"query": {"kernel": jax.random.normal(k2, (8, 6)), "bias": jnp.zeros(6)}},
          ],
          "out": {"kernel": jax.random.normal(k3, (2, 3, 8))},
      }
  }


def test_paths_of_a_plain_nested_dict_and_regex_targets():
  params = dense_params()
  assert list(sp.peft.leaf_paths(params)) == [
      "encoder/layers/0/query/bias", "encoder/layers/0/query/kernel",
      "encoder/layers/1/query/bias", "encoder/layers/1/query/kernel", "encoder/out/kernel"]
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"query/kernel$")
  assert list(adapters) == ["encoder/layers/0/query/kernel", "encoder/layers/1/query/kernel"]
  by_predicate = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), lambda path, leaf: path.endswith("0/query/kernel"))
  assert list(by_predicate) == ["encoder/layers/0/query/kernel"]


def test_nnx_state_gives_the_same_paths_and_merges_into_a_state():
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.query = nnx.Linear(8, 6, rngs=rngs)
      self.value = nnx.Linear(8, 6, rngs=rngs)

  model = Block(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  adapters = sp.peft.init_adapters(KEY, state, sp.peft.SineLoRA(2, omega=30.0), r"(query|value)/kernel")
  assert set(adapters) == {"query/kernel", "value/kernel"}
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)
  merged = sp.peft.merge(state, adapters)
  assert isinstance(merged, nnx.State)
  x = jnp.ones((2, 8))
  adapted = nnx.merge(graphdef, merged)
  w = state["query"]["kernel"][...] + adapters["query/kernel"].delta(state["query"]["kernel"][...])
  np.testing.assert_allclose(adapted.query(x), x @ w + state["query"]["bias"][...], atol=1e-5)
  chex.assert_trees_all_close(sp.peft.unmerge(merged, adapters), state, atol=1e-5)


def test_densegeneral_kernels_are_flattened_by_in_axes():
  params = dense_params()
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"out/kernel", in_axes=2)
  adapter = adapters["encoder/out/kernel"]
  assert adapter.matrix_shape == (6, 8)
  assert adapter.params["a"].shape == (6, 2) and adapter.params["b"].shape == (2, 8)
  adapter = jax.tree.map(lambda x: x + 0.3, adapter)
  w0 = params["encoder"]["out"]["kernel"]
  expected = w0 + (adapter.params["a"] @ adapter.params["b"]).reshape(2, 3, 8)
  np.testing.assert_allclose(adapter.merge(w0), expected, rtol=1e-6)
  x = jax.random.normal(KEY, (5, 2, 3))
  np.testing.assert_allclose(adapter.apply(x, w0), jnp.einsum("bij,ijo->bo", x, expected), atol=1e-5)
  by_callable = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"out/kernel", in_axes=lambda p, s: 1)
  assert by_callable["encoder/out/kernel"].matrix_shape == (2, 24)


def test_dtype_is_preserved_and_param_dtype_is_honoured():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), dense_params())
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.DoRA(2, param_dtype=jnp.float32), r"query/kernel")
  assert adapters["encoder/layers/0/query/kernel"].params["a"].dtype == jnp.float32
  merged = sp.peft.merge(params, jax.tree.map(lambda x: x + 0.01, adapters))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(merged))


def test_count_parameters_and_trainable_mask():
  params = dense_params()
  lora = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"query/kernel")
  assert sp.peft.count_parameters(lora) == 2 * (8 * 2 + 2 * 6)
  dora = sp.peft.init_adapters(KEY, params, sp.peft.DoRA(2), r"query/kernel")
  assert sp.peft.count_parameters(dora) == 2 * (8 * 2 + 2 * 6 + 6)  # the frozen w0 norms do not count
  assert sp.peft.count_parameters({"base": params, "adapters": dora}) == sp.peft.count_parameters(dora)
  mask = sp.peft.trainable_mask({"base": params, "adapters": dora})
  assert not any(jax.tree.leaves(mask["base"]))
  adapter_mask = mask["adapters"]["encoder/layers/0/query/kernel"]
  assert adapter_mask.params == {"a": True, "b": True, "magnitude": True}
  # The constants are static data, not leaves: nothing for an optimizer to see.
  assert set(adapter_mask.frozen) == {"w0_norm"} and len(jax.tree.leaves(adapter_mask)) == 3


def test_masked_optimizer_updates_trainable_adapter_arrays_only():
  params = dense_params()
  tree = {"base": params, "adapters": jax.tree.map(lambda x: x + 0.1, sp.peft.init_adapters(KEY, params, sp.peft.DoRA(2), r"query/kernel"))}
  x = jnp.ones((4, 8))

  def loss(tree):
    merged = sp.peft.merge(tree["base"], tree["adapters"])
    layers = merged["encoder"]["layers"]
    return jnp.sum(jnp.square(x @ layers[0]["query"]["kernel"] @ layers[1]["query"]["kernel"].T))

  grads = jax.grad(loss)(tree)
  assert jnp.any(grads["base"]["encoder"]["layers"][0]["query"]["kernel"] != 0)  # would move W0
  tx = sp.peft.masked_optimizer(optax.sgd(0.1), tree)
  updates, _ = tx.update(grads, tx.init(tree), tree)
  for update, trainable in zip(jax.tree.leaves(updates), jax.tree.leaves(sp.peft.trainable_mask(tree))):
    assert bool(jnp.any(update != 0)) == trainable


def test_partition_and_combine_round_trip_and_grad_of_the_trainable_part():
  params = dense_params()
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.DoRA(2), r"query/kernel")
  trainable, frozen = sp.peft.partition(adapters)
  # Constants are static: the trainable part holds every leaf, the rest none.
  assert len(jax.tree.leaves(trainable)) == 2 * 3 and len(jax.tree.leaves(frozen)) == 0
  chex.assert_trees_all_equal(sp.peft.combine(trainable, frozen), adapters)
  x = jnp.ones((4, 8))

  def loss(trainable):
    merged = sp.peft.merge(params, sp.peft.combine(trainable, frozen))
    return jnp.sum(x @ merged["encoder"]["layers"][0]["query"]["kernel"])

  grads = jax.grad(loss)(trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)


def test_weighted_combination_is_the_weighted_sum_of_updates():
  params = dense_params()
  a = jax.tree.map(lambda x: x + 0.1, sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"query/kernel"))
  b = jax.tree.map(lambda x: x - 0.05, sp.peft.init_adapters(jax.random.key(1), params, sp.peft.SineDoRA(1, omega=20.0), r"0/query/kernel"))
  combined = sp.peft.weighted_combination([a, b], [0.7, -0.4])
  merged = sp.peft.merge(params, combined)
  d_a, d_b = sp.peft.delta_tree(params, a), sp.peft.delta_tree(params, b)
  p0, p1 = "encoder/layers/0/query/kernel", "encoder/layers/1/query/kernel"
  w0 = sp.peft.leaf_paths(params)
  np.testing.assert_allclose(sp.peft.leaf_paths(merged)[p0], w0[p0] + 0.7 * d_a[p0] - 0.4 * d_b[p0], atol=1e-5)
  np.testing.assert_allclose(sp.peft.leaf_paths(merged)[p1], w0[p1] + 0.7 * d_a[p1], atol=1e-5)
  chex.assert_trees_all_close(sp.peft.unmerge(merged, combined), params, atol=1e-5)
  merged_a = sp.peft.merge(params, a)
  chex.assert_trees_all_close(sp.peft.switch_adapters(merged_a, a, combined), merged, atol=1e-5)


def test_weighted_combination_saves_and_loads(tmp_path):
  params = dense_params()
  a = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"query/kernel")
  b = sp.peft.init_adapters(KEY, params, sp.peft.DoRA(1), r"query/kernel")
  combined = jax.tree.map(lambda x: x + 0.1, sp.peft.weighted_combination([a, b], [0.5, 0.5]))
  sp.peft.save_adapters(tmp_path / "c", combined)
  chex.assert_trees_all_equal(sp.peft.load_adapters(tmp_path / "c", params), combined)


def test_training_with_optax_reduces_the_loss():
  params = dense_params()
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.SineLoRA(2, omega=30.0), r"query/kernel")
  x = jax.random.normal(KEY, (16, 8))
  target = jax.random.normal(jax.random.key(5), (16, 6))

  def loss(adapters):
    merged = sp.peft.merge(params, adapters)
    return jnp.mean(jnp.square(x @ merged["encoder"]["layers"][0]["query"]["kernel"] - target))

  tx = optax.adam(1e-2)
  state = tx.init(adapters)
  first = loss(adapters)

  @jax.jit
  def step(adapters, state):
    grads = jax.grad(loss)(adapters)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state

  for _ in range(50):
    adapters, state = step(adapters, state)
  assert loss(adapters) < 0.7 * first


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sp.peft.LoRA(0), "`rank` must be a positive int"),
        (lambda: sp.peft.DoRA(-2), "`rank` must be a positive int"),
        (lambda: sp.peft.SineLoRA(2, omega=0.0), "`omega`"),
        (lambda: sp.peft.SineDoRA(2, omega=-5.0), "`omega`"),
        (lambda: sp.peft.LoRA(2, alpha=0.0), "`alpha`"),
        (lambda: sp.peft.LoRA(2.5), "`rank`"),
        (lambda: sp.peft.LoRA(2, param_dtype=jnp.int32), "`param_dtype`"),
    ],
)
def test_bad_specs_are_rejected(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_rank_larger_than_the_matrix_is_rejected_with_the_path():
  with pytest.raises(ValueError, match=r"encoder/layers/0/query/kernel.*`rank`.*min\(m, n\) = 6"):
    sp.peft.init_adapters(KEY, dense_params(), sp.peft.LoRA(7), r"query/kernel")


def test_a_pattern_matching_nothing_lists_available_paths():
  with pytest.raises(ValueError, match=r"matched no parameter.*encoder/layers/0/query/kernel \(8, 6\)"):
    sp.peft.init_adapters(KEY, dense_params(), sp.peft.LoRA(2), r"attention/key")


def test_non_matrix_targets_and_missing_reshape_rules_are_rejected():
  with pytest.raises(ValueError, match=r"query/bias.*not a matrix"):
    sp.peft.init_adapters(KEY, dense_params(), sp.peft.LoRA(2), r"query/bias")
  with pytest.raises(ValueError, match=r"out/kernel.*3 axes and no reshape rule.*in_axes"):
    sp.peft.init_adapters(KEY, dense_params(), sp.peft.LoRA(2), r"out/kernel")
  with pytest.raises(ValueError, match=r"`in_axes`.*\[1, 2\], got 3"):
    sp.peft.init_adapters(KEY, dense_params(), sp.peft.LoRA(2), r"out/kernel", in_axes=3)


def test_merging_onto_parameters_that_do_not_fit_is_rejected():
  params = dense_params()
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"query/kernel")
  other = jax.tree.map(lambda x: x, params)
  other["encoder"]["layers"][0]["query"]["kernel"] = jnp.ones((8, 5))
  with pytest.raises(ValueError, match=r"made for shape \(8, 6\).*\(8, 5\)"):
    sp.peft.merge(other, adapters)
  with pytest.raises(ValueError, match="no leaf at adapter path"):
    sp.peft.merge({"something": jnp.ones((8, 6))}, adapters)


def test_checkpoints_refuse_mismatched_parameters_and_never_clobber(tmp_path):
  params = dense_params()
  adapters = jax.tree.map(lambda x: x + 1.0, sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), r"query/kernel"))
  path = tmp_path / "adapter"
  sp.peft.save_adapters(path, adapters)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    sp.peft.save_adapters(path, adapters)
  wrong = jax.tree.map(lambda x: x, params)
  wrong["encoder"]["layers"][1]["query"]["kernel"] = jnp.ones((8, 7))
  with pytest.raises(ValueError, match=r"does not fit `params`.*layers/1/query/kernel.*\(8, 6\).*\(8, 7\)"):
    sp.peft.load_adapters(path, wrong)
  with pytest.raises(ValueError, match="is not in `params`"):
    sp.peft.load_adapters(path, {"x": jnp.ones((8, 6))})
  with pytest.raises(FileNotFoundError):
    sp.peft.load_adapters(tmp_path / "missing")
  # Overwriting replaces the checkpoint only once the new one is complete; no temporaries remain.
  newer = jax.tree.map(lambda x: x * 2.0, adapters)
  sp.peft.save_adapters(path, newer, overwrite=True)
  chex.assert_trees_all_equal(sp.peft.load_adapters(path, params), newer)
  assert sorted(os.listdir(tmp_path)) == ["adapter"]
