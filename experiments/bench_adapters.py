"""Training-step time and compiled temporary memory of every adapter method, as ratios to LoRA.

One small pre-LN transformer (Linen; sizes in the config) with adapters on the attention query/value
kernels and both MLP kernels. Every method's jitted training step (forward, backward to the adapter,
Adam update) is compiled first, then all steps are timed interleaved in the same process, so every
method sees the same machine state; we report min/median/max over repeats and the ratio of medians
to LoRA at rank 1 and rank 8. Memory is XLA's compiled memory analysis (temporary bytes) of the same
step. Nothing here is asserted in tests.

Run:
  python -m experiments.bench_adapters --preset quick
"""

from __future__ import annotations

import dataclasses

import jax
import optax

import spectral_peft as sp
from experiments import _common

NAME = "bench"
TARGETS = r"(query|value|mlp_in|mlp_out)/kernel$"


@dataclasses.dataclass(frozen=True)
class Config:
  embed: int = 256
  heads: int = 4
  mlp: int = 1024
  layers: int = 2
  seq: int = 64
  batch: int = 8
  repeats: int = 20
  omega: float = 100.0
  dtype: str = "float32"
  paths: tuple[str, ...] = ("merge", "factored")


PRESETS = {
    "quick": Config(),
    "full": Config(embed=768, heads=12, mlp=3072, layers=4, seq=256, batch=16, repeats=50),
}


def transformer(config: Config) -> _common.Transformer:
  """The benchmark's pre-LN transformer at ``config``'s sizes and dtype."""
  return _common.Transformer(config.embed, config.heads, config.mlp, config.layers, config.dtype)


def methods(config: Config, budget_rank: int = 8) -> dict[str, sp.peft.AdapterMethod | None]:
  """Every method in sp.peft, sparse/spectral ones at LoRA rank-8's budget of the query kernel."""
  p = budget_rank * 2 * config.embed  # rank-8 LoRA scalars on an (embed, embed) kernel
  specs = {"LoRA r1": sp.peft.LoRA(1), "LoRA r8": sp.peft.LoRA(8), "DoRA r1": sp.peft.DoRA(1),
           "DoRA r8": sp.peft.DoRA(8), "SineLoRA r1": sp.peft.SineLoRA(1, omega=config.omega),
           "SineLoRA r8": sp.peft.SineLoRA(8, omega=config.omega),
           "SineDoRA r8": sp.peft.SineDoRA(8, omega=config.omega)}
  optional = {"SHiRA": lambda: sp.peft.SHiRA(p), "WaveFT": lambda: sp.peft.WaveFT(p),
              "FourierFT": lambda: sp.peft.FourierFT(p), "LFMA": lambda: sp.peft.LFMA(p / 2 / config.embed**2, value_init="spectrum")}
  for name, make in optional.items():
    if hasattr(sp.peft, name):
      specs[f"{name} p={p}"] = make()
  return specs


def step_fn(model, params, adapters, tx, path):
  """A jitted training step that donates its buffers; `path` is "merge" (W0 + Delta W per step) or
  "factored" (sp.peft.apply_factored)."""
  return _common.adapter_train_step(model, params, adapters, tx, path, donate=True)


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  model = transformer(config)
  x, y, params = _common.regression_task(model, (config.batch, config.seq, config.embed))
  tx = optax.adam(1e-3)

  compiled = {}
  jobs = [(name, spec, path) for name, spec in methods(config).items() for path in config.paths]
  for name, spec, path in _common.progress(jobs, desc="compile"):
    adapters = sp.peft.init_adapters(jax.random.key(1), params, spec, TARGETS,
                                     in_axes=lambda path, shape: 1 if len(shape) == 3 and "out" not in path else None)
    step, trainable = step_fn(model, params, adapters, tx, path)
    name = f"{name} ({path})"
    state = tx.init(trainable)
    lowered = step.lower(trainable, state, x, y).compile()
    memory = lowered.memory_analysis()
    compiled[name] = {"step": step, "trainable": trainable, "state": state,
                      "temp_MiB": memory.temp_size_in_bytes / 2**20,
                      "params": sp.peft.count_parameters(adapters)}
    t, s, _ = step(trainable, state, x, y)  # warm up (and consume the donated buffers)
    jax.block_until_ready(t)
    compiled[name]["trainable"], compiled[name]["state"] = t, s

  times = _common.time_adapter_steps(compiled, x, y, config.repeats)

  rows = []
  for name, c in compiled.items():
    rows.append({"method": name, "params": c["params"], **_common.milliseconds(times[name]), "temp_MiB": c["temp_MiB"]})
  for row in rows:  # ratios to LoRA on the same path
    path = row["method"].rsplit("(", 1)[1]
    r1, r8 = (next(x for x in rows if x["method"] == f"LoRA r{k} ({path}") for k in (1, 8))
    row["time_vs_lora_r1"] = row["median_ms"] / r1["median_ms"]
    row["time_vs_lora_r8"] = row["median_ms"] / r8["median_ms"]
    row["memory_vs_lora_r8"] = row["temp_MiB"] / r8["temp_MiB"]

  table = _common.markdown_table(
      ["method", "trainable", "step ms min / median / max", "time / LoRA r1", "time / LoRA r8", "temp MiB",
       "memory / LoRA r8"],
      [[r["method"], r["params"], _common.min_median_max(r), r["time_vs_lora_r1"], r["time_vs_lora_r8"],
        r["temp_MiB"], r["memory_vs_lora_r8"]] for r in rows])
  table += (f"\n{config.layers}-layer transformer, embed {config.embed}, MLP {config.mlp}, batch {config.batch} x "
            f"{config.seq} tokens, {config.dtype}, adapters on query/value/MLP kernels; ratios are to LoRA on the same "
            "path (merge: W0 + Delta W every step; factored: sp.peft.factored); "
            f"{jax.default_backend()} backend, {config.repeats} interleaved repeats after compilation.\n")
  worst = max(rows, key=lambda r: r["time_vs_lora_r8"])
  verdict = (f"Slowest method {worst['method']} at {worst['time_vs_lora_r8']:.2f}x LoRA r8's step "
             "(PyTorch PEFT anchors: WaveFT 2.1x, FourierFT 1.7x, DoRA 1.16x).")
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict, "environment": _common.environment()}
  return _common.save(out, result, stem="adapters")


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
