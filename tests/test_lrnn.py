"""Tests for the LRNN core (spectral_peft._lrnn) and its Flax modules."""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import nnx

import spectral_peft as sp

TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=3e-2, atol=3e-2)}

NP_ACTIVATIONS = {
    "sine": np.sin,
    "spder": lambda u: np.sin(u) * np.sqrt(np.abs(u)),
    "sin_arctan": lambda u: np.sin(u) * np.arctan(u),
    "relu": lambda u: np.maximum(u, 0.0),
    "tanh": np.tanh,
}


def _numpy_product(z, components, act, omega, gamma=None):
  """Per-neuron, per-component loops in numpy: the plain reading of eq. 4 / eq. 5."""
  z = np.asarray(z, np.float64)
  weights = [np.asarray(w, np.float64) for w in components["weights"]]
  biases = [np.asarray(b, np.float64) for b in components["biases"]]
  shared = weights[0].ndim == 3
  batch, r, d = z.shape
  gamma = d**-0.5 if gamma is None else gamma
  out = np.ones((batch, r))
  for l in range(r):
    for j in range(d):
      idx = (j,) if shared else (l, j)
      a = act(omega * z[:, l, j])[:, None]
      for w, b in zip(weights[:-1], biases):
        a = act(omega * (a @ w[idx] + b[idx]))
      g = (a @ weights[-1][idx])[:, 0]
      out[:, l] *= 1.0 + gamma * g
  return out


class ProductActivationTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      dict(hidden=(), shared=False, d=1),
      dict(hidden=(1,), shared=True, d=5),
      dict(hidden=(3, 2), shared=False, d=4),
      dict(hidden=(1, 3), shared=False, d=2),  # width 1 -> 1 -> 3 -> 1: every _block_linear case.
  )
  def test_matches_numpy_loops(self, hidden, shared, d):
    r, omega = 3, 2.0
    comps = sp.component_init(jax.random.key(0), r, d, hidden, omega=omega, shared=shared)
    z = jax.random.normal(jax.random.key(1), (4, r, d))
    fn = self.variant(lambda z, c: sp.product_activation(z, c, omega=omega))
    got = fn(z, comps)
    chex.assert_shape(got, (4, r))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, _numpy_product(z, comps, np.sin, omega), rtol=2e-5, atol=2e-5)

  @parameterized.parameters(*NP_ACTIVATIONS)
  def test_named_activations(self, name):
    comps = sp.component_init(jax.random.key(2), 2, 3, (2,), omega=1.5)
    z = jax.random.normal(jax.random.key(3), (5, 2, 3))
    got = sp.product_activation(z, comps, activation=name, omega=1.5, gamma=0.7)
    want = _numpy_product(z, comps, NP_ACTIVATIONS[name], 1.5, gamma=0.7)
    np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-5)

  def test_gelu_and_callable(self):
    comps = sp.component_init(jax.random.key(2), 2, 3, (2,))
    z = jax.random.normal(jax.random.key(3), (5, 2, 3))
    chex.assert_trees_all_close(
        sp.product_activation(z, comps, activation="gelu"),
        sp.product_activation(z, comps, activation=jax.nn.gelu),
    )
    cube = sp.product_activation(z, comps, activation=lambda u: u**3)
    np.testing.assert_allclose(cube, _numpy_product(z, comps, lambda u: u**3, 1.0), rtol=3e-5, atol=3e-5)

  def test_shared_equals_tiled_per_neuron(self):
    r, d = 4, 3
    shared = sp.component_init(jax.random.key(0), r, d, (2,), shared=True, omega=3.0)
    tiled = jax.tree.map(lambda a: jnp.broadcast_to(a, (r,) + a.shape), shared)
    z = jax.random.normal(jax.random.key(1), (6, r, d))
    chex.assert_trees_all_close(
        sp.product_activation(z, shared, omega=3.0), sp.product_activation(z, tiled, omega=3.0), rtol=1e-6, atol=1e-6
    )

  def test_remat_same_values_and_grads(self):
    comps = sp.component_init(jax.random.key(0), 3, 4, (5,), omega=2.0)
    z = jax.random.normal(jax.random.key(1), (6, 3, 4))
    loss = lambda z, c, remat: jnp.sum(jnp.sin(sp.product_activation(z, c, omega=2.0, remat=remat)))
    a = jax.value_and_grad(loss, argnums=(0, 1))(z, comps, False)
    b = jax.value_and_grad(loss, argnums=(0, 1))(z, comps, True)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)

  @pytest.mark.slow
  def test_remat_memory_is_o_brd(self):
    # App. B.2: the residuals the forward pass keeps for the backward pass, measured as the
    # output size of the compiled forward (XLA memory analysis), minus the parameters.
    batch, r, d, h, depth = 64, 8, 8, 16, 3
    params = sp.lrnn_init(jax.random.key(0), 2, (r,) * depth, 1, projection_width=d, hidden=(h,), layer_norm=False)
    x = jax.random.uniform(jax.random.key(1), (batch, 2))
    param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))

    def residual_bytes(remat):
      loss = lambda p: jnp.sum(sp.lrnn_apply(p, x, remat=remat) ** 2)
      forward = jax.jit(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]))
      return forward.lower(params).compile().memory_analysis().output_size_in_bytes - param_bytes

    brd, brdh = batch * r * d * 4, batch * r * d * h * 4
    plain, remat = residual_bytes(False), residual_bytes(True)
    assert plain >= depth * brdh, (plain, depth * brdh)  # O(B r d h) per layer.
    assert remat <= 2 * depth * brd, (remat, depth * brd)  # O(B r d) per layer.

  @parameterized.parameters(
      dict(shape=(4, 3, 0), match="d >= 1"),
      dict(shape=(4, 0, 3), match="r >= 1"),
      dict(shape=(3,), match=r"\(\.\.\., r, d\)"),
  )
  def test_bad_z(self, shape, match):
    comps = sp.component_init(jax.random.key(0), 3, 3)
    with pytest.raises(ValueError, match=match):
      sp.product_activation(jnp.zeros(shape), comps)

  def test_bad_components(self):
    z = jnp.zeros((4, 3, 5))
    with pytest.raises(ValueError, match=r"components\['weights'\]\[0\]"):
      sp.product_activation(z, sp.component_init(jax.random.key(0), 3, 4))  # d = 4, z has d = 5.
    with pytest.raises(ValueError, match=r"components\['weights'\]\[0\]"):
      sp.product_activation(z, sp.component_init(jax.random.key(0), 2, 5))  # r = 2, z has r = 3.
    comps = sp.component_init(jax.random.key(0), 3, 5, (2,))
    with pytest.raises(ValueError, match="one more weight"):
      sp.product_activation(z, {"weights": comps["weights"], "biases": ()})
    with pytest.raises(TypeError, match="'weights' and 'biases'"):
      sp.product_activation(z, {"w": 1})
    with pytest.raises(ValueError, match="one output"):
      sp.product_activation(z, {"weights": (jnp.ones((3, 5, 1, 2)),), "biases": ()})
    with pytest.raises(ValueError, match="`activation`"):
      sp.product_activation(z, sp.component_init(jax.random.key(0), 3, 5), activation="swish")
    with pytest.raises(ValueError, match="`gamma`"):
      sp.product_activation(z, sp.component_init(jax.random.key(0), 3, 5), gamma=-1.0)

  def test_bad_sizes(self):
    with pytest.raises(ValueError, match="projection_width"):
      sp.component_init(jax.random.key(0), 3, 0)
    with pytest.raises(ValueError, match="rank"):
      sp.component_init(jax.random.key(0), 0, 3)
    with pytest.raises(ValueError, match="projection_width"):
      sp.lrnn_init(jax.random.key(0), 2, (4,), 1, projection_width=0)
    with pytest.raises(ValueError, match="ranks"):
      sp.lrnn_init(jax.random.key(0), 2, (), 1, projection_width=3)
    with pytest.raises(ValueError, match="ranks"):
      sp.lrnn_init(jax.random.key(0), 2, (4, 0), 1, projection_width=3)
    params = sp.lrnn_init(jax.random.key(0), 2, (4,), 1, projection_width=3)
    with pytest.raises(ValueError, match="in_features = 2"):
      sp.lrnn_apply(params, jnp.ones((5, 3)))


