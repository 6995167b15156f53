"""Shared pieces of the LLM benchmark, its tests and its notebook: Tunix's Llama3 and Gemma3 at small
sizes with random weights (no downloads), a synthetic next-token task, every adapter method at LoRA
rank r's parameter count, qwix LoRA, and Tunix's ``PeftTrainer`` run on them.

Needs the ``llm`` extra (``pip install -e ".[llm]"``: google-tunix and qwix).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import spectral_peft as sp

# The projection weights both families adapt: the attention einsums (``w``) and the MLP's ``nnx.Linear``s.
TARGETS = {
    "llama3": r"attn/(q_proj|k_proj|v_proj|o_proj)/w$|mlp/(gate_proj|up_proj|down_proj)/kernel$",
    "gemma3": r"attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w$|mlp/(gate_proj|up_proj|down_proj)/kernel$",
}
TARGETS["qwen3"] = TARGETS["llama3"]
# qwix matches module paths (the einsum/linear module, not its weight).
QWIX_MODULES = {
    "llama3": r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    "gemma3": r".*(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum|gate_proj|up_proj|down_proj)",
}
METHODS = ("LoRA", "DoRA", "SineLoRA", "SineDoRA", "SHiRA", "WaveFT", "FourierFT", "LFMA")


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """A decoder's size: both families take the same numbers."""

  embed: int = 32
  hidden: int = 64
  layers: int = 2
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 8
  vocab: int = 64


def model_config(family: str, size: ModelSize) -> Any:
  """Tunix's ``ModelConfig`` of ``family`` (``"llama3"``, ``"gemma3"`` or ``"qwen3"``) at ``size``, float32.

  ``"qwen3"`` is Qwen3's dense architecture with its tied embedding (the 0.6B model's: the output head is
  ``Embedder.decode`` over the input table).
  """
  if family == "llama3":
    from tunix.models.llama3 import model as llama3

    return llama3.ModelConfig(num_layers=size.layers, vocab_size=size.vocab, embed_dim=size.embed,
                              hidden_dim=size.hidden, num_heads=size.heads, head_dim=size.head_dim,
                              num_kv_heads=size.kv_heads, rope_theta=10_000, norm_eps=1e-5)
  if family == "gemma3":
    from tunix.models.gemma3 import model as gemma3

    return gemma3.ModelConfig(num_layers=size.layers, num_embed=size.vocab, embed_dim=size.embed,
                              hidden_dim=size.hidden, num_heads=size.heads, head_dim=size.head_dim,
                              num_kv_heads=size.kv_heads, sliding_window_size=64, param_dtype=jnp.float32)
  if family == "qwen3":
    from tunix.models.qwen3 import model as qwen3

    return qwen3.ModelConfig(num_layers=size.layers, vocab_size=size.vocab, embed_dim=size.embed,
                             hidden_dim=size.hidden, num_heads=size.heads, head_dim=size.head_dim,
                             num_kv_heads=size.kv_heads, rope_theta=10_000, norm_eps=1e-6, use_tied_embedding=True)
  raise ValueError(f"`family` must be 'llama3', 'gemma3' or 'qwen3', got {family!r}.")


def model_class(family: str) -> type:
  if family == "llama3":
    from tunix.models.llama3 import model as llama3

    return llama3.Llama3
  if family == "qwen3":
    from tunix.models.qwen3 import model as qwen3

    return qwen3.Qwen3
  from tunix.models.gemma3 import model as gemma3

  return gemma3.Gemma3


