"""Bad input gets a clear error naming the argument, and no call returns a silent NaN or wrong array."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp

KEY = jax.random.key(0)


def dense(m=8, n=6, dtype=jnp.float32):
  return {"dense": {"kernel": jax.random.normal(jax.random.key(1), (m, n)).astype(dtype)}}


def with_params(adapters, fn):
  """The adapters with ``fn`` applied to every trainable array (frozen constants untouched)."""
  return {p: sp.peft.Adapter(jax.tree.map(fn, a.params), a.frozen, a.method, a.shape, a.dtype, a.in_axes)
          for p, a in adapters.items()}


# -- 2. never a silent NaN -------------------------------------------------------------------------
def test_merge_refuses_non_finite_weights_and_names_the_path():
  params = dense()
  adapters = with_params(sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "kernel"), lambda x: x.at[0].set(jnp.nan))
  with pytest.raises(ValueError, match=r"Refusing to merge: the result at 'dense/kernel' has \d+ non-finite entries"):
    sp.peft.merge(params, adapters)
  with pytest.raises(ValueError, match="Refusing to merge"):
    sp.peft.switch_adapters(params, sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "kernel"), adapters)
  # Opting out gives the NaNs; under jit nothing is checked (documented) unless safe=True is asked for.
  assert jnp.isnan(sp.peft.merge(params, adapters, safe=False)["dense"]["kernel"]).any()
  assert jnp.isnan(jax.jit(sp.peft.merge)(params, adapters)["dense"]["kernel"]).any()
  with pytest.raises(ValueError, match="safe=True inside jit"):
    jax.jit(lambda p, a: sp.peft.merge(p, a, safe=True))(params, adapters)
  inf = with_params(sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "kernel"), lambda x: x.at[0].set(jnp.inf))
  with pytest.raises(ValueError, match="non-finite"):
    sp.peft.merge(params, inf)


def test_values_that_overflow_the_dtype_are_refused():
  with pytest.raises(ValueError, match=r"`omega` of SineLoRA is 1e\+39, which overflows to inf in float32"):
    sp.peft.init_adapters(KEY, dense(), sp.peft.SineLoRA(2, omega=1e39), "kernel")
  with pytest.raises(ValueError, match=r"`scale` of FourierFT .* overflows"):
    sp.peft.init_adapters(KEY, dense(), sp.peft.FourierFT(4, scale=1e39), "kernel")
  with pytest.raises(ValueError, match=r"`alpha` of LFMA .* overflows"):
    sp.peft.init_adapters(KEY, dense(), sp.peft.LFMA(0.1, alpha=1e39), "kernel")


def test_core_sine_functions_refuse_an_omega_that_overflows():
  a, b = jnp.ones((4, 2)), jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"`omega` of sine_lowrank is 1e\+39, which overflows to inf in float32"):
    sp.sine_lowrank(a, b, omega=1e39)
  with pytest.raises(ValueError, match=r"`omega` of sine_lowrank_matmul .* overflows"):
    sp.sine_lowrank_matmul(jnp.ones((1, 4)), a, b, omega=1e39)
  assert jnp.all(jnp.isfinite(sp.sine_lowrank(a, b, omega=1e30)))  # Large but finite in float32: accepted.


def test_nnx_layers_name_a_bad_param_dtype():
  with pytest.raises(TypeError, match=r"`param_dtype` must be a real floating dtype .* got 'notadtype'"):
    sp.nnx.WaveFTDense(8, 4, n_params=3, param_dtype="notadtype", rngs=nnx.Rngs(0))


def test_dora_on_float16_columns_of_norm_above_256():
  kernel = jnp.full((16, 4), 100.0, jnp.float16)  # column norm 400: its square overflows float16.
  params = {"w": kernel}
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.DoRA(2), "w")
  np.testing.assert_allclose(np.asarray(adapters["w"].params["magnitude"], np.float32), 400.0)
  merged = sp.peft.merge(params, adapters)["w"]
  assert merged.dtype == jnp.float16
  np.testing.assert_array_equal(np.asarray(merged), np.asarray(kernel))  # Identity at init, no NaN.
  huge = {"w": jnp.full((16, 4), 60000.0, jnp.float16)}  # Norm 240000 does not fit a float16 magnitude.
  with pytest.raises(ValueError, match=r"column norms .* do not fit the magnitude's dtype float16.*param_dtype='float32'"):
    sp.peft.init_adapters(KEY, huge, sp.peft.DoRA(2), "w")
  ok = sp.peft.init_adapters(KEY, huge, sp.peft.DoRA(2, param_dtype="float32"), "w")
  assert jnp.all(jnp.isfinite(sp.peft.merge(huge, ok)["w"]))


def test_dora_exact_norm_gradient_on_a_zero_column_is_finite():
  kernel = jax.random.normal(KEY, (8, 5)).at[:, 2].set(0.0)
  for method in (sp.peft.DoRA(2, stop_norm_gradient=False), sp.peft.SineDoRA(2, omega=10.0, stop_norm_gradient=False)):
    adapters = sp.peft.init_adapters(KEY, {"w": kernel}, method, "w")
    trainable, rest = sp.peft.partition(adapters)

    def loss(t):
      w = sp.peft.merge({"w": kernel}, sp.peft.combine(t, rest))["w"]
      return jnp.sum(jnp.sin(w)) + jnp.sum(adapters["w"].apply(jnp.ones((2, 8)), kernel) ** 2)

    chex.assert_tree_all_finite(jax.grad(loss)(trainable))


@pytest.mark.parametrize("call", ["fourier", "scatter", "waveft", "fourier_pairs"])
@pytest.mark.parametrize("bad", [16, -1])
def test_positions_outside_the_grid_raise(call, bad):
  values = jnp.array([1.0, 2.0])
  flat = jnp.array([3, bad])
  pairs = jnp.array([[0, 1], [0, 5 if bad == 16 else -1]])  # (0, 5) would land on (1, 1) of a 4 x 4 grid.
  fn = {"fourier": lambda: sp.fourier_delta(values, flat, (4, 4)),
        "scatter": lambda: sp.scatter_coefficients(values, pairs, (4, 4)),
        "waveft": lambda: sp.waveft_delta(values, flat, (4, 4)),
        "fourier_pairs": lambda: sp.fourier_delta(values, pairs, (4, 4))}[call]
  with pytest.raises(ValueError, match=r"`indices` must hold .*4 x 4 grid"):
    fn()


def test_positions_outside_the_grid_are_dropped_under_jit():
  values = jnp.array([1.0, 2.0, 4.0])
  flat = jnp.array([3, 16, -1])
  pairs = jnp.array([[0, 3], [0, 5], [-1, 0]])
  one = sp.scatter_coefficients(jnp.array([1.0]), jnp.array([3]), (4, 4))
  np.testing.assert_array_equal(jax.jit(sp.scatter_coefficients, static_argnums=2)(values, flat, (4, 4)), one)
  np.testing.assert_array_equal(jax.jit(sp.scatter_coefficients, static_argnums=2)(values, pairs, (4, 4)), one)
  np.testing.assert_allclose(jax.jit(sp.fourier_delta, static_argnums=2)(values, flat, (4, 4)),
                             np.fft.ifft2(np.asarray(one)).real, atol=1e-6)
  x = jax.random.normal(KEY, (3, 4))
  for path in ("dense", "factored"):
    matmul = jax.jit(lambda x, v, i, path=path: sp.sparse_matmul(x, v, i, (4, 4), path=path))
    np.testing.assert_allclose(matmul(x, values, flat), x @ one, atol=1e-6)
    fmatmul = jax.jit(lambda x, v, i, path=path: sp.fourier_matmul(x, v, i, (4, 4), path=path))
    np.testing.assert_allclose(fmatmul(x, values, flat), x @ np.fft.ifft2(np.asarray(one)).real, atol=1e-5)
    wmatmul = jax.jit(lambda x, v, i, path=path: sp.waveft_matmul(x, v, i, (4, 4), path=path))
    np.testing.assert_allclose(wmatmul(x, values, flat), x @ sp.waveft_delta(values[:1], flat[:1], (4, 4)), atol=1e-5)


def test_nan_inputs_to_masks_and_diagnostics_raise():
  bad = jnp.ones((8, 6)).at[2, 3].set(jnp.nan)
  with pytest.raises(ValueError, match=r"`delta_init` must be finite, but 1 of its 48 entries are NaN or inf"):
    sp.topk_spectral_mask(bad, 0.1)
  params = dense()
  with pytest.raises(ValueError, match=r"`delta_inits\['dense/kernel'\]` must be finite"):
    sp.peft.init_lfma_adapters(KEY, params, sp.peft.LFMA(0.1, 1.0), "kernel", {"dense/kernel": bad})
  with pytest.raises(ValueError, match="`w` must be finite"):
    sp.numerical_rank(bad)
  assert int(jax.jit(sp.numerical_rank)(bad)) == -1  # Under jit: a rank that cannot be mistaken for one.
  assert int(sp.numerical_rank(jnp.ones((8, 6)))) == 1
  with pytest.raises(ValueError, match=r"`weights\[1\]` must be a finite real number, got nan"):
    sp.peft.WeightedSum((sp.peft.LoRA(2), sp.peft.LoRA(2)), (1.0, float("nan")))


def test_integer_kernels_are_refused_by_path():
  params = {"q": {"kernel": jnp.ones((8, 6), jnp.int8)}, "f": {"kernel": jnp.ones((8, 6))}}
  with pytest.raises(TypeError, match=r"Target 'q/kernel' has dtype int8: adapters need a real floating weight"):
    sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "kernel")
  assert set(sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "f/kernel")) == {"f/kernel"}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_nnx_lfma_layer_in_low_precision(dtype):
  layer = sp.nnx.LFMADense(16, 8, top_k_ratio=0.1, alpha=2.0, value_init="spectrum", param_dtype=dtype,
                           rngs=nnx.Rngs(0))
  x = jax.random.normal(KEY, (3, 16)).astype(dtype)
  y = layer(x)
  assert y.dtype == dtype and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  kernel = layer.kernel[...].astype(jnp.float32)
  delta = layer.method.delta({"values": layer.values[...]}, kernel, {"indices": layer.indices[...]})
  reference = x.astype(jnp.float32) @ (kernel + delta) + layer.bias[...].astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(y, np.float32), reference, atol=0.1, rtol=0.05)


def test_keys_with_slashes_that_collide_are_refused():
  params = {"a/b": jnp.ones((4, 3)), "a": {"b": jnp.zeros((4, 3))}}
  with pytest.raises(ValueError, match=r"Two parameters have the same path 'a/b'"):
    sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "b")
  adapters = sp.peft.init_adapters(KEY, {"a/b": jnp.ones((4, 3))}, sp.peft.LoRA(2), "b")  # No collision: fine.
  with pytest.raises(ValueError, match=r"two parameters have the path 'a/b'"):
    sp.peft.merge(params, adapters)


def test_lfma_default_is_the_identity_at_init():
  params = dense(16, 12)
  adapters = sp.peft.init_adapters(KEY, params, sp.peft.LFMA(0.05), "kernel")
  chex.assert_trees_all_equal(sp.peft.merge(params, adapters), params)
  spectrum = sp.peft.init_adapters(KEY, params, sp.peft.LFMA(0.05, value_init="spectrum"), "kernel")
  assert float(jnp.max(jnp.abs(sp.peft.merge(params, spectrum)["dense"]["kernel"] - params["dense"]["kernel"]))) > 1.0


# -- 3. errors name the argument -------------------------------------------------------------------
def test_invalid_target_pattern():
  with pytest.raises(ValueError, match=r"`targets` must be a valid regular expression, got '\('"):
    sp.peft.init_adapters(KEY, dense(), sp.peft.LoRA(2), "(")
  with pytest.raises(ValueError, match=r"`method` must be a valid regular expression"):
    sp.peft.init_adapters(KEY, dense(), {"[": sp.peft.LoRA(2)}, "kernel")
  with pytest.raises(ValueError, match=r"`in_axes` must be a valid regular expression"):
    sp.peft.init_adapters(KEY, {"w": jnp.ones((2, 3, 4))}, sp.peft.LoRA(2), "w", in_axes={"(": 1})


def test_target_predicate_must_return_a_bool():
  with pytest.raises(TypeError, match=r"`targets` predicate must return a bool .* for 'dense/kernel' it returned "
                                      r"ArrayImpl of shape \(8, 6\)"):
    sp.peft.init_adapters(KEY, dense(), sp.peft.LoRA(2), lambda path, leaf: leaf > 0)
  # A concrete 0-d boolean array is a bool.
  assert set(sp.peft.init_adapters(KEY, dense(), sp.peft.LoRA(2), lambda path, leaf: jnp.any(leaf != 0))) == {"dense/kernel"}


def test_passing_a_method_class_instead_of_an_instance():
  with pytest.raises(TypeError, match=r"`method` must be an adapter spec instance such as LoRA\(...\).*got the class LoRA"):
    sp.peft.init_adapters(KEY, dense(), sp.peft.LoRA, "kernel")
  with pytest.raises(TypeError, match="gave the class DoRA"):
    sp.peft.init_adapters(KEY, dense(), {"kernel": sp.peft.DoRA}, "kernel")


@pytest.mark.parametrize("make", [lambda d: sp.peft.LoRA(2, param_dtype=d), lambda d: sp.peft.DoRA(2, param_dtype=d),
                                  lambda d: sp.peft.WaveFT(4, param_dtype=d), lambda d: sp.peft.FourierFT(4, param_dtype=d)])
def test_bad_param_dtype(make):
  with pytest.raises(TypeError, match=r"`param_dtype` must be a real floating dtype .* got 'notadtype'"):
    make("notadtype")
  with pytest.raises(TypeError, match=r"`param_dtype` must be a real floating dtype .* got 'int8'"):
    make("int8")
  assert make(jnp.bfloat16).param_dtype == "bfloat16"


def test_delta_tree_on_params_lacking_the_path():
  adapters = sp.peft.init_adapters(KEY, dense(), sp.peft.LoRA(2), "kernel")
  with pytest.raises(ValueError, match=r"Cannot compute delta_tree: `params` has no leaf at adapter path\(s\) \['dense/kernel'\]"):
    sp.peft.delta_tree({"other": jnp.ones((8, 6))}, adapters)
  with pytest.raises(ValueError, match=r"made for shape \(8, 6\), but `params` has shape \(8, 5\)"):
    sp.peft.delta_tree({"dense": {"kernel": jnp.ones((8, 5))}}, adapters)


@pytest.mark.parametrize("call, name", [
    (lambda: sp.sine_lowrank(jnp.ones((0, 2)), jnp.ones((2, 3)), omega=1.0), "a"),
    (lambda: sp.sine_lowrank(jnp.ones((4, 2)), jnp.ones((2, 0)), omega=1.0), "b"),
    (lambda: sp.sine_lowrank(jnp.ones((4, 0)), jnp.ones((0, 3)), omega=1.0), "a"),
    (lambda: sp.sine_lowrank_matmul(jnp.ones((1, 4)), jnp.ones((4, 2)), jnp.ones((2, 0)), omega=1.0), "b"),
    (lambda: sp.sine_lowrank_matmul(jnp.ones((1, 0)), jnp.ones((0, 2)), jnp.ones((2, 3)), omega=1.0), "a"),
    (lambda: sp.dwt2(jnp.ones((0, 4))), "matrix"),
    (lambda: sp.idwt2(jnp.ones((4, 0))), "coeffs"),
])
def test_zero_size_inputs_name_the_argument(call, name):
  with pytest.raises(ValueError, match=rf"`{name}` must not have an axis of size 0"):
    call()


def test_empty_batch_is_fine():
  y = sp.sine_lowrank_matmul(jnp.ones((0, 4)), jnp.ones((4, 2)), jnp.ones((2, 3)), omega=1.0)
  assert y.shape == (0, 3)


def test_attention_output_adapter_with_the_wrong_in_axes():
  """merge cannot see the layer, so it cannot tell in_axes=1 from 2 on (heads, head_dim, embed); factored can."""

  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral(8, axis=(-2, -1), name="out")(x)

  x = jnp.ones((3, 2, 4))
  params = Attn().init(KEY, x)["params"]
  wrong = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "out/kernel", in_axes=1)
  with pytest.raises(ValueError, match=r"input axes \(0,\).*the layer 'out' \(DenseGeneral\) contracts input axes \(0, 1\).*build it with in_axes=2"):
    sp.peft.apply_factored(Attn(), params, wrong, x)
  right = sp.peft.init_adapters(KEY, params, sp.peft.LoRA(2), "out/kernel", in_axes=2)
  np.testing.assert_allclose(sp.peft.apply_factored(Attn(), params, right, x), Attn().apply({"params": params}, x),
                             atol=1e-6)
