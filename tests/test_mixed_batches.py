"""Mixed-adapter batches: every example sees its own adapter of an AdapterBank (Linen and NNX).

The reference is the plain per-example computation: example ``b`` through the layer at the merged
weight ``W0 + Delta W_{index[b]}`` (``sp.peft.merge`` of that adapter alone), or at ``W0`` for -1.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp
from adapter_cases import CASES, StringEinsum

K, IN, OUT = 3, 16, 12
INDEX = np.array([0, 2, -1, 1, 0])
CASE_IDS = [c.name for c in CASES]


def _perturbed(adapters, key, scale):
  leaves, treedef = jax.tree.flatten({p: a.params for p, a in adapters.items()})
  keys = jax.random.split(key, len(leaves))
  new = jax.tree.unflatten(treedef, [v + scale * jax.random.normal(k, v.shape, v.dtype) for v, k in zip(leaves, keys)])
  return {p: a.replace(params=new[p]) for p, a in adapters.items()}


def _bank_terms(params, case, target="kernel"):
  return [_perturbed(sp.peft.init_adapters(jax.random.key(10 + k), params, case.method, target),
                     jax.random.key(20 + k), case.scale) for k in range(K)]


def _close(actual, expected, terms):
  """Float32 agreement scaled by the values' magnitude and the summed terms per entry."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=8 * terms * np.finfo(np.float32).eps * scale)


@pytest.fixture(scope="module")
def dense():
  model = nn.Dense(OUT)
  x = jax.random.normal(jax.random.key(0), (len(INDEX), 4, IN))
  return model, model.init(jax.random.key(1), x)["params"], x


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_linen_values_and_gradients_equal_per_example_reference(dense, case):
  model, params, x = dense
  terms = _bank_terms(params, case)
  bank = sp.peft.stack_adapters(terms)

  def loss(bank):
    return jnp.sum(jnp.sin(sp.peft.apply_adapters(model, params, bank, x, adapter_index=jnp.asarray(INDEX))))

  def reference(terms):
    ys = [model.apply({"params": params if i < 0 else sp.peft.merge(params, terms[i])}, x[b])
          for b, i in enumerate(INDEX)]
    return jnp.stack(ys)

  y = jax.jit(lambda b: sp.peft.apply_adapters(model, params, b, x, adapter_index=jnp.asarray(INDEX)))(bank)
  _close(y, reference(terms), IN)
  grads = jax.jit(jax.grad(loss))(bank)["kernel"].params
  ref_grads = jax.grad(lambda ts: jnp.sum(jnp.sin(reference(ts))))(terms)
  for k in range(K):
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda g: g[k], grads)), jax.tree.leaves(ref_grads[k]["kernel"].params)):
      _close(got, want, IN * OUT * x.shape[1])


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=["lora", "dora", "waveft"])
def test_nnx_values_under_jit_equal_per_example_reference(case):
  layer = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  terms = _bank_terms(params, case)
  x = jax.random.normal(jax.random.key(0), (len(INDEX), IN))
  expected = []
  for b, i in enumerate(INDEX):
    plain = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
    if i >= 0:
      nnx.update(plain, sp.peft.merge(params, terms[i]))
    expected.append(plain(x[b]))
  sp.nnx.attach(layer, sp.peft.stack_adapters(terms))

  @nnx.jit
  def run(model, x, index):
    with sp.nnx.adapter_index(index):
      return model(x)

  _close(run(layer, x, jnp.asarray(INDEX)), jnp.stack(expected), IN)
  # Another index, same compiled function: the index is an argument, not a constant.
  _close(run(layer, x, jnp.full((len(INDEX),), -1)), jnp.stack([nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))(x)]).reshape(x.shape[0], OUT), IN)


def test_single_adapter_bank_equals_the_adapter(dense):
  model, params, x = dense
  (term,) = _bank_terms(params, CASES[0])[:1]
  bank = sp.peft.stack_adapters([term])
  y = sp.peft.apply_adapters(model, params, bank, x, adapter_index=jnp.zeros(len(INDEX), jnp.int32))
  _close(y, sp.peft.apply_adapters(model, params, term, x), IN)
  assert sp.peft.unstack_adapters(bank, 0)["kernel"].method == term["kernel"].method
  np.testing.assert_array_equal(sp.peft.unstack_adapters(bank, 0)["kernel"].params["a"], term["kernel"].params["a"])


