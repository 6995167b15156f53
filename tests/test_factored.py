"""sp.peft.factored: a Linen model run with factored adapters equals the merged model."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp
from adapter_cases import CASES
from test_adapter_matrix import IN_AXES, TARGETS, trained

by_name = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def _relative_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.max(jnp.abs(y))) + 1e-12
    assert float(jnp.max(jnp.abs(x - y))) <= rtol * scale


@pytest.mark.slow
@by_name
def test_factored_equals_merged_in_value_and_gradient(case, block, base_params, inputs):
  adapters = trained(case, base_params)
  trainable, frozen = sp.peft.partition(adapters)

  def merged_loss(t):
    return jnp.sum(jnp.square(block.apply({"params": sp.peft.merge(base_params, sp.peft.combine(t, frozen))}, inputs)))

  def factored_loss(t):
    return jnp.sum(jnp.square(sp.peft.apply_factored(block, base_params, sp.peft.combine(t, frozen), inputs)))

  value, grads = jax.value_and_grad(merged_loss)(trainable)
  fvalue, fgrads = jax.jit(jax.value_and_grad(factored_loss))(trainable)
  with sp.peft.factored(adapters):
    out = block.apply({"params": base_params}, inputs)
  # The adapters matter (so equality is informative) and the factored run used them.
  assert float(jnp.max(jnp.abs(out - block.apply({"params": base_params}, inputs)))) > 1e-3
  np.testing.assert_allclose(float(fvalue), float(value), rtol=1e-5)
  _relative_close(fgrads, grads, rtol=1e-4)


def test_layers_without_adapter_and_prefixed_paths(block, base_params, inputs):
  adapters = sp.peft.init_adapters(jax.random.key(0), {"params": base_params}, sp.peft.LoRA(2), r"mlp_in/kernel$")
  assert set(adapters) == {"params/mlp_in/kernel"}
  adapters = trained(CASES[0], base_params)
  adapters = {"params/" + k: v for k, v in adapters.items()}
  with sp.peft.factored(adapters):
    y = block.apply({"params": base_params}, inputs)
  merged = sp.peft.merge({"params": base_params}, adapters)
  chex.assert_trees_all_close(y, block.apply(merged, inputs), atol=1e-5, rtol=1e-5)


def test_mismatched_in_axes_is_an_error(block, base_params, inputs):
  # The attention output kernel (heads, head_dim, embed) contracts two axes; build it with in_axes=1.
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params, sp.peft.LoRA(2), r"attention/out/kernel$",
                                   in_axes=1)
  with pytest.raises(ValueError, match=r"input axes \(0,\).*the layer .attention/out. \(DenseGeneral\) contracts input axes \(0, 1\).*in_axes=2"):
    sp.peft.apply_factored(block, base_params, adapters, inputs)


def test_rejects_non_adapters():
  with pytest.raises(TypeError, match="`adapters` must be"):
    with sp.peft.factored({"a": jnp.ones(3)}):
      pass


def test_dense_general_two_axes(inputs):
  model = nn.DenseGeneral(features=7, axis=(-2, -1))
  x = inputs.reshape(3, 5, 4, 4)
  params = model.init(jax.random.key(0), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel", in_axes=2)
  trainable, frozen = sp.peft.partition(adapters)
  trainable = jax.tree.map(lambda a: a + 0.1, trainable)
  adapters = sp.peft.combine(trainable, frozen)
  y = sp.peft.apply_factored(model, params, adapters, x)
  chex.assert_trees_all_close(y, model.apply({"params": sp.peft.merge(params, adapters)}, x), atol=1e-5, rtol=1e-5)
  assert float(jnp.max(jnp.abs(y - model.apply({"params": params}, x)))) > 1e-2  # the root layer was adapted
