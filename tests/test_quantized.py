"""Quantized bases (QLoRA for every method): values and gradients equal the dequantized-base reference.

References: the symmetric quantizer written out in NumPy, and ``sp.peft.merge`` of the adapters onto
the dequantized base (the plain dense formula ``dequantize(Q) + Delta W``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spectral_peft as sp
from adapter_cases import CASES

X = jax.random.normal(jax.random.key(0), (3, 5, 16))
TARGETS = r"(Dense_\d|Conv_0)/kernel"
EPS = np.finfo(np.float32).eps


class Net(nn.Module):
  """A factored-path layer (Dense) and a rebuilt-path layer (Conv)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(24, (3,))(nn.Dense(24)(x))
    return nn.Dense(16)(nn.gelu(h))


def _in_axes(path, shape):
  return 2 if len(shape) == 3 else None


def _numpy_quantize(w, bits, group):
  top = 2 ** (bits - 1) - 1
  g = w.reshape((w.shape[0] // group, group) + w.shape[1:]).astype(np.float64)
  scale = np.max(np.abs(g), axis=1, keepdims=True) / top
  scale = np.where(scale > 0, scale, 1.0)
  return np.clip(np.round(g / scale), -top, top), scale


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 4)])
def test_quantizer_matches_numpy(bits, group):
  w = np.asarray(jax.random.normal(jax.random.key(1), (16, 6)), np.float32)
  q = sp.peft.quantize({"w": w}, bits=bits, group_size=group)["w"]
  values, scale = _numpy_quantize(w, bits, group or 16)
  np.testing.assert_array_equal(np.asarray(q.values.astype(jnp.int32)).reshape(values.shape), values)
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=4 * EPS)
  err = np.abs(np.asarray(q.dequantize()) - w)
  assert np.all(err <= (np.broadcast_to(scale, values.shape).reshape(w.shape) / 2) * (1 + 8 * EPS) + 8 * EPS)
  assert q.values.dtype == (jnp.int8 if bits == 8 else jnp.int4)


@pytest.fixture(scope="module")
def base():
  model = Net()
  return model, model.init(jax.random.key(1), X)["params"]


def _trained(params, case, targets=TARGETS):
  adapters = sp.peft.init_adapters(jax.random.key(2), params, case.method, targets, in_axes=_in_axes)
  leaves, treedef = jax.tree.flatten({p: a.params for p, a in adapters.items()})
  keys = jax.random.split(jax.random.key(3), len(leaves))
  noisy = jax.tree.unflatten(treedef, [v + case.scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)])
  return {p: a.replace(params=noisy[p]) for p, a in adapters.items()}


# Every method over int4; int8 on one low-rank and one sparse method (the product code is the same).
LINEN_CASES = [(c, 4) for c in CASES] + [(c, 8) for c in CASES if c.name in ("lora", "waveft")]


@pytest.mark.slow
@pytest.mark.parametrize("case,bits", LINEN_CASES, ids=[f"{c.name}-int{b}" for c, b in LINEN_CASES])
def test_linen_every_method_over_a_quantized_base(base, case, bits):
  model, params = base
  q = sp.peft.quantize(params, bits=bits)
  dense = sp.peft.dequantize(q)
  adapters = _trained(q, case)
  loss = lambda a: jnp.sum(jnp.sin(sp.peft.apply_adapters(model, q, a, X)))
  ref = lambda a: jnp.sum(jnp.sin(model.apply({"params": sp.peft.merge(dense, a)}, X)))
  value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
  ref_value, ref_grads = jax.value_and_grad(ref)(adapters)
  np.testing.assert_allclose(value, ref_value, rtol=0, atol=64 * 24 * EPS * max(1.0, abs(float(ref_value))))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    scale = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * 24 * 16 * EPS * scale)


def test_linen_unadapted_quantized_layers_run_dequantized(base):
  model, params = base
  q = sp.peft.quantize(params, bits=4)
  adapters = sp.peft.init_adapters(jax.random.key(2), q, sp.peft.LoRA(2), "Dense_0/kernel")
  y = sp.peft.apply_adapters(model, q, adapters, X)
  want = model.apply({"params": sp.peft.dequantize(q)}, X)
  np.testing.assert_allclose(y, want, rtol=0, atol=64 * 24 * EPS * max(1.0, float(jnp.max(jnp.abs(want)))))


def test_merge_refuses_then_merges_on_request(base):
  model, params = base
  q = sp.peft.quantize(params, bits=4)
  adapters = _trained(q, CASES[0])
  with pytest.raises(ValueError, match=r"quantized \(4-bit\).*merge_quantized"):
    sp.peft.merge(q, adapters)
  merged, errors = sp.peft.merge_quantized(q, adapters)
  expected = sp.peft.merge(sp.peft.dequantize(q), adapters)
  for path in adapters:
    np.testing.assert_allclose(sp.peft.leaf_paths(merged)[path], sp.peft.leaf_paths(expected)[path], rtol=0, atol=1e-6)
  assert set(errors) == set(adapters) and all(e == 0.0 for e in errors.values())
  again, errors = sp.peft.merge_quantized(q, adapters, requantize=True)
  for path in adapters:
    quantized = sp.peft.leaf_paths(again)[path]
    assert isinstance(quantized, sp.peft.QuantizedArray) and quantized.bits == 4
    exact = np.asarray(sp.peft.leaf_paths(expected)[path])
    measured = float(np.max(np.abs(np.asarray(quantized.dequantize()) - exact)) / np.max(np.abs(exact)))
    assert 0 < errors[path] <= 0.5 / 7 * (1 + 1e-5)
    np.testing.assert_allclose(errors[path], measured, rtol=1e-5)


