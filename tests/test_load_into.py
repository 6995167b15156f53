"""sp.nnx.load_into is all or nothing: a bad adapter dict leaves the model's trained adapters in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp


class Two(nnx.Module):

  def __init__(self):
    self.a = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    self.b = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.b(self.a(x))


def _trained():
  model = Two()
  sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(0))
  adapters = sp.nnx.adapters_of(model)
  trained = {p: a.replace(params=jax.tree.map(lambda x: x + 0.5, a.params)) for p, a in adapters.items()}
  sp.nnx.load_into(model, trained)
  return model, trained


def _same(model, adapters):
  now = sp.nnx.adapters_of(model)
  assert sorted(now) == sorted(adapters)
  for p in adapters:
    for x, y in zip(jax.tree.leaves(now[p].params), jax.tree.leaves(adapters[p].params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_mistyped_path_keeps_the_trained_adapters():
  model, trained = _trained()
  x = jnp.ones((1, 4))
  before = model(x)
  bad = dict(trained)
  bad["a/kernell"] = bad.pop("a/kernel")
  with pytest.raises(ValueError, match=r"'a/kernell' is not a weight of the model.*unchanged|unchanged.*'a/kernell'"):
    sp.nnx.load_into(model, bad)
  _same(model, trained)
  np.testing.assert_array_equal(model(x), before)


def test_a_wrong_shape_keeps_the_trained_adapters():
  model, trained = _trained()
  other = sp.peft.init_adapters(jax.random.key(1), {"a": {"kernel": jnp.ones((5, 3))}}, sp.peft.LoRA(2), "kernel")
  with pytest.raises(ValueError, match=r"made for shape \(5, 3\), the weight has \(4, 3\)"):
    sp.nnx.load_into(model, {"a/kernel": other["a/kernel"], "b/kernel": trained["b/kernel"]})
  _same(model, trained)


def test_not_a_dict_of_adapters_keeps_the_model():
  model, trained = _trained()
  with pytest.raises(TypeError, match="adapters"):
    sp.nnx.load_into(model, {"a/kernel": "not an adapter"})
  _same(model, trained)


def test_a_failing_attach_puts_the_previous_adapters_back(monkeypatch):
  from spectral_peft.peft._runtime import nnx as _nnx

  model, trained = _trained()
  real = _nnx.attach
  calls = []

  def failing(m, adapters, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      real(m, {p: a for p, a in list(adapters.items())[:1]}, **kwargs)  # Half attached, then a failure.
      raise RuntimeError("boom")
    return real(m, adapters, **kwargs)

  monkeypatch.setattr(_nnx, "attach", failing)
  with pytest.raises(RuntimeError, match="boom"):
    _nnx.load_into(model, {p: a.replace(params=jax.tree.map(jnp.zeros_like, a.params)) for p, a in trained.items()})
  _same(model, trained)


def test_a_valid_load_replaces_the_adapters():
  model, trained = _trained()
  new = {p: a.replace(params=jax.tree.map(lambda x: x * 0 + 2.0, a.params)) for p, a in trained.items()}
  sp.nnx.load_into(model, new)
  _same(model, new)
