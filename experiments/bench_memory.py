"""Training memory and step time of every adapter method: through `merge` vs the adapter runtime (Linen, NNX).

The stack: `layers` bias-free `Dense(width)` layers with residual tanh (`x + tanh(x W)`), batch `batch`,
float32, every kernel adapted at a budget of 8 (m + n) scalars per layer (LoRA/DoRA/sine rank 8; SHiRA,
WaveFT, FourierFT `n_params`/`n_frequency` = 8 (m + n); LFMA top-k ratio 8 (m + n) / (m n)). For each
method and path we compile `jit(grad(loss))` with respect to the adapters (the base weights are a
non-differentiated argument) and read XLA's compiled memory analysis (`temp_size_in_bytes`); then
every compiled step is timed interleaved in one process, and step times are reported as ratios to
LoRA on the same path and to the merge path of the same method. Nothing here is asserted in tests.

Paths:
  merge         `model.apply({"params": sp.peft.merge(params, adapters)}, x)`: every merged weight alive.
  runtime       `sp.peft.apply_adapters(model, params, adapters, x)` (Linen).
  runtime-nnx   the same stack in NNX with `sp.nnx.adapt` (adapters in place), differentiated
                with respect to the `sp.nnx.AdapterParam` state.

The target: temp memory <= LoRA's runtime figure + 3 x (the largest adapted m x n in bytes).

Run:
  python -m experiments.bench_memory --preset full    # the 2048-wide stack of the target
  python -m experiments.bench_memory --preset quick   # the same at width 1024 (the report's preset)
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import spectral_peft as sp
from experiments import _common

NAME = "bench_memory"
PATHS = ("merge", "runtime", "runtime-nnx")


@dataclasses.dataclass(frozen=True)
class Config:
  width: int = 2048
  layers: int = 8
  batch: int = 256
  rank: int = 8
  repeats: int = 3
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SineLoRA", "SineDoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")


PRESETS = {
    "quick": Config(width=1024),  # the report's preset: the same stack at half the width
    "full": Config(repeats=5),  # the 2048-wide stack of the design target
    "tiny": Config(width=256, layers=4, batch=32, repeats=2),  # a smoke run
}


class Stack(nn.Module):
  layers: int
  width: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = x + jnp.tanh(nn.Dense(self.width, use_bias=False, name=f"dense_{i}")(x))
    return x


class NNXStack(nnx.Module):
  def __init__(self, layers: int, width: int, rngs: nnx.Rngs):
    self.dense = nnx.List([nnx.Linear(width, width, use_bias=False, rngs=rngs) for _ in range(layers)])

  def __call__(self, x):
    for layer in self.dense:
      x = x + jnp.tanh(layer(x))
    return x


def method_specs(config: Config) -> dict[str, sp.peft.AdapterMethod]:
  p = config.rank * 2 * config.width  # rank-r LoRA scalars on a (width, width) kernel
  specs = {
      "LoRA": sp.peft.LoRA(config.rank), "DoRA": sp.peft.DoRA(config.rank),
      "SineLoRA": sp.peft.SineLoRA(config.rank), "SineDoRA": sp.peft.SineDoRA(config.rank),
      "SHiRA": sp.peft.SHiRA(p), "WaveFT": sp.peft.WaveFT(p), "FourierFT": sp.peft.FourierFT(p),
      "LFMA": sp.peft.LFMA(p / config.width**2),
  }
  return {name: specs[name] for name in config.methods}


def linen_step(config, path, spec, x):
  model = Stack(config.layers, config.width)
  params = model.init(jax.random.key(0), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(1), params, spec, "kernel")
  return _common.merge_or_runtime_step(model, path), (adapters, params, x)


def nnx_step(config, spec, x):
  model = NNXStack(config.layers, config.width, nnx.Rngs(0))
  sp.nnx.adapt(model, spec, "kernel", key=jax.random.key(1))
  graphdef, adapter_state, rest = nnx.split(model, sp.nnx.AdapterParam, ...)

  def loss(adapter_state, rest, x):
    return jnp.mean(jnp.square(nnx.merge(graphdef, adapter_state, rest)(x)))

  return jax.jit(jax.value_and_grad(loss)), (adapter_state, rest, x)


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  x = jax.random.normal(jax.random.key(2), (config.batch, config.width))
  compiled = {}
  jobs = [(name, spec, path) for name, spec in method_specs(config).items() for path in PATHS]
  for name, spec, path in _common.progress(jobs, desc="compile"):
    step, args = nnx_step(config, spec, x) if path == "runtime-nnx" else linen_step(config, path, spec, x)
    executable = step.lower(*args).compile()
    temp = executable.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(executable(*args))  # warm up
    compiled[(name, path)] = {"run": executable, "args": args, "temp_MiB": temp}

  times = _common.time_interleaved({key: lambda c=c: c["run"](*c["args"]) for key, c in compiled.items()},
                                   config.repeats)

  mn_mib = config.width * config.width * 4 / 2**20
  rows = []
  for (name, path), c in compiled.items():
    rows.append({"method": name, "path": path, "temp_MiB": c["temp_MiB"], **_common.milliseconds(times[(name, path)])})
  for row in rows:
    lora = next(r for r in rows if r["method"] == "LoRA" and r["path"] == row["path"])
    merge = next(r for r in rows if r["method"] == row["method"] and r["path"] == "merge")
    row["time_vs_lora"] = row["median_ms"] / lora["median_ms"]
    row["time_vs_merge"] = row["median_ms"] / merge["median_ms"]
    if row["path"] != "merge":
      row["target_MiB"] = lora["temp_MiB"] + 3 * mn_mib
      row["meets_target"] = bool(row["temp_MiB"] <= row["target_MiB"])

  def cell(name, path, field, fmt):
    row = next(r for r in rows if r["method"] == name and r["path"] == path)
    return fmt.format(row[field])

  names = list(method_specs(config))
  memory_table = _common.markdown_table(
      ["method", "merge temp MiB", "runtime (Linen) temp MiB", "runtime (NNX) temp MiB", "target MiB"],
      [[n, cell(n, "merge", "temp_MiB", "{:.1f}"), cell(n, "runtime", "temp_MiB", "{:.1f}"),
        cell(n, "runtime-nnx", "temp_MiB", "{:.1f}"), cell(n, "runtime", "target_MiB", "{:.0f}")] for n in names])
  time_table = _common.markdown_table(
      ["method", "merge ms (/ LoRA)", "runtime ms (/ LoRA, / merge)", "runtime NNX ms (/ LoRA, / merge)"],
      [[n, f"{cell(n, 'merge', 'median_ms', '{:.0f}')} ({cell(n, 'merge', 'time_vs_lora', '{:.2f}')})",
        f"{cell(n, 'runtime', 'median_ms', '{:.0f}')} ({cell(n, 'runtime', 'time_vs_lora', '{:.2f}')}, "
        f"{cell(n, 'runtime', 'time_vs_merge', '{:.2f}')})",
        f"{cell(n, 'runtime-nnx', 'median_ms', '{:.0f}')} ({cell(n, 'runtime-nnx', 'time_vs_lora', '{:.2f}')}, "
        f"{cell(n, 'runtime-nnx', 'time_vs_merge', '{:.2f}')})"] for n in names])
  setup = (f"{config.layers} bias-free Dense({config.width}) layers with residual tanh, batch {config.batch}, float32, "
           f"every kernel adapted at 8 (m + n) scalars; base weights {config.layers * mn_mib:.0f} MiB (an argument, "
           f"not temp). XLA compiled memory analysis of jit(value_and_grad) wrt the adapters; step times: median of "
           f"{config.repeats} interleaved repeats, {jax.default_backend()} backend.")
  failing = [f"{r['method']} ({r['path']})" for r in rows if r["path"] != "merge" and not r["meets_target"]]
  verdict = ("Every method meets the memory target on both runtimes." if not failing
             else "Over the memory target: " + ", ".join(failing) + ".")
  slower = [f"{r['method']} ({r['path']}: {r['time_vs_merge']:.2f}x)" for r in rows
            if r["path"] != "merge" and r["time_vs_merge"] > 1.0]
  verdict += (" Step time: every runtime step is at most the merge step's." if not slower
              else " Slower than training through merge: " + ", ".join(slower) + ".")
  table = f"{memory_table}\n\n{time_table}\n\n{setup}\n"
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict, "environment": _common.environment()}
  with open(os.path.join(out, "memory.md"), "w") as f:
    f.write(table + "\n" + verdict + "\n")
  _common.write_json(os.path.join(out, "memory.json"), result)
  print(table)
  print(verdict)
  return result


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
