"""Runs every reproduction experiment and writes ``results/REPORT.md``.

Each experiment is a module of this package with ``main(preset) -> dict`` returning at least a
Markdown ``table``, a one-line ``verdict`` computed from its own measurements and optionally a
``plot`` path; its own files (JSON, PNG, table) go to ``results/<name>/``.

Run (the README's main command; CPU by default):
  python -m experiments                       # every experiment, quick presets
  python -m experiments --full                # the full presets (hours on a CPU; use an accelerator)
  python -m experiments --only sine_rank_spectrum lrnn_poisson
  python -m experiments --preset paper --only lrnn_poisson --record   # a named budget, recorded

Recorded runs. ``--record`` writes each chosen experiment's result, with the command, date, versions,
machine and wall/CPU time, to ``experiments/recorded/<name>/<preset>.json`` (and ``.md``); these files are
committed. Every report shows, per claim, the run it just made (normally ``quick``) and the recorded
runs beside it, and says which one the verdict rests on: the recorded run of the largest budget (the last
of the experiment's ``PRESETS``, which list budgets from small to large, that has a record), else the run
just made. A preset an experiment lists in ``PARTIAL_PRESETS`` (a run of part of the claim, e.g. two of
its eight methods) is shown but never rested on. A hand-written ``experiments/recorded/<name>/NOTES.md``,
where present, says what the recorded runs settled and what still differs from the paper; it is shown
under them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import os
import shlex
import traceback

from experiments import _common


@dataclasses.dataclass(frozen=True)
class Claim:
  """One paper claim and the experiment module that measures it."""

  module: str
  title: str
  claim: str
  paper: str  # what the paper reports, quoted by figure/table, to read beside our table


# The report keeps this order (the papers: sine low rank, WaveFT/LFMA, sinusoidal networks, LRNN).
CLAIMS = (
    Claim("sine_rank_spectrum", "Rank and spectrum of sin(omega U V^T)",
          "The rank of sin(omega U V^T) rises with omega (Theorem 1); Prop. 1 bounds it below (as corrected by "
          "the factor 1/4 its eq. 8 drops, the bound never exceeds pi/12, so the rise is measured, not implied).",
          "The sine low-rank paper (Ji et al.), Fig. 2-3: a rank-k product becomes (near) full rank as omega grows; the normalised "
          "spectrum flattens."),
    Claim("lowrank_pretraining", "Low-rank vs sine low-rank vs full-rank pretraining",
          "At equal k, the sine low-rank layer beats the plain low-rank layer and approaches full rank.",
          "The sine low-rank paper (Ji et al.), Fig. 4 (ViT-Small on CIFAR-100 / ImageNet) and Tab. 13 (occupancy IoU, e.g. low-rank "
          "k=1: 0.8, sine k=1: 0.96, full rank 0.98)."),
    Claim("sine_lora_finetune", "LoRA vs sine LoRA at equal rank",
          "Sine LoRA beats LoRA at the same rank (same trainable parameters).",
          "The sine low-rank paper (Ji et al.), Tab. 1 (LLaMA-3-8B commonsense: sine LoRA above LoRA at every rank, e.g. k=4: 84.9 vs 80.6)."),
    Claim("finetune_comparison", "Eight adapters at matched budgets",
          "At matched trainable-parameter budgets (including below LoRA rank 1) the spectral/sparse adapters are "
          "competitive; WaveFT beats SHiRA at small budgets; LFMA matches or beats FourierFT.",
          "The WaveFT paper, Tab. 3 / Fig. 4 (SDXL personalisation: WaveFT > SHiRA at small p, gap closes with p); "
          "The LFMA paper, Tab. 1-3 (LFMA >= FourierFT at equal or fewer parameters); the sine low-rank paper (Ji et al.), Tab. 1."),
    Claim("sparse_updates", "Sparse updates: rank and interpolation",
          "Random sparse updates are high rank (Lemma 1); 5 random input/output pairs at 784 x 784 are interpolated "
          "once p reaches a threshold (Lemma 3).",
          "The WaveFT paper, Fig. 3 (rank reaches full near p ~ n ln n) and Fig. 5 (loss reaches zero near p = 15,680)."),
    Claim("sinusoidal_init", "Integer-frequency vs SIREN initialisation",
          "A first layer of integer frequencies (periodic network) fits faster than SIREN's random one at equal "
          "size and steps.",
          "The sinusoidal-networks paper (Aldana et al.), Fig. 3 and 6: the integer initialisation reaches a higher PSNR at equal steps."),
    Claim("sinusoidal_bounding", "Bounding controls the spectrum",
          "Bounding the hidden matrix (and block bounding by input band) limits the high frequencies of the fit.",
          "The sinusoidal-networks paper (Aldana et al.), Fig. 11: the bounded network's spectrum stays inside the band the bound allows."),
    Claim("sinusoidal_pruning", "Structured pruning of A's columns",
          "Pruning 25% of A's columns costs almost nothing with the integer initialisation; 50-75% costs more.",
          "The sinusoidal-networks paper (Aldana et al.), Fig. 17: relative PSNR ~1.0 at 25% pruned, decreasing at 50% and 75%."),
    Claim("sinusoidal_growing", "Growing vs a fixed wide band",
          "Growing the network with new frequencies in the most important band beats a fixed wide band.",
          "The sinusoidal-networks paper (Aldana et al.), Fig. 20: the grown network reaches a higher PSNR than the fixed-band one."),
    Claim("lrnn_image", "LRNN image fit against SIREN, SPDER and ReLU MLP",
          "At matched parameter counts and steps an LRNN fits the cameraman image better than SIREN, SPDER and a "
          "ReLU MLP.",
          "The LRNN paper, Fig. 3 and App. E Table 6 (cameraman 256 x 256, ~197k parameters, 1000 steps, one run: "
          "LRNN-SPDER 107.9 dB, SPDER 49.0 dB next best); Table 8: LRNN's step 2.6x SIREN's."),
    Claim("lrnn_poisson", "LRNN Poisson solver",
          "LRNN [2,16,16,1] solves the 2-D Poisson problem of App. G to Table 11's error at n = 1, 2, 4 in 1000 Adam "
          "steps, the error growing with n.",
          "The LRNN paper, Tab. 11: LRNN [2,16,16,1] 'l2 error' 8.9e-7 / 1.5e-5 / 3.7e-3 for n = 1 / 2 / 4, which we read "
          "as pykan's mean squared error on the collocation points."),
    Claim("lrnn_product_function", "LRNN on a product-structured function",
          "LRNN's error on a product-structured test function stays low as the dimension grows, unlike an MLP's.",
          "The LRNN paper, App. D."),
    Claim("lrnn_mnist1d", "LRNN on MNIST-1D",
          "LRNN (46k parameters) classifies MNIST-1D better than an MLP (15k), plain and with shuffled positions.",
          "The LRNN paper, Tab. 14 (5 seeds): test accuracy LRNN 67.2 / 67.3 %, MLP 65.0 / 65.2 % (plain / shuffled)."),
    Claim("lfma_vs_fourierft", "LFMA vs FourierFT and LFMA's mask strategies",
          "At equal or smaller budgets LFMA matches or beats FourierFT; informed masks beat random ones.",
          "The LFMA paper, Tab. 1-3 (e.g. ViT-B: LFMA above FourierFT with fewer parameters)."),
    Claim("bench_spectral_step", "Sparse/spectral adapters: step time against LoRA",
          "WaveFT, SHiRA, FourierFT and LFMA train at LoRA's step cost; the factored product never forms Delta W.",
          "PyTorch PEFT (the issue's anchors, Llama-3.2-3B on L40S): WaveFT 2.1x, FourierFT 1.7x LoRA's step time."),
    Claim("bench_memory", "Adapter runtime: training memory and step time of every method",
          "Training through the adapter runtime (Linen and NNX) keeps XLA's temporary memory within LoRA's runtime "
          "figure + 3 x (the largest adapted m x n) for every method, with a step no slower than training through "
          "merge.",
          "Design target, no paper figure. PyTorch PEFT's WaveFT ran out of memory on a 24 GB GPU in its MetaMathQA "
          "benchmark; the sine low-rank paper (Ji et al.), Tab. 6: +31% training memory for sine LoRA on LLaMA-3-8B."),
    Claim("bench_quantized", "Adapters over a quantized base: training memory on int4, int8, bfloat16 and float32",
          "Every method trains over an int4/int8 base through the adapter runtime (each layer dequantizes its own weight "
          "inside its product), so the base's argument memory shrinks with its bits while the temporaries stay those "
          "of one layer.",
          "QLoRA (Dettmers et al., 2023) trains LoRA over a 4-bit base; no paper reports the sparse/spectral methods "
          "over a quantized base. Design target, no paper figure."),
    Claim("bench_sine_memory", "Memory of the sine low-rank product",
          "The sine low-rank product can be trained without materialising the (m, n) matrix.",
          "The sine low-rank paper (Ji et al.), Tab. 6: +31% training memory (and +17% time) for sine LoRA on LLaMA-3-8B."),
)

# Benchmarks too heavy for the report's own run (a Tunix LLM at embed 1024, 8 simulated devices, a 7B layer set):
# their recorded runs are shown in the report's benchmark section, with the command that reran them.
RECORDED_BENCHMARKS = (
    ("bench_llm", "Tunix LLMs: every method against qwix LoRA (step time and compiled temp memory)"),
    ("bench_sharded", "Sharded bases: per-device temp memory and collectives, through merge and the runtime"),
    ("bench_attach", "Attach at LLM scale: every method on a 7B-shaped layer set"),
)

NOT_REPRODUCIBLE = (
    "NeRF / LLFF (the sine low-rank paper (Ji et al.) Tab. 2-3): needs the LLFF scenes (a download) and GPU-days; the occupancy field and the "
    "image fits above are the nearest analogues we can run from generated data.",
    "SDXL DreamBooth personalisation (the WaveFT paper Tab. 3): needs SDXL weights and the DreamBooth images; the "
    "fine-tuning comparison above runs the same eight adapters on a model we pretrain ourselves.",
    "LLaMA / RoBERTa / ViT-B fine-tuning (papers 000 Tab. 1, 004 Tab. 1-3): needs pretrained weights (a download) "
    "and accelerators; reproduced as the direction of the effect on our small pretrained model.",
)


def _known(names: tuple[str, ...]) -> list[Claim]:
  modules = {c.module for c in CLAIMS}
  unknown = sorted(set(names) - modules)
  if unknown:
    raise ValueError(f"`--only` names unknown experiments {unknown}; known: {sorted(modules)}.")
  return [c for c in CLAIMS if not names or c.module in names]


def _available(claim: Claim) -> bool:
  return importlib.util.find_spec(f"experiments.{claim.module}") is not None


def presets_of(module: str) -> tuple[str, ...]:
  """The preset names of ``experiments.<module>`` (its ``PRESETS`` keys, small to large budgets)."""
  return tuple(getattr(importlib.import_module(f"experiments.{module}"), "PRESETS", {"quick": None, "full": None}))


def _check_presets(claims: list[Claim], preset: str) -> None:
  missing = [c.module for c in claims if _available(c) and preset not in presets_of(c.module)]
  if missing:
    raise ValueError(f"preset {preset!r} is not defined by {missing}; their presets: "
                     + "; ".join(f"{m}: {list(presets_of(m))}" for m in missing) + ".")


def _headline(verdict: str) -> str:
  """The verdict's first words, up to its first ' (' or ':' ("Matches", "Does not match", ...)."""
  cut = [i for i in (verdict.find(" ("), verdict.find(":")) if i > 0]
  return verdict[:min(cut)] if cut else verdict


def recorded_section(module: str, root: str | None = None) -> tuple[str, dict | None]:
  """The Markdown of ``module``'s recorded runs (empty without any) and the record the verdict rests on (the
  last in budget order that is not one of the module's ``PARTIAL_PRESETS``, see the module docstring; None
  without any)."""
  order = presets_of(module) if importlib.util.find_spec(f"experiments.{module}") else ()
  records = _common.load_recorded(module, root, order)
  if not records:
    return "", None
  parts = ["*Recorded runs* (larger budgets or more seeds than the quick preset; committed in `experiments/recorded/" + module + "/`; not rerun by this "
           "report):\n"]
  for rec in records:
    parts.append(f"**`{rec['preset']}`**: {_common.record_heading(rec)}.\n\n{rec['table']}\n"
                 f"**Verdict of the recorded `{rec['preset']}` run:** {rec['verdict']}\n")
  mod = importlib.import_module(f"experiments.{module}")
  if hasattr(mod, "summarize_recorded"):
    parts.append(mod.summarize_recorded(records))
  notes = os.path.join(root or _common.RECORDED_ROOT, module, "NOTES.md")
  if os.path.exists(notes):
    with open(notes) as f:
      parts.append("*What the recorded runs settled and what still differs from the paper.* " + f.read().strip() + "\n")
  partial = set(getattr(mod, "PARTIAL_PRESETS", ()))
  whole = [rec for rec in records if rec["preset"] not in partial]
  return "\n".join(parts), (whole[-1] if whole else None)


def recorded_benchmarks(root: str | None = None) -> str:
  """The report's benchmark section: the recorded runs of :data:`RECORDED_BENCHMARKS` (not rerun by the report)."""
  parts = ["## Recorded benchmarks\n\nThese benchmarks are not rerun by the report (each needs minutes to an hour "
           "of CPU, or 8 simulated devices); their recorded runs are shown as committed, each with the command that "
           "reproduces it.\n"]
  for module, title in RECORDED_BENCHMARKS:
    text, _ = recorded_section(module, root)
    parts.append(f"### {title}\n\n" + (text if text else f"*No recorded run of `{module}`.*\n"))
  return "\n".join(parts)


def run(preset: str, only: tuple[str, ...] = (), *, record: bool = False) -> str:
  """Runs the chosen experiments at ``preset`` and writes ``results/REPORT.md``; returns its path.

  With ``record``, each experiment's result is also written to ``experiments/recorded/<name>/<preset>.json``
  (:func:`experiments._common.record`) with the command, date, versions, machine and wall/CPU time.
  """
  chosen = _known(only)
  _check_presets(chosen, preset)
  env = _common.environment()
  sections = [
      "# spectral_peft reproduction report\n",
      f"Preset `{preset}`, generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} on "
      f"{env['backend']} ({', '.join(env['devices'])}), jax {env['jax']}. Every number under *Ours* was measured by "
      "this run; each section's files (JSON, PNG, table) are in `results/<name>/`. Runs recorded earlier at larger "
      "budgets (committed under `experiments/recorded/`, with their command, machine and run time) are shown beside "
      "them, and each section says which run its verdict rests on. The paper's figure is quoted beside ours; the "
      "verdict lines are computed from our numbers.\n",
  ]
  summary = []
  for claim in chosen:
    command = f"python -m experiments.{claim.module} --preset {preset}"
    head = f"## {claim.title}\n\n*Claim.* {claim.claim}\n\n*Paper.* {claim.paper}\n"
    if not _available(claim):
      sections.append(head + "\n*Not measured: this experiment is not in this version of the package.*\n")
      summary.append((claim.title, "not measured (missing)", "-", "-"))
      continue
    try:
      result, usage = _common.measured(lambda: importlib.import_module(f"experiments.{claim.module}").main(preset))
    except Exception as err:  # one failing experiment must not hide the others; the failure is reported
      traceback.print_exc()
      sections.append(head + f"\n*Failed:* `{type(err).__name__}: {err}`. Rerun: `{command}`.\n")
      summary.append((claim.title, f"failed ({type(err).__name__})", "-", "-"))
      continue
    if record:
      config = getattr(importlib.import_module(f"experiments.{claim.module}"), "PRESETS", {}).get(preset)
      recorded_command = f"python -m experiments --preset {shlex.quote(preset)} --only {claim.module} --record"
      print("recorded", _common.record(claim.module, preset, result, usage, command=recorded_command, config=config))
    sections.append(head + f"\n*Ours ({preset}, this run).*\n\n{result['table']}")
    if result.get("plot"):
      sections.append(f"![{claim.title}]({os.path.relpath(result['plot'], _common.RESULTS_ROOT)})\n")
    verdict = result.get("verdict", "no verdict computed")
    sections.append(f"**Verdict of this `{preset}` run:** {verdict}\n\n*Run time {usage.wall_s:.0f} s (CPU "
                    f"{usage.cpu_s:.0f} s). Rerun: `{command}`.*\n")
    recorded, rests_on = recorded_section(claim.module)
    if rests_on is None or rests_on["preset"] == preset:
      basis = f"this `{preset}` run"
      final = verdict
    else:
      basis = f"recorded `{rests_on['preset']}` ({rests_on['seeds']} seeds, {rests_on['date'][:10]})"
      final = rests_on["verdict"]
    if recorded:
      sections.append(recorded)
    sections.append(f"**The verdict rests on:** {basis}"
                    + ("" if rests_on is None else f"; command `{rests_on['command']}`") + ".\n")
    summary.append((claim.title, final, basis, _headline(verdict)))
  sections.insert(2, "## Summary\n\nThe verdict of each claim comes from the run named in *rests on*: the recorded "
                  "run of the largest budget (or the most seeds) where there is one, else this report's own run (whose verdict's first "
                  f"words are in the last column).\n\n"
                  + _common.markdown_table(["claim", "verdict", "rests on", f"this `{preset}` run"], summary))
  sections.append(recorded_benchmarks())
  sections.append("## Settings we cannot run here\n\n" + "\n".join(f"- {line}" for line in NOT_REPRODUCIBLE) + "\n")
  report = "\n".join(sections)
  path = os.path.join(_common.RESULTS_ROOT, "REPORT.md")
  os.makedirs(_common.RESULTS_ROOT, exist_ok=True)
  with open(path, "w") as f:
    f.write(report)
  return path


def cli(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments",
                                   description="Run the reproduction experiments and write results/REPORT.md.")
  parser.add_argument("--preset", default="quick",
                      help="preset of every chosen experiment: quick (default), full, or a named budget that the "
                           "chosen experiments define (their PRESETS)")
  parser.add_argument("--full", action="store_true", help="shorthand for --preset full")
  parser.add_argument("--record", action="store_true",
                      help="also write each result, with command, date, versions, machine and wall/CPU time, to "
                           "experiments/recorded/<name>/<preset>.json (to be committed)")
  parser.add_argument("--only", nargs="*", default=(), metavar="NAME",
                      help=f"experiment module names to run (default: all of {[c.module for c in CLAIMS]})")
  args = parser.parse_args(argv)
  path = run("full" if args.full else args.preset, tuple(args.only), record=args.record)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(cli())
