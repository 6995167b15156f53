"""Adapter dropout (PEFT's ``lora_dropout``): only the adapter's branch sees the dropped input.

An adapted layer with dropout computes ``layer_{W0}(x) + x_d @ Delta W`` with
``x_d = x * mask / (1 - rate)``. The references here are independent of the runtime: the dense
``Delta W`` of ``adapter.delta``, a mask recovered by enumerating every binary mask of a small
input, and the expectation over many keys (``E[x_d] = x``).
"""

from __future__ import annotations

import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp
from spectral_peft.peft._runtime.core import LayerAdapter
from adapter_cases import CASES

M, N, BATCH, RATE = 6, 12, 16, 0.3
ALL_MASKS = np.array(list(itertools.product([0.0, 1.0], repeat=M)))  # (2^M, M)


def _perturbed(adapters, scale, seed=7):
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


class Dense(nn.Module):
  """One Dense layer named ``proj`` (``subclass=True`` uses a Dense subclass: the merged path)."""

  subclass: bool = False

  @nn.compact
  def __call__(self, x):
    layer = _DenseSubclass if self.subclass else nn.Dense
    return layer(N, name="proj")(x)


class _DenseSubclass(nn.Dense):
  pass


def _setup(case, subclass=False):
  x = jax.random.normal(jax.random.key(0), (BATCH, M))
  model = Dense(subclass)
  params = model.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda w: w + 0.1 * jax.random.normal(jax.random.key(2), w.shape), params)  # nonzero bias
  adapters = _perturbed(sp.peft.init_adapters(jax.random.key(3), params, case.method, "kernel"), case.scale)
  return model, params, adapters, x


def _recover_dropped_input(x, branch_out, delta):
  """The ``x_d = x * mask / (1 - RATE)`` (over all ``2^M`` masks per row) that explains ``branch_out``."""
  candidates = (x[:, None, :] * ALL_MASKS[None] / (1.0 - RATE)) @ delta  # (B, 2^M, N)
  errors = np.abs(candidates - branch_out[:, None, :]).max(axis=-1)
  best = errors.argmin(axis=1)
  return ALL_MASKS[best], errors[np.arange(len(x)), best]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_method_branch_is_the_dense_delta_product(case):
  w0 = jax.random.normal(jax.random.key(0), (M, N))
  adapter = _perturbed(sp.peft.init_adapters(jax.random.key(1), {"w": w0}, case.method, "w")["w"], case.scale)
  x = jax.random.normal(jax.random.key(2), (3, 4, M))
  expected = np.asarray(x @ adapter.delta(w0))
  np.testing.assert_allclose(adapter.branch(x, w0), expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
  jitted = jax.jit(lambda a, x: a.branch(x, w0))(adapter, x)
  np.testing.assert_allclose(jitted, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
  np.testing.assert_allclose(adapter.apply(x, w0) - x @ w0, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


PEFT_DROPOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft", "dropout.npz")


@pytest.mark.parametrize("name, method", [("lora", sp.peft.LoRA(rank=2, alpha=4.0)), ("dora", sp.peft.DoRA(rank=2, alpha=4.0))])
def test_branch_at_a_fixed_mask_matches_peft_training_output(name, method):
  """PEFT's layer in training mode with ``lora_dropout`` at a committed mask (tests/fixtures/generate_peft_fixtures.py)."""
  data = np.load(PEFT_DROPOUT)
  kernel, bias, x = (jnp.asarray(data[k]) for k in ("kernel", "bias", "x"))
  adapter = sp.peft.init_adapters(jax.random.key(0), {"w": kernel}, method, "w")["w"]
  params = {"a": jnp.asarray(data[f"{name}_a"]), "b": jnp.asarray(data[f"{name}_b"])}
  if name == "dora":
    params["magnitude"] = jnp.asarray(data["dora_magnitude"])
  adapter = sp.peft.Adapter(params, adapter.frozen, adapter.method, adapter.shape, adapter.dtype, adapter.in_axes)
  x_dropped = x * jnp.asarray(data["mask"]) / (1.0 - 0.3)
  ours = x @ kernel + bias + adapter.branch(x_dropped, kernel)
  np.testing.assert_allclose(ours, data[f"{name}_y"], rtol=1e-5, atol=1e-5)
  # And without dropout the branch is not what PEFT computed (the mask matters).
  assert not np.allclose(x @ kernel + bias + adapter.branch(x, kernel), data[f"{name}_y"], atol=1e-3)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_linen_output_is_base_plus_dropped_branch(case, jit):
  model, params, adapters, x = _setup(case)
  key = jax.random.key(11)

  def run(ad):
    return sp.peft.apply_adapters(model, params, ad, x, adapter_dropout=RATE, dropout_key=key)

  y = np.asarray((jax.jit(run) if jit else run)(adapters))
  kernel, bias = params["proj"]["kernel"], params["proj"]["bias"]
  delta = np.asarray(adapters["proj/kernel"].delta(kernel))
  mask, error = _recover_dropped_input(np.asarray(x), y - np.asarray(x @ kernel + bias), delta)
  scale = np.abs(y).max()
  assert error.max() < 1e-4 * scale, f"no binary mask explains the output (worst row error {error.max():.3g})"
  assert 0.45 < mask.mean() < 0.9, mask.mean()  # 96 Bernoulli(0.7) draws

  # The gradient with respect to the adapter is that of the dense reference at the recovered mask.
  x_dropped = x * jnp.asarray(mask, x.dtype) / (1.0 - RATE)

  def reference(ad):
    return x @ kernel + bias + x_dropped @ ad["proj/kernel"].delta(kernel)

  g = jax.grad(lambda ad: jnp.sum(jnp.sin(run(ad))))(adapters)
  g_ref = jax.grad(lambda ad: jnp.sum(jnp.sin(reference(ad))))(adapters)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * (np.abs(np.asarray(b)).max() + 1e-12))


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("lora", "dora", "sine_lora", "shira")],
                         ids=lambda c: c.name)