def test_bank_from_init_adapters_is_identity(dense):
  model, params, x = dense
  bank = sp.peft.init_adapters(jax.random.key(3), params, sp.peft.AdapterBank(sp.peft.SHiRA(n_params=10), 4), "kernel")
  assert {v.shape[0] for v in jax.tree.leaves(bank["kernel"].params)} == {4}
  y = sp.peft.apply_adapters(model, params, bank, x, adapter_index=jnp.asarray(INDEX))
  _close(y, model.apply({"params": params}, x), IN)


def test_errors(dense):
  model, params, x = dense
  terms = _bank_terms(params, CASES[0])
  bank = sp.peft.stack_adapters(terms)
  with pytest.raises(ValueError, match=r"adapter_index.*\[-1, 2\].*\[0, 3\]"):
    sp.peft.apply_adapters(model, params, bank, x, adapter_index=jnp.array([0, 3, 0, 0, 0]))
  with pytest.raises(ValueError, match="pass `adapter_index="):
    sp.peft.apply_adapters(model, params, bank, x)
  with pytest.raises(ValueError, match="no adapter is a bank"):
    sp.peft.apply_adapters(model, params, terms[0], x, adapter_index=jnp.asarray(INDEX))
  with pytest.raises(ValueError, match="one entry per example"):
    sp.peft.apply_adapters(model, params, bank, x, adapter_index=jnp.array([0, 1]))
  with pytest.raises(ValueError, match="1-D integer"):
    sp.peft.apply_adapters(model, params, bank, x, adapter_index=jnp.zeros((5,), jnp.float32))
  with pytest.raises(ValueError, match="no single update"):
    sp.peft.merge(params, bank)
  with pytest.raises(ValueError, match="differ"):
    sp.peft.stack_adapters([terms[0], _bank_terms(params, CASES[1])[0]])
  with pytest.raises(ValueError, match="k"):
    sp.peft.unstack_adapters(bank, K)


def test_traced_out_of_range_index_gives_nan_rows_only(dense):
  model, params, x = dense
  bank = sp.peft.stack_adapters(_bank_terms(params, CASES[0]))
  index = jnp.array([0, 7, -1, -2, 1])
  y = jax.jit(lambda i: sp.peft.apply_adapters(model, params, bank, x, adapter_index=i))(index)
  bad = np.array([False, True, False, True, False])
  assert np.all(np.isnan(np.asarray(y)[bad])) and np.all(np.isfinite(np.asarray(y)[~bad]))


def test_bank_on_a_conv_is_refused_naming_the_layer():
  model = nn.Conv(4, (3,))
  x = jnp.ones((2, 6, 3))
  params = model.init(jax.random.key(0), x)["params"]
  terms = [sp.peft.init_adapters(jax.random.key(k), params, sp.peft.LoRA(2), "kernel", in_axes=2) for k in range(2)]
  with pytest.raises(ValueError, match=r"'kernel'.*AdapterBank.*Conv"):
    sp.peft.apply_adapters(model, params, sp.peft.stack_adapters(terms), x, adapter_index=jnp.array([0, 1]))


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[5], CASES[2]], ids=["waveft", "sine_lora"])
def test_grouped_product_equals_the_per_example_reference(dense, case, monkeypatch):
  """Large batches group the examples by adapter (a ragged dot) instead of gathering their matrices."""
  from spectral_peft.peft._methods import bank as bank_module

  model, params, _ = dense
  x = jax.random.normal(jax.random.key(5), (11, 2, IN))  # 11 > 2 (K + 1) and no byte budget: grouped
  index = np.array([2, 0, -1, 1, 1, 0, 2, 2, -1, 0, 1])
  terms = _bank_terms(params, case)
  monkeypatch.setattr(bank_module, "GATHER_BYTES", 0)
  loss = lambda b: jnp.sum(jnp.sin(sp.peft.apply_adapters(model, params, b, x, adapter_index=jnp.asarray(index))))  # noqa: E731
  value, grads = jax.value_and_grad(loss)(sp.peft.stack_adapters(terms))

  def reference(terms):
    return sum(jnp.sum(jnp.sin(model.apply({"params": params if i < 0 else sp.peft.merge(params, terms[i])}, x[b])))
               for b, i in enumerate(index))

  ref_value, ref_grads = jax.value_and_grad(reference)(terms)
  _close(value, ref_value, IN * x.shape[0] * x.shape[1] * OUT)
  for k in range(K):
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda g: g[k], grads["kernel"].params)),
                         jax.tree.leaves(ref_grads[k]["kernel"].params)):
      _close(got, want, IN * OUT * x.shape[1])


