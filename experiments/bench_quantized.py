"""Training memory over a quantized base: int4 and int8 vs bfloat16 and float32 bases, every method.

The model is a residual MLP stack (``layers`` blocks ``x + W2 gelu(W1 x)``, ``embed`` -> ``hidden`` ->
``embed``) with an adapter on every kernel at LoRA rank ``rank``'s parameter count. One training step
(loss, gradient with respect to the adapters through ``sp.peft.apply_adapters``, an Adam update) is
compiled for each base:

* float32: the base as initialised;
* bfloat16: the base cast to bfloat16 (adapters in bfloat16 too: they follow the weight's dtype);
* int8 / int4: the bfloat16 base quantized (``sp.peft.quantize``, per-output-channel scales), so the
  adapters and the dequantized products are bfloat16 as on the bfloat16 base.

Reported: XLA's compiled memory analysis of the step, argument bytes (base + adapters + optimizer
state + batch) and temp bytes, in MiB. No timing.

Second table: the Tunix Llama3 of the LLM benchmark (random weights, ``llm_size``), its 14 projection
weights per layer adapted (``experiments._llm.TARGETS``), float32 base vs the same projections in int8
and int4 (``sp.nnx.quantize``; embeddings and norms stay float32), one Adam step on the adapters through
the model's own call. Skipped without the ``llm`` extra.

Run:
  python -m experiments.bench_quantized --preset quick
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import spectral_peft as sp
from experiments import _common
from experiments.bench_attach import method

NAME = "bench_quantized"


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int = 4
  embed: int = 1024
  hidden: int = 4096
  batch: int = 8
  tokens: int = 128
  rank: int = 8
  methods: tuple[str, ...] = ("LoRA", "DoRA", "SineLoRA", "SineDoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")
  bases: tuple[str, ...] = ("float32", "bfloat16", "int8", "int4")


  llm_embed: int = 512
  llm_hidden: int = 2048
  llm_layers: int = 2
  llm_bases: tuple[str, ...] = ("float32", "int8", "int4")


PRESETS = {"quick": Config(layers=2), "full": Config(), "tiny": Config(layers=1, embed=32, hidden=64, batch=2, tokens=4,
                                             methods=("LoRA", "WaveFT"), llm_embed=32, llm_hidden=64)}


def base_params(params, kind: str):
  if kind == "float32":
    return params
  half = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  return half if kind == "bfloat16" else sp.peft.quantize(half, bits=int(kind[3:]))


def step_memory(model, params, adapters, x) -> tuple[int, int]:
  """(argument bytes, temp bytes) of one compiled training step."""
  tx = optax.adam(1e-3)

  def step(adapters, opt_state, params, x):
    loss = lambda ad: jnp.mean(jnp.square(sp.peft.apply_adapters(model, params, ad, x).astype(jnp.float32)))
    value, grads = jax.value_and_grad(loss)(adapters)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, value

  analysis = jax.jit(step).lower(adapters, tx.init(adapters), params, x).compile().memory_analysis()
  return analysis.argument_size_in_bytes, analysis.temp_size_in_bytes


def llm_rows(config: Config) -> list[dict]:
  """Argument / temp memory of one Adam step of the Tunix Llama3's adapters, per method and base."""
  try:
    from flax import nnx

    from experiments import _llm
  except ImportError:
    return []
  size = _llm.ModelSize(embed=config.llm_embed, hidden=config.llm_hidden, layers=config.llm_layers,
                        heads=8, kv_heads=4, head_dim=config.llm_embed // 8, vocab=256)
  tokens = jnp.zeros((config.batch, config.tokens), jnp.int32)
  inputs = _llm.model_inputs(tokens, jnp.ones_like(tokens, dtype=bool))
  tx = optax.adam(1e-3)
  rows = []
  for name in _common.progress(config.methods, desc="llm"):
    for kind in config.llm_bases:
      model = _llm.build("llama3", size)
      if kind != "float32":
        sp.nnx.quantize(model, _llm.TARGETS["llama3"], bits=int(kind[3:]))
      sp.nnx.adapt(model, _llm.method(name, config.rank, "llama3"), _llm.TARGETS["llama3"], key=jax.random.key(1))
      graphdef, adapters, rest = nnx.split(model, sp.nnx.AdapterParam, ...)

      def step(adapters, opt_state, rest, inputs, graphdef=graphdef):
        def loss(ad):
          out = nnx.merge(graphdef, ad, rest)(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
          return jnp.mean(jnp.square(out[0]))

        value, grads = jax.value_and_grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(adapters, updates), opt_state, value

      analysis = jax.jit(step).lower(adapters, tx.init(adapters), rest, inputs).compile().memory_analysis()
      rows.append({"method": name, "base": kind, "argument_mib": analysis.argument_size_in_bytes / 2**20,
                   "temp_mib": analysis.temp_size_in_bytes / 2**20})
  return rows


def _memory_table(rows: list[dict], methods, bases) -> str:
  return _common.markdown_table(
      ["method"] + [f"{kind} arg / temp MiB" for kind in bases],
      [[name] + [f"{r['argument_mib']:.1f} / {r['temp_mib']:.1f}" for kind in bases
                 for r in rows if r["method"] == name and r["base"] == kind] for name in methods])


def main(preset: str = "quick") -> dict:
  config, out = _common.setup(PRESETS, preset, NAME)
  model = _common.ResidualMLP(config.layers, config.hidden)
  x = jax.random.normal(jax.random.key(0), (config.batch, config.tokens, config.embed))
  params = model.init(jax.random.key(1), x)["params"]
  rows = []
  for name in _common.progress(config.methods, desc="methods"):
    for kind in config.bases:
      base = base_params(params, kind)
      adapters = sp.peft.init_adapters(jax.random.key(2), base, method(name, config.rank), "kernel")
      xs = x.astype(jnp.float32 if kind == "float32" else jnp.bfloat16)
      argument, temp = step_memory(model, base, adapters, xs)
      rows.append({"method": name, "base": kind, "argument_mib": argument / 2**20, "temp_mib": temp / 2**20})
  table = _memory_table(rows, config.methods, config.bases)
  weights = sum(w.size for w in jax.tree.leaves(params) if w.ndim == 2)
  table += (f"\n{config.layers} blocks {config.embed} -> {config.hidden} -> {config.embed} ({weights / 1e6:.1f}M kernel "
            f"weights), batch {config.batch} x {config.tokens} tokens, one Adam step on the adapters (LoRA r{config.rank}'s "
            f"budget per kernel); XLA memory analysis, {jax.default_backend()} backend.\n")
  int4 = {r["method"]: r for r in rows if r["base"] == "int4"}
  bf16 = {r["method"]: r for r in rows if r["base"] == "bfloat16"}
  ratios = {m: (int4[m]["argument_mib"] + int4[m]["temp_mib"]) / (bf16[m]["argument_mib"] + bf16[m]["temp_mib"])
            for m in int4 if m in bf16}
  verdict = ("Argument + temp memory on the int4 base / on the bfloat16 base: "
             + ", ".join(f"{m} {r:.2f}" for m, r in ratios.items()) + ".")
  llm = llm_rows(config)
  if llm:
    table += ("\nTunix Llama3 (" f"{config.llm_layers} layers, embed {config.llm_embed}, MLP {config.llm_hidden}, "
              f"batch {config.batch} x {config.tokens} tokens), the 7 projections of each layer adapted:\n\n"
              + _memory_table(llm, config.methods, config.llm_bases) + "\n")
  result = {"config": config, "rows": rows, "llm_rows": llm, "table": table, "verdict": verdict,
            "environment": _common.environment()}
  _common.write_preset_results(out, NAME, preset, table + "\n" + verdict + "\n", result)
  return result


if __name__ == "__main__":
  _common.cli(main, PRESETS, __doc__)
