"""Data-parallel x model-parallel adapter training of a small transformer on a (data, model) mesh.

A frozen pre-LN transformer (Linen) is sharded Megatron style along "model" (attention heads and
MLP hidden units), the batch along "data"; adapters on the query/value/MLP kernels get shardings
from :func:`sp.peft.adapter_shardings` (LoRA factors split like their kernels, vectors, sparse
coefficients and integer positions replicated). For each method the same training run is done on
the mesh and on one device, and we report the loss curves, the largest difference between the two
runs' final adapters and the placement of every adapter array. On a CPU the devices are simulated
(``--xla_force_host_platform_device_count``), so step times say nothing about speed-ups; they are
recorded only to show the sharded program runs.

Run (the script sets the XLA flag itself when it starts jax; set it yourself when jax is already
running in the process, e.g. in a notebook):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.sharded_training --preset quick
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import spectral_peft as sp  # noqa: E402
from experiments import _common  # noqa: E402

NAME = "sharded_training"
TARGETS = r"(query|value|mlp_in|mlp_out)/kernel$"
IN_AXES = {r"attention/": 1}
# Megatron-style model parallelism: column-split query/key/value and MLP input kernels, row-split
# attention output and MLP output kernels; everything else replicated.
RULES = {
    r"attention/(query|key|value)/kernel$": P(None, "model", None),
    r"attention/(query|key|value)/bias$": P("model", None),
    r"attention/out/kernel$": P("model", None, None),
    r"mlp_in/kernel$": P(None, "model"),
    r"mlp_in/bias$": P("model"),
    r"mlp_out/kernel$": P("model", None),
}


@dataclasses.dataclass(frozen=True)
class Config:
  embed: int = 64
  heads: int = 4
  mlp: int = 128
  layers: int = 2
  seq: int = 16
  batch: int = 16
  steps: int = 30
  learning_rate: float = 3e-3
  rank: int = 4
  data: int = 2
  model: int = 4
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SineLoRA", "WaveFT")
  seed: int = 0


PRESETS = {
    "quick": Config(),
    "full": Config(embed=256, heads=8, mlp=1024, layers=4, seq=64, batch=32, steps=300),
}


def method(name: str, config: Config) -> sp.peft.AdapterMethod:
  """A spec by class name; sparse/spectral methods get LoRA's parameter budget on an (embed, embed) kernel."""
  budget = config.rank * 2 * config.embed
  if name in ("LoRA", "DoRA"):
    return getattr(sp.peft, name)(config.rank)
  if name in ("SineLoRA", "SineDoRA"):
    return getattr(sp.peft, name)(config.rank, omega=100.0)
  if name in ("WaveFT", "SHiRA"):
    return getattr(sp.peft, name)(n_params=budget)
  if name == "FourierFT":
    return sp.peft.FourierFT(n_frequency=budget)
  raise ValueError(f"`methods` entries must be LoRA, DoRA, SineLoRA, SineDoRA, WaveFT, SHiRA or FourierFT, got {name!r}.")


def teacher_task(config: Config, model: _common.Transformer, params):
  """Inputs and the outputs of a 'teacher': the base model shifted by a random rank-``rank`` update."""
  kx, ka, kb = jax.random.split(jax.random.key(config.seed + 1), 3)
  x = jax.random.normal(kx, (config.batch, config.seq, config.embed))
  shift = sp.peft.init_adapters(ka, params, sp.peft.LoRA(config.rank), TARGETS, in_axes=IN_AXES)
  shift = {
      path: dataclasses.replace(a, params={"a": a.params["a"], "b": 0.5 * jax.random.normal(jax.random.fold_in(kb, i), a.params["b"].shape)})
      for i, (path, a) in enumerate(shift.items())
  }
  teacher = sp.peft.merge(params, shift)
  return x, model.apply({"params": teacher}, x)


def make_step(model: _common.Transformer, tx):
  def step(adapters, opt_state, params, x, y):
    trainable, rest = sp.peft.partition(adapters)

    def loss(trainable):
      merged = sp.peft.merge(params, sp.peft.combine(trainable, rest))
      return jnp.mean(jnp.square(model.apply({"params": merged}, x) - y))

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return sp.peft.combine(optax.apply_updates(trainable, updates), rest), opt_state, value

  return step


def train(step, adapters, tx, params, x, y, steps, desc):
  """Runs ``steps`` jitted steps; returns the final adapters, the losses and the median step time."""
  opt_state = tx.init(sp.peft.partition(adapters)[0])
  losses, times = [], []
  for _ in _common.progress(range(steps), desc=desc):
    start = time.perf_counter()
    adapters, opt_state, value = step(adapters, opt_state, params, x, y)
    value.block_until_ready()
    times.append(time.perf_counter() - start)
    losses.append(float(value))
  return adapters, losses, float(np.median(times[1:])) if len(times) > 1 else float("nan")


