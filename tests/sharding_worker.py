"""Sharded == unsharded checks on 8 simulated CPU devices, run by tests/test_sharding.py.

XLA reads ``--xla_force_host_platform_device_count`` once, when jax starts its CPU backend, and the
rest of the suite runs with one device in the pytest process; so this file runs in a subprocess:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_worker.py

For every method in ``adapter_cases.CASES`` it trains adapters on a small Linen transformer block
for two SGD steps on a 2 x 4 (data x model) mesh (batch split along "data", attention heads and
MLP hidden units along "model", Megatron style) and on one device, compares the results, and checks
that merging sharded adapters into sharded parameters keeps every kernel's sharding. It prints one
``OK <case>`` line per case and ``ALL OK`` at the end; any failure raises (non-zero exit code).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import spectral_peft as sp  # noqa: E402
from adapter_cases import CASES  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

EMBED, HEADS, MLP, SEQ, BATCH = 16, 4, 32, 3, 4
# A column-split 3-D kernel (query), a row-split 3-D kernel (out) and a column-split Dense kernel.
TARGETS = r"(query|attention/out|mlp_in)/kernel$"
STEPS, LR = 2, 0.1
IN_AXES = {r"attention/out/": 2, r"attention/": 1}
# Megatron-style model parallelism: heads and MLP hidden units split along "model".
RULES = {
    r"attention/(query|key|value)/kernel$": P(None, "model", None),
    r"attention/(query|key|value)/bias$": P("model", None),
    r"attention/out/kernel$": P("model", None, None),
    r"mlp_in/kernel$": P(None, "model"),
    r"mlp_in/bias$": P("model"),
    r"mlp_out/kernel$": P("model", None),
}


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="norm")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attention")(h, h)
    h = nn.gelu(nn.Dense(MLP, name="mlp_in")(x))
    return x + nn.Dense(EMBED, name="mlp_out")(h)


def perturb(adapters, key, scale):
  trainable, rest = sp.peft.partition(adapters)
  leaves, treedef = jax.tree.flatten(trainable)
  keys = jax.random.split(key, len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return sp.peft.combine(jax.tree.unflatten(treedef, leaves), rest)


def make_step(block):
  """One SGD step on the adapters, then merge and unmerge with the new adapters.

  Plain SGD keeps the comparison well conditioned (Adam's first step, ``g / |g|``, would turn
  rounding noise in a near-zero gradient into a visible difference).
  """

  def step(adapters, params, x, y):
    trainable, rest = sp.peft.partition(adapters)

    def loss(trainable):
      merged = sp.peft.merge(params, sp.peft.combine(trainable, rest))
      return jnp.mean(jnp.square(block.apply({"params": merged}, x) - y))

    value, grads = jax.value_and_grad(loss)(trainable)
    adapters = sp.peft.combine(jax.tree.map(lambda t, g: t - LR * g, trainable, grads), rest)
    merged = sp.peft.merge(params, adapters)
    return adapters, value, merged, sp.peft.unmerge(merged, adapters)

  return step


def check_layout(case, specs):
  """The generic rule on the shapes we know: LoRA factors follow the kernel's split."""
  for path, adapter in specs.items():
    for spec in jax.tree.leaves(adapter.params, is_leaf=lambda s: isinstance(s, P)):
      assert isinstance(spec, P), (case.name, path, spec)
    if "a" in adapter.params and "b" in adapter.params:
      split_rows = path.startswith("attention/out")
      want_a = P("model") if split_rows else P()
      want_b = P() if split_rows else P(None, "model")
      assert adapter.params["a"] == want_a, (case.name, path, adapter.params["a"])
      assert adapter.params["b"] == want_b, (case.name, path, adapter.params["b"])