def test_factored_and_merged_paths_draw_the_same_mask(case):
  model, params, adapters, x = _setup(case)
  merged_model = Dense(subclass=True)  # a Dense subclass: always the merged weight
  key = jax.random.key(5)
  y = sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=RATE, dropout_key=key)
  y_merged = sp.peft.apply_adapters(merged_model, params, adapters, x, adapter_dropout=RATE, dropout_key=key)
  np.testing.assert_allclose(y, y_merged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("lora", "sine_lora")], ids=lambda c: c.name)
def test_expectation_over_keys_is_the_undropped_output(case):
  model, params, adapters, x = _setup(case)
  keys = jax.random.split(jax.random.key(0), 4000)
  ys = jax.jit(jax.vmap(lambda k: sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=RATE,
                                                         dropout_key=k)))(keys)
  y0 = sp.peft.apply_adapters(model, params, adapters, x)
  standard_error = np.asarray(ys.std(axis=0)) / np.sqrt(len(keys))
  assert np.all(np.abs(np.asarray(ys.mean(axis=0) - y0)) < 5 * standard_error + 1e-6)
  assert float(ys.std(axis=0).max()) > 0


def test_rate_zero_keys_and_layers():
  case = CASES[0]
  model, params, adapters, x = _setup(case)
  y0 = sp.peft.apply_adapters(model, params, adapters, x)
  same = sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=0.0, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(y0, same)
  a = sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=RATE, dropout_key=jax.random.key(1))
  b = sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=RATE, dropout_key=jax.random.key(1))
  c = sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=RATE, dropout_key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # The context draws from the key alone; given apply_adapters' stream, it draws the same masks.
  runs = []
  for rngs in ({}, {}, {"adapter_dropout": jax.random.key(1)}):
    with sp.peft.factored(adapters, adapter_dropout=RATE, dropout_key=jax.random.key(1)):
      runs.append(model.apply({"params": params}, x, rngs=rngs))
  np.testing.assert_array_equal(runs[0], runs[1])
  assert not np.allclose(runs[0], y0)
  np.testing.assert_allclose(runs[2], a, rtol=1e-6, atol=1e-6)


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    body = nn.scan(lambda mdl, h, _: (jnp.tanh(nn.Dense(M, name="layer")(h)), None),
                   variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return body(self, x, None)[0]


def test_scanned_layers_draw_their_own_masks():
  x = jax.random.normal(jax.random.key(0), (BATCH, M))
  model = _Stack()
  params = model.init(jax.random.key(1), x)["params"]
  adapters = _perturbed(sp.peft.init_adapters(jax.random.key(2), params, sp.peft.LoRA(2), "kernel", stack_axes=1), 0.3)

  def loss(ad, key):
    return jnp.sum(sp.peft.apply_adapters(model, params, ad, x, adapter_dropout=RATE, dropout_key=key) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(adapters, jax.random.key(3))
  assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  keys = LayerAdapter.from_adapter("layer/kernel", adapters["layer/kernel"], jax.random.key(3)).dropout_key
  assert keys.shape == (3,)
  data = np.asarray(jax.random.key_data(keys))
  assert len({tuple(row) for row in data.reshape(3, -1)}) == 3  # one key per scanned layer


class _TwoInputs(nn.Module):
  @nn.compact
  def __call__(self, x, y):
    kernel = self.param("kernel", nn.initializers.normal(), (M, N))
    return x @ kernel + y @ kernel


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(adapter_dropout=0.1), ValueError, "needs `dropout_key="),
    (dict(adapter_dropout=1.0, dropout_key=jax.random.key(0)), ValueError, r"in \[0, 1\)"),
    (dict(adapter_dropout=True, dropout_key=jax.random.key(0)), TypeError, "Python float"),
    (dict(adapter_dropout=0.1, dropout_key=jax.random.PRNGKey(0)), TypeError, "typed key"),
])
def test_bad_dropout_arguments(kwargs, error, match):
  model, params, adapters, x = _setup(CASES[0])
  with pytest.raises(error, match=match):
    sp.peft.apply_adapters(model, params, adapters, x, **kwargs)


