"""Memory of a sine low-rank training step: dense ``x @ sin(omega A B)/g`` vs the lean product.

The sine low-rank paper (Ji et al.) (Table 6) pays +31% training memory for sine LoRA on LLaMA-3-8B because the ``(m, n)``
matrix (and its cosine, in the backward pass) is materialised. ``sp.sine_lowrank_matmul`` builds it
in column blocks under rematerialisation. Memory comes from XLA's compiled memory analysis of the
jitted step (value and grad w.r.t. both factors), which is deterministic; step times are measured
side by side in the same process (median of repeats after compilation) and reported as ratios.

Run:
  python -m experiments.bench_sine_memory --preset quick
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import spectral_peft as sp
from experiments import _common


@dataclasses.dataclass(frozen=True)
class Config:
  sizes: tuple[tuple[int, int, int, int], ...] = ((4096, 4096, 8, 256), (1024, 4096, 8, 256), (4096, 4096, 32, 256))
  time_sizes: tuple[tuple[int, int, int, int], ...] = ((1024, 1024, 8, 256),)
  repeats: int = 5
  omega: float = 100.0


PRESETS = {
    "quick": Config(),
    "full": Config(time_sizes=((1024, 1024, 8, 256), (4096, 4096, 8, 256)), repeats=10),
}
NAME = "bench_sine_memory"


def steps(omega: float):
  def dense(a, b, x):
    return jnp.sum(jnp.square(x @ sp.sine_lowrank(a, b, omega=omega)))

  def lean(a, b, x):
    return jnp.sum(jnp.square(sp.sine_lowrank_matmul(x, a, b, omega=omega)))

  return {name: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for name, f in (("dense", dense), ("lean", lean))}


def args_for(m, n, k, batch):
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
  return spec(m, k), spec(k, n), spec(batch, m)


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  fns = steps(config.omega)
  memory = []
  for m, n, k, batch in _common.progress(config.sizes, desc="memory analysis"):
    row = {"m": m, "n": n, "k": k, "batch": batch, "block_size": sp.default_block_size(m, n)}
    for name, fn in fns.items():
      analysis = fn.lower(*args_for(m, n, k, batch)).compile().memory_analysis()
      row[f"{name}_temp_MiB"] = analysis.temp_size_in_bytes / 2**20
    row["lean_over_dense"] = row["lean_temp_MiB"] / row["dense_temp_MiB"]
    memory.append(row)

  timing = []
  for m, n, k, batch in config.time_sizes:
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(keys[0], (m, k)) / np.sqrt(m)
    b = jax.random.normal(keys[1], (k, n)) / np.sqrt(k)
    x = jax.random.normal(keys[2], (batch, m))
    for name, fn in fns.items():
      jax.block_until_ready(fn(a, b, x))  # compile
    times = _common.time_interleaved({name: lambda fn=fn: fn(a, b, x) for name, fn in fns.items()}, config.repeats)
    med = {name: float(np.median(t)) for name, t in times.items()}
    timing.append({"m": m, "n": n, "k": k, "batch": batch, "dense_median_s": med["dense"], "lean_median_s": med["lean"],
                   "lean_over_dense": med["lean"] / med["dense"], "backend": jax.default_backend()})

  table = _common.markdown_table(
      ["m", "n", "k", "batch", "block", "dense temp (MiB)", "lean temp (MiB)", "lean / dense"],
      [[r["m"], r["n"], r["k"], r["batch"], r["block_size"], r["dense_temp_MiB"], r["lean_temp_MiB"], r["lean_over_dense"]]
       for r in memory],
  )
  table += "\nStep time, median of interleaved repeats after compilation (" + jax.default_backend() + "):\n\n"
  table += _common.markdown_table(
      ["m", "n", "k", "batch", "dense (ms)", "lean (ms)", "lean / dense"],
      [[r["m"], r["n"], r["k"], r["batch"], 1e3 * r["dense_median_s"], 1e3 * r["lean_median_s"], r["lean_over_dense"]]
       for r in timing],
  )
  worst = max(r["lean_over_dense"] for r in memory)
  verdict = (f"{'Improves on the paper' if worst < 1 else 'Does not improve on the paper'}: the lean product needs at "
             f"most {worst:.1%} of the dense version's temporary memory in a value-and-grad step (the paper pays +31% "
             "for materialising the matrix).")
  result = {"config": config, "memory": memory, "timing": timing, "environment": _common.environment(), "table": table,
            "verdict": verdict}
  return _common.save(out, result)


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
