"""Our adapter training step against PyTorch PEFT's on the same CPU, same model and budgets.

Optional: needs ``torch`` and ``peft`` (``pip install -e ".[bench-torch]"``, CPU wheels); without
them the script says so and writes nothing. The model is the transformer of
``experiments.bench_adapters`` (same sizes) written in PyTorch with separate q/k/v/out projections;
adapters on q, v and both MLP kernels; LoRA r1/r8, DoRA r8, SHiRA (PEFT ``r`` chosen so its budget
equals ours), WaveFT and FourierFT at LoRA rank-8's budget of the query kernel. Both sides run a full
training step (forward, backward to the adapter, Adam) after warm-up, interleaved in one process;
we report each side's median, the ratio of each method to its own LoRA r8, and ours / PEFT's.

Run:
  python -m experiments.bench_peft_torch --preset quick
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

import spectral_peft as sp
from experiments import _common
from experiments import bench_adapters

NAME = "bench"


@dataclasses.dataclass(frozen=True)
class Config:
  model: bench_adapters.Config = bench_adapters.Config()
  repeats: int = 20
  threads: int = 0  # 0: leave torch's default


PRESETS = {"quick": Config(), "full": Config(model=bench_adapters.PRESETS["full"], repeats=50)}


def torch_model(config: bench_adapters.Config):
  import torch
  from torch import nn

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.heads = config.heads
      self.query, self.key, self.value, self.out = (nn.Linear(config.embed, config.embed) for _ in range(4))

    def forward(self, x):
      b, t, d = x.shape
      split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
      q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
      y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
      return self.out(y.transpose(1, 2).reshape(b, t, d))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(config.embed), nn.LayerNorm(config.embed)
      self.attention = Attention()
      self.mlp_in, self.mlp_out = nn.Linear(config.embed, config.mlp), nn.Linear(config.mlp, config.embed)

    def forward(self, x):
      x = x + self.attention(self.norm1(x))
      return x + self.mlp_out(torch.nn.functional.gelu(self.mlp_in(self.norm2(x))))

  return nn.Sequential(*(Block() for _ in range(config.layers)))


def peft_configs(config: bench_adapters.Config):
  import peft

  targets = ["query", "value", "mlp_in", "mlp_out"]
  p = 8 * 2 * config.embed
  return {
      "LoRA r1": peft.LoraConfig(r=1, lora_alpha=1, target_modules=targets),
      "LoRA r8": peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets),
      "DoRA r8": peft.LoraConfig(r=8, lora_alpha=8, target_modules=targets, use_dora=True),
      # PEFT's SHiRA takes r and keeps r * (m + n) entries per layer: r = 8 matches LoRA r8 exactly.
      f"SHiRA p={p}": peft.ShiraConfig(r=8, target_modules=targets),
      f"WaveFT p={p}": peft.WaveFTConfig(n_frequency=p, target_modules=targets),
      f"FourierFT p={p}": peft.FourierFTConfig(n_frequency=p, target_modules=targets),
  }


def ours(config: bench_adapters.Config):
  p = 8 * 2 * config.embed
  return {"LoRA r1": sp.peft.LoRA(1), "LoRA r8": sp.peft.LoRA(8), "DoRA r8": sp.peft.DoRA(8),
          f"SHiRA p={p}": sp.peft.SHiRA(p), f"WaveFT p={p}": sp.peft.WaveFT(p),
          f"FourierFT p={p}": sp.peft.FourierFT(p)}


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  try:
    import peft
    import torch
  except ImportError as err:
    message = f"skipped: {err.name} is not installed (pip install -e '.[bench-torch]')"
    print(message)
    return {"table": message + "\n", "verdict": message}
  if config.threads:
    torch.set_num_threads(config.threads)
  mc = config.model
  rng = np.random.default_rng(0)
  x_np = rng.normal(size=(mc.batch, mc.seq, mc.embed)).astype(np.float32)
  y_np = rng.normal(size=x_np.shape).astype(np.float32)

  steps = {}
  base = torch_model(mc)
  xt, yt = torch.from_numpy(x_np), torch.from_numpy(y_np)
  for name, cfg in peft_configs(mc).items():
    import copy

    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-3)

    def step(model=model, opt=opt):
      opt.zero_grad(set_to_none=True)
      loss = torch.mean((model(xt) - yt) ** 2)
      loss.backward()
      opt.step()
      return loss.item()

    count = sum(q.numel() for q in model.parameters() if q.requires_grad)
    steps[("peft", name)] = (step, count)

  model = bench_adapters.transformer(mc)
  x, y = jax.numpy.asarray(x_np), jax.numpy.asarray(y_np)
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.adam(1e-3)
  for name, spec in ours(mc).items():
    adapters = sp.peft.init_adapters(jax.random.key(1), params, spec, bench_adapters.TARGETS,
                                     in_axes=lambda path, shape: 1 if len(shape) == 3 and "out" not in path else None)
    for path in ("merge", "factored"):
      fn, trainable = bench_adapters.step_fn(model, params, adapters, tx, path)
      trainable = jax.tree.map(lambda a: a.copy(), trainable)  # Private buffers: the step donates them.
      state = {"t": trainable, "s": tx.init(trainable)}

      def step(fn=fn, state=state):
        state["t"], state["s"], value = fn(state["t"], state["s"], x, y)
        return float(value)  # blocks until done, like .item()

      steps[(f"ours ({path})", name)] = (step, sp.peft.count_parameters(adapters))

  for step, _ in _common.progress(list(steps.values()), desc="warm-up"):
    for _ in range(3):
      step()
  times = _common.time_interleaved({key: step for key, (step, _) in steps.items()}, config.repeats)
  median = {key: float(np.median(t)) * 1e3 for key, t in times.items()}

  rows = []
  for name in peft_configs(mc):
    row = {"method": name, "peft_ms": median[("peft", name)], "peft_params": steps[("peft", name)][1],
           "peft_vs_lora": median[("peft", name)] / median[("peft", "LoRA r8")]}
    for path in ("merge", "factored"):
      side = f"ours ({path})"
      row[f"{path}_ms"] = median[(side, name)]
      row[f"{path}_params"] = steps[(side, name)][1]
      row[f"{path}_vs_lora"] = median[(side, name)] / median[(side, "LoRA r8")]
      row[f"{path}_over_peft"] = median[(side, name)] / median[("peft", name)]
    rows.append(row)
  table = _common.markdown_table(
      ["method", "PEFT ms (vs its LoRA r8)", "ours merge ms (vs LoRA r8)", "ours factored ms (vs LoRA r8)",
       "ours / PEFT (merge, factored)", "trainable PEFT / ours"],
      [[r["method"], f"{r['peft_ms']:.1f} ({r['peft_vs_lora']:.2f}x)", f"{r['merge_ms']:.1f} ({r['merge_vs_lora']:.2f}x)",
        f"{r['factored_ms']:.1f} ({r['factored_vs_lora']:.2f}x)",
        f"{r['merge_over_peft']:.2f}, {r['factored_over_peft']:.2f}", f"{r['peft_params']} / {r['merge_params']}"]
       for r in rows])
  table += (f"\nCPU, torch {torch.__version__} ({torch.get_num_threads()} threads), peft {peft.__version__}, "
            f"jax {jax.__version__}; medians of {config.repeats} interleaved steps after warm-up. PEFT counts include "
            "its own extra buffers where it marks them trainable.\n")
  verdict = ("Ours / PEFT step time: " +
             ", ".join(f"{r['method']} {min(r['merge_over_peft'], r['factored_over_peft']):.2f}" for r in rows) + ".")
  result = {"config": config, "rows": rows, "table": table, "verdict": verdict, "environment": _common.environment()}
  return _common.save(out, result, stem="peft_torch")


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
