"""Adapter shardings: the layout rule, its errors, and sharded == unsharded training on 8 CPU devices.

The 8-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax starts,
so they run in a subprocess (tests/sharding_worker.py); the rest runs here on one device.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spectral_peft as sp
from adapter_cases import CASES

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharding_worker.py")
MESH_2x4 = AbstractMesh((2, 4), ("data", "model"))


def lora_specs(kernel_shape, spec, in_axes=1, mesh=MESH_2x4, method=sp.peft.LoRA(rank=2)):
  params = {"layer": {"kernel": jax.ShapeDtypeStruct(kernel_shape, jnp.float32)}}
  # Only shapes matter: shardings can be chosen before any adapter array exists.
  adapters = jax.eval_shape(lambda p: sp.peft.init_adapters(jax.random.key(0), p, method, "kernel", in_axes=in_axes), params)
  return sp.peft.adapter_partition_specs(adapters, {"layer/kernel": spec}, mesh)["layer/kernel"]


@pytest.mark.parametrize(
    "kernel_shape, spec, in_axes, want_a, want_b",
    [
        ((16, 32), P(None, "model"), 1, P(), P(None, "model")),  # column-parallel Dense
        ((32, 16), P("model", None), 1, P("model"), P()),  # row-parallel Dense
        ((32, 16), P("model", "data"), 1, P("model"), P(None, "data")),
        ((16, 32), P(("data", "model")), 1, P(("data", "model")), P()),  # an axis over both mesh axes
        ((16, 4, 8), P(None, "model", None), 1, P(), P(None, "model")),  # heads split: contiguous blocks
        ((16, 4, 8), P(None, None, "model"), 1, P(), P()),  # head_dim split: strided, so replicated
        ((4, 8, 16), P("model", None, None), 2, P("model"), P()),  # attention output kernel
        ((1, 16, 8), P(None, "model", None), 2, P("model"), P()),  # a leading size-1 axis is harmless
        ((6, 8), P("model", None), 1, P(), P()),  # 4 does not divide 6: replicated
        ((16, 32), None, 1, P(), P()),
    ],
)
def test_lora_factors_follow_the_kernel_split(kernel_shape, spec, in_axes, want_a, want_b):
  got = lora_specs(kernel_shape, spec, in_axes)
  assert got.params == {"a": want_a, "b": want_b}


def test_dora_factors_are_sharded_and_its_vectors_replicated():
  got = lora_specs((16, 32), P("data", "model"), method=sp.peft.DoRA(rank=2))
  assert got.params == {"a": P("data"), "b": P(None, "model"), "magnitude": P()}
  assert set(got.frozen) == {"w0_norm"}  # constants are static data, replicated with the program


@dataclasses.dataclass(frozen=True)
class _SparseCoefficients(sp.peft.AdapterMethod):
  """A stand-in for the sparse methods: a coefficient vector at frozen integer positions."""

  budget: int = 5

  def init(self, key, w0):
    return {"coefficients": jnp.zeros((self.budget,), w0.dtype), "dense": jnp.zeros(w0.shape, w0.dtype)}

  def init_frozen(self, key, w0):
    flat = jax.random.choice(key, w0.size, (self.budget,), replace=False)
    return {"rows": flat // w0.shape[1], "cols": flat % w0.shape[1]}

  def delta(self, params, w0, frozen=None):
    return params["dense"].at[frozen["rows"], frozen["cols"]].add(params["coefficients"])


def test_coefficient_vectors_and_integer_positions_are_replicated():
  got = lora_specs((16, 4, 8), P("data", "model", None), method=_SparseCoefficients())
  assert got.params == {"coefficients": P(), "dense": P("data", "model")}
  assert set(got.frozen) == {"rows", "cols"}
  # An array with the kernel's own (unflattened) shape takes the kernel's spec.
  adapter = sp.peft.Adapter({"full": jnp.zeros((16, 4, 8))}, {}, _SparseCoefficients(), (16, 4, 8), "float32", 1)
  specs = sp.peft.adapter_partition_specs({"k": adapter}, {"k": P("data", "model")}, MESH_2x4)
  assert specs["k"].params == {"full": P("data", "model")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_method_gets_valid_specs(case, base_params):
  """On the shared test block, with Megatron rules: every adapter array's spec fits its shape."""
  mesh = AbstractMesh((2, 2), ("data", "model"))  # the block has 2 heads
  rules = {r"(query|key|value)/kernel$": P(None, "model", None), r"attention/out/kernel$": P("model", None, None),
           r"mlp_in/kernel$": P(None, "model"), r"mlp_out/kernel$": P("model", None)}
  base = {path: next((s for r, s in rules.items() if re.search(r, path)), P())
          for path in sp.peft.leaf_paths(base_params)}
  adapters = jax.eval_shape(lambda p: sp.peft.init_adapters(
      jax.random.key(0), p, case.method, r"(query|value|out|mlp_in|mlp_out)/kernel$",
      in_axes={r"attention/out/": 2, r"attention/": 1}), base_params)
  specs = sp.peft.adapter_partition_specs(adapters, base, mesh)
  assert jax.tree.structure(specs) == jax.tree.structure(jax.tree.map(lambda _: P(), adapters))
  for path, adapter in adapters.items():
    used = {n for e in base[path] if e is not None for n in (e if isinstance(e, tuple) else (e,))}
    for x, spec in zip(jax.tree.leaves(adapter), jax.tree.leaves(specs[path], is_leaf=lambda s: isinstance(s, P))):
      assert len(spec) <= x.ndim
      for size, entry in zip(x.shape, spec):
        if entry is not None:
          assert entry in used and size % mesh.shape[entry] == 0, (path, x.shape, spec)
      if not jnp.issubdtype(x.dtype, jnp.inexact):
        assert spec == P()