def run_case(case, block, params, params_shardings, mesh, x, y):
  # Constants (positions, masks, norms) are computed eagerly; the trainable arrays can then be
  # transformed under jit like any pytree.
  initial = sp.peft.init_adapters(jax.random.key(7), params, case.method, TARGETS, in_axes=IN_AXES)
  adapters = jax.jit(lambda a: perturb(a, jax.random.key(11), case.scale))(initial)
  step = make_step(block)

  # One device.
  ref_adapters, ref_step = adapters, jax.jit(step)
  for _ in range(STEPS):
    ref_adapters, ref_loss, ref_merged, ref_restored = ref_step(ref_adapters, params, x, y)

  # 2 x 4 mesh: the adapters as the generic rule places them, the batch split along "data".
  shardings = sp.peft.adapter_shardings(adapters, params_shardings)
  check_layout(case, sp.peft.adapter_partition_specs(adapters, params_shardings))
  sharded_params = jax.device_put(params, params_shardings)
  sharded_adapters = sp.peft.shard_adapters(adapters, sharded_params)
  for got, want in zip(jax.tree.leaves(sharded_adapters), jax.tree.leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (case.name, got.sharding, want)
    if not jnp.issubdtype(got.dtype, jnp.inexact):
      assert want.is_fully_replicated, (case.name, "integer arrays are replicated", want)
  batch_sharding = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)
  sharded_step = jax.jit(step, out_shardings=(shardings, None, None, None))
  for _ in range(STEPS):
    sharded_adapters, loss, merged, restored = sharded_step(sharded_adapters, sharded_params, xs, ys)

  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6, err_msg=case.name)
  for got, want in zip(jax.tree.leaves(sharded_adapters), jax.tree.leaves(ref_adapters)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=2e-6, err_msg=case.name)
  moved = max(float(jnp.max(jnp.abs(n - o))) for n, o in zip(jax.tree.leaves(ref_adapters), jax.tree.leaves(adapters)))
  assert moved > 1e-4, (case.name, "training changed nothing", moved)

  # Merge on sharded parameters (with output shardings left to XLA) keeps every kernel's sharding.
  base_paths = sp.peft.leaf_paths(sharded_params)
  for path, leaf in sp.peft.leaf_paths(merged).items():
    base = base_paths[path]
    assert leaf.sharding.is_equivalent_to(base.sharding, leaf.ndim), (case.name, path, leaf.sharding, base.sharding)
  for got, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(ref_merged)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=2e-6, err_msg=case.name)
  for got, ref in zip(jax.tree.leaves(restored), jax.tree.leaves(ref_restored)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5, err_msg=case.name)
  print(f"OK {case.name} loss={float(loss):.6f}", flush=True)


FSDP_TARGETS = r"mlp_(in|out)/kernel$"
FSDP_CASES = ("fourierft", "lfma", "waveft", "shira")


def run_fsdp_output_axis(case, block, params, x, y):
  """Kernels split on their output axis (FSDP ``P(None, "data")``): the step runs and equals one device.

  XLA:CPU's FFT needs row-major operands, and a merged kernel split this way used to get a
  column-major FFT (a run-time error in ``fft_thunk``), through merge and through the runtime.
  """
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  shardings = sp.peft.path_shardings(params, mesh, {r"mlp_(in|out)/kernel$": P(None, "data")})
  adapters = perturb(sp.peft.init_adapters(jax.random.key(7), params, case.method, FSDP_TARGETS),
                     jax.random.key(11), case.scale)
  trainable, rest = sp.peft.partition(adapters)

  def losses(trainable, params, x, y):
    ad = sp.peft.combine(trainable, rest)
    through_merge = jnp.mean(jnp.square(block.apply({"params": sp.peft.merge(params, ad)}, x) - y))
    through_runtime = jnp.mean(jnp.square(sp.peft.apply_adapters(block, params, ad, x) - y))
    return through_merge + 2 * through_runtime

  step = jax.jit(jax.value_and_grad(losses))
  want = step(trainable, params, x, y)
  batch = NamedSharding(mesh, P("data"))
  got = step(trainable, jax.device_put(params, shardings), jax.device_put(x, batch), jax.device_put(y, batch))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6 * float(np.max(np.abs(w))),
                               err_msg=case.name)
  print(f"OK fsdp-output-axis {case.name}", flush=True)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + nn.Dense(EMBED, name="mlp_out")(nn.gelu(nn.Dense(4 * EMBED, name="mlp_in")(x)))