def test_dropout_on_a_layer_with_two_inputs_is_refused():
  model = _TwoInputs()
  x = jnp.ones((2, M))
  params = model.init(jax.random.key(0), x, x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel")
  with pytest.raises(ValueError, match="one input array"):
    sp.peft.apply_adapters(model, params, adapters, x, x, adapter_dropout=0.1, dropout_key=jax.random.key(2))


# -- NNX --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("lora", "dora", "sine_lora", "fourierft")],
                         ids=lambda c: c.name)
def test_nnx_output_is_base_plus_dropped_branch(case):
  layer = nnx.Linear(M, N, rngs=nnx.Rngs(0))
  sp.nnx.adapt(layer, case.method, "kernel", key=jax.random.key(1))
  sp.nnx.load_into(layer, _perturbed(sp.nnx.adapters_of(layer), case.scale))
  x = jax.random.normal(jax.random.key(2), (BATCH, M))
  y0 = layer(x)
  sp.nnx.set_adapter_dropout(layer, RATE, rngs=nnx.Rngs(dropout=3))
  y1, y2 = nnx.jit(lambda m, x: m(x))(layer, x), layer(x)
  assert not np.allclose(y1, y2)  # a new mask at every call
  kernel, bias = layer.kernel[...], layer.bias[...]
  delta = np.asarray(sp.nnx.adapters_of(layer)["kernel"].delta(kernel))
  for y in (y1, y2):
    mask, error = _recover_dropped_input(np.asarray(x), np.asarray(y - (x @ kernel + bias)), delta)
    assert error.max() < 1e-4 * np.abs(np.asarray(y)).max()
    assert 0.45 < mask.mean() < 0.9
  layer.eval()
  np.testing.assert_allclose(layer(x), y0, rtol=1e-6, atol=1e-6)
  layer.train()
  sp.nnx.set_adapter_dropout(layer, 0.0)
  np.testing.assert_allclose(layer(x), y0, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_nnx_dropout_trains_and_merges():
  net = nnx.Sequential(nnx.Linear(M, N, rngs=nnx.Rngs(0)), nnx.gelu, nnx.Conv(N, 3, (3,), rngs=nnx.Rngs(1)))
  sp.nnx.adapt(net, sp.peft.SineLoRA(2, omega=30.0), "kernel", key=jax.random.key(2), in_axes=lambda p, s: len(s) - 1)
  sp.nnx.set_adapter_dropout(net, RATE, rngs=nnx.Rngs(dropout=4))
  x = jax.random.normal(jax.random.key(3), (4, 7, M))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, sp.nnx.AdapterParam))(net)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  net.eval()
  expected = net(x)
  sp.nnx.merge_adapters(net)
  assert not hasattr(net.layers[0], "adapter_dropout")
  np.testing.assert_allclose(net(x), expected, rtol=1e-4, atol=1e-5)