def _numpy_last_hidden(z, components, act, omega):
  """``a_L``, the input of each component's output weight, ``(N, r, d, h_L)`` in float64 (numpy loops)."""
  z = np.asarray(z, np.float64)
  weights = [np.asarray(w, np.float64) for w in components["weights"]]
  biases = [np.asarray(b, np.float64) for b in components["biases"]]
  a = act(omega * z)[..., None]  # (N, r, d, 1)
  for w, b in zip(weights[:-1], biases):
    a = act(omega * (np.einsum("nrdi,rdio->nrdo", a, w) + b))
  return a


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6, 7))
def _lemma1_draws(key, activation, omega, d, hidden, first_layer, output_init, draws):
  """``draws`` initialisations of one layer (one jit: eager random draws compile per shape)."""
  in_features = 2 if first_layer else 16
  kx, kk, kc = jax.random.split(key, 3)
  x = (jax.random.uniform(kx, (in_features,), minval=-1, maxval=1) if first_layer
       else jax.random.normal(kx, (in_features,)))  # A LayerNorm output has unit scale.
  kernel, bias = sp.lrnn_projection_init(kk, in_features, draws, d, omega=omega, first_layer=first_layer)
  comps = sp.component_init(kc, draws, d, hidden, omega=omega, output_init=output_init)
  z = (jnp.einsum("i,ird->rd", x, kernel) + bias)[None]  # (1, draws, d)
  g, g_prime = jax.jvp(lambda z: sp.component_apply(z, comps, activation=activation, omega=omega),
                       (z,), (jnp.ones_like(z),))
  product = lambda z: sp.product_activation(z, comps, activation=activation, omega=omega)
  return z, comps, g, g_prime, product(z)[0], jax.grad(lambda z: jnp.sum(product(z)))(z)[0]


def _lemma1_statistics(activation, omega, d, hidden, first_layer, output_init="siren", draws=4096, seed=0):
  """Lemma 1's quantities at one fixed input ``x`` over ``draws`` independent initialisations.

  The rank axis holds the draws: neuron ``l`` has its own projection row and components, so the
  ``draws`` neurons of one layer are ``draws`` independent draws of the initialisation at one ``x``.
  """
  z, comps, g, g_prime, phi, dphi = _lemma1_draws(jax.random.key(seed), activation, float(omega), d, tuple(hidden),
                                                  first_layer, output_init, draws)
  a_last = _numpy_last_hidden(z, comps, NP_ACTIVATIONS[activation], omega)[0]  # (draws, d, h_L)
  g64 = np.asarray(g, np.float64)
  return {
      "mean_g": float(np.mean(g64)), "std_g": float(np.std(g64)), "n_g": g64.size,
      "sigma_g2": float(np.mean(g64**2)),  # E[g^2] (= Var g, as E[g] = 0 over draws).
      "sigma_gprime2": float(np.mean(np.asarray(g_prime, np.float64) ** 2)),  # E[g'^2] >= Var g'.
      "siren_sigma_g2": 2.0 * float(np.mean(a_last**2)) / omega**2,  # h Var[U(+-sqrt(6/h)/omega)] E[a_L^2].
      "var_phi": float(np.var(np.asarray(phi, np.float64))),
      "sum_var_dphi": float(np.sum(np.var(np.asarray(dphi, np.float64), axis=0))),
      "max_var_dphi": float(np.max(np.var(np.asarray(dphi, np.float64), axis=0))),
  }


