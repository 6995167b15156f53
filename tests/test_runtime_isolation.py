"""One non-finite input element stays in its own example through the adapter runtime, as in the merged model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp

METHODS = [sp.peft.LoRA(2), sp.peft.DoRA(2), sp.peft.SineLoRA(2, omega=10.0), sp.peft.SHiRA(5), sp.peft.WaveFT(6),
           sp.peft.FourierFT(5), sp.peft.LFMA(0.5, 1.0)]


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.Conv(4, (3,))(x))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_linen_runtime_keeps_a_non_finite_element_in_its_example(method):
  model = _Conv()
  x = jax.random.normal(jax.random.key(0), (3, 8, 2))
  params = model.init(jax.random.key(1), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(2), params, method, "kernel",
                                   in_axes=lambda path, shape: len(shape) - 1)
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)  # Non-zero updates: the rebuild matters.
  x_bad = x.at[0, 0, 0].set(jnp.inf)
  merged = model.apply({"params": sp.peft.merge(params, adapters)}, x_bad)
  run = jax.jit(lambda ad, x: sp.peft.apply_adapters(model, params, ad, x))(adapters, x_bad)
  assert np.all(np.isfinite(np.asarray(merged[1:])))
  assert np.all(np.isfinite(np.asarray(run[1:])))
  np.testing.assert_allclose(run[1:], merged[1:], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(merged[1:]))))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_nnx_runtime_keeps_a_non_finite_element_in_its_example(method):
  model = nnx.Sequential(nnx.Conv(2, 4, (3,), rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(1)))
  sp.nnx.adapt(model, method, "kernel", key=jax.random.key(2), in_axes=lambda path, shape: len(shape) - 1)
  x_bad = jax.random.normal(jax.random.key(0), (3, 8, 2)).at[0, 0, 0].set(jnp.nan)
  out = nnx.jit(lambda m, x: m(x))(model, x_bad)
  assert np.all(np.isfinite(np.asarray(out[1:])))


def _dense_setup():
  model = nn.Dense(8)
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  adapters = jax.tree.map(lambda a: a + 0.1,
                          sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel"))
  return model, params, adapters


def test_factored_context_adapts_the_root_module():
  model, params, adapters = _dense_setup()
  x = jnp.ones((3, 4))
  with sp.peft.factored(adapters):
    got = model.apply({"params": params}, x)
  np.testing.assert_allclose(got, model.apply({"params": sp.peft.merge(params, adapters)}, x), rtol=1e-6, atol=1e-6)


def test_factored_context_refuses_adapters_a_jit_trace_would_bake_in():
  model, params, adapters = _dense_setup()
  x = jnp.ones((3, 4))
  run = jax.jit(lambda x: model.apply({"params": params}, x))
  with pytest.raises(ValueError, match="entered outside this jit trace"):
    with sp.peft.factored(adapters):
      run(x)

  @jax.jit
  def inside(adapters, x):  # The supported form: the context inside, the adapters as arguments.
    with sp.peft.factored(adapters):
      return model.apply({"params": params}, x)

  other = jax.tree.map(lambda a: 2 * a, adapters)
  for ad in (adapters, other):
    np.testing.assert_allclose(inside(ad, x), model.apply({"params": sp.peft.merge(params, ad)}, x),
                               rtol=1e-6, atol=1e-6)
