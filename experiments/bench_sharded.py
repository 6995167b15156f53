"""Sharded adapter training: per-device temp memory and collective traffic, through `merge` vs the runtime.

The stack is :class:`experiments._common.ResidualMLP` (``layers`` blocks ``x + W2 gelu(W1 x)``, embed
-> hidden -> embed, float32), batch ``batch x seq`` tokens, every kernel adapted at LoRA rank ``rank``'s
budget (sparse/spectral methods: ``rank (m + n)`` coefficients). For each method, layout and path the
step ``jit(value_and_grad(loss))`` with respect to the adapters is compiled on a simulated 8-device CPU
mesh (``--xla_force_host_platform_device_count=8``) and read, not timed:

* ``temp MiB``: XLA's compiled memory analysis, ``temp_size_in_bytes`` (per device);
* ``gathered MiB``: the bytes every ``all-gather`` of the compiled HLO produces per step (per device),
  and the largest single gathered array;
* ``reduced MiB``: the bytes of every ``all-reduce`` / ``reduce-scatter`` result.

Layouts (the batch is split along ``data`` wherever there is one):

* ``1 device``: no mesh;
* ``FSDP rows``: 8-way ``data`` mesh, every kernel ``P("data", None)``;
* ``FSDP cols``: the same with ``P(None, "data")``;
* ``TP 2x4``: ``(data, model) = (2, 4)``, Megatron: ``W1`` column-split ``P(None, "model")``, ``W2``
  row-split ``P("model", None)``, adapters placed by :func:`sp.peft.adapter_shardings`.

With ``execute`` each sharded step also runs once and its loss and gradients are compared with the
one-device step (largest relative difference over the adapter leaves): "runs" says every layout
compiles *and* executes. On a CPU the devices share the host, so no timing is reported.

Run (the flag is set here when jax has not started yet; ``--record`` also writes the result with its
command, machine and run time to ``experiments/recorded/bench_sharded/<preset>.json``):
  python -m experiments.bench_sharded --preset quick   # embed 512: compiles and executes every case
  python -m experiments.bench_sharded --preset full    # the 2048 / 4096 stack; compile-only
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import re  # noqa: E402
from typing import Any, Optional  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import spectral_peft as sp  # noqa: E402
from experiments import _common  # noqa: E402

NAME = "bench_sharded"
PATHS = ("merge", "runtime")
LAYOUTS = ("1 device", "FSDP rows", "FSDP cols", "TP 2x4")


@dataclasses.dataclass(frozen=True)
class Config:
  embed: int = 2048
  hidden: int = 4096
  layers: int = 4
  batch: int = 48
  seq: int = 128
  rank: int = 8
  execute: bool = False
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SineLoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")


PRESETS = {
    "quick": Config(embed=512, hidden=1024, layers=2, batch=16, seq=32, execute=True),
    "full": Config(),  # the stack: 4 blocks, d = 2048, hidden 4096, 48 x 128 tokens
    "tiny": Config(embed=64, hidden=128, layers=2, batch=8, seq=4, execute=True, methods=("LoRA", "SHiRA", "FourierFT", "LFMA")),
}

_BYTES = {"f64": 8, "c64": 8, "c128": 16, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "s8": 1, "u8": 1, "pred": 1, "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_COLLECTIVE = re.compile(r"=\s*(\([^=]*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter)(-start)?\(")


def collective_bytes(hlo: str) -> dict[str, float]:
  """Bytes produced per device by the all-gathers and all-reduces / reduce-scatters of compiled HLO text.

  Returns ``{"gathered": ..., "largest_gather": ..., "reduced": ...}`` in bytes; an async ``-start``
  op counts its last tuple element (the result buffer).
  """
  out = {"gathered": 0.0, "largest_gather": 0.0, "reduced": 0.0}
  for match in _COLLECTIVE.finditer(hlo):
    shapes = _SHAPE.findall(match.group(1))
    if match.group(3):
      shapes = shapes[-1:]
    sizes = [_BYTES[dtype] * (int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1)
             for dtype, dims in shapes]
    if match.group(2) == "all-gather":
      out["gathered"] += sum(sizes)
      out["largest_gather"] = max([out["largest_gather"], *sizes])
    else:
      out["reduced"] += sum(sizes)
  return out


def method_specs(config: Config) -> dict[str, sp.peft.AdapterMethod]:
  """LoRA rank ``rank``'s budget on an (embed, hidden) kernel for every method."""
  m, n = config.embed, config.hidden
  p = config.rank * (m + n)
  specs = {
      "LoRA": sp.peft.LoRA(config.rank), "DoRA": sp.peft.DoRA(config.rank), "SineLoRA": sp.peft.SineLoRA(config.rank),
      "SHiRA": sp.peft.SHiRA(p), "WaveFT": sp.peft.WaveFT(p), "FourierFT": sp.peft.FourierFT(p),
      "LFMA": sp.peft.LFMA(p / (m * n)),
  }
  return {name: specs[name] for name in config.methods}


