"""The checks every adapter method must pass, run over all cases of ``adapter_cases.CASES``."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spectral_peft as sp
from adapter_cases import CASES

TARGETS = r"(query|value|mlp_in)/kernel$"
IN_AXES = {r"attention/": 1}  # DenseGeneral (embed, heads, head_dim) kernels: one input axis.
by_name = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def make_adapters(case, params, key=jax.random.key(7)):
  return sp.peft.init_adapters(key, params, case.method, TARGETS, in_axes=IN_AXES)


def perturb(adapters, key, scale):
  """Adds Gaussian noise to every trainable array, so the adapter is no longer the identity."""
  trainable, rest = sp.peft.partition(adapters)
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(key, len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return sp.peft.combine(jax.tree.unflatten(treedef, leaves), rest)


def trained(case, params, key=jax.random.key(7)):
  return perturb(make_adapters(case, params, key), jax.random.key(11), case.scale)


@by_name
def test_identity_at_init(case, block, base_params, inputs):
  adapters = make_adapters(case, base_params)
  assert set(adapters) == {
      "attention/query/kernel", "attention/value/kernel", "mlp_in/kernel"
  }
  merged = sp.peft.merge(base_params, adapters)
  chex.assert_trees_all_close(merged, base_params, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(block.apply({"params": merged}, inputs), block.apply({"params": base_params}, inputs), atol=1e-6)


@by_name
def test_perturbed_adapter_changes_the_model(case, block, base_params, inputs):
  merged = sp.peft.merge(base_params, trained(case, base_params))
  diff = jnp.max(jnp.abs(block.apply({"params": merged}, inputs) - block.apply({"params": base_params}, inputs)))
  assert diff > 1e-3


@by_name
def test_merged_forward_equals_unmerged_forward(case, base_params):
  adapters = trained(case, base_params)
  paths = sp.peft.leaf_paths(base_params)
  merged_paths = sp.peft.leaf_paths(sp.peft.merge(base_params, adapters))
  for path, adapter in adapters.items():
    in_shape = adapter.shape[: adapter.in_axes]
    x = jax.random.normal(jax.random.key(3), (4,) + in_shape)
    unmerged = adapter.apply(x, paths[path])
    merged = jnp.tensordot(x, merged_paths[path], axes=adapter.in_axes)
    assert unmerged.shape == (4,) + adapter.shape[adapter.in_axes :]
    np.testing.assert_allclose(unmerged, merged, atol=2e-5, rtol=2e-5, err_msg=path)


@by_name
def test_unmerge_inverts_merge(case, base_params):
  adapters = trained(case, base_params)
  restored = sp.peft.unmerge(sp.peft.merge(base_params, adapters), adapters)
  chex.assert_trees_all_close(restored, base_params, atol=2e-6, rtol=2e-6)


@by_name
def test_gradients_reach_adapter_leaves_only(case, block, base_params, inputs):
  tree = {"base": base_params, "adapters": trained(case, base_params)}
  trainable, rest = sp.peft.partition(tree)
  target = jnp.ones_like(inputs)

  def loss(trainable):
    tree = sp.peft.combine(trainable, rest)
    merged = sp.peft.merge(tree["base"], tree["adapters"])
    return jnp.mean(jnp.square(block.apply({"params": merged}, inputs) - target))

  grads = jax.grad(loss)(trainable)
  # Exactly the adapters' trainable arrays are differentiated, and each gets a gradient.
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert jax.tree.leaves(grads["base"]) == []
  assert all(jnp.any(g != 0) for g in jax.tree.leaves(grads))
  tx = optax.adam(1e-2)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  new = sp.peft.combine(optax.apply_updates(trainable, updates), rest)
  chex.assert_trees_all_equal(new["base"], tree["base"])
  for path, adapter in new["adapters"].items():
    chex.assert_trees_all_equal(adapter.frozen, tree["adapters"][path].frozen)
    assert any(jnp.any(n != o) for n, o in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(tree["adapters"][path].params)))


@by_name
def test_jit_matches_no_jit(case, base_params):
  adapters = trained(case, base_params)
  for fn in (sp.peft.merge, sp.peft.unmerge):
    chex.assert_trees_all_close(jax.jit(fn)(base_params, adapters), fn(base_params, adapters), atol=1e-6, rtol=1e-6)


@by_name
def test_vmap_over_stacked_adapters_equals_loop(case, block, base_params, inputs):
  # Members share their constants (positions, masks are static data) and differ in trained values.
  base = make_adapters(case, base_params)
  stack = [perturb(base, jax.random.key(s), case.scale) for s in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stack)

  def forward(adapters):
    return block.apply({"params": sp.peft.merge(base_params, adapters)}, inputs)

  batched = jax.vmap(forward)(stacked)
  looped = jnp.stack([forward(a) for a in stack])
  np.testing.assert_allclose(batched, looped, atol=1e-5, rtol=1e-5)


@by_name
def test_save_load_round_trip_is_exact(case, base_params, tmp_path):
  adapters = trained(case, base_params)
  sp.peft.save_adapters(tmp_path / "ckpt", adapters)
  loaded = sp.peft.load_adapters(tmp_path / "ckpt", base_params)
  assert set(loaded) == set(adapters)
  for path in adapters:
    assert loaded[path].method == adapters[path].method
    assert (loaded[path].shape, loaded[path].dtype, loaded[path].in_axes) == (
        adapters[path].shape, adapters[path].dtype, adapters[path].in_axes)
  chex.assert_trees_all_equal(loaded, adapters)
  chex.assert_trees_all_equal(sp.peft.merge(base_params, loaded), sp.peft.merge(base_params, adapters))


@by_name
def test_same_key_same_adapter(case, base_params):
  chex.assert_trees_all_equal(make_adapters(case, base_params), make_adapters(case, base_params))
  other = make_adapters(case, base_params, jax.random.key(8))
  a0 = make_adapters(case, base_params)["mlp_in/kernel"]
  # A different key changes the adapter: its random init, or (zero-init sparse methods) its positions.
  arrays = lambda adapter: jax.tree.leaves((adapter.params, adapter.frozen))
  assert any(np.any(np.asarray(o) != np.asarray(a)) for o, a in zip(arrays(other["mlp_in/kernel"]), arrays(a0)))


# -- low-precision bases: every method inits, trains, merges, unmerges and saves on bf16 and fp16 -----
LOW_PRECISION = pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])


def cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def cast_adapters(adapters, dtype):
  """The adapters with floating trainable arrays cast to ``dtype``, recorded for a ``dtype`` weight."""
  return {p: sp.peft.Adapter(cast(a.params, dtype), a.frozen, a.method, a.shape, jnp.dtype(dtype).name, a.in_axes)
          for p, a in adapters.items()}


@by_name
@LOW_PRECISION
def test_low_precision_identity_at_init(case, dtype, block, base_params, inputs):
  params = cast(base_params, dtype)
  adapters = make_adapters(case, params)
  assert all(a.dtype == jnp.dtype(dtype).name for a in adapters.values())
  merged = sp.peft.merge(params, adapters)
  assert jax.tree.map(lambda x: x.dtype, merged) == jax.tree.map(lambda x: x.dtype, params)
  chex.assert_trees_all_equal(merged, params)


@by_name
@LOW_PRECISION
def test_low_precision_merge_matches_float32_and_unmerges(case, dtype, base_params):
  params = cast(base_params, dtype)
  adapters = trained(case, params)
  merged = sp.peft.merge(params, adapters)  # safe: raises on any NaN/inf.
  # The same adapters and base in float32, merged there and rounded once: the low-precision merge
  # (computed in float32 and cast back) may differ from it by the final rounding only.
  reference = cast(sp.peft.merge(cast(params, jnp.float32), cast_adapters(adapters, jnp.float32)), dtype)
  eps = float(jnp.finfo(dtype).eps)
  for path in adapters:
    got = np.asarray(sp.peft.leaf_paths(merged)[path], np.float32)
    want = np.asarray(sp.peft.leaf_paths(reference)[path], np.float32)
    np.testing.assert_allclose(got, want, rtol=2 * eps, atol=2 * eps * np.abs(want).max(), err_msg=path)
  restored = sp.peft.unmerge(merged, adapters)
  for path in adapters:
    base = np.asarray(sp.peft.leaf_paths(params)[path], np.float32)
    np.testing.assert_allclose(np.asarray(sp.peft.leaf_paths(restored)[path], np.float32), base,
                               atol=8 * eps * np.abs(base).max(), err_msg=path)


@by_name
@LOW_PRECISION
def test_low_precision_training_reduces_the_loss(case, dtype, block, base_params, inputs):
  params = cast(base_params, dtype)
  x = inputs.astype(dtype)
  target = block.apply({"params": base_params}, inputs) + 0.5
  adapters = make_adapters(case, params)
  trainable, rest = sp.peft.partition(adapters)

  def loss(trainable):
    merged = sp.peft.merge(params, sp.peft.combine(trainable, rest))
    return jnp.mean(jnp.square(block.apply({"params": merged}, x).astype(jnp.float32) - target))

  # Adam's default eps=1e-8 is 0 in float16 (updates become inf where a gradient is 0); 1e-4 is not.
  tx = optax.adam(2e-3, eps=1e-4)
  opt_state = tx.init(trainable)
  step = jax.jit(lambda t, s: (lambda v, g: (v, g, *tx.update(g, s, t)))(*jax.value_and_grad(loss)(t)))
  losses = []
  for _ in range(8):
    value, grads, updates, opt_state = step(trainable, opt_state)
    chex.assert_tree_all_finite(grads)
    trainable = optax.apply_updates(trainable, updates)
    losses.append(float(value))
  assert all(np.isfinite(losses)) and losses[-1] < 0.99 * losses[0], losses
  assert jax.tree.map(lambda x: x.dtype, trainable) == jax.tree.map(lambda x: x.dtype, sp.peft.partition(adapters)[0])
  chex.assert_tree_all_finite(sp.peft.merge(params, sp.peft.combine(trainable, rest), safe=False))


@by_name
@LOW_PRECISION
def test_low_precision_save_load_round_trip(case, dtype, base_params, tmp_path):
  params = cast(base_params, dtype)
  adapters = trained(case, params)
  sp.peft.save_adapters(tmp_path / "ckpt", adapters)
  loaded = sp.peft.load_adapters(tmp_path / "ckpt", params)
  chex.assert_trees_all_equal(loaded, adapters)
  assert all(loaded[p].dtype == jnp.dtype(dtype).name for p in adapters)