def random_state(family: str, size: ModelSize, seed: int = 0) -> tuple[Any, Any]:
  """``(graphdef, state)`` of a ``family`` model at ``size`` with random weights drawn by NumPy.

  The model is built abstractly (``nnx.eval_shape``, nothing allocated or compiled); matrices and
  embeddings get ``N(0, 1 / fan_in)`` values (fan-in: the leading axis, all but the last for an
  attention output einsum), norm scales their neutral value (Llama's ``w`` ones, Gemma's
  ``scale`` zeros). The same seed gives the same numbers on every machine.
  """
  config = model_config(family, size)
  abstract = nnx.eval_shape(lambda: model_class(family)(config, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    shape, dtype = leaf.shape, leaf.dtype
    if len(shape) == 1:
      return jnp.zeros(shape, dtype) if "scale" in name else jnp.ones(shape, dtype)
    if "embedding" in name:
      fan_in = shape[-1]
    elif re.search(r"o_proj|attn_vec_einsum", name):
      fan_in = math.prod(shape[:-1])
    else:
      fan_in = shape[0] if len(shape) == 2 else shape[-2] if family == "gemma3" else shape[0]
    return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(fan_in), dtype)

  return graphdef, jax.tree.map_with_path(fill, state)


def build(family: str, size: ModelSize, seed: int = 0) -> nnx.Module:
  """A fresh ``family`` model at ``size`` with the random weights of :func:`random_state`."""
  graphdef, state = random_state(family, size, seed)
  return nnx.merge(graphdef, state)


def flat_shape(adapter_target_shape: tuple[int, ...], path: str, family: str) -> tuple[int, int]:
  """``(m, n)`` of a target as qwix's LoRA sees it: contracted axes in, the others out."""
  shape = adapter_target_shape
  if len(shape) == 2:
    return shape
  name = path.split("/")[-2]
  inputs = {"q_proj": (0,), "k_proj": (0,), "v_proj": (0,), "o_proj": (0, 1),
            "q_einsum": (1,), "kv_einsum": (2,), "qkv_einsum": (2,), "attn_vec_einsum": (0, 1)}[name]
  m = math.prod(shape[i] for i in inputs)
  return m, math.prod(shape) // m


def method(name: str, rank: int, family: str = "llama3") -> Any:
  """Adapter spec ``name`` at LoRA rank ``rank``'s parameter count on every target.

  LoRA/DoRA/SineLoRA/SineDoRA: rank ``rank`` (DoRA adds its magnitude vector). SHiRA/WaveFT/FourierFT:
  ``rank (m + n)`` entries per target, LFMA ``rank (m + n) / 2`` complex coefficients (each counts
  twice), where ``(m, n)`` is the target flattened to (contracted axes, the others), qwix's split.
  """
  fixed = {"LoRA": sp.peft.LoRA, "DoRA": sp.peft.DoRA, "SineLoRA": sp.peft.SineLoRA, "SineDoRA": sp.peft.SineDoRA}
  if name in fixed:
    return fixed[name](rank)
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; one of {METHODS}")

  def per_target(path: str, shape: tuple[int, ...]) -> Any:
    m, n = flat_shape(tuple(shape), path, family)
    p = rank * (m + n)
    if name == "SHiRA":
      return sp.peft.SHiRA(p)
    if name == "WaveFT":
      return sp.peft.WaveFT(p)
    if name == "FourierFT":
      return sp.peft.FourierFT(p)
    return sp.peft.LFMA((p / 2 + 0.5) / (m * n))

  return per_target


def adapted(family: str, size: ModelSize, name: str, rank: int, *, seed: int = 0, key: int = 1,
            targets: str | None = None) -> nnx.Module:
  """A fresh random ``family`` model with ``name``'s adapters (see :func:`method`) on its projections
  (``targets``: a regex over weight paths, default :data:`TARGETS` of the family)."""
  model = build(family, size, seed)
  sp.nnx.adapt(model, method(name, rank, family), targets or TARGETS[family], key=jax.random.key(key))
  return model


def qwix_lora(family: str, size: ModelSize, rank: int, *, seed: int = 0, alpha: float | None = None,
              weight_qtype: str | None = None) -> nnx.Module:
  """A fresh random ``family`` model with qwix's LoRA (``alpha`` default ``rank``: scale 1, as ours).

  ``weight_qtype`` (e.g. ``"int4"``): qwix's QLoRA, the adapted projections' weights quantized.
  """
  import qwix

  model = build(family, size, seed)
  provider = qwix.LoraProvider(module_path=QWIX_MODULES[family], rank=rank, alpha=float(alpha or rank),
                               weight_qtype=weight_qtype)
  tokens = jnp.zeros((1, 4), jnp.int32)
  inputs = model_inputs(tokens, jnp.ones_like(tokens, dtype=bool))
  return qwix.apply_lora_to_model(model, provider, tokens, inputs["positions"], None, inputs["attention_mask"],
                                  rngs=nnx.Rngs(seed + 7))


def variant(family: str, size: ModelSize, name: str, rank: int, *, seed: int = 0) -> nnx.Module:
  """``name``: one of :data:`METHODS`, ``"qwix LoRA"`` or ``"full"`` (the model with no adapter)."""
  if name == "qwix LoRA":
    return qwix_lora(family, size, rank, seed=seed)
  if name == "full":
    return build(family, size, seed)
  return adapted(family, size, name, rank, seed=seed)


# --- The task and Tunix's trainer ---------------------------------------------------------------------------


def token_batches(vocab: int, batch: int, seq: int, steps: int, *, seed: int = 0) -> list[Any]:
  """A synthetic next-token task as Tunix ``TrainingInput`` s: each sequence starts at a random token and
  follows one fixed random permutation of the vocabulary (``t[i + 1] = perm[t[i]]``), so a model can
  lower its loss from ``log(vocab)`` towards zero. ``steps`` batches of ``(batch, seq)`` int32 tokens."""
  from tunix.sft import peft_trainer

  rng = np.random.default_rng(seed)
  perm = np.random.default_rng(1234).permutation(vocab)
  out = []
  for _ in range(steps):
    tokens = np.empty((batch, seq), np.int32)
    tokens[:, 0] = rng.integers(0, vocab, batch)
    for i in range(1, seq):
      tokens[:, i] = perm[tokens[:, i - 1]]
    out.append(peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones((batch, seq), bool)))
  return out


