"""Claim (the sinusoidal-networks paper (Aldana et al.), Fig. 3 and 6, sec. 3.1): a first layer of integer frequencies (a period-2 network)
fits an image faster and better than SIREN's real-valued first layer, at equal size and steps.

Three networks f(x) = C sin(A sin(omega x + phi) + b) + d with the same widths, hidden init, optimizer
and steps fit the 256 x 256 cameraman; only the frozen first layer differs: integer frequencies in
[-w0, w0]^2 (sp.integer_frequencies) or SIREN's real omega ~ omega_0 U(-1/2, 1/2) (sp.siren_frequencies),
compared band for band: w0 = 6 against SIREN's omega_0 = 30 (|k| <= 4.8), and a wide band w0 = 30 against
a SIREN layer of the same band (omega_0 = 2 pi w0).

Run:
  python -m experiments.sinusoidal_init --preset quick
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
import optax

import spectral_peft as sp
from experiments import _common
from experiments import _sinusoidal_image as img


@dataclasses.dataclass(frozen=True)
class Config:
  size: int = 256
  frequencies: int = 64
  hidden: int = 128
  bandwidth: int = 30
  steps: int = 300
  learning_rate: float = 2e-3
  batch_size: int | None = 8192  # None: full batch.
  seed: int = 0
  seeds: int = 1  # repeats; repeat s uses seed + 1000 s (network init, frequencies and batches)


PRESETS = {
    "quick": Config(),
    "seeds3": Config(seeds=3),  # the quick budget at 3 seeds: the spread the quick run cannot measure
    "full": Config(frequencies=128, hidden=256, steps=3000, batch_size=None),
}
NAME = "sinusoidal_init"


def first_layers(config: Config) -> dict:
  key = jax.random.key(config.seed)
  # SIREN's omega_0 = 30 with fan-in 2 draws |omega| <= 15, i.e. integer units |k| <= 15 / pi ~ 4.8: the
  # integer layer with w0 = 6 covers about the same band; the wide band w0 is compared with a SIREN of that band.
  low = 6  # [-5, 5]^2 holds only 60 frequencies up to sign; 6 is the smallest band with 64.
  return {
      f"integer (w0 = {low})": sp.integer_frequencies(key, config.frequencies, low),
      "siren (omega_0 = 30, |k| <= 4.8)": sp.siren_frequencies(key, config.frequencies, omega_0=30.0),
      f"integer (w0 = {config.bandwidth})": sp.integer_frequencies(key, config.frequencies, config.bandwidth),
      f"siren (|k| <= {config.bandwidth})": sp.siren_frequencies(key, config.frequencies, omega_0=2.0 * math.pi * config.bandwidth),
  }


def mean_std(values) -> "float | str":
  """One value as it is; several as ``"mean +- std"`` (ddof = 1)."""
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return values[0]
  return f"{np.mean(values):.4g} +- {_common.sample_std(values):.2g}"


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  image, x, y = img.task(config.size)
  per_seed = [run_seed(dataclasses.replace(config, seed=config.seed + 1000 * s), image, x, y) for s in range(config.seeds)]
  rows = [row for seed_rows, _ in per_seed for row in seed_rows]
  curves = per_seed[0][1]
  names = list(curves)

  fig, ax = _common.subplots(figsize=(6, 4))
  for name, curve in curves.items():
    ax.plot(curve, label=name)
  ax.set(xlabel="step", ylabel="training PSNR (dB, batch)",
         title=f"cameraman {config.size}^2, m={config.frequencies}, n={config.hidden} (seed {config.seed})")
  ax.legend()
  plot = _common.save_figure(fig, os.path.join(out, "convergence.png"))

  col = lambda name, key: [r[key] for r in rows if r["init"] == name]  # noqa: E731
  table = _common.markdown_table(
      ["first layer", "final PSNR (dB)", f"PSNR near step {config.steps // 4}", "steps to 20 dB", "steps to 24 dB", "max |f(x+2) - f(x)|"],
      [[name, mean_std(col(name, "psnr")), mean_std(col(name, "psnr_at_quarter")), mean_std(col(name, "steps_to_20db")),
        mean_std(col(name, "steps_to_24db")), max(col(name, "max_abs_f(x+2)-f(x)"))] for name in names],
  ) + (f"\nMean +- std over {config.seeds} seeds (seed {config.seed} + 1000 s: network init, frequencies, batches)."
       if config.seeds > 1 else "")
  pairs = [(names[0], names[1]), (names[2], names[3])]
  spreads = [_common.paired_spread_verdict(col(a, "psnr"), col(b, "psnr")) for a, b in pairs]
  if config.seeds == 1:
    # One seed: no spread is measured, so the verdict can only state the direction, never "Matches".
    wins = [d["diff_mean"] > 0 for d in spreads]
    word = ("Same direction as the paper" if all(wins) else "Partly the paper's direction" if any(wins)
            else "Does not match")
    verdict = (f"{word} (1 seed, spread not measured): after {config.steps} steps at equal band, integer vs SIREN first layer: "
               + "; ".join(f"{a} {d['mean_a']:.2f} dB vs {b} {d['mean_b']:.2f} dB" for (a, b), d in zip(pairs, spreads)) + ".")
  else:
    held = sum(d["beyond_spread"] and d["diff_mean"] > 0 for d in spreads)
    verdict = (f"{_common.agreement(held, len(pairs))} (final PSNR after {config.steps} steps, {config.seeds} seeds; "
               "'matches' needs the integer layer above SIREN by more than the spread at both bands): "
               + "; ".join(f"{a} vs {b}: {d['text']}" for (a, b), d in zip(pairs, spreads)) + ".")
  result = {"config": config, "rows": rows, "environment": _common.environment(), "plot": plot, "table": table,
            "verdict": verdict, "spread": spreads}
  _common.save(out, {**result, "curves": curves})
  return result


def run_seed(config: Config, image, x, y) -> tuple[list[dict], dict]:
  """Fits every first layer of :func:`first_layers` at ``config.seed``; returns one row per layer and the
  training PSNR curves."""
  rows, curves = [], {}
  for name, omega in first_layers(config).items():
    params = sp.periodic_siren_init(jax.random.key(config.seed + 1), omega, config.hidden, 1)
    fit = sp.fit_periodic_siren(
        params, x, y, optax.adam(config.learning_rate), config.steps, batch_size=config.batch_size,
        key=jax.random.key(config.seed + 2), progress=_common.progress_bar(f"{NAME}: {name}"),
    )
    curve = img.psnr_from_mse(fit.losses)
    curves[name] = curve
    smooth = np.convolve(curve, np.ones(10) / 10, mode="valid")
    reach = {t: int(np.argmax(smooth >= t)) + 10 if (smooth >= t).any() else None for t in (20.0, 24.0)}
    periodic = sp.periodic_siren_apply(fit.params, x[:64] + 2.0) - sp.periodic_siren_apply(fit.params, x[:64])
    rows.append({
        "init": name, "seed": config.seed, "psnr": img.psnr(fit.params, image), "steps_to_20db": reach[20.0], "steps_to_24db": reach[24.0],
        "psnr_at_quarter": float(np.mean(curve[config.steps // 4 - 5: config.steps // 4 + 5])),
        "max_abs_f(x+2)-f(x)": float(np.abs(np.asarray(periodic)).max()),
    })

  return rows, curves


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