def check_no_gather_under_tensor_parallelism(case, mesh):
  """Megatron TP: the runtime's step gathers neither a kernel nor an activation (no all-gather at all).

  Each device adds its shard of the update into its shard of the kernel (sparse methods scatter in
  2-D; a flat scatter gathered the whole kernel) and LoRA-type factors are split like the kernel.
  """
  model = _MLP()
  x = jax.random.normal(jax.random.key(1), (8, SEQ, EMBED))
  params = model.init(jax.random.key(0), x)["params"]
  rules = {r"mlp_in/kernel$": P(None, "model"), r"mlp_in/bias$": P("model"), r"mlp_out/kernel$": P("model", None)}
  shardings = sp.peft.path_shardings(params, mesh, rules)
  adapters = sp.peft.init_adapters(jax.random.key(2), params, case.method, "kernel")
  step = jax.jit(jax.value_and_grad(lambda a, p, x: jnp.mean(sp.peft.apply_adapters(model, p, a, x) ** 2)))
  args = (jax.device_put(adapters, sp.peft.adapter_shardings(adapters, shardings, mesh)),
          jax.device_put(params, shardings), jax.device_put(x, NamedSharding(mesh, P("data"))))
  hlo = step.lower(*args).compile().as_text()
  gathers = [line.strip()[:160] for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
  assert not gathers, (case.name, gathers)
  print(f"OK tp-no-gather {case.name}", flush=True)


def check_fourier_cotangent_layouts(mesh):
  """The Fourier coefficients' cotangent from each device's block of ``x^T g`` equals the one-device one.

  Token, row and column splits of the activations (Megatron column and row layouts, FSDP-like,
  replicated), real (FourierFT) and complex (LFMA) coefficients; the compiled HLO gathers nothing.
  """
  from spectral_peft._sparse import sharded

  m, n, p, tokens = 16, 24, 40, 8
  keys = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(keys[0], (tokens, m))
  g = jax.random.normal(keys[1], (tokens, n))
  indices = jnp.asarray(np.sort(np.random.default_rng(0).choice(m * n, p, replace=False)), jnp.int32)
  real = jax.random.normal(keys[2], (p,))
  values = {"real": real, "complex": real + 1j * jax.random.normal(keys[3], (p,))}
  layouts = [(P("data", None), P("data", "model")), (P("data", "model"), P("data", None)),
             (P(None, ("data", "model")), P()), (P(), P(None, "model")), (P(), P())]
  cotangent = jax.jit(lambda x, g, v: sharded.fourier_cotangent(x, g, v, indices, (m, n), 3.0))
  for kind, v in values.items():
    want = np.asarray(cotangent(x, g, v))  # one device: no mesh in the operands' types
    for x_spec, g_spec in layouts:
      args = (jax.device_put(x, NamedSharding(mesh, x_spec)), jax.device_put(g, NamedSharding(mesh, g_spec)),
              jax.device_put(v, NamedSharding(mesh, P())))
      got = np.asarray(cotangent(*args))
      scale = float(np.max(np.abs(want)))
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=f"{kind} {x_spec} {g_spec}")
      hlo = cotangent.lower(*args).compile().as_text()
      assert "all-gather" not in hlo, (kind, x_spec, g_spec)
  # What custom_partitioning has no rule for: per-example (vmap) and differentiated (jvp) cotangents.
  fn = lambda x, g: sharded.fourier_cotangent(x, g, real, indices, (m, n), 3.0)  # noqa: E731
  per_example = jax.jit(jax.vmap(lambda x, g: fn(x[None], g[None])))
  tangent = jax.jit(lambda x, g: jax.jvp(fn, (x, g), (2 * x, g))[1])
  x_tp, g_tp = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(g, NamedSharding(mesh, P("data", "model")))
  for name, f in (("vmap", per_example), ("jvp", tangent)):
    want = np.asarray(f(x, g))
    np.testing.assert_allclose(np.asarray(f(x_tp, g_tp)), want, rtol=0, atol=1e-5 * float(np.max(np.abs(want))),
                               err_msg=name)
  print("OK fourier-cotangent-layouts", flush=True)


TP_NO_GATHER_CASES = ("lora", "dora", "sine_lora", "shira", "waveft", "fourierft", "lfma")


def main():
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()} (set XLA_FLAGS)"
  mesh = sp.peft.data_model_mesh(2, 4)
  block = Block()
  x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, EMBED))
  y = jax.random.normal(jax.random.key(2), (BATCH, SEQ, EMBED))
  params = block.init(jax.random.key(0), x)["params"]
  params_shardings = sp.peft.path_shardings(params, mesh, RULES)
  only = set(sys.argv[1:])
  for case in CASES:
    if not only or case.name in only:
      run_case(case, block, params, params_shardings, mesh, x, y)
  x8, y8 = (jax.random.normal(jax.random.key(k), (8, SEQ, EMBED)) for k in (3, 4))  # a batch of 8: one per device
  for case in CASES:
    if case.name in FSDP_CASES and (not only or case.name in only):
      run_fsdp_output_axis(case, block, params, x8, y8)
    if case.name in TP_NO_GATHER_CASES and (not only or case.name in only):
      check_no_gather_under_tensor_parallelism(case, mesh)
  if not only or "fourierft" in only:
    check_fourier_cotangent_layouts(mesh)
  print("ALL OK", flush=True)


if __name__ == "__main__":
  main()