def _layout(name: str, params: Any) -> tuple[Optional[Mesh], Any, Optional[P]]:
  """(mesh, params' shardings, the batch's spec) of a layout; no mesh on one device."""
  if name == "1 device":
    return None, None, None
  if name == "TP 2x4":
    mesh = sp.peft.data_model_mesh(2, 4)
  else:
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

  def spec(path, leaf):
    kernel = getattr(path[-1], "key", None) == "kernel"
    if name == "FSDP rows":
      return P("data", None) if kernel else P()
    if name == "FSDP cols":
      return P(None, "data") if kernel else P()
    # TP (Megatron), told apart by shape: W1 (embed, hidden) column-split with its bias, W2 (hidden,
    # embed) row-split with its bias replicated.
    if kernel:
      return P(None, "model") if leaf.shape[1] > leaf.shape[0] else P("model", None)
    return P("model") if leaf.shape[0] > embed else P()

  embed = next(leaf.shape[0] for leaf in jax.tree.leaves(params) if leaf.ndim == 2 and leaf.shape[1] > leaf.shape[0])

  shardings = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), params)
  return mesh, shardings, P("data")


def _relative(got: Any, want: Any) -> float:
  worst = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
  return worst


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  if jax.device_count() < 8:
    raise RuntimeError(f"bench_sharded needs 8 devices; jax has {jax.device_count()} (start it with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8).")
  model = _common.ResidualMLP(config.layers, config.hidden)
  x = jax.random.normal(jax.random.key(2), (config.batch, config.seq, config.embed))
  params = model.init(jax.random.key(0), x[:1])["params"]
  rows, reference = [], {}
  jobs = [(name, spec, layout, path) for name, spec in method_specs(config).items() for layout in LAYOUTS
          for path in PATHS]
  for name, spec, layout, path in _common.progress(jobs, desc="compile"):
    adapters = sp.peft.init_adapters(jax.random.key(1), params, spec, r"Dense_\d+/kernel")
    adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # Away from LoRA's zero B: nonzero gradients everywhere.
    mesh, shardings, batch_spec = _layout(layout, params)
    args: tuple[Any, ...] = (adapters, params, x)
    if mesh is not None:
      args = (jax.device_put(adapters, sp.peft.adapter_shardings(adapters, shardings, mesh)),
              jax.device_put(params, shardings), jax.device_put(x, NamedSharding(mesh, batch_spec)))
    row: dict[str, Any] = {"method": name, "layout": layout, "path": path}
    try:
      compiled = _common.merge_or_runtime_step(model, path).lower(*args).compile()
    except Exception as err:  # Reported as a result: a layout a method cannot compile on.
      rows.append({**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
      continue
    traffic = collective_bytes(compiled.as_text())
    row.update(temp_MiB=compiled.memory_analysis().temp_size_in_bytes / 2**20,
               gathered_MiB=traffic["gathered"] / 2**20, largest_gather_MiB=traffic["largest_gather"] / 2**20,
               reduced_MiB=traffic["reduced"] / 2**20)
    if config.execute:
      try:
        value, grads = jax.block_until_ready(compiled(*args))
      except Exception as err:
        row["error"] = f"runs: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
      else:
        if layout == "1 device":
          reference[name, path] = (value, grads)
        else:
          want = reference[name, path]
          row["rel_diff_vs_1_device"] = max(_relative(value, want[0]), _relative(grads, want[1]))
    rows.append(row)

  def fmt(row: dict[str, Any]) -> list[str]:
    if "temp_MiB" not in row:
      return [row["method"], row["layout"], row["path"], "-", "-", "-", "-", row["error"]]
    status = row.get("error") or (f"{row['rel_diff_vs_1_device']:.1e}" if "rel_diff_vs_1_device" in row
                                  else ("reference" if config.execute else "compiled"))
    return [row["method"], row["layout"], row["path"], f"{row['temp_MiB']:.1f}", f"{row['gathered_MiB']:.1f}",
            f"{row['largest_gather_MiB']:.2f}", f"{row['reduced_MiB']:.1f}", status]

  header = ["method", "layout", "path", "temp MiB / device", "gathered MiB", "largest gather MiB", "reduced MiB",
            "runs (rel. diff vs 1 device)" if config.execute else "status"]
  table = _common.markdown_table(header, [fmt(r) for r in rows])
  kernel_mib = config.embed * config.hidden * 4 / 2**20
  activation_mib = config.batch * config.seq * config.hidden * 4 / 2**20
  setup = (f"{config.layers} blocks x + W2 gelu(W1 x), embed {config.embed}, hidden {config.hidden}, "
           f"{config.batch} x {config.seq} tokens, float32; adapters on every kernel at LoRA r{config.rank}'s budget. "
           f"A whole kernel is {kernel_mib:.0f} MiB, a whole hidden activation {activation_mib:.0f} MiB. XLA compiled "
           f"memory analysis and HLO of jit(value_and_grad) wrt the adapters on {jax.device_count()} simulated CPU "
           "devices; nothing is timed.")
  tp = {r["method"]: r for r in rows if r["layout"] == "TP 2x4" and r["path"] == "runtime" and "temp_MiB" in r}
  failing = [f"{r['method']} ({r['layout']}, {r['path']})" for r in rows if "error" in r]
  verdict = []
  if "LoRA" in tp:
    over = [f"{m} {r['temp_MiB'] / tp['LoRA']['temp_MiB']:.2f}x" for m, r in tp.items()
            if r["temp_MiB"] > 1.1 * tp["LoRA"]["temp_MiB"]]
    big = [f"{m} ({r['largest_gather_MiB']:.1f} MiB)" for m, r in tp.items()
           if r["largest_gather_MiB"] >= min(kernel_mib, activation_mib) / 4]
    verdict.append("TP runtime temp within 1.1x LoRA's for every method." if not over
                   else "TP runtime temp over 1.1x LoRA's: " + ", ".join(over) + ".")
    verdict.append("No TP runtime step gathers a quarter of a kernel or activation or more." if not big
                   else "TP runtime steps that gather a quarter of a kernel/activation or more: " + ", ".join(big) + ".")
  one = {(r["method"], r["path"]): r for r in rows if r["layout"] == "1 device" and "temp_MiB" in r}
  heavier = [f"{m} ({one[m, 'runtime']['temp_MiB']:.0f} vs {one[m, 'merge']['temp_MiB']:.0f} MiB)"
             for m in ("LoRA", "DoRA") if (m, "runtime") in one and (m, "merge") in one
             and one[m, "runtime"]["temp_MiB"] > one[m, "merge"]["temp_MiB"]]
  verdict.append("On one device LoRA/DoRA through the runtime need no more temp than through merge." if not heavier
                 else "On one device the runtime needs more temp than merge: " + ", ".join(heavier) + ".")
  verdict.append("Every case compiled" + (" and ran." if config.execute else ".") if not failing
                 else "Failed: " + ", ".join(failing) + ".")
  result = {"config": config, "rows": rows, "table": f"{table}\n\n{setup}\n", "verdict": " ".join(verdict),
            "environment": _common.environment()}
  with open(os.path.join(out, f"sharded_{preset}.md"), "w") as f:
    f.write(result["table"] + "\n" + result["verdict"] + "\n")
  _common.write_json(os.path.join(out, f"sharded_{preset}.json"), result)
  return result


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__, name=NAME)
