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


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("batch, m, n", [
    ((2,), 7, 30),       # fewer rows than m and n: factored forward and input gradient
    ((3, 5), 7, 4),      # more rows than m and n: merged forward and input gradient
    ((20,), 50, 3),      # factored forward, merged input gradient
    ((2, 3), 4, 40),     # merged forward, factored input gradient
])
@pytest.mark.parametrize("scaled", [False, True], ids=["lora", "dora-factor"])
def test_low_rank_product_equals_the_dense_formula_in_every_regime(batch, m, n, jit, scaled):
  """LoRA's product (and DoRA's, with a column factor) is merged or factored by the shapes; it equals
  (x (w0 + a b)) * factor, and its gradients (every argument), forward-mode derivatives and Hessian
  equal those of the dense formula (DoRA's merged route: value and gradients)."""
  from spectral_peft.peft._methods.lowrank import low_rank_product

  keys = jax.random.split(jax.random.key(0), 6)
  x, w0 = jax.random.normal(keys[0], (*batch, m)), jax.random.normal(keys[1], (m, n))
  a, b = jax.random.normal(keys[2], (m, 3)), jax.random.normal(keys[3], (3, n))
  cotangent = jax.random.normal(keys[4], (*batch, n))
  args = (x, w0, a, b) + ((1.0 + 0.3 * jax.random.normal(keys[5], (n,)),) if scaled else ())
  value = lambda x, w0, a, b, factor=1.0: (x @ (w0 + a @ b)) * factor  # noqa: E731
  dense = lambda *t: jnp.sum(jnp.sin(value(*t)) * cotangent)  # noqa: E731
  ours = lambda *t: jnp.sum(jnp.sin(low_rank_product(*t)) * cotangent)  # noqa: E731
  wrap = jax.jit if jit else (lambda f: f)
  want_value = value(*args)
  np.testing.assert_allclose(wrap(low_rank_product)(*args), want_value, rtol=1e-5,
                             atol=1e-6 * np.sqrt(m * 3) * float(np.abs(want_value).max()))
  argnums = tuple(range(len(args)))
  got = wrap(jax.grad(ours, argnums=argnums))(*args)
  want = jax.grad(dense, argnums=argnums)(*args)
  terms = int(np.prod(batch)) * max(m, n)  # the most terms any gradient entry sums
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.sqrt(terms) * float(np.abs(w).max()) + 1e-7)
  if scaled and np.prod(batch) > m:
    return  # DoRA's merged route has a reverse rule only (it keeps no output for the factor's gradient).
  # Forward mode (a JVP in every argument) and forward-over-reverse (a Hessian in x), as in PDE losses.
  tangents = tuple(jax.random.normal(k, t.shape) for k, t in zip(jax.random.split(keys[4], len(args)), args))
  jvp = wrap(lambda *t: jax.jvp(ours, t, tangents))(*args)
  jvp_dense = jax.jvp(dense, args, tangents)
  # The scalars sum batch x n summands of m terms each, bounded by |cotangent| times the value and its tangent.
  value_tangent = jax.jvp(value, args, tangents)
  summands = [np.abs(cotangent * v).max() for v in value_tangent]
  for g, w, size in zip(jvp, jvp_dense, summands):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.sqrt(np.prod(batch) * m * n) * float(size) + 1e-7)
  one = lambda row, f: f(row, *args[1:])  # noqa: E731
  hessian = wrap(jax.hessian(lambda r: one(r, ours)))(x.reshape(-1, m)[0])
  hessian_dense = jax.hessian(lambda r: one(r, dense))(x.reshape(-1, m)[0])
  np.testing.assert_allclose(hessian, hessian_dense, rtol=0, atol=1e-5 * m * float(np.abs(hessian_dense).max()))


def test_dora_merged_route_needs_no_more_training_memory_than_lora():
  """With more tokens than inputs (the transient merged route), DoRA's magnitude gradient is taken from
  x^T g, so its step keeps no (tokens, n) pre-scale output: XLA's compiled temp memory of the step
  (input and adapter gradients) is at most LoRA's at the same shapes (it was LoRA's plus that output)."""
  x = jax.random.normal(jax.random.key(0), (4, 128, 64))
  w0 = jax.random.normal(jax.random.key(1), (64, 256))
  cotangent = jax.random.normal(jax.random.key(2), (4, 128, 256))
  temp = {}
  for method in (sp.peft.LoRA(4), sp.peft.DoRA(4)):
    params = method.init(jax.random.key(3), w0)
    loss = lambda p, x, method=method: jnp.sum(jnp.tanh(method.apply(p, jnp.tanh(x), w0)) * cotangent)  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    temp[type(method).__name__] = compiled.memory_analysis().temp_size_in_bytes
  output_bytes = cotangent.size * 4
  assert temp["DoRA"] <= temp["LoRA"], (temp, output_bytes)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("batch, m, n", [((2, 3), 7, 5), ((4,), 16, 40)])
def test_sine_merged_product_equals_the_dense_formula_in_value_gradient_and_vmap(batch, m, n, jit):
  """Sine LoRA's runtime product x (w0 + c sin(omega a b)) and its reverse rule (every argument) equal the
  dense formula's; per-example gradients under vmap too."""
  from spectral_peft.peft._methods.lowrank import sine_merged_product

  keys = jax.random.split(jax.random.key(1), 5)
  x, w0 = jax.random.normal(keys[0], (*batch, m)), jax.random.normal(keys[1], (m, n))
  a, b = 0.3 * jax.random.normal(keys[2], (m, 3)), 0.3 * jax.random.normal(keys[3], (3, n))
  cotangent = jax.random.normal(keys[4], (*batch, n))
  omega, c = 7.0, 0.25
  value = lambda x, w0, a, b: x @ (w0 + c * jnp.sin(omega * a @ b))  # noqa: E731
  dense = lambda *t: jnp.sum(jnp.tanh(value(*t)) * cotangent)  # noqa: E731
  ours = lambda *t: jnp.sum(jnp.tanh(sine_merged_product(*t, omega, c)) * cotangent)  # noqa: E731
  wrap = jax.jit if jit else (lambda f: f)
  want_value = value(x, w0, a, b)
  scale = float(np.abs(want_value).max())
  np.testing.assert_allclose(wrap(lambda *t: sine_merged_product(*t, omega, c))(x, w0, a, b), want_value, rtol=0,
                             atol=1e-6 * np.sqrt(m * 3) * omega * scale)
  got = wrap(jax.grad(ours, argnums=(0, 1, 2, 3)))(x, w0, a, b)
  want = jax.grad(dense, argnums=(0, 1, 2, 3))(x, w0, a, b)
  terms = int(np.prod(batch)) * max(m, n)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.sqrt(terms) * omega * float(np.abs(w).max()) + 1e-7)
  # Per-example gradients in a and b: vmap over the leading batch axis of x and the cotangent.
  one = lambda f: (lambda xi, ci, a, b: jnp.sum(jnp.tanh(f(xi, w0, a, b)) * ci))  # noqa: E731
  per_example = lambda f: jax.vmap(jax.grad(one(f), argnums=(2, 3)), in_axes=(0, 0, None, None))  # noqa: E731
  got = wrap(per_example(lambda *t: sine_merged_product(*t, omega, c)))(x, cotangent, a, b)
  want = per_example(value)(x, cotangent, a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.sqrt(terms) * omega * float(np.abs(w).max()) + 1e-7)
