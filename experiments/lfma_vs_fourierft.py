"""LFMA against FourierFT at equal and smaller budgets, and LFMA's mask strategies (the LFMA paper).

Same pretrained MNIST-1D model, downstream task, learning-rate grid and seeds as
``experiments.finetune_comparison`` (its cached orbax checkpoint is reused). FourierFT keeps
``budget`` real coefficients at random frequencies; LFMA keeps ``budget / 2`` complex coefficients
(the same trainable count) or ``budget / 4`` (half of it) at the top-k frequencies of a
``Delta W_init``: a random matrix, the weight W0 itself, or the loss gradient wrt W0 accumulated
over a few downstream batches (``sp.peft.lfma_gradient_init``). LFMA's coefficients start at zero
here (``value_init="zeros"``) so every adapter starts as the pretrained model.

Run:
  python -m experiments.lfma_vs_fourierft --preset quick
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spectral_peft as sp
from experiments import _common
from experiments import finetune_comparison as fc

NAME = "lfma_vs_fourierft"


@dataclasses.dataclass(frozen=True)
class Config:
  base: fc.Config = fc.Config()
  budgets: tuple[int, ...] = (128, 512)
  strategies: tuple[str, ...] = ("random", "weight", "gradient")
  gradient_batches: int = 4


PRESETS = {"quick": Config(), "full": Config(base=fc.PRESETS["full"], budgets=(64, 128, 512, 2048))}


def gradient_inits(config, model, params, tasks):
  """LFMA's "gradient" Delta W_init: the downstream loss gradient at the hidden kernels, with a fresh head."""
  x, y = (jnp.asarray(a) for a in tasks["train"])
  head = model.init(jax.random.key(0), x[:1])["params"]["head"]
  size = config.base.batch

  def loss_fn(p, batch):
    xb, yb = batch
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": {**p, "head": head}}, xb), yb).mean()

  batches = [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(config.gradient_batches)]
  return sp.peft.lfma_gradient_init(loss_fn, params, batches, fc.TARGETS)


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  base = config.base
  tasks = fc.split_tasks(base.seed)
  model, params, _ = fc.pretrained(base, tasks, _common.results_dir(fc.NAME))
  shape = (base.width, base.width)
  grads = gradient_inits(config, model, params, tasks) if "gradient" in config.strategies else None

  jobs = []
  for budget in config.budgets:
    jobs.append(("FourierFT", "random", budget, fc.adapter_maker(params, sp.peft.FourierFT(budget))))
    for share, label in ((budget, "equal"), (budget // 2, "half")):
      for strategy in config.strategies:
        spec = sp.peft.LFMA(fc.lfma_ratio(share, shape), delta_init=strategy, value_init="zeros")
        if strategy == "gradient":
          make = lambda key, spec=spec: sp.peft.init_lfma_adapters(key, params, spec, fc.TARGETS, grads)
        else:
          make = fc.adapter_maker(params, spec)
        jobs.append((f"LFMA ({label} budget)", strategy, budget, make))
  rows = []
  for name, strategy, budget, make in _common.progress(jobs, desc="LFMA / FourierFT"):
    val, test, count = fc.finetune(base, model, params, tasks, make)
    best = int(np.argmax(val.mean(0)))
    rows.append({"method": name, "mask": strategy, "budget": budget, "trainable": count,
                 "learning_rate": base.learning_rates[best], "test_mean": float(test[:, best].mean()),
                 "test_std": float(test[:, best].std())})

  table = _common.markdown_table(
      ["method", "mask", "FourierFT budget / kernel", "trainable", "lr (val)", "test accuracy (mean +- std)"],
      [[r["method"], r["mask"], r["budget"], r["trainable"], r["learning_rate"],
        f"{r['test_mean']:.3f} +- {r['test_std']:.3f}"] for r in rows])

  fig, ax = _common.subplots(figsize=(6.5, 4))
  for (name, strategy) in dict.fromkeys((r["method"], r["mask"]) for r in rows):
    sel = [r for r in rows if r["method"] == name and r["mask"] == strategy]
    ax.errorbar([r["trainable"] for r in sel], [r["test_mean"] for r in sel], [r["test_std"] for r in sel],
                marker="o", capsize=3, label=f"{name}, {strategy} mask" if name != "FourierFT" else name)
  ax.set(xscale="log", xlabel="trainable scalars", ylabel="test accuracy, digits 5-9", title="LFMA vs FourierFT")
  ax.legend(fontsize=6)
  _common.save_figure(fig, os.path.join(out, "lfma.png"))

  checks = []
  for budget in config.budgets:
    fourier = next(r["test_mean"] for r in rows if r["method"] == "FourierFT" and r["budget"] == budget)
    for label in ("equal", "half"):
      best = max((r for r in rows if r["method"] == f"LFMA ({label} budget)" and r["budget"] == budget),
                 key=lambda r: r["test_mean"])
      checks.append((f"LFMA {label} ({best['mask']} mask) {best['test_mean']:.3f} vs FourierFT {fourier:.3f} at "
                     f"{budget}", best["test_mean"] >= fourier - max(best["test_std"], 1e-3)))
  held = sum(ok for _, ok in checks)
  verdict = (_common.agreement(held, len(checks)) +
             " (LFMA within one std or above FourierFT): " + "; ".join(c for c, _ in checks) + ".")
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict,
            "plot": os.path.join(out, "lfma.png"), "environment": _common.environment()}
  return _common.save(out, result)


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
