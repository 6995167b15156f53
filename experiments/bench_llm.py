"""LLM fine-tuning under Tunix: every adapter method against qwix LoRA and full fine-tuning, step time and memory.

Models: Tunix's ``Llama3`` and ``Gemma3`` (tunix.models.*; float32, random weights, no downloads; Gemma3
with its tied embedding and its ``q_einsum`` ``NDH`` / ``kv_einsum`` ``CKDH`` layouts) at two widths. Every
spectral_peft method goes on the 7 projection weights of each layer (the attention einsums and the MLP's
``nnx.Linear`` s) at LoRA rank ``rank``'s parameter count per weight (SHiRA/WaveFT/FourierFT ``rank (m + n)``
entries, LFMA ``rank (m + n) / 2`` complex coefficients, ``(m, n)`` the weight flattened to (contracted axes,
the others) as qwix sees it); beside them qwix's LoRA at rank ``rank`` on the same modules (``alpha = rank``,
scale 1, as ours) and full fine-tuning (the model without adapters, which Tunix then trains whole).

Training: Tunix's ``PeftTrainer`` (Adam; ``learning_rate`` for adapters, ``full_learning_rate`` for full
fine-tuning), ``steps`` steps on a synthetic next-token task (each sequence follows one fixed random
permutation of the vocabulary from a random first token), its train step compiled once ahead of time
(``_llm.compiled_trainer``: Tunix's own step body, jitted over the split model/optimiser state). We report
the trainable scalars (what Tunix's optimiser holds), the loss curve, XLA's compiled temp memory of the step
(``memory_analysis().temp_size_in_bytes``) and the step time, every variant's compiled step timed
interleaved in one process (median of ``repeats``), both as ratios to qwix LoRA's on the same model.

Targets (on the Llama3 at the wide point): our LoRA <= 1.05x qwix LoRA's step time and <= its temp memory;
WaveFT, SHiRA, FourierFT and LFMA <= 1.3x its step time and <= 1.1x its temp memory.

Run:
  python -m experiments.bench_llm --preset quick   # two small widths, CPU, minutes
  python -m experiments.bench_llm --preset full    # embed 512 and 1024 / hidden 4096
  python -m experiments.bench_llm --preset wide    # only the Llama3 at embed 1024 / hidden 4096 (the targets')
  python -m experiments.bench_llm --preset wide_tokens  # the same model at 4x the tokens per step
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

import spectral_peft as sp
from experiments import _common

NAME = "bench_llm"
BASELINE = "qwix LoRA"
SPARSE = ("WaveFT", "SHiRA", "FourierFT", "LFMA")
FLOOR = "irfft2 floor"


@dataclasses.dataclass(frozen=True)
class Width:
  embed: int
  hidden: int
  heads: int
  kv_heads: int
  head_dim: int


@dataclasses.dataclass(frozen=True)
class Config:
  widths: tuple[Width, ...] = (Width(64, 256, 4, 2, 16), Width(128, 512, 4, 2, 32))
  families: tuple[str, ...] = ("llama3", "gemma3")
  layers: int = 2
  vocab: int = 256
  batch: int = 4
  seq: int = 32
  rank: int = 8
  steps: int = 12
  repeats: int = 7
  learning_rate: float = 3e-3
  full_learning_rate: float = 3e-4
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SineLoRA", "SineDoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")


WIDE = Width(1024, 4096, 8, 4, 128)
PRESETS = {
    "quick": Config(),
    "full": Config(widths=(Width(512, 2048, 8, 4, 64), WIDE), batch=4, seq=64, steps=10, repeats=7),
    "wide": Config(widths=(WIDE,), families=("llama3",), batch=4, seq=64, steps=6, repeats=5),
    # The wide Llama3 at 4x the tokens per step (16 x 64): how the per-step cost of the sparse/spectral
    # updates (independent of the tokens) weighs against the matmuls (proportional to them).
    "wide_tokens": Config(widths=(WIDE,), families=("llama3",), batch=16, seq=64, steps=4, repeats=7,
                          methods=("LoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")),
    "tiny": Config(widths=(Width(32, 64, 4, 2, 8),), families=("llama3",), steps=3, repeats=2, seq=8, vocab=64),
}


def variants(config: Config) -> tuple[str, ...]:
  return (*config.methods, BASELINE, "full")


def synthesis_floor(shapes: list[tuple[int, int]]) -> Callable[[], Any]:
  """One compiled call: one ``irfft2`` of a dense half spectrum per ``(m, n)`` of ``shapes``, nothing else.

  A FourierFT/LFMA step that forms each ``Delta W = Re(ifft2(S))`` pays at least this (ours forms it twice,
  once for the forward pass and once for the input's gradient, and adds the scatter and the coefficients'
  gradient), on top of the base model's matmuls that every method's step shares; timed with the steps, it
  bounds from below what any such formulation can reach on the machine at hand.
  """
  import jax.numpy as jnp

  keys = jax.random.split(jax.random.key(0), len(shapes))
  spectra = [jax.random.normal(k, (m, n // 2 + 1), jnp.complex64) for k, (m, n) in zip(keys, shapes)]
  synthesise = jax.jit(lambda ss: [jnp.fft.irfft2(s, s=shape) for s, shape in zip(ss, shapes)])
  return lambda: synthesise(spectra)


def run_width(config: Config, family: str, width: Width) -> list[dict]:
  """Trains every variant on one model, then times their compiled steps interleaved.

  On the Llama3, :func:`synthesis_floor` is timed among them (the row ``irfft2 floor``: no training, no
  memory figure).
  """
  from experiments import _llm

  size = _llm.ModelSize(embed=width.embed, hidden=width.hidden, layers=config.layers, heads=width.heads,
                        kv_heads=width.kv_heads, head_dim=width.head_dim, vocab=config.vocab)
  batches = _llm.token_batches(config.vocab, config.batch, config.seq, config.steps)
  rows, trainers, spectral_shapes = [], {}, []
  for name in _common.progress(variants(config), desc=f"{family} {width.embed}"):
    model = _llm.variant(family, size, name, config.rank)
    if name in ("FourierFT", "LFMA"):  # the adapted weights as (m, n), what the synthesis forms
      spectral_shapes = [_llm.flat_shape(a.shape, path, family) for path, a in sp.nnx.adapters_of(model).items()]
    lr = config.full_learning_rate if name == "full" else config.learning_rate
    t = _llm.compiled_trainer(model, lr, config.steps)
    t.train(batches, skip_jit=True)
    losses = np.asarray(t.metrics_logger.get_metric_history("", "loss", "train"), np.float64)
    trainers[name] = t
    rows.append({"family": family, "embed": width.embed, "hidden": width.hidden, "method": name,
                 "trainable": _llm.trainable_count(model), "losses": losses.tolist(),
                 "temp_MiB": t.compiled.memory_analysis().temp_size_in_bytes / 2**20})
  calls = {name: t.timed_step() for name, t in trainers.items()}
  if family == "llama3" and spectral_shapes:
    calls[FLOOR] = synthesis_floor(spectral_shapes)
  for call in calls.values():
    jax.block_until_ready(call())  # a warm-up step on the copied state (the floor: its compilation)
  times = _common.time_interleaved(calls, config.repeats, desc=f"timing {family} {width.embed}")
  if FLOOR in calls:
    rows.append({"family": family, "embed": width.embed, "hidden": width.hidden, "method": FLOOR,
                 "trainable": 0, "losses": [], "temp_MiB": float("nan")})
  base = next(r for r in rows if r["method"] == BASELINE)
  base.update(_common.milliseconds(times[BASELINE]))
  for row in rows:
    row.update(_common.milliseconds(times[row["method"]]))
    row["time_vs_qwix"] = row["median_ms"] / base["median_ms"]
    row["temp_vs_qwix"] = row["temp_MiB"] / base["temp_MiB"] if base["temp_MiB"] else float("nan")
  for t in trainers.values():
    t.close()
  return rows


def verdict_of(rows: list[dict], width: int, tokens: int) -> str:
  wide = {r["method"]: r for r in rows if r["family"] == "llama3" and r["embed"] == width}
  if not wide:
    return "No Llama3 row at the verdict's width."
  checks = []
  if "LoRA" in wide:
    r = wide["LoRA"]
    checks.append((f"LoRA r8 {r['time_vs_qwix']:.2f}x time, {r['temp_vs_qwix']:.2f}x temp",
                   r["time_vs_qwix"] <= 1.05 and r["temp_vs_qwix"] <= 1.0))
  for name in SPARSE:
    if name in wide:
      r = wide[name]
      checks.append((f"{name} {r['time_vs_qwix']:.2f}x, {r['temp_vs_qwix']:.2f}x",
                     r["time_vs_qwix"] <= 1.3 and r["temp_vs_qwix"] <= 1.1))
  met = [c for c, ok in checks if ok]
  missed = [c for c, ok in checks if not ok]
  floor = ""
  if FLOOR in wide:
    f = wide[FLOOR]["time_vs_qwix"]
    floor = (f" One irfft2 of every adapted weight, alone in its own compiled call ({FLOOR}), takes {f:.2f}x qwix "
             f"LoRA's step time; FourierFT/LFMA form every update twice per step (forward pass, input gradient).")
  return (f"Llama3 at embed {width}, {tokens} tokens per step, against qwix LoRA r8 (targets, set at 256 tokens: LoRA <= 1.05x time and <= 1.0x temp; "
          f"WaveFT/SHiRA/FourierFT/LFMA <= 1.3x time and <= 1.1x temp): "
          + (f"met: {'; '.join(met)}. " if met else "")
          + (f"missed: {'; '.join(missed)}." if missed else "all met.") + floor)


def table_of(rows: list[dict], config: Config) -> str:
  body = []
  for r in rows:
    trained = bool(r["losses"])
    body.append([r["family"], f"{r['embed']}/{r['hidden']}", r["method"], f"{r['trainable']:,}" if trained else "-",
                 f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" if trained else "-",
                 f"{r['temp_MiB']:.1f}" if trained else "-", f"{r['temp_vs_qwix']:.2f}" if trained else "-",
                 f"{r['median_ms']:.1f}", f"{r['time_vs_qwix']:.2f}"])
  header = ["model", "embed/hidden", "method", "trainable", f"loss step 1 -> {config.steps}", "temp MiB",
            "temp / qwix", "step ms (median)", "time / qwix"]
  setup = (f"{config.layers} layers, vocabulary {config.vocab}, batch {config.batch} x {config.seq} tokens, float32, "
           f"budget LoRA r{config.rank} per weight on the 7 projections of each layer; Adam lr {config.learning_rate} "
           f"(full fine-tuning {config.full_learning_rate}); Tunix PeftTrainer, {config.steps} steps; step times: median "
           f"of {config.repeats} interleaved repeats, {jax.default_backend()} backend ({_common.cpu_model()}).")
  return _common.markdown_table(header, body) + "\n" + setup + "\n"


def plot(rows: list[dict], path: str) -> str:
  keys = sorted({(r["family"], r["embed"]) for r in rows})
  fig, axes = _common.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
  for ax, (family, embed) in zip(axes[0], keys):
    for r in rows:
      if (r["family"], r["embed"]) == (family, embed) and r["losses"]:
        style = "--" if r["method"] in (BASELINE, "full") else "-"
        ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], style, label=r["method"])
    ax.set_title(f"{family}, embed {embed}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
  axes[0][-1].legend(fontsize=7)
  return _common.save_figure(fig, path)


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  rows = []
  for width in config.widths:
    for family in config.families:
      rows += run_width(config, family, width)
  table = table_of(rows, config)
  verdict = verdict_of(rows, max(w.embed for w in config.widths), config.batch * config.seq)
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict,
            "plot": plot(rows, os.path.join(out, f"loss_curves_{preset}.png")), "environment": _common.environment()}
  _common.write_preset_results(out, NAME, preset, table + "\n" + verdict + "\n", result)
  return result


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__, name=NAME)
