"""Kernels at any layout and einsum layers: explicit input/output axes, axes read from the einsum
equation, refusals of axes that contradict the layer, and the factored branch on einsum layers,
all against the merged model (``sp.peft.merge``) in value and gradient.

The einsum modules below are written in the style of Gemma's and Tunix's ``Einsum`` (a string
``einsum_str`` and one weight ``w``), with Gemma 3's attention and MLP layouts.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp
from spectral_peft.peft._runtime import core as runtime_core
from spectral_peft.peft._runtime import nnx as runtime_nnx

from adapter_cases import StringEinsum as Einsum

D, N, K, H, F = 6, 4, 2, 5, 7

METHODS = [sp.peft.LoRA(2), sp.peft.DoRA(2), sp.peft.SineLoRA(2, omega=5.0), sp.peft.SineDoRA(2, omega=5.0),
           sp.peft.SHiRA(5), sp.peft.WaveFT(8), sp.peft.FourierFT(6), sp.peft.LFMA(0.5, 1.0)]


class GemmaBlock(nnx.Module):
  """Gemma 3's projections: q (N, D, H), kv (2, K, D, H), attention output (N, H, D), gated MLP (2, D, F) and (F, D)."""

  def __init__(self, rngs):
    self.q_einsum = Einsum("BTD,NDH->BTNH", (N, D, H), rngs)
    self.kv_einsum = Einsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs)
    self.attn_vec_einsum = Einsum("BTNH,NHD->BTD", (N, H, D), rngs)
    self.gating_einsum = Einsum("...D,CDF->...CF", (2, D, F), rngs)
    self.linear = Einsum("...F,FD->...D", (F, D), rngs)

  def __call__(self, x):
    q = self.q_einsum(x)
    k, v = self.kv_einsum(x)
    attn = q * jnp.tile(k, (1, 1, N // K, 1)) + jnp.tile(v, (1, 1, N // K, 1))
    h = self.attn_vec_einsum(jnp.tanh(attn)) + x
    gate, up = jnp.moveaxis(self.gating_einsum(h), -2, 0)
    return self.linear(jax.nn.gelu(gate) * up) + h


EXPECTED_AXES = {  # Input axes, output axes of each kernel, read off the equations by hand.
    "q_einsum/w": ((1,), (0, 2)),
    "kv_einsum/w": ((2,), (0, 1, 3)),
    "attn_vec_einsum/w": ((0, 1), (2,)),
    "gating_einsum/w": ((1,), (0, 2)),
    "linear/w": ((0,), (1,)),
}


def _perturbed(model):
  state = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [l + 0.05 * jax.random.normal(k, l.shape, l.dtype)
                                                 for l, k in zip(leaves, keys)]))


def _merged_loss(adapters, x):
  plain = GemmaBlock(nnx.Rngs(0))
  nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), adapters))
  return jnp.sum(jnp.sin(plain(x)))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_gemma_layouts_adapt_from_the_equations_and_equal_merge(method):
  model = GemmaBlock(nnx.Rngs(0))
  sp.nnx.adapt(model, method, r"/w$", key=jax.random.key(1))
  adapters = sp.nnx.adapters_of(model)
  assert {p: a.io_axes for p, a in adapters.items()} == EXPECTED_AXES
  _perturbed(model)
  adapters = sp.nnx.adapters_of(model)
  x = jax.random.normal(jax.random.key(2), (2, 3, D))

  value, grads = nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))),
                                            argnums=nnx.DiffState(0, nnx.LoRAParam)))(model, x)
  ref_value, ref_grads = jax.value_and_grad(_merged_loss)(adapters, x)
  scale = float(jnp.sum(jnp.abs(jnp.cos(GemmaBlock(nnx.Rngs(0))(x))))) + 1.0
  tol = 64 * float(jnp.finfo(jnp.float32).eps) * scale
  assert abs(float(value) - float(ref_value)) <= tol
  ours = {p: a.params for p, a in _adapters_from_grads(model, grads).items()}
  for path, ref in ref_grads.items():
    for got, want in zip(jax.tree.leaves(ours[path]), jax.tree.leaves(ref.params)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (float(jnp.max(jnp.abs(want))) + 1.0))


def _adapters_from_grads(model, grads):
  copy = nnx.clone(model)
  nnx.update(copy, grads)
  return sp.nnx.adapters_of(copy)


@pytest.mark.parametrize("method, full", [(sp.peft.LoRA(2), False),
                                          (sp.peft.SHiRA(5), True), (sp.peft.WaveFT(8), True),
                                          (sp.peft.FourierFT(6), True), (sp.peft.LFMA(0.5, 1.0), True)],
                         ids=lambda m: type(m).__name__ if isinstance(m, sp.peft.AdapterMethod) else str(m))