def model_inputs(tokens: Any, mask: Any) -> dict[str, Any]:
  """The model inputs Tunix's default loss takes, built from tokens and their mask as its examples do."""
  from tunix.sft import utils

  return {"input_tokens": tokens, "input_mask": mask, "positions": utils.build_positions_from_mask(mask),
          "attention_mask": utils.make_causal_attn_mask(mask)}


def gen_model_input(example: Any) -> dict[str, Any]:
  return model_inputs(example.input_tokens, example.input_mask)


def trainer(model: nnx.Module, learning_rate: float, steps: int, *, checkpoint_dir: str | None = None) -> Any:
  """Tunix's ``PeftTrainer`` on ``model`` with Adam, ``steps`` steps, no evaluation, checkpoints under
  ``checkpoint_dir`` every step (None: none). It trains the model's ``nnx.LoRAParam`` s where it has any
  (spectral_peft's ``AdapterParam`` and qwix's LoRA), else every ``nnx.Param`` (full fine-tuning)."""
  import orbax.checkpoint as ocp
  from tunix.sft import peft_trainer

  options = None
  if checkpoint_dir is not None:
    options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=2)
  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=steps, pbar_description=None,
                                       checkpoint_root_directory=checkpoint_dir, checkpointing_options=options)
  return peft_trainer.PeftTrainer(model, optax.adam(learning_rate), config).with_gen_model_input_fn(gen_model_input)


def train(model: nnx.Module, batches: list[Any], learning_rate: float, *, checkpoint_dir: str | None = None) -> tuple[Any, np.ndarray]:
  """Trains ``model`` in place with :func:`trainer` on ``batches``; returns the trainer and its loss per step."""
  t = trainer(model, learning_rate, len(batches), checkpoint_dir=checkpoint_dir)
  t.train(batches)
  return t, np.asarray(t.metrics_logger.get_metric_history("", "loss", "train"), np.float64)


def trainable_count(model: nnx.Module) -> int:
  """Scalars Tunix's ``PeftTrainer`` trains: its ``nnx.LoRAParam`` s, or every ``nnx.Param`` without any."""
  from tunix.sft import utils

  state = nnx.state(model, nnx.LoRAParam if utils.is_lora_enabled(model) else nnx.Param)
  return int(sum(np.size(x) for x in jax.tree.leaves(state)))


def compiled_trainer(model: nnx.Module, learning_rate: float, steps: int) -> Any:
  """:func:`trainer`'s ``PeftTrainer``, whose train step (Tunix's own: its loss, the gradient wrt the
  variables it trains, the optimiser update) is compiled once, ahead of time, as a pure function of the
  split (model, optimiser) state, with that state donated.

  Train with ``t.train(batches, skip_jit=True)`` (Tunix's loop, metrics and checkpoints, running the
  compiled step); then ``t.compiled`` is the XLA executable (``memory_analysis()``) and ``t.timed_step()``
  a no-argument call running one more step on a copy of the state (for interleaved timing).
  """
  from tunix.sft import peft_trainer

  class CompiledStepTrainer(peft_trainer.PeftTrainer):
    compiled = None

    def create_train_step_fn(self):
      body = super().create_train_step_fn()
      graphdef, _ = nnx.split((self.model, self.optimizer))

      def pure(state, example):
        model, optimizer = nnx.merge(graphdef, state)
        loss, _, grad_norm = body(model, optimizer, example)
        return loss, grad_norm, nnx.state((model, optimizer))

      def step(example):
        example = jax.tree.map(jnp.asarray, example)
        state = nnx.state((self.model, self.optimizer))
        if self.compiled is None:
          self.compiled = jax.jit(pure, donate_argnums=0).lower(state, example).compile()
          self._example = example
        loss, grad_norm, state = self.compiled(state, example)
        nnx.update((self.model, self.optimizer), state)
        return loss, None, grad_norm

      return step

    def timed_step(self) -> Callable[[], Any]:
      box = {"state": jax.tree.map(jnp.copy, nnx.state((self.model, self.optimizer)))}

      def call():
        loss, _, box["state"] = self.compiled(box["state"], self._example)
        return loss

      return call

  config = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=steps, pbar_description=None)
  return CompiledStepTrainer(model, optax.adam(learning_rate), config).with_gen_model_input_fn(gen_model_input)
