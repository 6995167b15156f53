"""Mixed-adapter batches: a batch whose examples use K different adapters vs a single-adapter batch.

The model is a residual MLP stack (``layers`` blocks ``x + W2 gelu(W1 x)``, ``embed`` -> ``hidden`` ->
``embed``) with an adapter on every kernel at LoRA rank ``rank``'s parameter count. A batch of
``batch`` examples x ``tokens`` tokens runs forward (serving) through ``sp.peft.apply_adapters``:

* single: one adapter for the whole batch (the runtime's usual product);
* mixed K: an :class:`sp.peft.AdapterBank` of K adapters, example ``b`` using adapter ``b mod K``.

Each jitted call is timed interleaved with the others (``_common.time_interleaved``); the table gives
the median ratio mixed / single per method and K, and the compiled temp memory of both (XLA's memory
analysis). LoRA/DoRA gather factors per example; SHiRA/WaveFT/FourierFT form the K updates and run one
grouped product (``jax.lax.ragged_dot``), so their cost grows with K's update syntheses.

Target: LoRA at K = 1, 4, 16 <= 1.3 x the single-adapter batch.

Run:
  python -m experiments.bench_mixed --preset quick
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import spectral_peft as sp
from experiments import _common
from experiments.bench_attach import method

NAME = "bench_mixed"


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int = 2
  embed: int = 512
  hidden: int = 1024
  batch: int = 16
  tokens: int = 64
  rank: int = 8
  ks: tuple[int, ...] = (1, 4, 16)
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SHiRA", "WaveFT", "FourierFT")
  repeats: int = 15


PRESETS = {"quick": Config(), "tiny": Config(layers=1, embed=32, hidden=64, batch=8, tokens=4, ks=(1, 4), repeats=2),
           "full": Config(layers=4, embed=1024, hidden=4096, batch=32, tokens=128, repeats=10)}


def _adapters(params, spec, seed: int):
  adapters = sp.peft.init_adapters(jax.random.key(seed), params, spec, "kernel")
  key = jax.random.key(seed + 1000)
  return {p: a.replace(params=jax.tree.map(lambda v: v + 0.01 * jax.random.normal(key, v.shape, v.dtype), a.params))
          for p, a in adapters.items()}


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  model = _common.ResidualMLP(config.layers, config.hidden)
  x = jax.random.normal(jax.random.key(0), (config.batch, config.tokens, config.embed))
  params = model.init(jax.random.key(1), x)["params"]
  calls, memory = {}, {}
  for name in config.methods:
    spec = method(name, config.rank)
    single = _adapters(params, spec, 0)
    run_single = jax.jit(lambda ad: sp.peft.apply_adapters(model, params, ad, x))
    calls[(name, "single")] = (run_single, (single,))
    for k in config.ks:
      bank = sp.peft.stack_adapters([_adapters(params, spec, s) for s in range(k)])
      index = jnp.asarray(np.arange(config.batch) % k, jnp.int32)
      run = jax.jit(lambda b, i: sp.peft.apply_adapters(model, params, b, x, adapter_index=i))
      calls[(name, k)] = (run, (bank, index))
  for key, (fn, args) in _common.progress(list(calls.items()), desc="compile"):
    compiled = fn.lower(*args).compile()
    memory[key] = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(fn(*args))
  times = _common.time_interleaved({key: (lambda f=fn, a=args: f(*a)) for key, (fn, args) in calls.items()},
                                   config.repeats, desc="timing")
  median = {key: float(np.median(v)) for key, v in times.items()}
  rows = []
  for name in config.methods:
    base_t, base_m = median[(name, "single")], memory[(name, "single")]
    for k in config.ks:
      rows.append({"method": name, "K": k, "single_ms": 1e3 * base_t, "mixed_ms": 1e3 * median[(name, k)],
                   "ratio": median[(name, k)] / base_t, "single_temp_mib": base_m / 2**20,
                   "mixed_temp_mib": memory[(name, k)] / 2**20})
  table = _common.markdown_table(
      ["method", "K", "single ms", "mixed ms", "mixed / single", "temp MiB single", "temp MiB mixed"],
      [[r["method"], r["K"], f"{r['single_ms']:.2f}", f"{r['mixed_ms']:.2f}", f"{r['ratio']:.2f}",
        f"{r['single_temp_mib']:.1f}", f"{r['mixed_temp_mib']:.1f}"] for r in rows])
  table += (f"\n{config.layers} blocks {config.embed} -> {config.hidden} -> {config.embed}, batch {config.batch} x "
            f"{config.tokens} tokens, forward, LoRA r{config.rank}'s budget per kernel; median of {config.repeats} "
            f"interleaved runs; {jax.default_backend()} backend ({_common.cpu_model()}, "
            f"{_common.machine()['cores']} cores).\n")
  lora = [r for r in rows if r["method"] == "LoRA"]
  worst = max((r["ratio"] for r in lora), default=float("nan"))
  verdict = (f"LoRA mixed / single at K = {', '.join(str(r['K']) for r in lora)}: at most {worst:.2f}x "
             f"({'within' if worst <= 1.3 else 'above'} the 1.3x target).")
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict, "environment": _common.environment()}
  _common.write_preset_results(out, NAME, preset, table + "\n" + verdict + "\n", result)
  return result


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
