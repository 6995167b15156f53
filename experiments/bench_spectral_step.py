"""Training-step time of WaveFT, SHiRA, FourierFT and LFMA relative to LoRA, dense vs factored path.

One small pre-LN Linen transformer with adapters on the attention query and value kernels (the
issue's setting). Every method at one parameter budget (LoRA rank ``budget_rank``'s count on a
query kernel, ``p = 2 r d``; LFMA's complex coefficients count twice) runs a jitted training step
(forward, backward to the adapter, Adam) on three paths:

* ``merge``: ``model.apply(merge(params, adapters))``: ``Delta W`` is formed every step (the
  PyTorch PEFT way, "dense");
* ``factored``: ``sp.peft.apply_factored`` with each spec's ``path="factored"`` (never forms
  ``Delta W``: 1-D wavelet cascades, gathers, 1-D FFTs);
* ``auto``: ``sp.peft.apply_factored`` with ``path="auto"`` (the flop model chooses per layer).

All steps are compiled first and then timed interleaved in one process; we report min / median /
max over repeats and the ratio of medians to LoRA (rank ``budget_rank``) on the same path.

Run:
  .venv/bin/python -m experiments.bench_spectral_step --preset quick
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import optax

import spectral_peft as sp
from experiments import _common

NAME = "bench_spectral"
TARGETS = r"attention/(query|value)/kernel$"
PATHS = ("merge", "factored", "auto")


@dataclasses.dataclass(frozen=True)
class Config:
  embed: int = 128
  heads: int = 4
  mlp: int = 256
  layers: int = 2
  seq: int = 32
  batch: int = 4
  repeats: int = 15
  budget_rank: int = 4


PRESETS = {
    "quick": Config(),
    "full": Config(embed=768, heads=12, mlp=3072, layers=4, seq=128, batch=16, repeats=40, budget_rank=8),
}


def methods(config: Config, path: str) -> dict[str, sp.peft.AdapterMethod]:
  """LoRA and the four sparse/spectral methods at LoRA rank ``budget_rank``'s parameter count."""
  d = config.embed
  p = 2 * config.budget_rank * d
  inner = "dense" if path == "merge" else path
  return {
      f"LoRA r{config.budget_rank}": sp.peft.LoRA(config.budget_rank),
      "WaveFT": sp.peft.WaveFT(p, path=inner),
      "SHiRA": sp.peft.SHiRA(p, path=inner),
      "FourierFT": sp.peft.FourierFT(p, path=inner),
      "LFMA": sp.peft.LFMA((p / 2 + 0.5) / (d * d), 12.0, value_init="zeros", path=inner),
  }


def _plot(rows, config, path):
  names = list(dict.fromkeys(r["method"] for r in rows))
  fig, ax = _common.subplots(figsize=(7, 3.5))
  width = 0.8 / len(PATHS)
  for j, p in enumerate(PATHS):
    ratios = [next(r["time_vs_lora"] for r in rows if r["method"] == n and r["path"] == p) for n in names]
    ax.bar(np.arange(len(names)) + j * width, ratios, width, label=p)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(names)) + width, names)
  ax.set_ylabel("step time / LoRA (same path)")
  ax.set_title(f"{config.layers}-layer transformer, d={config.embed}, {jax.default_backend()}")
  ax.legend()
  _common.save_figure(fig, path)


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  model = _common.Transformer(config.embed, config.heads, config.mlp, config.layers)
  x, y, params = _common.regression_task(model, (config.batch, config.seq, config.embed))
  tx = optax.adam(1e-3)

  compiled = {}
  jobs = [(name, spec, path) for path in PATHS for name, spec in methods(config, path).items()]
  for name, spec, path in _common.progress(jobs, desc="compile"):
    adapters = sp.peft.init_adapters(jax.random.key(1), params, spec, TARGETS, in_axes=1)
    step, trainable = _common.adapter_train_step(model, params, adapters, tx, path)
    state = tx.init(trainable)
    t, s, _ = step(trainable, state, x, y)  # compile and warm up
    jax.block_until_ready(t)
    compiled[(name, path)] = {"step": step, "trainable": t, "state": s,
                              "params": sp.peft.count_parameters(adapters)}

  times = _common.time_adapter_steps(compiled, x, y, config.repeats)

  lora = f"LoRA r{config.budget_rank}"
  rows = []
  for (name, path), c in compiled.items():
    rows.append({"method": name, "path": path, "params": c["params"], **_common.milliseconds(times[(name, path)])})
  for row in rows:
    ref = next(r for r in rows if r["method"] == lora and r["path"] == row["path"])
    row["time_vs_lora"] = row["median_ms"] / ref["median_ms"]
    merge_ref = next(r for r in rows if r["method"] == lora and r["path"] == "merge")
    row["time_vs_lora_merge"] = row["median_ms"] / merge_ref["median_ms"]

  table = _common.markdown_table(
      ["method", "path", "trainable", "step ms min / median / max", "time / LoRA (same path)",
       "time / LoRA (merge)"],
      [[r["method"], r["path"], r["params"], _common.min_median_max(r), r["time_vs_lora"], r["time_vs_lora_merge"]]
       for r in rows])
  table += (f"\n{config.layers}-layer transformer, embed {config.embed}, MLP {config.mlp}, batch {config.batch} x "
            f"{config.seq} tokens, float32, adapters on the query/value kernels, budget p = {2 * config.budget_rank * config.embed} "
            f"per kernel (= LoRA r{config.budget_rank}); {jax.default_backend()} backend, {config.repeats} interleaved "
            "repeats after compilation. merge: W0 + Delta W formed every step; factored: x W0 + x Delta W without "
            "forming Delta W; auto: per-layer choice by the flop model.\n")
  best = {n: min((r for r in rows if r["method"] == n), key=lambda r: r["median_ms"]) for n in dict.fromkeys(r["method"] for r in rows)}
  verdict = "; ".join(f"{n}: best {r['path']} at {r['time_vs_lora_merge']:.2f}x LoRA (merge)" for n, r in best.items())
  verdict += " (PyTorch PEFT anchors: WaveFT 2.1x, FourierFT 1.7x LoRA)."
  plot = os.path.join(out, "step_time.png")
  _plot(rows, config, plot)
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict, "plot": plot,
            "environment": _common.environment()}
  return _common.save(out, result, stem="step_time")


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