def test_quantize_errors():
  w = jnp.ones((6, 4))
  with pytest.raises(ValueError, match="`bits` must be 8 or 4"):
    sp.peft.quantize({"w": w}, bits=3)
  with pytest.raises(ValueError, match=r"'w'.*group_size.*divisor of the first axis \(6\)"):
    sp.peft.quantize({"w": w}, bits=4, group_size=4, targets="w")
  with pytest.raises(ValueError, match=r"'w'.*NaN"):
    sp.peft.quantize({"w": w.at[0, 0].set(jnp.nan)}, bits=4)
  with pytest.raises(ValueError, match=r"no weight to quantize.*2 or more axes.*shapes \(3,\)"):
    sp.peft.quantize({"b": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"no weight to quantize.*`group_size=4` divides.*shapes \(6, 4\)"):
    sp.peft.quantize({"w": w}, bits=4, group_size=4)
  with pytest.raises(ValueError, match="selects no weight"):
    sp.peft.quantize({"w": w}, targets="nothing")
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match=r"`group_size` must be a positive int"):
      sp.peft.quantize({"w": w}, bits=4, group_size=bad)
  q = sp.peft.quantize({"w": w}, bits=4)["w"]
  with pytest.raises(ValueError, match="needs a scale"):
    sp.peft.QuantizedArray(q.values, None, 4, None, "float32").dequantize()
  with pytest.raises(ValueError, match="needs a scale"):
    sp.peft.QuantizedArray(q.values, jnp.ones((4, 1, 4)), 4, None, "float32").dequantize()


class NNXNet(nnx.Module):

  def __init__(self):
    self.a = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
    self.c = nnx.Conv(24, 24, (3,), rngs=nnx.Rngs(1))
    self.b = nnx.Linear(24, 16, rngs=nnx.Rngs(2))

  def __call__(self, x):
    return self.b(nnx.gelu(self.c(self.a(x))))


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[7]], ids=["lora", "dora", "waveft", "fourierft"])
def test_nnx_trains_adapters_only_over_an_int4_base(case):
  model = NNXNet()
  sp.nnx.quantize(model, bits=4, group_size=8)
  dense = sp.peft.dequantize(nnx.state(model, nnx.Param))
  sp.nnx.adapt(model, case.method, "kernel", key=jax.random.key(2), in_axes=_in_axes)
  trained = _trained(sp.nnx.base_params(model), case, "kernel")
  sp.nnx.load_into(model, trained)
  reference = NNXNet()
  nnx.update(reference, sp.peft.merge(dense, trained))
  y = nnx.jit(lambda m, x: m(x))(model, X)
  want = reference(X)
  np.testing.assert_allclose(y, want, rtol=0, atol=64 * 24 * EPS * max(1.0, float(jnp.max(jnp.abs(want)))))

  # Gradients: ours through the quantized layers, the reference through the merged dequantized model.
  graphdef, _ = nnx.split(NNXNet())
  loss_ref = lambda ads: jnp.sum(jnp.sin(nnx.merge(graphdef, sp.peft.merge(dense, ads))(X)))
  ref_grads = jax.grad(loss_ref)(trained)
  grads = sp.peft.leaf_paths(nnx.grad(lambda m: jnp.sum(jnp.sin(m(X))), argnums=nnx.DiffState(0, nnx.LoRAParam))(model))
  for path, adapter_grads in ref_grads.items():
    prefix, name = path.rsplit("/", 1)
    for i, want in enumerate(jax.tree.leaves(adapter_grads.params)):
      got = grads[f"{prefix}/{name}_adapter_p{i}"]
      np.testing.assert_allclose(got, want, rtol=0, atol=64 * 24 * 16 * EPS * max(1.0, float(jnp.max(jnp.abs(want)))))

  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  base_after = jax.tree.map(np.asarray, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  jax.tree.map(np.testing.assert_array_equal, base_before, base_after)
  assert isinstance(model.a.kernel.get_value(), sp.peft.QuantizedArray)
  with pytest.raises(ValueError, match="quantized='dequantize'"):
    sp.nnx.merge_adapters(model)
  trained = sp.nnx.adapters_of(model)
  sp.nnx.merge_adapters(model, quantized="dequantize")
  assert not isinstance(model.a.kernel.get_value(), sp.peft.QuantizedArray)
  np.testing.assert_allclose(model.a.kernel.get_value(), sp.peft.merge(dense, trained)["a"]["kernel"].get_value(),
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", [sp.peft.WaveFT, sp.peft.SHiRA])
def test_factored_layers_dequantize_a_quantized_bias(kind):
  """DenseGeneral's (heads, head_dim) bias is quantized with the kernels; the merged product reads it dequantized."""
  model = nn.SelfAttention(num_heads=2, qkv_features=16)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  quantized = sp.peft.quantize(model.init(jax.random.key(1), x)["params"], bits=4)
  assert isinstance(quantized["query"]["bias"], sp.peft.QuantizedArray)

  def adapters(path):
    made = sp.peft.init_adapters(jax.random.key(2), quantized, kind(64, path=path), r"(query|value)/kernel", in_axes=1)
    return jax.tree.map(lambda a: a + 0.05, made)

  got = sp.peft.apply_adapters(model, quantized, adapters("auto"), x)
  want = sp.peft.apply_adapters(model, quantized, adapters("dense"), x)  # the rebuilt path
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
