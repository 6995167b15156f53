"""Named adapters (PEFT's add/set/disable/weighted add/delete/save-one workflow) in NNX and Linen.

References: ``sp.peft.merge`` of the same adapters (the plain dense formula ``W0 + sum_i w_i Delta W_i``).
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

X = jax.random.normal(jax.random.key(0), (4, 16))


class Net(nnx.Module):

  def __init__(self):
    self.l1 = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    self.l2 = nnx.Linear(8, 4, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _perturbed(adapters, seed):
  return {p: a.replace(params=jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.key(seed), v.shape, v.dtype),
                                           a.params)) for p, a in adapters.items()}


def _close(actual, expected):
  scale = max(1.0, float(np.max(np.abs(np.asarray(expected)))))
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=0, atol=64 * np.finfo(np.float32).eps * scale)


def _merged_net(adapters):
  plain = Net()
  state = nnx.state(plain, nnx.Param)
  if adapters:
    nnx.update(plain, sp.peft.merge(state, adapters))
  return plain(X)


@pytest.fixture()
def two():
  params = nnx.state(Net(), nnx.Param)
  a = _perturbed(sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2, alpha=4.0), "kernel"), 5)
  b = _perturbed(sp.peft.init_adapters(jax.random.key(2), params, sp.peft.WaveFT(n_params=10), "l1/kernel"), 6)
  return a, b


def test_nnx_named_workflow(two, tmp_path):
  a, b = two
  model = Net()
  base = model(X)
  sp.nnx.adapt(model, sp.peft.LoRA(2, alpha=4.0), "kernel", key=jax.random.key(1), adapter_name="a")
  sp.nnx.load_into(model, a, adapter_name="a")
  sp.nnx.attach(model, b, adapter_name="b")
  assert sp.nnx.adapter_names(model) == ["a", "b"] and sp.nnx.active_adapters(model) == ["a"]  # PEFT: first stays
  _close(model(X), _merged_net(a))
  sp.nnx.set_adapter(model, "b")
  _close(model(X), _merged_net(b))
  sp.nnx.set_adapter(model, ["a", "b"])
  _close(model(X), _merged_net(sp.peft.weighted_combination([a, b], [1.0, 1.0])))
  with sp.nnx.disable_adapters(model):
    np.testing.assert_array_equal(model(X), base)
  assert sp.nnx.active_adapters(model) == ["a", "b"]

  sp.nnx.add_weighted_adapter(model, ["a", "b"], [0.5, -2.0], "mix")
  sp.nnx.add_weighted_adapter(model, ["a"], [3.0], "cat", combination_type="cat")
  sp.nnx.set_adapter(model, "mix")
  _close(model(X), _merged_net(sp.peft.weighted_combination([a, b], [0.5, -2.0])))
  sp.nnx.set_adapter(model, "cat")
  _close(model(X), _merged_net(sp.peft.weighted_combination([a], [3.0])))
  assert type(sp.nnx.adapters_of(model, "cat")["l1/kernel"].method) is sp.peft.LoRA

  # Training one named adapter: gradients reach it only (the others are inactive).
  sp.nnx.set_adapter(model, "a")
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
  before = {n: sp.nnx.adapters_of(model, n) for n in sp.nnx.adapter_names(model)}
  grads = nnx.grad(lambda m: jnp.sum(m(X) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  for name, adapters in before.items():
    changed = any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves({p: v.params for p, v in adapters.items()}),
                                                            jax.tree.leaves({p: v.params for p, v in sp.nnx.adapters_of(model, name).items()})))
    assert changed == (name == "a"), name

  sp.nnx.delete_adapter(model, "mix")
  assert "mix" not in sp.nnx.adapter_names(model)
  sp.peft.save_adapters(tmp_path / "b", sp.nnx.adapters_of(model, "b"))
  restored = Net()
  sp.nnx.attach(restored, sp.peft.load_adapters(tmp_path / "b"), adapter_name="b")
  _close(restored(X), _merged_net(b))
  summary = sp.peft.trainable_summary(sp.nnx.base_params(model), sp.nnx.adapters_of(model, "b"))
  assert summary.adapter == 10 and summary.base == 16 * 8 + 8 + 8 * 4 + 4

  trained_a = sp.nnx.adapters_of(model, "a")
  sp.nnx.merge_and_unload(model)
  assert sp.nnx.adapter_names(model) == []
  _close(model(X), _merged_net(trained_a))


def test_nnx_named_errors(two):
  a, b = two
  model = Net()
  sp.nnx.attach(model, a, adapter_name="a")
  with pytest.raises(ValueError, match="already has an adapter named 'a'"):
    sp.nnx.attach(model, a, adapter_name="a")
  with pytest.raises(ValueError, match=r"no adapter named \['c'\]"):
    sp.nnx.set_adapter(model, "c")
  with pytest.raises(ValueError, match=r"no adapter named \['c'\]"):
    sp.nnx.delete_adapter(model, "c")
  with pytest.raises(ValueError, match="adapter_name"):
    sp.nnx.attach(model, b, adapter_name="has space")
  sp.nnx.attach(model, b, adapter_name="b")
  with pytest.raises(ValueError, match="already has an adapter named 'b'"):
    sp.nnx.add_weighted_adapter(model, ["a"], [1.0], "b")
  with pytest.raises(ValueError, match="LoRA adapters only"):
    sp.nnx.add_weighted_adapter(model, ["b"], [1.0], "c", combination_type="cat")
  with pytest.raises(ValueError, match="combination_type"):
    sp.nnx.add_weighted_adapter(model, ["a"], [1.0], "c", combination_type="svd")
  sp.nnx.set_adapter(model, ["a", "b"])
  with pytest.raises(ValueError, match="pass `adapter_name=`"):
    sp.nnx.adapters_of(model)
  assert sorted(sp.nnx.detach_adapters(model)) == ["a", "b"]


def test_nnx_active_set_is_part_of_the_jit_graph(two):
  a, b = two
  model = Net()
  sp.nnx.attach(model, a, adapter_name="a")
  sp.nnx.attach(model, b, adapter_name="b")
  run = nnx.jit(lambda m, x: m(x))
  _close(run(model, X), _merged_net(a))
  sp.nnx.set_adapter(model, "b")
  _close(run(model, X), _merged_net(b))
  with sp.nnx.disable_adapters(model):
    np.testing.assert_array_equal(run(model, X), Net()(X))


def test_linen_named_workflow(tmp_path):
  model = nn.Dense(8)
  params = model.init(jax.random.key(0), X)["params"]
  a = _perturbed(sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel"), 3)
  b = _perturbed(sp.peft.init_adapters(jax.random.key(2), params, sp.peft.FourierFT(n_frequency=10), "kernel"), 4)
  reference = lambda adapters: model.apply({"params": sp.peft.merge(params, adapters)}, X)
  run = jax.jit(lambda named: sp.peft.apply_adapters(model, params, named, X))

  named = sp.peft.NamedAdapters({"a": a}).add("b", b)
  assert named.active == ("a",)
  _close(run(named), reference(a))
  _close(run(named.set_adapter("b")), reference(b))
  both = named.set_adapter(["a", "b"])
  _close(run(both), reference(sp.peft.weighted_combination([a, b], [1.0, 1.0])))
  _close(run(named.disabled()), model.apply({"params": params}, X))
  weighted = both.add_weighted_adapter(["a", "b"], [2.0, 0.5], "mix").set_adapter("mix")
  _close(run(weighted), reference(sp.peft.weighted_combination([a, b], [2.0, 0.5])))
  _close(sp.peft.merge(params, weighted)["kernel"], sp.peft.merge(params, sp.peft.weighted_combination([a, b], [2.0, 0.5]))["kernel"])

  grads = jax.grad(lambda n: jnp.sum(sp.peft.apply_adapters(model, params, n, X) ** 2))(named)
  assert isinstance(grads, sp.peft.NamedAdapters) and grads.names == ("a", "b")
  assert not any(np.any(g) for g in jax.tree.leaves(grads.adapter("b")["kernel"].params))  # inactive: zero gradient
  assert any(np.any(g) for g in jax.tree.leaves(grads.adapter("a")["kernel"].params))

  sp.peft.save_adapters(tmp_path / "a", named.adapter("a"))
  _close(run(sp.peft.NamedAdapters({"a": sp.peft.load_adapters(tmp_path / "a")})), reference(a))
  assert named.delete("a").names == ("b",) and named.delete("a").active == ()
  with pytest.raises(ValueError, match="exists already"):
    named.add("a", a)
  with pytest.raises(ValueError, match=r"No adapter named \['z'\]"):
    named.set_adapter("z")