def test_nnx_bad_arguments():
  layer = nnx.Linear(M, N, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no adapters"):
    sp.nnx.set_adapter_dropout(layer, 0.1, rngs=nnx.Rngs(0))
  sp.nnx.adapt(layer, sp.peft.LoRA(2), "kernel", key=jax.random.key(1))
  with pytest.raises(ValueError, match="needs `rngs=`"):
    sp.nnx.set_adapter_dropout(layer, 0.1)
  with pytest.raises(ValueError, match=r"in \[0, 1\)"):
    sp.nnx.set_adapter_dropout(layer, 1.5, rngs=nnx.Rngs(0))


def test_a_layer_called_twice_draws_a_mask_per_call():
  """PEFT draws a new dropout mask at every forward of a layer; the second call is not the first's copy."""

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.Dense(16)
      return dense(x), dense(x)

  model, x = Twice(), jnp.ones((4, 16))
  params = model.init(jax.random.key(0), x)["params"]
  adapters = jax.tree.map(lambda a: a + 0.3,
                          sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "kernel"))
  first, second = sp.peft.apply_adapters(model, params, adapters, x, adapter_dropout=0.5,
                                         dropout_key=jax.random.key(3))
  assert not np.allclose(first, second)
  # Without dropout both calls agree: the difference is the masks alone.
  plain_first, plain_second = sp.peft.apply_adapters(model, params, adapters, x)
  np.testing.assert_array_equal(plain_first, plain_second)


@pytest.mark.parametrize("jit", [False, True])
def test_the_mask_is_the_bernoulli_draw_at_the_input_shape(jit):
  """The mask is drawn flat (faster to compile for 4-D Conv inputs) but equals the draw at x's shape."""
  params = {"conv": {"kernel": jnp.ones((3, 3, 4, 5))}}
  adapter = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), "kernel", in_axes=3)["conv/kernel"]
  layer = LayerAdapter.from_adapter("conv/kernel", adapter, jax.random.key(7))
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
  dropped = jax.jit(layer.dropped, static_argnums=1) if jit else layer.dropped
  keep = jax.random.bernoulli(layer.dropout_key, 0.7, x.shape)
  np.testing.assert_array_equal(np.asarray(dropped(x, 0.3)) != 0, np.asarray(keep))
  np.testing.assert_allclose(dropped(x, 0.3), jnp.where(keep, x / 0.7, 0.0), rtol=1e-6, atol=0)


class _Cell(nn.Module):
  """One Dense applied at every step of an nn.scan (an RNN cell's input projection)."""
  split: bool

  @nn.compact
  def __call__(self, xs):
    def body(mdl, carry, x):
      return carry, nn.Dense(M, use_bias=False, name="cell")(x)
    split_rngs = {"params": False, "adapter_dropout": True} if self.split else {"params": False}
    return nn.scan(body, variable_broadcast="params", split_rngs=split_rngs)(self, None, xs)[1]


@pytest.mark.parametrize("split", [True, False])
def test_a_scanned_cell_draws_a_mask_per_step_when_the_scan_splits_the_stream(split):
  xs = jnp.ones((5, 2, M))  # The same input at every step: only the masks can tell the steps apart.
  model = _Cell(split)
  params = model.init(jax.random.key(0), xs)["params"]
  adapters = _perturbed(sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(M), "kernel"), 0.5)
  run = jax.jit(lambda key: sp.peft.apply_adapters(model, params, adapters, xs, adapter_dropout=0.5, dropout_key=key))
  branch = np.asarray(run(jax.random.key(3)) - sp.peft.apply_adapters(model, params, adapters, xs))
  steps = {tuple(np.round(b.ravel(), 4)) for b in branch}
  assert len(steps) == (5 if split else 1)
  # Each step differs from the undropped output by (x_d - x) @ Delta W, with x_d in {0, 1 / (1 - rate)}:
  # here x = 1 and the rate 0.5, so x_d - x is -1 or +1 per entry.
  delta = np.asarray(adapters["cell/kernel"].delta(params["cell"]["kernel"]), np.float64)
  for b in branch.reshape(-1, branch.shape[-1]):
    signs = np.linalg.solve(delta.T, b)
    np.testing.assert_allclose(np.abs(signs), 1.0, atol=1e-3 * np.linalg.cond(delta) ** 0.5)