def test_factored_methods_take_the_einsum_product_on_every_einsum_layer(monkeypatch, method, full):
  """Lean branches are added to the einsum; merged products (sparse/spectral) replace the whole contraction."""
  calls = []
  original = runtime_core.einsum_branch

  def spy(adapter, equation, x, kernel, kernel_operand=1, *, full=False):
    out = original(adapter, equation, x, kernel, kernel_operand, full=full)
    calls.append((adapter.path, out is not None, full))
    return out

  monkeypatch.setattr(runtime_core, "einsum_branch", spy)
  monkeypatch.setenv(runtime_core.DEBUG_ENV, "1")
  model = GemmaBlock(nnx.Rngs(0))
  sp.nnx.adapt(model, method, r"/w$", key=jax.random.key(1))
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # A fallback to the rebuilt layer would raise here.
    model(jnp.ones((2, 3, D)))
  assert sorted(calls) == sorted((p, True, full) for p in EXPECTED_AXES)


def test_lora_parameter_counts_on_gemma_layouts_are_qwix_lora_counts():
  """qwix puts A over the kernel's contracted axes and B over the rest: r (prod(in) + prod(out))."""
  model = GemmaBlock(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(3), r"/w$", key=jax.random.key(1))
  counts = {p: sum(int(np.size(l)) for l in jax.tree.leaves(a.params)) for p, a in sp.nnx.adapters_of(model).items()}
  assert counts == {"q_einsum/w": 3 * (D + N * H), "kv_einsum/w": 3 * (D + 2 * K * H),
                    "attn_vec_einsum/w": 3 * (N * H + D), "gating_einsum/w": 3 * (D + 2 * F),
                    "linear/w": 3 * (F + D)}


def test_explicit_axes_match_the_dense_formula_and_survive_a_checkpoint(tmp_path):
  w = jax.random.normal(jax.random.key(0), (N, D, H))
  params = {"q": {"w": w}}
  for method in METHODS:
    adapters = sp.peft.init_adapters(jax.random.key(2), params, method, "w", in_axes=(1,))
    adapters = jax.tree.map(lambda a: a + 0.05, adapters)
    adapter = adapters["q/w"]
    assert adapter.layout == ((1,), (0, 2)) and adapter.matrix_shape == (D, N * H)
    matrix = jnp.transpose(w, (1, 0, 2)).reshape(D, N * H)
    delta = method.delta(adapter.params, matrix, adapter.frozen)
    expected = jnp.transpose((matrix + delta).reshape(D, N, H), (1, 0, 2))
    got = sp.peft.merge(params, adapters)["q"]["w"]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(expected))))
    x = jax.random.normal(jax.random.key(3), (2, D))
    np.testing.assert_allclose(adapter.branch(x, w), jnp.einsum("bd,ndh->bnh", x, expected - w),
                               rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected - w))) * D)
  sp.peft.save_adapters(str(tmp_path / "ck"), adapters)
  loaded = sp.peft.load_adapters(str(tmp_path / "ck"))
  assert loaded["q/w"].layout == ((1,), (0, 2))
  np.testing.assert_array_equal(sp.peft.merge(params, loaded)["q"]["w"], sp.peft.merge(params, adapters)["q"]["w"])


@pytest.mark.parametrize("in_axes, layout, match", [
    ((1, 1), "in_out", "distinct axis positions"),
    ((0, 1, 2), "in_out", "fewer than 3"),
    (None, ((1,), (0,)), "each axis once"),
    ((1,), "out_in", "default layout"),
    (2, ((1,), (0, 2)), "disagrees"),
])
def test_bad_axes_are_refused_by_name(in_axes, layout, match):
  params = {"q": {"w": jnp.ones((N, D, H))}}
  with pytest.raises(ValueError, match=match):
    sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), "w", in_axes=in_axes, layout=layout)


def test_nnx_attach_refuses_axes_that_contradict_the_equation():
  model = GemmaBlock(nnx.Rngs(0))
  wrong = sp.peft.init_adapters(jax.random.key(0), nnx.state(model, nnx.Param), sp.peft.LoRA(2), "q_einsum/w",
                                in_axes=2)
  with pytest.raises(ValueError, match=r"q_einsum/w.*einsum 'BTD,NDH->BTNH' disagrees"):
    sp.nnx.attach(model, wrong)
  assert sp.nnx.adapters_of(model) == {}
  with pytest.raises(ValueError, match="contradict|disagrees|input axes"):
    sp.nnx.adapt(model, sp.peft.LoRA(2), r"q_einsum/w$", key=jax.random.key(0), in_axes=(0,))


