"""Attach time at LLM scale: ``sp.peft.init_adapters`` for every method on a 7B-shaped layer set.

The layer set is Llama-7B's: 32 layers, each with four 4096 x 4096 attention projections (q, k, v, o)
and three 4096 x 11008 MLP weights (gate, up: 4096 x 11008; down: 11008 x 4096), 6.5B weights in all. The
base weights are stand-ins (``jnp.zeros(shape, bfloat16)``, what ``init_adapters`` reads of them is their
shape and dtype; DoRA's magnitude reads the values), created one layer at a time (0.4 GB each) and freed
before the next; only the ``init_adapters`` call on each layer's 7 weights is timed, its outputs waited for
(``jax.block_until_ready``). Every method at LoRA rank 8's parameter count per weight (SHiRA/WaveFT/
FourierFT ``8 (m + n)`` entries, LFMA ``8 (m + n) / 2`` complex coefficients). The total is the sum over the
32 layers, so it includes the first layer's compilations (a warm-up on one 64 x 96 weight per method
takes the process's first-call costs out).

Target: every method under 10 s on a 2-core CPU.

Run:
  python -m experiments.bench_attach --preset full    # the 7B layer set
  python -m experiments.bench_attach --preset quick   # 4 layers of it
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp

import spectral_peft as sp
from experiments import _common

NAME = "bench_attach"


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int = 32
  embed: int = 4096
  hidden: int = 11008
  rank: int = 8
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SineLoRA", "SineDoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")


PRESETS = {"quick": Config(layers=4), "full": Config(), "tiny": Config(layers=2, embed=256, hidden=688)}


def layer_shapes(config: Config) -> dict[str, tuple[int, int]]:
  d, h = config.embed, config.hidden
  return {"attn/q_proj/kernel": (d, d), "attn/k_proj/kernel": (d, d), "attn/v_proj/kernel": (d, d),
          "attn/o_proj/kernel": (d, d), "mlp/gate_proj/kernel": (d, h), "mlp/up_proj/kernel": (d, h),
          "mlp/down_proj/kernel": (h, d)}


def method(name: str, rank: int):
  fixed = {"LoRA": sp.peft.LoRA, "DoRA": sp.peft.DoRA, "SineLoRA": sp.peft.SineLoRA, "SineDoRA": sp.peft.SineDoRA}
  if name in fixed:
    return fixed[name](rank)

  def per_target(path, shape):
    m, n = shape
    p = rank * (m + n)
    return {"SHiRA": lambda: sp.peft.SHiRA(p), "WaveFT": lambda: sp.peft.WaveFT(p),
            "FourierFT": lambda: sp.peft.FourierFT(p), "LFMA": lambda: sp.peft.LFMA((p / 2 + 0.5) / (m * n))}[name]()

  return per_target


def attach_seconds(config: Config, name: str) -> tuple[float, int]:
  """Seconds of ``init_adapters`` summed over the layers, and the adapters' trainable scalars."""
  spec, total, count = method(name, config.rank), 0.0, 0
  for layer in range(config.layers):
    params = {f"layers/{layer}/{k}": jnp.zeros(s, jnp.bfloat16) for k, s in layer_shapes(config).items()}
    jax.block_until_ready(params)
    start = time.perf_counter()
    adapters = sp.peft.init_adapters(jax.random.key(0), params, spec, "kernel")
    jax.block_until_ready({k: a.params for k, a in adapters.items()})
    total += time.perf_counter() - start
    count += _common.num_parameters({k: a.params for k, a in adapters.items()})
    del params, adapters
  return total, count


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  rows = []
  for name in config.methods:  # warm-up: the process's first calls (imports, small compilations), not timed
    sp.peft.init_adapters(jax.random.key(0), {"w/kernel": jnp.zeros((64, 96), jnp.bfloat16)}, method(name, 2), "kernel")
  for name in _common.progress(config.methods, desc="attach"):
    seconds, count = attach_seconds(config, name)
    rows.append({"method": name, "seconds": seconds, "trainable": count})
  lora = next((r["seconds"] for r in rows if r["method"] == "LoRA"), float("nan"))
  for r in rows:
    r["vs_lora"] = r["seconds"] / lora
  weights = config.layers * sum(m * n for m, n in layer_shapes(config).values())
  table = _common.markdown_table(
      ["method", "attach s (total)", "/ LoRA", "trainable"],
      [[r["method"], f"{r['seconds']:.2f}", f"{r['vs_lora']:.1f}", f"{r['trainable']:,}"] for r in rows])
  table += (f"\n{config.layers} layers x (4 x {config.embed}^2 + 3 x {config.embed} x {config.hidden}) = {weights / 1e9:.2f}B "
            f"bfloat16 stand-in weights, one layer at a time; LoRA r{config.rank}'s budget per weight; "
            f"{jax.default_backend()} backend ({_common.cpu_model()}, {_common.machine()['cores']} cores).\n")
  slow = [r["method"] for r in rows if r["seconds"] >= 10.0]
  verdict = ("Every method attaches in under 10 s." if not slow else f"10 s or more: {', '.join(slow)}.")
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict, "environment": _common.environment()}
  _common.write_preset_results(out, NAME, preset, table + "\n" + verdict + "\n", result)
  return result


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__, name=NAME)
