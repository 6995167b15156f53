"""WaveFT, SHiRA, FourierFT and LFMA specs beyond the shared matrix; their Flax modules; sparse theory."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt
from flax import nnx

import spectral_peft as sp

QV = r"attention/(query|value)/kernel$"


@pytest.mark.slow
def test_waveft_on_query_value_equals_pywavelets(base_params):
  method = sp.peft.WaveFT(n_params=30, scale=25.0, wavelet="db2", level=2)
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params, method, QV, in_axes=1)
  assert set(adapters) == {"attention/query/kernel", "attention/value/kernel"}
  trainable, rest = sp.peft.partition(adapters)
  trainable = jax.tree.map(lambda v: jax.random.normal(jax.random.key(1), v.shape, v.dtype), trainable)
  adapters = sp.peft.combine(trainable, rest)
  deltas = sp.peft.delta_tree(base_params, adapters)
  for path, adapter in adapters.items():
    m, n = adapter.matrix_shape
    grid = sp.wavelet_coefficient_shape((m, n), wavelet="db2", level=2)
    coeffs = np.zeros(grid[0] * grid[1])
    coeffs[np.asarray(adapter.frozen["indices"])] = np.asarray(adapter.params["values"], np.float64)
    coeffs = coeffs.reshape(grid)
    slices = pywt.coeffs_to_array(pywt.wavedec2(np.zeros(grid), "db2", "periodization", level=2))[1]
    rec = pywt.waverec2(pywt.array_to_coeffs(coeffs, slices, output_format="wavedec2"), "db2", "periodization")
    np.testing.assert_allclose(np.asarray(deltas[path]).reshape(m, n), 25.0 * rec[:m, :n], atol=1e-5 * 25.0)
  # Positions: distinct, inside the grid, and the same for the same key.
  idx = np.asarray(adapters["attention/query/kernel"].frozen["indices"])
  assert len(set(idx.tolist())) == 30 and idx.min() >= 0 and idx.max() < 16 * 16
  again = sp.peft.init_adapters(jax.random.key(0), base_params, method, QV, in_axes=1)
  np.testing.assert_array_equal(again["attention/query/kernel"].frozen["indices"], idx)


@pytest.mark.slow
def test_factored_model_equals_merged_model(block, base_params, inputs):
  for method in (sp.peft.WaveFT(20, path="factored"), sp.peft.FourierFT(20, scale=10.0, path="factored"),
                 sp.peft.LFMA(0.1, 5.0, path="factored")):
    adapters = sp.peft.init_adapters(jax.random.key(0), base_params, method, r"mlp_in/kernel$")
    trainable, rest = sp.peft.partition(adapters)
    adapters = sp.peft.combine(jax.tree.map(lambda v: v + 0.3, trainable), rest)
    merged = block.apply({"params": sp.peft.merge(base_params, adapters)}, inputs)
    factored = sp.peft.apply_factored(block, base_params, adapters, inputs)
    np.testing.assert_allclose(factored, merged, atol=2e-5)


def test_shira_delta_is_the_scattered_values():
  w0 = jnp.zeros((6, 5))
  method = sp.peft.SHiRA(n_params=7, scale=3.0, value_init="normal")
  params, frozen = method.init(jax.random.key(0), w0), method.init_frozen(jax.random.key(1), w0)
  expected = np.zeros(30)
  expected[np.asarray(frozen["indices"])] = 3.0 * np.asarray(params["values"])
  np.testing.assert_allclose(method.delta(params, w0, frozen), expected.reshape(6, 5), atol=1e-6)


def test_fourierft_delta_matches_numpy():
  w0 = jnp.zeros((8, 6))
  method = sp.peft.FourierFT(n_frequency=9, scale=150.0, value_init="normal")
  params, frozen = method.init(jax.random.key(0), w0), method.init_frozen(jax.random.key(1), w0)
  spectrum = np.zeros(48, complex)
  spectrum[np.asarray(frozen["indices"])] = np.asarray(params["values"])
  np.testing.assert_allclose(method.delta(params, w0, frozen), 150.0 * np.fft.ifft2(spectrum.reshape(8, 6)).real, atol=1e-5)


def test_lfma_weight_init_follows_the_paper():
  w0 = jax.random.normal(jax.random.key(0), (16, 12))
  method = sp.peft.LFMA(top_k_ratio=0.05, alpha=12.0, delta_init="weight", value_init="spectrum")
  adapters = sp.peft.init_adapters(jax.random.key(1), {"w": w0}, method, "w")
  a = adapters["w"]
  mask = np.asarray(a.frozen["indices"])
  np.testing.assert_array_equal(mask, np.asarray(sp.topk_spectral_mask(w0, 0.05)))
  spectrum = np.fft.fft2(np.asarray(w0, np.float64)).ravel()
  np.testing.assert_allclose(np.asarray(method.coefficients(a.params)), spectrum[mask], rtol=1e-4, atol=1e-4)
  masked = np.zeros_like(spectrum)
  masked[mask] = spectrum[mask]
  np.testing.assert_allclose(a.delta(w0), 12.0 * np.fft.ifft2(masked.reshape(16, 12)).real, atol=1e-4)


def test_lfma_random_init_mask_and_values_share_one_draw(base_params):
  adapters = sp.peft.init_adapters(jax.random.key(2), base_params, sp.peft.LFMA(0.1, 1.0, value_init="spectrum"), r"mlp_in/kernel$")
  values = np.abs(np.asarray(sp.peft.LFMA.coefficients(adapters["mlp_in/kernel"].params)))
  # The mask is in top-k order of |fft2(Delta W_init)| and the values are that spectrum on it.
  assert values.shape == (int(16 * 32 * 0.1),)
  assert np.all(np.diff(values) <= 1e-5 * values.max())
  assert values.min() > 0


@pytest.mark.slow
def test_lfma_gradient_init_and_checkpoint(block, base_params, inputs, tmp_path):
  target = jnp.ones_like(inputs)

  def loss(params, batch):
    return jnp.mean(jnp.square(block.apply({"params": params}, batch) - target))

  batches = [inputs, 2.0 * inputs]
  grads = sp.peft.lfma_gradient_init(loss, base_params, batches, QV)
  full = jax.grad(loss)(base_params, inputs)["attention"]["query"]["kernel"]
  full = full + jax.grad(loss)(base_params, 2.0 * inputs)["attention"]["query"]["kernel"]
  np.testing.assert_allclose(grads["attention/query/kernel"], full, atol=1e-6)
  method = sp.peft.LFMA(0.05, 10.0, delta_init="gradient")
  with pytest.raises(ValueError, match="init_lfma_adapters"):
    sp.peft.init_adapters(jax.random.key(0), base_params, method, QV, in_axes=1)
  adapters = sp.peft.init_lfma_adapters(jax.random.key(0), base_params, method, QV, grads, in_axes=1)
  mask = adapters["attention/query/kernel"].frozen["indices"]
  # Same set (the order within exactly tied conjugate pairs is up to FFT rounding).
  assert set(np.asarray(mask).tolist()) == set(np.asarray(sp.topk_spectral_mask(full.reshape(16, 16), 0.05)).tolist())
  sp.peft.save_adapters(tmp_path / "ckpt", adapters)
  loaded = sp.peft.load_adapters(tmp_path / "ckpt", base_params)
  chex.assert_trees_all_equal(loaded, adapters)
  with pytest.raises(ValueError, match="no array for target"):
    sp.peft.init_lfma_adapters(jax.random.key(0), base_params, method, QV, {}, in_axes=1)


def test_budgets_proportional_and_per_path(base_params):
  choose = sp.peft.proportional_allocation(base_params, r"(query|mlp_in)/kernel$", sp.peft.WaveFT(1), 96,
                                           in_axes={"attention/": 1})
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params, choose, r"(query|mlp_in)/kernel$",
                                   in_axes={"attention/": 1})
  # (m + n): query 16 + 16 = 32, mlp_in 16 + 32 = 48 -> 96 * 32/80 and 96 * 48/80.
  assert adapters["attention/query/kernel"].params["values"].shape == (38,)
  assert adapters["mlp_in/kernel"].params["values"].shape == (58,)
  override = {r"mlp_in": sp.peft.WaveFT(5), r".*": sp.peft.WaveFT(9)}
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params, override, r"(query|mlp_in)/kernel$",
                                   in_axes={"attention/": 1})
  assert adapters["mlp_in/kernel"].params["values"].shape == (5,)
  assert adapters["attention/query/kernel"].params["values"].shape == (9,)
  assert sp.peft.count_parameters(sp.peft.init_adapters(jax.random.key(0), base_params, sp.peft.LFMA(0.1, 1.0),
                                                        r"mlp_in/kernel$")) == 2 * 51


def test_bad_method_arguments():
  with pytest.raises(ValueError, match="`n_params` must be a positive int"):
    sp.peft.WaveFT(0)
  with pytest.raises(ValueError, match="at most the 256 positions"):
    sp.peft.WaveFT(300).check_shape((16, 16))
  with pytest.raises(ValueError, match="at most m \\* n = 20"):
    sp.peft.FourierFT(21).check_shape((4, 5))
  with pytest.raises(ValueError, match=r"`top_k_ratio` must be in \(0, 1\]"):
    sp.peft.LFMA(1.5)
  with pytest.raises(ValueError, match=r"`top_k_ratio` must be in \(0, 1\]"):
    sp.peft.LFMA(0.0)
  with pytest.raises(ValueError, match="`wavelet`"):
    sp.peft.WaveFT(3, wavelet="mexh")
  with pytest.raises(ValueError, match="too deep"):
    sp.peft.WaveFT(3, wavelet="db2", level=3).check_shape((8, 8))
  with pytest.raises(ValueError, match="`value_init` must be one of"):
    sp.peft.SHiRA(3, value_init="ones")
  with pytest.raises(TypeError, match="`values` must be real"):
    sp.peft.WaveFT(2).delta({"values": jnp.ones(2, jnp.complex64)}, jnp.zeros((4, 4)), {"indices": jnp.arange(2)})


def test_specs_round_trip_through_config():
  for method in (sp.peft.WaveFT(5, wavelet="sym3", level=2), sp.peft.SHiRA(3), sp.peft.FourierFT(7),
                 sp.peft.LFMA(0.1, 12.0, delta_init="weight", value_init="zeros")):
    assert sp.peft.method_from_config(method.to_config()) == method


# -- Flax modules ------------------------------------------------------------------------------
X = jax.random.normal(jax.random.key(3), (2, 3, 16))
NNX_LAYERS = {
    "waveft": lambda: sp.nnx.WaveFTDense(16, 8, n_params=12, wavelet="db2", value_init="normal", rngs=nnx.Rngs(0)),
    "shira": lambda: sp.nnx.SHiRADense(16, 8, n_params=9, value_init="normal", rngs=nnx.Rngs(0)),
    "fourierft": lambda: sp.nnx.FourierFTDense(16, 8, n_frequency=9, value_init="normal", rngs=nnx.Rngs(0)),
    "lfma": lambda: sp.nnx.LFMADense(16, 8, top_k_ratio=0.1, alpha=2.0, value_init="spectrum", rngs=nnx.Rngs(0)),
}
LINEN_LAYERS = {
    "waveft": sp.linen.WaveFTDense(features=8, n_params=12, wavelet="db2", value_init="normal"),
    "shira": sp.linen.SHiRADense(features=8, n_params=9, value_init="normal"),
    "fourierft": sp.linen.FourierFTDense(features=8, n_frequency=9, value_init="normal"),
    "lfma": sp.linen.LFMADense(features=8, top_k_ratio=0.1, alpha=2.0, value_init="spectrum"),
}


@pytest.mark.parametrize("name", list(NNX_LAYERS))
def test_nnx_layers_equal_core(name):
  layer = NNX_LAYERS[name]()
  layer.bias[...] = jnp.arange(8.0)
  params, frozen = {"values": layer.values[...]}, {"indices": layer.indices[...]}
  delta = layer.method.delta(params, layer.kernel[...], frozen)
  assert float(jnp.max(jnp.abs(delta))) > 0
  np.testing.assert_allclose(layer(X), X @ (layer.kernel[...] + delta) + jnp.arange(8.0), atol=2e-5)
  assert isinstance(layer.indices, sp.nnx.AdapterIndices)
  trainable = nnx.state(layer, nnx.Param)
  assert "indices" not in trainable


@pytest.mark.parametrize("name", list(LINEN_LAYERS))
def test_linen_layers_equal_core(name):
  module = LINEN_LAYERS[name]
  variables = module.init(jax.random.key(0), X)
  p, idx = variables["params"], variables["adapter"]["indices"]
  method = module.spec()
  delta = method.delta({"values": p["values"]}, p["kernel"], {"indices": idx})
  np.testing.assert_allclose(module.apply(variables, X), X @ (p["kernel"] + delta) + p["bias"], atol=2e-5)
  if name == "lfma":  # mask and values come from one Delta W_init: values in decreasing magnitude.
    mags = np.abs(np.asarray(sp.peft.LFMA.coefficients(p)))
    assert np.all(np.diff(mags) <= 1e-5 * mags.max())


# -- theory ------------------------------------------------------------------------------------
def test_sparse_rank_reaches_full_rank_near_n_log_n():
  n = 32
  threshold = sp.lemma1_threshold(n)  # 32 ln 32 ~ 111
  ps = [n // 2, int(threshold / 2), int(3 * threshold)]
  ranks = np.asarray(sp.sparse_rank_curve((n, n), ps, jax.random.key(0), trials=3))
  assert ranks.shape == (3, 3)
  assert np.all(ranks[0] <= n // 2)  # p entries cannot give rank above p
  assert np.all(ranks[1] < n)  # well below n ln n: rank deficient (empty rows/columns)
  assert np.all(ranks[2] == n)  # a few times n ln n: full rank
  assert np.all(np.diff(ranks.mean(axis=1)) > 0)


def test_receptive_field_and_coverage_match_table_1():
  assert sp.receptive_field_size("haar", 1) == 4
  assert sp.receptive_field_size("db2", 1) == 16
  assert sp.receptive_field_size("haar", 3, shape=(4, 100)) == 4 * 8
  coverage = [float(sp.gradient_coverage(0.1, r)) for r in (1, 4, 64 * 64)]
  np.testing.assert_allclose(coverage, [0.1, 0.3439, 1.0], atol=1e-4)
  with pytest.raises(ValueError, match="`rho`"):
    sp.gradient_coverage(1.5, 4)
  with pytest.raises(ValueError, match="`receptive_field`"):
    sp.gradient_coverage(0.1, 0)


def test_receptive_field_is_the_support_of_one_coefficient():
  # A level-1 coefficient of db2 (K = 4 taps) reaches a K x K block of the weight: |R| = 16.
  grid = (32, 32)
  one = np.zeros(grid)
  one[20, 20] = 1.0  # a level-1 diagonal detail coefficient
  support = np.count_nonzero(np.abs(np.asarray(sp.idwt2(jnp.asarray(one), "db2", 1))) > 1e-9)
  assert support == sp.receptive_field_size("db2", 1)


@pytest.mark.slow
def test_lfma_trains_with_a_standard_optimizer():
  # Real storage of the complex coefficients: a plain optax.adam loop must lower the loss.
  import optax
  w0 = jax.random.normal(jax.random.key(0), (16, 12))
  adapters = sp.peft.init_adapters(jax.random.key(1), {"w": w0}, sp.peft.LFMA(0.1, 1.0, delta_init="weight",
                                                                               value_init="zeros"), "w")
  trainable, frozen = sp.peft.partition(adapters)
  goal = jax.random.normal(jax.random.key(2), (19,)) + 1j * jax.random.normal(jax.random.key(3), (19,))
  target = w0 + sp.fourier_delta(goal, frozen["w"].frozen["indices"], (16, 12))  # reachable on the mask
  assert not jnp.iscomplexobj(trainable["w"].params["values"])
  loss = lambda t: jnp.mean(jnp.square(sp.peft.merge({"w": w0}, sp.peft.combine(t, frozen))["w"] - target))
  tx = optax.adam(0.1)
  state = tx.init(trainable)
  start = float(loss(trainable))
  for _ in range(100):
    updates, state = tx.update(jax.grad(loss)(trainable), state)
    trainable = optax.apply_updates(trainable, updates)
  assert float(loss(trainable)) < 1e-2 * start
