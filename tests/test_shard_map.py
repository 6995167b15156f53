"""The runtime inside a user's ``shard_map``: every method trains there as it does unsharded.

Inside ``shard_map`` each array carries the manual axes it varies along; a custom derivative's
cotangent must vary exactly like its primal (the base kernel and the adapters are the same on every
device, the tokens differ), so the adapters' gradient is the sum over the devices, as for any
replicated parameter.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import spectral_peft as sp
from adapter_cases import CASES


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="out")(nn.gelu(nn.Dense(12, name="hidden")(x)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_runtime_inside_shard_map_equals_the_unsharded_gradient(case):
  model = _MLP()
  # 32 tokens: more than a kernel's inputs, so the merged products (not the few-token ones) run.
  x = jax.random.normal(jax.random.key(0), (32, 8))
  params = model.init(jax.random.key(1), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(2), params, case.method, "kernel")
  adapters = jax.tree.map(lambda a: a + case.scale * jax.random.normal(jax.random.key(3), a.shape, a.dtype)
                          if jnp.issubdtype(a.dtype, jnp.inexact) else a, adapters)
  trainable, rest = sp.peft.partition(adapters)

  def loss(trainable, params, x):
    return jnp.sum(sp.peft.apply_adapters(model, params, sp.peft.combine(trainable, rest), x) ** 2)

  want = jax.grad(loss)(trainable, params, x)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  per_device = jax.shard_map(lambda t, p, x: jax.lax.psum(jax.grad(loss)(t, p, x), "data"), mesh=mesh,
                             in_specs=(P(), P(), P("data")), out_specs=P())
  got = jax.jit(per_device)(trainable, params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(np.max(np.abs(w))) or 1.0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale, err_msg=case.name)