HEADS, HEAD_DIM = 3, 4
EINSUM_LAYOUTS = {  # equation, kernel shape, input shape per example
    "query": ("BTD,DNH->BTNH", (IN, HEADS, HEAD_DIM), (4, IN)),  # Tunix Llama3's q_proj
    "gemma_q": ("BTD,NDH->BTNH", (HEADS, IN, HEAD_DIM), (4, IN)),  # Gemma3's q_einsum: input axis in the middle
    "output": ("BTNH,NHD->BTD", (HEADS, HEAD_DIM, OUT), (4, HEADS, HEAD_DIM)),  # an attention output
}


@pytest.mark.parametrize("layout", list(EINSUM_LAYOUTS))
@pytest.mark.parametrize("case", [CASES[0], CASES[6], CASES[7]], ids=["lora", "shira", "fourierft"])
def test_nnx_einsum_layers_take_mixed_batches_in_value_and_gradient(case, layout):
  equation, shape, example = EINSUM_LAYOUTS[layout]
  layer = StringEinsum(equation, shape, nnx.Rngs(0))
  sp.nnx.adapt(layer, case.method, "w", key=jax.random.key(3))  # the adapter's axes, read from the equation
  template = sp.nnx.adapters_of(layer)
  sp.nnx.detach_adapters(layer)
  terms = [_perturbed({p: a.replace(params=jax.tree.map(lambda v: v + 0.0, a.params)) for p, a in template.items()},
                      jax.random.key(20 + k), case.scale) for k in range(K)]
  sp.nnx.attach(layer, sp.peft.stack_adapters(terms))
  x = jax.random.normal(jax.random.key(0), (len(INDEX),) + example)

  def reference(terms):
    ys = []
    for b, i in enumerate(INDEX):
      plain = StringEinsum(equation, shape, nnx.Rngs(0))
      if i >= 0:
        nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), terms[i]))
      ys.append(plain(x[b:b + 1])[0])
    return jnp.stack(ys)

  @nnx.jit
  def loss(model, x, index):
    with sp.nnx.adapter_index(index):
      return jnp.sum(jnp.sin(model(x))), model(x)

  (value, y), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(
      layer, x, jnp.asarray(INDEX))
  contracted = IN if layout != "output" else HEADS * HEAD_DIM
  _close(y, reference(terms), contracted)
  ref_grads = jax.grad(lambda ts: jnp.sum(jnp.sin(reference(ts))))(terms)
  copy = nnx.clone(layer)
  nnx.update(copy, grads)
  got = sp.nnx.adapters_of(copy)["w"].params
  for k in range(K):
    for g, w in zip(jax.tree.leaves(jax.tree.map(lambda v: v[k], got)), jax.tree.leaves(ref_grads[k]["w"].params)):
      _close(g, w, contracted * int(np.prod(y.shape[1:])))


def test_linen_einsum_takes_mixed_batches():
  model = nn.Einsum((IN, HEADS, HEAD_DIM), "BTD,DNH->BTNH")
  x = jax.random.normal(jax.random.key(0), (len(INDEX), 4, IN))
  params = model.init(jax.random.key(1), x)["params"]
  terms = [_perturbed(sp.peft.init_adapters(jax.random.key(10 + k), params, CASES[0].method, "kernel", in_axes=1),
                      jax.random.key(20 + k), CASES[0].scale) for k in range(K)]
  y = jax.jit(lambda b: sp.peft.apply_adapters(model, params, b, x, adapter_index=jnp.asarray(INDEX)))(
      sp.peft.stack_adapters(terms))
  ref = jnp.stack([model.apply({"params": params if i < 0 else sp.peft.merge(params, terms[i])}, x[b:b + 1])[0]
                   for b, i in enumerate(INDEX)])
  _close(y, ref, IN)


def test_an_einsum_that_contracts_the_inputs_leading_axis_refuses_a_bank():
  """A bank reads the input's leading axis as the batch (as on Dense); ``DB,DN->BN`` contracts it."""
  layer = StringEinsum("DB,DN->BN", (IN, OUT), nnx.Rngs(0))
  sp.nnx.adapt(layer, CASES[0].method, "w", key=jax.random.key(3))
  template = sp.nnx.adapters_of(layer)
  sp.nnx.detach_adapters(layer)
  sp.nnx.attach(layer, sp.peft.stack_adapters([template, template]))
  with sp.nnx.adapter_index(jnp.array([0, 1])):
    with pytest.raises(ValueError, match=r"AdapterBank.*einsum layers whose input leads with the batch"):
      layer(jnp.ones((IN, 2)))
