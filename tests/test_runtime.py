"""The adapter runtime: every kernel-using layer, Linen and NNX, equals the merged model; nothing is silent."""

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

by_name = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
D = 8


def _perturb(tree, scale, key=jax.random.key(11)):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _gradient_rtol(case):
  # sin(omega a b): the products are summed in another order (blocked lean product vs dense), and
  # omega = 50 turns the float32 rounding of the phase into ~1e-5 of the gradient.
  return 5e-5 if "sine" in case.name else 1e-5


def _assert_relative(got, want, rtol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(w))) + 1e-12
    assert float(jnp.max(jnp.abs(g - w))) <= rtol * scale, (float(jnp.max(jnp.abs(g - w))), scale)


# -- Linen -------------------------------------------------------------------------------------------
class OutInLinear(nn.Module):
  """A layer storing its weight (out, in), like GPT-2's Conv1D read with x @ W.T."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (self.features, x.shape[-1]))
    return x @ w.T


class SubDense(nn.Dense):
  """A subclass of Dense (the runtime must not require the exact type)."""


class ScanBody(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return x + jnp.tanh(nn.Dense(D, name="dense")(x)), None


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x):  # (batch, seq, D)
    h = nn.Conv(D, (3,), name="conv")(x)
    h = SubDense(D, name="sub")(h)
    h = nn.Dense(D, name="keyword")(inputs=jnp.tanh(h))
    h = nn.Einsum((D, D), "bsd,de->bse", name="einsum")(h)
    h = nn.DenseGeneral((2, D // 2), name="split")(h)
    h = nn.DenseGeneral(D, axis=(-2, -1), name="joined")(h)
    h = nn.remat(nn.Dense)(D, name="remat")(h)
    h, _ = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="scan")(h, None)
    h = OutInLinear(D, name="outin")(h)
    return nn.DenseGeneral(6, axis=0, name="axis0")(h)  # contracts the batch axis: (seq, D, 6)


LINEN_IN_AXES = {r"conv/": 2, r"joined/": 2, r"axis0/": 1, r"split/": 1}
LINEN_LAYOUT = {r"outin/": "out_in"}
LINEN_STACK = {r"scan/": 1}


@pytest.fixture(scope="module")
def linen_setup():
  model = LinenModel()
  x = jax.random.normal(jax.random.key(0), (6, 5, D))
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x


def _linen_adapters(case, params, targets=r"kernel$"):
  adapters = sp.peft.init_adapters(jax.random.key(2), params, case.method, targets, in_axes=LINEN_IN_AXES,
                                   layout=LINEN_LAYOUT, stack_axes=LINEN_STACK)
  return _perturb(adapters, case.scale)


@pytest.mark.slow
@by_name
def test_linen_runtime_equals_merge_on_every_layer_kind(case, linen_setup):
  model, params, x = linen_setup
  adapters = _linen_adapters(case, params)
  assert adapters["scan/dense/kernel"].stack_axes == 1 and adapters["outin/kernel"].layout == "out_in"

  def merged_loss(a):
    return jnp.sum(jnp.sin(model.apply({"params": sp.peft.merge(params, a)}, x)))

  def runtime_loss(a):
    return jnp.sum(jnp.sin(sp.peft.apply_adapters(model, params, a, x)))

  value, grads = jax.value_and_grad(merged_loss)(adapters)
  base = model.apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(sp.peft.apply_adapters(model, params, adapters, x) - base))) > 1e-3
  # sum(sin(y)): each output's float32 rounding (relative to |y|, through sin' <= 1) adds up over the sum.
  y = model.apply({"params": sp.peft.merge(params, adapters)}, x)
  value_tol = 64 * float(jnp.finfo(jnp.float32).eps) * (float(jnp.sum(jnp.abs(y))) + 1.0)
  for fn in (runtime_loss, jax.jit(runtime_loss)):
    got_value, got_grads = jax.value_and_grad(fn)(adapters)
    np.testing.assert_allclose(float(got_value), float(value), rtol=0, atol=value_tol)
    _assert_relative(got_grads, grads, _gradient_rtol(case))
  # Every adapter, including each slice of the stacked one, received a gradient.
  for path, g in got_grads.items():
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g.params)), path


@pytest.mark.slow
def test_linen_runtime_gradient_wrt_inputs(linen_setup):
  model, params, x = linen_setup
  adapters = _linen_adapters(CASES[5], params)  # WaveFT: the rebuilt merged path
  want = jax.grad(lambda z: jnp.sum(model.apply({"params": sp.peft.merge(params, adapters)}, z) ** 2))(x)
  got = jax.jit(jax.grad(lambda z: jnp.sum(sp.peft.apply_adapters(model, params, adapters, z) ** 2)))(x)
  _assert_relative(got, want)


class Unused(nn.Module):
  def setup(self):
    self.used = nn.Dense(D)
    self.spare = nn.Dense(D)

  def __call__(self, x):
    return self.used(x)

  def both(self, x):
    return self.spare(self.used(x))


def test_adapter_on_a_layer_that_does_not_run_raises():
  model, x = Unused(), jnp.ones((2, D))
  params = model.init(jax.random.key(0), x, method=Unused.both)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel")
  with pytest.raises(ValueError, match=r"'spare/kernel': no layer owning this weight was called"):
    sp.peft.apply_adapters(model, params, adapters, x)
  with pytest.raises(ValueError, match=r"'spare/kernel'"):
    with sp.peft.factored(adapters):
      model.apply({"params": params}, x)
  # Both run: no error.
  assert sp.peft.apply_adapters(model, params, adapters, x, method=Unused.both).shape == (2, D)


def test_typo_and_shape_mismatch_raise(linen_setup):
  model, params, x = linen_setup
  adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), r"keyword/kernel")
  with pytest.raises(ValueError, match=r"'keyword/kernal'.*has no weight"):
    sp.peft.apply_adapters(model, params, {"keyword/kernal": adapters["keyword/kernel"]}, x)
  with pytest.raises(ValueError, match=r"'conv/kernel'.*made for shape \(8, 8\)"):
    sp.peft.apply_adapters(model, params, {"conv/kernel": adapters["keyword/kernel"]}, x)
  with pytest.raises(TypeError, match="`adapters` must be"):
    sp.peft.apply_adapters(model, params, {"keyword/kernel": jnp.ones(3)}, x)


def test_in_axes_that_disagree_with_the_layer_raise(linen_setup):
  model, params, x = linen_setup
  adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.DoRA(2), r"joined/kernel", in_axes=1)
  with pytest.raises(ValueError, match=r"the layer 'joined' \(DenseGeneral\) contracts input axes \(0, 1\)"):
    sp.peft.apply_adapters(model, params, adapters, x)
  adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.DoRA(2), r"conv/kernel", in_axes=1)
  with pytest.raises(ValueError, match=r"the layer 'conv' \(Conv\) contracts input axes \(0, 1\)"):
    sp.peft.apply_adapters(model, params, adapters, x)


def test_out_in_layout_uses_the_input_axis_for_dora_and_the_sine_gain():
  w = jax.random.normal(jax.random.key(0), (6, 4))  # (out, in)
  for method in (sp.peft.DoRA(2), sp.peft.SineLoRA(2, omega=20.0)):
    stored = sp.peft.init_adapters(jax.random.key(1), {"w": w}, method, "w", layout="out_in")["w"]
    flax_layout = sp.peft.init_adapters(jax.random.key(1), {"w": w.T}, method, "w")["w"]
    assert stored.matrix_shape == flax_layout.matrix_shape == (4, 6)
    stored = stored.replace(params=_perturb(stored.params, 0.1))
    flax_layout = flax_layout.replace(params=stored.params)
    np.testing.assert_allclose(stored.delta(w), flax_layout.delta(w.T).T, rtol=1e-6, atol=1e-7)
  if True:  # DoRA's magnitude is one per output feature (6), not per input (4).
    dora = sp.peft.init_adapters(jax.random.key(1), {"w": w}, sp.peft.DoRA(2), "w", layout="out_in")["w"]
    np.testing.assert_allclose(dora.params["magnitude"], jnp.linalg.norm(w, axis=1), rtol=1e-6)


# -- the trainable tree --------------------------------------------------------------------------------
@by_name
def test_grad_optax_and_ema_work_on_the_adapters_as_they_are(case, linen_setup):
  model, params, x = linen_setup
  adapters = _linen_adapters(case, params, targets=r"(keyword|conv)/kernel$")
  loss = lambda a: jnp.mean(sp.peft.apply_adapters(model, params, a, x) ** 2)
  grads = jax.grad(loss)(adapters)  # no partition needed: constants are not leaves
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  tx = optax.adam(1e-2)
  state = tx.init(adapters)
  updates, state = tx.update(grads, state, adapters)
  stepped = optax.apply_updates(adapters, updates)
  ema = jax.tree.map(lambda e, a: 0.9 * e + 0.1 * a, adapters, stepped)
  masked = sp.peft.masked_optimizer(optax.sgd(0.1), adapters)
  masked_updates, _ = masked.update(grads, masked.init(adapters), adapters)
  for path, adapter in adapters.items():
    for tree in (stepped, ema):
      np.testing.assert_array_equal(jax.tree.leaves(tree[path].frozen), jax.tree.leaves(adapter.frozen))
      assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(tree[path].params), jax.tree.leaves(adapter.params)))
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(masked_updates[path].params))


def test_constants_made_under_jit_are_refused_clearly():
  params = {"w": jnp.ones((4, 4))}
  abstract = jax.eval_shape(lambda p: sp.peft.init_adapters(jax.random.key(0), p, sp.peft.SHiRA(3), "w"), params)
  with pytest.raises(TypeError, match="constants .* are abstract shapes"):
    sp.peft.merge(params, abstract)


# -- NNX -----------------------------------------------------------------------------------------------
class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, D, (3,), rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D, decode=False, rngs=rngs)
    self.out = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    h = self.conv(x)
    h = h + self.attn(h)
    return self.out(jnp.tanh(h))


NNX_TARGETS = r"(conv|attn/(query|value|out)|out)/kernel$"
NNX_IN_AXES = {r"conv/": 2, r"attn/(query|key|value)/": 1, r"attn/out/": 2}


def _nnx_model(case):
  model = NNXNet(nnx.Rngs(0))
  sp.nnx.adapt(model, case.method, NNX_TARGETS, key=jax.random.key(1), in_axes=NNX_IN_AXES)
  nnx.update(model, _perturb(nnx.state(model, sp.nnx.AdapterParam), case.scale))
  return model


@by_name
def test_nnx_runtime_equals_merge(case):
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  model = _nnx_model(case)
  adapters = sp.nnx.adapters_of(model)
  assert set(adapters) == {"conv/kernel", "attn/query/kernel", "attn/value/kernel", "attn/out/kernel", "out/kernel"}
  graphdef, base, rest = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)

  def merged_loss(a):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, sp.peft.merge(base, a), rest)(x)))

  value, grads = jax.value_and_grad(merged_loss)(adapters)
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  got_value, got_grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, sp.nnx.AdapterParam)))(model)
  np.testing.assert_allclose(float(got_value), float(value), rtol=1e-5, atol=1e-5)  # a sum of O(1) terms
  grad_model = _nnx_model(case)
  nnx.update(grad_model, got_grads)
  _assert_relative({p: a.params for p, a in sp.nnx.adapters_of(grad_model).items()},
                   {p: a.params for p, a in grads.items()}, _gradient_rtol(case))


def test_nnx_optimizer_trains_exactly_the_adapters_and_merge_restores_plain_layers(tmp_path):
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  model = _nnx_model(CASES[0])
  before_base = jax.tree.map(jnp.copy, sp.nnx.base_params(model))
  before_adapters = jax.tree.map(jnp.copy, nnx.state(model, sp.nnx.AdapterParam))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=sp.nnx.AdapterParam)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, sp.nnx.AdapterParam))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  for now, then in zip(jax.tree.leaves(sp.nnx.base_params(model)), jax.tree.leaves(before_base)):
    np.testing.assert_array_equal(now, then)
  changed = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(nnx.state(model, sp.nnx.AdapterParam)), jax.tree.leaves(before_adapters))]
  assert min(changed) > 0
  adapted_out = model(x)
  # Save the adapter state alone, reload it into a fresh adapted model: same outputs.
  sp.peft.save_adapters(tmp_path / "nnx", sp.nnx.adapters_of(model))
  fresh = NNXNet(nnx.Rngs(0))
  sp.nnx.attach(fresh, sp.peft.load_adapters(tmp_path / "nnx", sp.nnx.base_params(fresh)))
  np.testing.assert_allclose(fresh(x), adapted_out, rtol=1e-6, atol=1e-6)
  sp.nnx.merge_adapters(model)
  assert type(model.out) is nnx.Linear and not nnx.state(model, sp.nnx.AdapterParam)
  np.testing.assert_allclose(model(x), adapted_out, rtol=1e-5, atol=1e-5)


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(D, D, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(x))


@pytest.mark.parametrize("case", [CASES[0], CASES[6]], ids=lambda c: c.name)
def test_nnx_scanned_stack_gets_one_adapter_per_layer(case):
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(key):
    return NNXBlock(nnx.Rngs(key))

  blocks = create(jax.random.split(jax.random.key(0), 3))
  graphdef, base, rest = nnx.split(blocks, nnx.Param, ...)
  sp.nnx.adapt(blocks, case.method, "kernel", key=jax.random.key(1), stack_axes=1)
  nnx.update(blocks, _perturb(nnx.state(blocks, sp.nnx.AdapterParam), case.scale))
  adapters = sp.nnx.adapters_of(blocks)
  assert adapters["lin/kernel"].stack_axes == 1
  x = jax.random.normal(jax.random.key(2), (4, D))

  def run(blocks, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, block):
      return block(h)
    return body(x, blocks)

  merged = nnx.merge(graphdef, sp.peft.merge(base, adapters), rest)
  np.testing.assert_allclose(nnx.jit(run)(blocks, x), run(merged, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_cls, kwargs", [(sp.nnx.SHiRADense, {"n_params": 10}),
                                               (sp.nnx.WaveFTDense, {"n_params": 10, "scale": 1.0}),
                                               (sp.nnx.FourierFTDense, {"n_frequency": 10}),
                                               (sp.nnx.LFMADense, {"top_k_ratio": 0.2, "alpha": 1.0})])
def test_nnx_adapter_layers_wrap_an_existing_linear(layer_cls, kwargs):
  base = nnx.Linear(D, 6, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, D))
  layer = layer_cls(D, 6, base_module=base, rngs=nnx.Rngs(2), **kwargs)
  assert layer.kernel is base.kernel and layer.bias is base.bias  # shared, not copied
  np.testing.assert_allclose(layer(x), base(x), rtol=1e-6, atol=1e-6)  # identity at init
  layer.values[...] = _perturb(layer.values[...], 0.5)
  want = x @ (base.kernel[...] + layer.delta()) + base.bias[...]
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
  grad = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.PathContains("values")))(layer)
  def dense_loss(values):
    delta = layer.method.delta({"values": values}, base.kernel[...], {"indices": layer.indices[...]})
    return jnp.sum((x @ (base.kernel[...] + delta) + base.bias[...]) ** 2)
  _assert_relative(grad["values"][...], jax.grad(dense_loss)(layer.values[...]))
  with pytest.raises(ValueError, match="`base_module` maps 8 -> 6"):
    layer_cls(D, 7, base_module=base, rngs=nnx.Rngs(2), **kwargs)


# -- layer kinds and lifted transforms beyond the models above ---------------------------------------
class LinenMore(nn.Module):
  @nn.compact
  def __call__(self, x):  # (3, batch, seq, D): the leading axis is mapped by nn.vmap
    h = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0)(
        D, name="vmapped")(x)
    return nn.ConvTranspose(D, (3,), name="deconv")(jnp.tanh(h))


class NNXMore(nnx.Module):
  def __init__(self, rngs):
    self.einsum = nnx.Einsum("bsd,de->bse", (D, D), (D,), rngs=rngs)
    self.deconv = nnx.ConvTranspose(D, D, (3,), rngs=rngs)

  def __call__(self, x):
    return self.deconv(jnp.tanh(self.einsum(x)))


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=lambda c: c.name)
def test_linen_vmap_and_conv_transpose_equal_merge(case):
  model = LinenMore()
  x = jax.random.normal(jax.random.key(0), (3, 2, 5, D))
  params = model.init(jax.random.key(1), x)["params"]
  adapters = _perturb(sp.peft.init_adapters(jax.random.key(2), params, case.method, r"kernel$",
                                            in_axes={r"deconv/": 2}, stack_axes={r"vmapped/": 1}), case.scale)
  assert adapters["vmapped/kernel"].shape == (3, D, D)
  merged_loss = lambda a: jnp.sum(jnp.sin(model.apply({"params": sp.peft.merge(params, a)}, x)))
  runtime_loss = lambda a: jnp.sum(jnp.sin(sp.peft.apply_adapters(model, params, a, x)))
  value, grads = jax.value_and_grad(merged_loss)(adapters)
  got_value, got_grads = jax.jit(jax.value_and_grad(runtime_loss))(adapters)
  np.testing.assert_allclose(float(got_value), float(value), rtol=1e-5, atol=1e-5)
  _assert_relative(got_grads, grads, _gradient_rtol(case))
  assert float(jnp.abs(runtime_loss(adapters) - jnp.sum(jnp.sin(model.apply({"params": params}, x))))) > 1e-4


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=lambda c: c.name)
def test_nnx_einsum_and_conv_transpose_equal_merge(case):
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  model = NNXMore(nnx.Rngs(0))
  sp.nnx.adapt(model, case.method, r"kernel$", key=jax.random.key(1), in_axes={r"einsum/": 1, r"deconv/": 2})
  nnx.update(model, _perturb(nnx.state(model, sp.nnx.AdapterParam), case.scale))
  adapters = sp.nnx.adapters_of(model)
  assert set(adapters) == {"einsum/kernel", "deconv/kernel"}
  graphdef, base, rest = nnx.split(NNXMore(nnx.Rngs(0)), nnx.Param, ...)
  merged_loss = lambda a: jnp.sum(jnp.sin(nnx.merge(graphdef, sp.peft.merge(base, a), rest)(x)))
  value, grads = jax.value_and_grad(merged_loss)(adapters)
  loss = lambda m: jnp.sum(jnp.sin(m(x)))
  got_value, got_grads = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, sp.nnx.AdapterParam)))(model)
  np.testing.assert_allclose(float(got_value), float(value), rtol=1e-5, atol=1e-5)
  nnx.update(model, got_grads)
  _assert_relative({p: a.params for p, a in sp.nnx.adapters_of(model).items()},
                   {p: a.params for p, a in grads.items()}, _gradient_rtol(case))


class _Pair(nnx.Module):
  def __init__(self, rngs):
    self.a, self.b = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(jax.nn.relu(self.a(x)))


def _adapted_pair(seed=1):
  model = _Pair(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(seed))
  nnx.update(model, _perturb(nnx.state(model, sp.nnx.AdapterParam), 0.3, key=jax.random.key(seed)))
  return model


def test_nnx_state_round_trips_give_the_adapted_model_or_raise():
  x = jax.random.normal(jax.random.key(0), (5, 4))
  adapted = _adapted_pair()
  want = adapted(x)
  assert float(jnp.max(jnp.abs(want - _Pair(nnx.Rngs(0))(x)))) > 1e-3  # The adapters change the output.
  graphdef, state = nnx.split(adapted)
  graphdef2, adapter_state, rest = nnx.split(adapted, sp.nnx.AdapterParam, ...)
  for rebuilt in (nnx.merge(graphdef, state), nnx.clone(adapted), nnx.merge(graphdef2, adapter_state, rest)):
    np.testing.assert_array_equal(rebuilt(x), want)
    assert sorted(sp.nnx.adapters_of(rebuilt)) == ["a/kernel", "b/kernel"]
  # The state of one adapted model into another adapted alike: that model, once (not twice).
  other = _adapted_pair(seed=2)
  nnx.update(other, nnx.state(adapted))
  nnx.update(other, nnx.state(adapted))
  np.testing.assert_array_equal(other(x), want)
  # Into a model that was never adapted: nnx.update itself refuses to add the adapter variables
  # (flax would keep them as inert attributes), naming the variable's path.
  plain = _Pair(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"adapter variable 'a/kernel_adapter_p0' to a Linear that does not apply"):
    nnx.update(plain, nnx.state(adapted))
  assert not any("adapter" in name for name in vars(plain.a))
  # The same for a model adapted on fewer layers: the unadapted layer refuses.
  partial = _Pair(nnx.Rngs(0))
  sp.nnx.adapt(partial, sp.peft.LoRA(2), r"^a/kernel$", key=jax.random.key(9))
  with pytest.raises(ValueError, match=r"'b/kernel_adapter_p0' to a Linear"):
    nnx.update(partial, nnx.state(adapted))
  # A pure-dict state carries raw arrays, which flax sets without any hook: every sp.nnx function that
  # reads adapters refuses such a model, naming the layer.
  plain = _Pair(nnx.Rngs(0))
  nnx.update(plain, nnx.to_pure_dict(nnx.state(adapted)))
  for call in (sp.nnx.adapters_of, sp.nnx.merge_adapters, sp.nnx.adapter_names, sp.nnx.detach_adapters):
    with pytest.raises(ValueError, match=r"'a' \(Linear\) holds adapter variables that no adapter of it uses"):
      call(plain)
  with pytest.raises(ValueError, match="inert"):
    sp.nnx.attach(plain, sp.nnx.adapters_of(adapted))
  # A graph of one kind with the state of the other is refused by flax itself.
  with pytest.raises(ValueError):
    nnx.merge(nnx.split(_Pair(nnx.Rngs(0)))[0], state)
  with pytest.raises(ValueError):
    nnx.merge(graphdef, nnx.state(_Pair(nnx.Rngs(0))))
  # The way that works: adapt the same way first, then update.
  target = _Pair(nnx.Rngs(5))
  sp.nnx.adapt(target, sp.peft.LoRA(2), "kernel", key=jax.random.key(9))
  nnx.update(target, nnx.state(adapted))
  np.testing.assert_array_equal(target(x), want)
  target = _Pair(nnx.Rngs(5))
  sp.nnx.load_into(target, sp.nnx.adapters_of(adapted))
  nnx.update(target, sp.nnx.base_params(adapted))
  np.testing.assert_array_equal(target(x), want)