def placement_rows(adapters, specs, limit_prefix: str) -> list[list[str]]:
  rows = []
  for path, adapter in adapters.items():
    if not path.startswith(limit_prefix):
      continue
    for part in ("params", "frozen"):
      arrays, part_specs = getattr(adapter, part), getattr(specs[path], part)
      for name in arrays:
        rows.append([path, f"{part}/{name}", str(tuple(arrays[name].shape)), str(arrays[name].dtype), str(part_specs[name])])
  return rows


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  devices = jax.devices()
  if len(devices) >= config.data * config.model:
    mesh = sp.peft.data_model_mesh(config.data, config.model)
  else:  # jax was started before the flag could be set: use what there is.
    mesh = sp.peft.data_model_mesh(model=1)
  model = _common.Transformer(config.embed, config.heads, config.mlp, config.layers)
  x0 = jnp.zeros((config.batch, config.seq, config.embed))
  params = model.init(jax.random.key(config.seed), x0)["params"]
  x, y = teacher_task(config, model, params)
  params_shardings = sp.peft.path_shardings(params, mesh, RULES)
  sharded_params = jax.device_put(params, params_shardings)
  batch = NamedSharding(mesh, P("data"))
  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  tx = optax.adam(config.learning_rate)
  step = make_step(model, tx)

  runs, placements = [], {}
  for name in config.methods:
    spec = method(name, config)
    adapters = sp.peft.init_adapters(jax.random.key(config.seed + 2), params, spec, TARGETS, in_axes=IN_AXES)
    shardings = sp.peft.adapter_shardings(adapters, params_shardings)
    placements[name] = placement_rows(adapters, sp.peft.adapter_partition_specs(adapters, params_shardings), "block_0/")
    sharded_step = jax.jit(step, out_shardings=(shardings, None, None))
    final, losses, step_s = train(sharded_step, sp.peft.shard_adapters(adapters, sharded_params), tx,
                                  sharded_params, xs, ys, config.steps, f"{name} on {dict(mesh.shape)}")
    ref, ref_losses, ref_step_s = train(jax.jit(step), adapters, tx, params, x, y, config.steps, f"{name} on 1 device")
    diff = max(float(jnp.max(jnp.abs(jnp.asarray(a) - b))) for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref)))
    runs.append({
        "method": name, "trainable_parameters": sp.peft.count_parameters(adapters),
        "loss_first": losses[0], "loss_last": losses[-1], "loss_last_one_device": ref_losses[-1],
        "max_abs_adapter_difference": diff, "median_step_s_mesh": step_s, "median_step_s_one_device": ref_step_s,
        "losses": losses, "losses_one_device": ref_losses,
    })

  fig, ax = _common.subplots(figsize=(5.5, 3.8))
  for run in runs:
    line, = ax.plot(run["losses"], label=f"{run['method']} on mesh {dict(mesh.shape)}")
    ax.plot(run["losses_one_device"], ls=":", color=line.get_color(), label=f"{run['method']} on 1 device")
  ax.set(xlabel="step", ylabel="MSE to teacher", yscale="log", title="Sharded vs single-device adapter training")
  ax.legend(fontsize=6)
  _common.save_figure(fig, os.path.join(out, "losses.png"))

  table = f"Mesh {dict(mesh.shape)} on {len(devices)} {jax.default_backend()} devices; {config.steps} Adam steps.\n\n"
  table += _common.markdown_table(
      ["method", "trainable params", "loss first", "loss last (mesh)", "loss last (1 device)",
       "max |adapter diff|", "step s (mesh)", "step s (1 device)"],
      [[r["method"], r["trainable_parameters"], r["loss_first"], r["loss_last"], r["loss_last_one_device"],
        r["max_abs_adapter_difference"], r["median_step_s_mesh"], r["median_step_s_one_device"]] for r in runs],
  )
  table += "\nPlacement of the adapter arrays of block_0 (PartitionSpec over the mesh axes):\n\n"
  table += _common.markdown_table(
      ["method", "target", "array", "shape", "dtype", "spec"],
      [[name] + row for name, rows in placements.items() for row in rows],
  )
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table)
  result = {
      "config": config, "environment": _common.environment(), "mesh": dict(mesh.shape), "runs": runs,
      "placements": placements,
      "max_abs_adapter_difference": max(r["max_abs_adapter_difference"] for r in runs),
  }
  _common.write_json(os.path.join(out, "results.json"), result)
  return {"mesh": dict(mesh.shape), "max_abs_adapter_difference": result["max_abs_adapter_difference"],
          "loss_last": {r["method"]: r["loss_last"] for r in runs}}


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__, show=str)