def test_nnx_attach_is_all_or_nothing():
  model = GemmaBlock(nnx.Rngs(0))
  adapters = sp.peft.init_adapters(jax.random.key(0), nnx.state(model, nnx.Param), sp.peft.LoRA(2), r"/w$",
                                   in_axes=lambda path, shape: EXPECTED_AXES[path][0])
  adapters["missing/w"] = adapters["linear/w"]
  with pytest.raises(ValueError, match="missing/w"):
    sp.nnx.attach(model, adapters)
  assert sp.nnx.adapters_of(model) == {}


def test_nnx_linear_refuses_a_transposed_layout():
  model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Linear contracts input axes"):
    sp.nnx.adapt(model, sp.peft.DoRA(2), "kernel", key=jax.random.key(0), layout="out_in")


class _LinenEinsums(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Einsum((N, D, H), "btd,ndh->btnh")(x)
    return nn.Einsum((N, H, D), "btnh,nhd->btd")(h) + nn.Dense(D)(x)


@pytest.mark.parametrize("method", [sp.peft.LoRA(2), sp.peft.DoRA(2), sp.peft.WaveFT(8)], ids=lambda m: type(m).__name__)
def test_linen_einsum_layers_equal_merge_and_refuse_wrong_axes(method):
  model = _LinenEinsums()
  x = jax.random.normal(jax.random.key(0), (2, 3, D))
  params = model.init(jax.random.key(1), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(2), params, method, "Einsum_0/kernel", in_axes=(1,))
  adapters.update(sp.peft.init_adapters(jax.random.key(2), params, method, "Einsum_1/kernel", in_axes=2))
  adapters = jax.tree.map(lambda a: a + 0.05, adapters)

  def loss_runtime(ad):
    return jnp.sum(jnp.sin(sp.peft.apply_adapters(model, params, ad, x)))

  def loss_merged(ad):
    return jnp.sum(jnp.sin(model.apply({"params": sp.peft.merge(params, ad)}, x)))

  got, want = jax.jit(jax.value_and_grad(loss_runtime))(adapters), jax.value_and_grad(loss_merged)(adapters)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * (float(jnp.max(jnp.abs(w))) + 1.0))
  wrong = sp.peft.init_adapters(jax.random.key(2), params, method, "Einsum_0/kernel", in_axes=2)
  with pytest.raises(ValueError, match="contracts input axes \\(1,\\)"):
    sp.peft.apply_adapters(model, params, wrong, x)
  transposed = sp.peft.init_adapters(jax.random.key(2), params, method, "Dense_0/kernel", layout="out_in")
  with pytest.raises(ValueError, match="Dense"):
    sp.peft.apply_adapters(model, params, transposed, x)


def test_einsum_io_axes_reads_equations():
  assert runtime_core.einsum_io_axes("BTD,NDH->BTNH", 3) == ((1,), (0, 2), ())
  assert runtime_core.einsum_io_axes("BSD,CKDH->CBSKH", 4) == ((2,), (0, 1, 3), ())
  assert runtime_core.einsum_io_axes("...F,FD->...D", 2) == ((0,), (1,), ())
  assert runtime_core.einsum_io_axes("BNTH,NHK->BNTK", 3) == ((1,), (2,), (0,))  # Per-head: N is shared.
  with pytest.raises(ValueError, match="'->'"):
    runtime_core.einsum_io_axes("ab,bc", 2)


class _TransformsItsWeight(nnx.Module):
  """An einsum-style module that does not contract its weight as stored (the rebuilt path is exact)."""

  def __init__(self, rngs):
    self.einsum_str = "btd,df->btf"
    self.w = nnx.Param(jax.random.normal(rngs.params(), (D, F)))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, 2.0 * self.w[...])


def test_modules_that_transform_their_weight_fall_back_exactly_and_loudly_in_debug_mode(monkeypatch):
  model = _TransformsItsWeight(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "w", key=jax.random.key(1))
  _perturbed(model)
  adapters = sp.nnx.adapters_of(model)
  x = jax.random.normal(jax.random.key(2), (2, 3, D))
  plain = _TransformsItsWeight(nnx.Rngs(0))
  nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), adapters))
  monkeypatch.setenv(runtime_core.DEBUG_ENV, "1")
  with pytest.warns(RuntimeWarning, match="'w' runs on the rebuilt path"):
    got = model(x)
  np.testing.assert_allclose(got, plain(x), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(plain(x)))))