class LemmaTest(parameterized.TestCase):

  def test_component_weights_are_siren_uniform(self):
    # App. C.2: every component layer after an activation, the bias-free output layer included,
    # is U(+-sqrt(6/h_in)/omega); the earlier scheme survives only as output_init="unit_variance".
    omega, hidden = 7.0, (3, 2)
    comps = sp.component_init(jax.random.key(0), 64, 8, hidden, omega=omega)
    legacy = sp.component_init(jax.random.key(0), 64, 8, hidden, omega=omega, output_init="unit_variance")
    for w, h_in in zip(comps["weights"], (1,) + hidden):
      bound = math.sqrt(6.0 / h_in) / omega
      assert float(jnp.max(jnp.abs(w))) <= bound
      assert float(jnp.max(jnp.abs(w))) > 0.95 * bound  # The whole interval is used.
      np.testing.assert_allclose(float(jnp.var(w)), bound**2 / 3, rtol=0.15)  # Uniform's variance.
    chex.assert_trees_all_equal(legacy["weights"][:-1], comps["weights"][:-1])
    # The two draws round differently (U(+-b) scaled before or after): a few ulps of the interval's bound.
    scale = float(jnp.max(jnp.abs(legacy["weights"][-1])))
    chex.assert_trees_all_close(legacy["weights"][-1], omega * comps["weights"][-1], rtol=0,
                                atol=8 * float(jnp.finfo(jnp.float32).eps) * scale)
    with pytest.raises(ValueError, match="`output_init`"):
      sp.component_init(jax.random.key(0), 4, 3, output_init="he")

  # Each example compiles one function (a few seconds on a loaded 2-core CPU), hence few examples.
  @hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
  @hypothesis.given(
      activation=st.sampled_from(("sine", "spder", "sin_arctan")),
      omega=st.floats(2.0, 40.0),
      d=st.integers(1, 40),
      hidden=st.sampled_from(((), (1,), (3,), (2, 2))),
      first_layer=st.booleans(),
      seed=st.integers(0, 2**16),
  )
  def test_lemma1_bounds_at_init(self, activation, omega, d, hidden, first_layer, seed):
    stats = _lemma1_statistics(activation, omega, d, hidden, first_layer, draws=2048, seed=seed)
    # Assumption 2 holds at init: E[g] = 0 (within 5 standard errors of the mean).
    assert abs(stats["mean_g"]) <= 5 * stats["std_g"] / math.sqrt(stats["n_g"]), stats
    # The SIREN-scaled output layer: Var g = 2 E[a_L^2] / omega^2 (the earlier scheme is omega^2 times this).
    np.testing.assert_allclose(stats["sigma_g2"], stats["siren_sigma_g2"], rtol=0.25)
    s2 = stats["sigma_g2"]
    # Independent factors: Var[phi] = (1 + sigma_g^2 / d)^d - 1 (Corollary 1's identity)...
    np.testing.assert_allclose(stats["var_phi"], (1.0 + s2 / d) ** d - 1.0, rtol=0.25)
    # ... and Lemma 1 (i), (ii), with 15% room for sampling error.
    assert stats["var_phi"] <= 1.15 * (math.exp(s2) - 1.0), stats
    assert stats["sum_var_dphi"] <= 1.15 * stats["sigma_gprime2"] * math.exp(s2), stats
    # Lemma 3: each coordinate carries a 1/d share of the gradient variance.
    assert stats["max_var_dphi"] <= 1.5 * stats["sum_var_dphi"] / d + 1e-12, stats

  @parameterized.product(
      activation=("sine", "spder", "sin_arctan"),
      setting=(dict(omega=6.0, d=12), dict(omega=30.0, d=16)),  # The paper's PDE and image settings.
  )
  def test_lemma1_regime_at_paper_settings(self, activation, setting):
    # With the paper's initialisation the bound e^{sigma_g^2} - 1 of Lemma 1 is small, so phi
    # starts near 1; the earlier unit-variance output layer left that regime for every activation
    # (Var phi ~ 1.6 for sine, ~3e4 for SPDER at omega = 30).
    paper = _lemma1_statistics(activation, setting["omega"], setting["d"], (1,), True)
    legacy = _lemma1_statistics(activation, setting["omega"], setting["d"], (1,), True, output_init="unit_variance")
    assert paper["sigma_g2"] <= 0.15 and math.exp(paper["sigma_g2"]) - 1.0 <= 0.17, paper
    assert paper["var_phi"] <= 0.15, paper
    assert legacy["sigma_g2"] >= 0.9 and legacy["var_phi"] >= 1.0, legacy

  def test_lemma2_sum_and_difference_frequencies(self):
    # One neuron, d = 3 sine components g_k(t) = sin(2 pi f_k t) (hidden=(), unit output weight,
    # z_k = 2 pi f_k t): phi has energy exactly at all |sum_k s_k f_k| over non-empty subsets.
    freqs, n = (3, 7, 19), 256
    t = jnp.arange(n) / n
    z = (2 * jnp.pi * t[:, None] * jnp.array(freqs, jnp.float32))[:, None, :]  # (n, 1, 3)
    comps = {"weights": (jnp.ones((1, 3, 1, 1)),), "biases": ()}
    phi = sp.product_activation(z, comps, omega=1.0)[:, 0]
    power = np.abs(np.fft.rfft(np.asarray(phi, np.float64))) / n
    expected = set()
    for mask in range(1, 8):
      subset = [f for k, f in enumerate(freqs) if mask >> k & 1]
      for signs in range(2 ** len(subset)):
        expected.add(abs(sum(f if signs >> i & 1 else -f for i, f in enumerate(subset))))
    expected.discard(0)
    assert len(expected) == 13  # 3 fundamentals + 3 * 2 pairs (sum, difference) + 4 triples.
    for f in expected:
      assert power[f] > 1e-3, (f, power[f])
    others = [k for k in range(1, n // 2) if k not in expected]
    assert np.max(power[others]) < 1e-5
    np.testing.assert_allclose(power[0], 1.0, rtol=1e-5)  # E[phi] = 1.


def _mlp_params_from_lrnn(params):
  """The MLP that an LRNN with d = 1, hidden=() and a fixed activation is (eq. 1 discussion)."""
  ws, bs, scale = [], [], None
  for layer in params["layers"]:
    kernel, bias = layer["kernel"][:, :, 0], layer["bias"][:, 0]
    w_out = layer["components"]["weights"][0][:, 0, 0, 0]  # g_l(z) = w_l act(omega z)
    if scale is not None:  # Previous layer output 1 + w h: fold w into rows, 1 into the bias.
      bias = bias + jnp.sum(kernel, axis=0)
      kernel = scale[:, None] * kernel
    ws.append(kernel)
    bs.append(bias)
    scale = w_out
  out = params["output"]
  return ws, bs, scale[:, None] * out["kernel"], out.get("bias", 0.0) + jnp.sum(out["kernel"], axis=0)


class NetworkTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_reduces_to_mlp_for_d1(self):
    params = sp.lrnn_init(jax.random.key(0), 3, (6, 5), 2, projection_width=1, hidden=(), layer_norm=False, omega=1.0)
    x = jax.random.normal(jax.random.key(1), (7, 3))
    got = self.variant(lambda p, x: sp.lrnn_apply(p, x, activation="tanh", omega=1.0))(params, x)
    ws, bs, w_out, b_out = _mlp_params_from_lrnn(params)
    h = np.asarray(x, np.float64)
    for w, b in zip(ws, bs):
      h = np.tanh(h @ np.asarray(w, np.float64) + np.asarray(b, np.float64))
    want = h @ np.asarray(w_out, np.float64) + np.asarray(b_out, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_deep_matches_manual_composition(self):
    params = sp.lrnn_init(jax.random.key(0), 2, (5, 4), 3, projection_width=(3, 2), omega=6.0, first_omega=10.0,
                          output_bias=True)
    params["output"]["bias"] = jnp.array([0.5, -1.0, 2.0])  # Zero at init; make it count.
    x = jax.random.uniform(jax.random.key(1), (6, 2), minval=-1, maxval=1)
    got = self.variant(lambda p, x: sp.lrnn_apply(p, x, omega=6.0, first_omega=10.0))(params, x)
    chex.assert_shape(got, (6, 3))
    h = np.asarray(x, np.float64)
    for k, layer in enumerate(params["layers"]):
      z = np.einsum("bi,ird->brd", h, np.asarray(layer["kernel"], np.float64)) + np.asarray(layer["bias"], np.float64)
      h = _numpy_product(z, layer["components"], np.sin, 10.0 if k == 0 else 6.0)
      mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
      h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(layer["norm"]["scale"]) + np.asarray(layer["norm"]["bias"])
    want = h @ np.asarray(params["output"]["kernel"], np.float64) + np.asarray(params["output"]["bias"])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)

  def test_structure_and_dtypes(self):
    shapes = jax.eval_shape(lambda k: sp.lrnn_init(k, 2, (16, 16), 1, projection_width=12, omega=6.0), jax.random.key(0))
    assert sp._lrnn.neurons.default_gamma(12) == pytest.approx(12**-0.5)
    # ~5k, Table 11's LRNN [2,16,16,1]: per layer a (n_in + 1) x 16 x 12 projection, 16 x 12 x 3
    # component parameters and 2 x 16 LayerNorm; then 16 output weights (eq. 3 has no output bias).
    assert sum(a.size for a in jax.tree.leaves(shapes)) == 576 + 576 + 32 + 3264 + 576 + 32 + 16 == 5072
    assert set(shapes["output"]) == {"kernel"}
    with_bias = jax.eval_shape(lambda k: sp.lrnn_init(k, 2, (16, 16), 1, projection_width=12, output_bias=True),
                               jax.random.key(0))
    assert with_bias["output"]["bias"].shape == (1,)
    assert set(shapes["layers"][0]) == {"kernel", "bias", "components", "norm"}
    params = sp.lrnn_init(jax.random.key(0), 2, (4, 3), 1, projection_width=2, omega=6.0)
    shallow = sp.lrnn_init(jax.random.key(0), 2, (4,), 1, projection_width=3, layer_norm=False, shared_components=True)
    assert "norm" not in shallow["layers"][0] and shallow["layers"][0]["components"]["weights"][0].shape == (3, 1, 1)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x = jnp.zeros((3, 2), jnp.bfloat16)
    assert sp.lrnn_apply(bf16, x, omega=6.0).dtype == jnp.bfloat16
    assert sp.lrnn_apply(params, x, omega=6.0).dtype == jnp.float32

  def test_interaction_heatmap(self):
    params = sp.lrnn_init(jax.random.key(0), 2, (4, 3), 1, projection_width=5, omega=6.0)
    # Silence component (neuron 1, coordinate 2) of the first layer: zero output weight.
    w_last = params["layers"][0]["components"]["weights"][-1].at[1, 2].set(0.0)
    params["layers"][0]["components"]["weights"] = params["layers"][0]["components"]["weights"][:-1] + (w_last,)
    x = jax.random.uniform(jax.random.key(1), (64, 2), minval=-1, maxval=1)
    maps = jax.jit(lambda p, x: sp.interaction_heatmap(p, x, omega=6.0))(params, x)
    assert [m.shape for m in maps] == [(4, 5), (3, 5)]
    assert float(maps[0][1, 2]) == 0.0 and float(jnp.min(maps[0].at[1, 2].set(1.0))) > 0.0
    layer = params["layers"][0]
    z = x @ layer["kernel"].reshape(2, -1) + layer["bias"].reshape(-1)
    g = sp.component_apply(z.reshape(64, 4, 5), layer["components"], omega=6.0)
    chex.assert_trees_all_close(maps[0], jnp.var(g, axis=0), rtol=1e-5, atol=1e-7)


class ModuleTest(parameterized.TestCase):

  def test_nnx_modules_equal_core(self):
    x = jax.random.uniform(jax.random.key(1), (5, 2), minval=-1, maxval=1)
    model = sp.nnx.LRNN(2, (6, 4), 2, projection_width=3, omega=6.0, first_omega=8.0, rngs=nnx.Rngs(0))
    want = sp.lrnn_apply(model.params_dict(), x, omega=6.0, first_omega=8.0)
    chex.assert_trees_all_close(model(x), want)
    chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x))(model, x), want, rtol=1e-5, atol=1e-6)
    n_params = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == sum(a.size for a in jax.tree.leaves(model.params_dict()))
    layer = sp.nnx.LRNNLayer(2, 4, projection_width=3, hidden=(2,), activation="spder", first_layer=True, rngs=nnx.Rngs(0))
    comps = jax.tree.map(lambda v: v[...], layer.components, is_leaf=lambda v: isinstance(v, nnx.Variable))
    want = sp.lrnn_layer(x, layer.kernel[...], layer.bias[...], comps, activation="spder", omega=30.0)
    chex.assert_trees_all_close(layer(x), want)
    low = sp.nnx.LRNN(2, (4,), 1, projection_width=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert low(x).dtype == jnp.bfloat16

  def test_linen_modules_equal_core(self):
    x = jax.random.uniform(jax.random.key(1), (5, 2), minval=-1, maxval=1)
    model = sp.linen.LRNN(ranks=(6, 4), out_features=2, projection_width=3, omega=6.0, shared_components=True)
    variables = model.init(jax.random.key(0), x)
    chex.assert_trees_all_close(model.apply(variables, x), sp.lrnn_apply(variables["params"], x, omega=6.0))
    layer = sp.linen.LRNNLayer(rank=4, projection_width=3, omega=5.0, remat=True)
    v = layer.init(jax.random.key(0), x)
    p = v["params"]
    chex.assert_trees_all_close(
        layer.apply(v, x), sp.lrnn_layer(x, p["kernel"], p["bias"], p["components"], omega=5.0)
    )
    assert model.apply(variables, x.astype(jnp.bfloat16)).dtype == jnp.float32  # Promotion.

  def test_modules_pass_output_options(self):
    x = jnp.zeros((3, 2))
    bound = math.sqrt(6.0) / 6.0  # Component output weight, h_L = 1, omega = 6.
    for output_init, inside in (("siren", True), ("unit_variance", False)):
      model = sp.nnx.LRNN(2, (32,), 1, projection_width=8, omega=6.0, output_init=output_init, output_bias=True,
                          rngs=nnx.Rngs(0))
      w_last = model.params_dict()["layers"][0]["components"]["weights"][-1]
      assert (float(jnp.max(jnp.abs(w_last))) <= bound) == inside
      assert model.params_dict()["output"]["bias"].shape == (1,)
      variables = sp.linen.LRNN(ranks=(32,), out_features=1, projection_width=8, omega=6.0,
                                output_init=output_init).init(jax.random.key(0), x)
      assert set(variables["params"]["output"]) == {"kernel"}
      w_last = variables["params"]["layers"][0]["components"]["weights"][-1]
      assert (float(jnp.max(jnp.abs(w_last))) <= bound) == inside
      layer = sp.nnx.LRNNLayer(2, 32, projection_width=8, omega=6.0, output_init=output_init, rngs=nnx.Rngs(0))
      assert (float(jnp.max(jnp.abs(layer.components["weights"][-1][...]))) <= bound) == inside
      v = sp.linen.LRNNLayer(rank=32, projection_width=8, omega=6.0, output_init=output_init).init(jax.random.key(0), x)
      assert (float(jnp.max(jnp.abs(v["params"]["components"]["weights"][-1]))) <= bound) == inside

  def test_module_bad_input(self):
    with pytest.raises(ValueError, match="projection_width"):
      sp.nnx.LRNNLayer(2, 4, projection_width=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
      sp.nnx.LRNN(2, (0,), 1, projection_width=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`activation`"):
      sp.nnx.LRNNLayer(2, 4, projection_width=3, activation="swish", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`output_init`"):
      sp.nnx.LRNN(2, (4,), 1, projection_width=3, output_init="xavier", rngs=nnx.Rngs(0))