def test_shard_adapters_places_values_unchanged_and_merge_keeps_the_kernel_sharding(base_params):
  mesh = sp.peft.data_model_mesh()
  assert mesh.axis_names == ("data", "model") and mesh.devices.size == jax.device_count()
  shardings = sp.peft.path_shardings(base_params, mesh, {r"mlp_in/kernel$": P(None, "model")})
  params = jax.device_put(base_params, shardings)
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params, sp.peft.LoRA(2), r"mlp_in/kernel$")
  placed = sp.peft.shard_adapters(adapters, params)
  chex.assert_trees_all_equal(placed, adapters)
  assert placed["mlp_in/kernel"].params["b"].sharding.spec == P(None, "model")
  merged = jax.jit(sp.peft.merge)(params, placed)
  assert merged["mlp_in"]["kernel"].sharding.is_equivalent_to(shardings["mlp_in"]["kernel"], 2)
  # A Linen variables dict with its "params" collection works as well as the bare params.
  named = sp.peft.adapter_shardings(adapters, {"params": shardings})
  assert isinstance(named["mlp_in/kernel"].params["a"], NamedSharding)


def test_errors_name_the_problem(base_params):
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params, sp.peft.LoRA(2), r"mlp_in/kernel$")
  with pytest.raises(ValueError, match="no entry for adapter path 'mlp_in/kernel'"):
    sp.peft.adapter_partition_specs(adapters, {"mlp_out/kernel": P()})
  with pytest.raises(ValueError, match="`mesh` is required"):
    sp.peft.adapter_shardings(adapters, {"mlp_in/kernel": P(None, "model")})
  with pytest.raises(ValueError, match="more entries"):
    sp.peft.adapter_partition_specs(adapters, {"mlp_in/kernel": P(None, None, "model")})
  with pytest.raises(TypeError, match="PartitionSpec, NamedSharding, None or a jax.Array"):
    sp.peft.adapter_partition_specs(adapters, {"mlp_in/kernel": "model"})
  mesh = sp.peft.data_model_mesh()
  with pytest.raises(TypeError, match="`rules` must map regexes to PartitionSpec"):
    sp.peft.path_shardings(base_params, mesh, {"kernel": ("model",)})
  with pytest.raises(ValueError, match="`data \\* model` must be at most"):
    sp.peft.data_model_mesh(data=jax.device_count() + 1, model=1)
  with pytest.raises(ValueError, match="more entries than the leaf has axes"):
    sp.peft.path_shardings(base_params, mesh, {r"mlp_in/bias$": P(None, None)})


@pytest.mark.slow
def test_sharded_training_equals_unsharded_for_every_method_on_8_devices():
  # Compile-time savers: the check is about values and layouts, not the speed of the compiled code.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
  proc = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
  for case in CASES:
    assert f"OK {case.name} " in proc.stdout, proc.stdout
  for name in ("fourierft", "lfma", "waveft", "shira"):
    assert f"OK fsdp-output-axis {name}" in proc.stdout, proc.stdout
  for name in ("lora", "dora", "sine_lora", "shira", "waveft", "fourierft", "lfma"):
    assert f"OK tp-no-gather {name}" in proc.stdout, proc.stdout
  assert "OK fourier-cotangent-layouts" in proc.stdout, proc.stdout
  assert proc.stdout.rstrip().endswith("ALL OK")


def test_nnx_partition_specs_and_sharded_state_give_the_same_layout():
  from flax import nnx

  with jax.set_mesh(sp.peft.data_model_mesh()):
    layer = nnx.Linear(4, 8, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
                       rngs=nnx.Rngs(0))
  state = nnx.state(layer, nnx.Param)
  adapters = sp.peft.init_adapters(jax.random.key(0), state, sp.peft.LoRA(2), "kernel")
  from_specs = sp.peft.adapter_partition_specs(adapters, nnx.get_partition_spec(state))
  from_state = sp.peft.adapter_shardings(adapters, state)
  assert from_specs["kernel"].params == {"a": P(), "b": P(None, "model")}
  assert jax.tree.map(lambda s: s.spec, from_state) == from_specs
