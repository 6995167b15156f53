"""Tunix and qwix: a tiny Tunix Llama3 adapted with every method trains, checkpoints and resumes under
Tunix's own ``PeftTrainer``, and our LoRA equals qwix's LoRA given the same numbers.

The model is 2 layers, embed 32, MLP 64, 4 query / 2 key-value heads of 8, vocabulary 64, with random
weights (built abstractly and filled by NumPy: nothing downloaded, nothing compiled to initialise it).
Adapters go on the 14 projection weights: the attention einsums ``q/k/v/o_proj/w`` (``BTD,DNH->BTNH``,
``BTNH,NHD->BTD``) and the MLP's ``gate/up/down_proj/kernel``. Skipped where the ``llm`` extra
(google-tunix, qwix) is not installed. Every matrix of a Tunix Llama3, Gemma3 and Qwen3 (tied head),
embeddings and heads included, adapts and equals the merged model.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tunix", reason="needs the `llm` extra (google-tunix): pip install -e '.[llm]'")
pytest.importorskip("qwix", reason="needs the `llm` extra (qwix): pip install -e '.[llm]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import spectral_peft as sp  # noqa: E402
from experiments import _llm  # noqa: E402

SIZE = _llm.ModelSize()
RANK, STEPS, LR = 2, 2, 1e-2
# The trainer test adapts one weight of each kind in the first layer (an input-first einsum, a
# heads-first output einsum, a Linear), to keep its 8 compilations short (the second layer's weights
# are base weights that must not move); the qwix test adapts all 14.
TRAIN_TARGETS = r"layers/0/(attn/(q_proj|o_proj)/w|mlp/down_proj/kernel)$"


@pytest.fixture(scope="module")
def batches():
  return _llm.token_batches(SIZE.vocab, 2, 8, STEPS)


@pytest.fixture(scope="module")
def logits():
  """``model -> logits`` on one fixed batch, jitted (one compilation per model structure)."""
  inputs = _llm.model_inputs(*(jnp.asarray(x) for x in (_llm.token_batches(SIZE.vocab, 2, 8, 1, seed=5)[0].input_tokens,
                                                       np.ones((2, 8), bool))))

  @nnx.jit
  def forward(model):
    return model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])[0]

  return forward


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _adapters_equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(
      _leaves_equal(a[k].params, b[k].params) and _leaves_equal(a[k].frozen, b[k].frozen) for k in a)


def _size(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


@pytest.mark.slow
@pytest.mark.parametrize("name", _llm.METHODS)
def test_peft_trainer_trains_checkpoints_and_resumes(name, batches, logits, tmp_path):
  _trains_checkpoints_and_resumes("llama3", name, TRAIN_TARGETS, 3, batches, logits, tmp_path)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_peft_trainer_trains_a_tied_embedding_checkpoints_and_resumes(family, batches, logits, tmp_path):
  """FourierFT (positions re-derived on resume) on the tied embedding, read by encode and decode, and one MLP weight."""
  _trains_checkpoints_and_resumes(family, "FourierFT", r"embedder/input_embedding$|layers/0/mlp/down_proj/kernel$", 2,
                                  batches, logits, tmp_path)


def _trains_checkpoints_and_resumes(family, name, targets, n_targets, batches, logits, tmp_path):
  model = _llm.adapted(family, SIZE, name, RANK, targets=targets)
  assert len(sp.nnx.adapters_of(model)) == n_targets
  adapter_count = _size({k: a.params for k, a in sp.nnx.adapters_of(model).items()})
  assert adapter_count == _size(nnx.state(model, nnx.LoRAParam)) == _llm.trainable_count(model)
  assert adapter_count < _size(nnx.state(model, nnx.Param)) // 5
  base0 = jax.tree.map(np.asarray, sp.nnx.base_params(model))
  adapters0 = sp.nnx.adapters_of(model)

  trainer, losses = _llm.train(model, batches, LR, checkpoint_dir=str(tmp_path / "ckpt"))
  assert losses.shape == (STEPS,) and np.all(np.isfinite(losses))

  # Tunix chose the adapters: Adam holds two moments of exactly the adapter scalars, nothing of the base.
  opt_state = nnx.state(trainer.optimizer, nnx.optimizer.OptState)
  assert sum(np.size(x) for x in jax.tree.leaves(opt_state) if np.ndim(x)) == 2 * adapter_count
  assert _leaves_equal(sp.nnx.base_params(model), base0), "a base weight changed"
  after = sp.nnx.adapters_of(model)
  unchanged = [k for k in after if _leaves_equal(after[k].params, adapters0[k].params)]
  assert not unchanged, f"adapters not trained: {unchanged}"

  # The adapted model is its merge onto the base, in value.
  plain = _llm.build(family, SIZE)
  nnx.update(plain, sp.peft.merge(sp.nnx.base_params(model), after))
  np.testing.assert_allclose(logits(model), logits(plain), rtol=2e-5, atol=2e-5)

  # Resume: an identically built model gets everything back from Tunix's checkpoint (sparse positions
  # and masks are not saved by Tunix: they are re-derived from the same key).
  fresh = _llm.adapted(family, SIZE, name, RANK, targets=targets)
  resumed = _llm.trainer(fresh, LR, STEPS, checkpoint_dir=str(tmp_path / "ckpt"))
  try:
    assert resumed.train_steps == STEPS
    assert _adapters_equal(sp.nnx.adapters_of(fresh), after)
    assert _leaves_equal(nnx.state(fresh), nnx.state(model))
    assert _leaves_equal(nnx.state(resumed.optimizer, nnx.optimizer.OptState), opt_state)
  finally:
    resumed.close()


def test_full_fine_tuning_without_adapters_trains_every_param():
  """The contrast: a model without ``nnx.LoRAParam`` is fully trainable to Tunix (what the benchmark's
  "full" row measures)."""
  model = _llm.build("llama3", SIZE)
  assert _llm.trainable_count(model) == _size(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_our_lora_equals_qwix_lora_given_the_same_numbers(logits):
  ours = _llm.adapted("llama3", SIZE, "LoRA", RANK)
  theirs = _llm.qwix_lora("llama3", SIZE, RANK)
  qwix_state = nnx.state(theirs, nnx.LoRAParam)
  assert _size(qwix_state) == _size(nnx.state(ours, nnx.LoRAParam))

  # Non-zero A and B (B starts at zero in both), copied into qwix's layout: A over the contracted
  # axes, B over the others.
  state = nnx.state(ours, sp.nnx.AdapterParam)
  rng = np.random.default_rng(3)
  nnx.update(ours, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.3), state))
  for path, adapter in sp.nnx.adapters_of(ours).items():
    *module_path, weight = path.split("/")
    module = theirs
    for part in module_path:
      module = module[int(part)] if part.isdigit() else getattr(module, part)
    lora_a, lora_b = getattr(module, f"{weight}_lora_a"), getattr(module, f"{weight}_lora_b")
    lora_a[...] = adapter.params["a"].reshape(lora_a.shape)
    lora_b[...] = adapter.params["b"].reshape(lora_b.shape)
  ours_out, theirs_out = logits(ours), logits(theirs)
  assert float(jnp.max(jnp.abs(ours_out - logits(_llm.build("llama3", SIZE))))) > 1e-2  # the adapters act
  np.testing.assert_allclose(ours_out, theirs_out, rtol=1e-5, atol=1e-5)


def _module(model, path):
  *module_path, weight = path.split("/")
  module = model
  for part in module_path:
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module, weight


@pytest.mark.slow
def test_our_lora_over_qwix_int4_base_equals_qwix_qlora(logits):
  """QLoRA: qwix quantizes the 14 projections to int4 and adds its LoRA; ours reads the same int4 weights."""
  theirs = _llm.qwix_lora("llama3", SIZE, RANK, weight_qtype="int4")
  ours = _llm.build("llama3", SIZE)
  paths = [p for p in sp.peft.leaf_paths(sp.nnx.base_params(ours)) if re.search(_llm.TARGETS["llama3"], p)]
  sp.nnx.quantize(ours, weights={p: getattr(*_module(theirs, p)) for p in paths})
  sp.nnx.adapt(ours, sp.peft.LoRA(RANK), _llm.TARGETS["llama3"], key=jax.random.key(1))
  rng = np.random.default_rng(4)
  state = nnx.state(ours, sp.nnx.AdapterParam)
  nnx.update(ours, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.3), state))
  for path, adapter in sp.nnx.adapters_of(ours).items():
    module, weight = _module(theirs, path)
    getattr(module, f"{weight}_lora_a")[...] = adapter.params["a"].reshape(getattr(module, f"{weight}_lora_a").shape)
    getattr(module, f"{weight}_lora_b")[...] = adapter.params["b"].reshape(getattr(module, f"{weight}_lora_b").shape)
  ours_out, theirs_out = logits(ours), logits(theirs)
  scale = max(1.0, float(jnp.max(jnp.abs(theirs_out))))
  np.testing.assert_allclose(ours_out, theirs_out, rtol=0, atol=1e-4 * scale)
  # The int4 base differs from the float one: the comparison is not of two float models.
  assert float(jnp.max(jnp.abs(theirs_out - logits(_llm.build("llama3", SIZE))))) > 1e-3

  def loss(model, wrt):
    del wrt
    return jnp.sum(jnp.sin(logits(model)))

  our_grads = nnx.grad(lambda m: loss(m, 0), argnums=nnx.DiffState(0, sp.nnx.AdapterParam))(ours)
  their_grads = nnx.grad(lambda m: loss(m, 0), argnums=nnx.DiffState(0, nnx.LoRAParam))(theirs)
  ours_by_path = sp.peft.leaf_paths(our_grads)
  theirs_by_path = sp.peft.leaf_paths(their_grads)
  for path in sp.nnx.adapters_of(ours):
    *module_path, weight = path.split("/")
    prefix = "/".join(module_path)
    for ours_name, theirs_name in (("p0", "lora_a"), ("p1", "lora_b")):
      got = ours_by_path[f"{prefix}/{weight}_adapter_{ours_name}"]
      want = theirs_by_path[f"{prefix}/{weight}_{theirs_name}"]
      g_scale = max(1.0, float(jnp.max(jnp.abs(want))))
      np.testing.assert_allclose(np.asarray(got).reshape(np.shape(want)), want, rtol=0, atol=1e-4 * g_scale)


def _matrices(model) -> list[str]:
  return [p for p, v in sp.peft.leaf_paths(nnx.state(model, nnx.Param)).items() if np.ndim(v) >= 2]


@pytest.mark.parametrize("method", [sp.peft.LoRA(RANK), sp.peft.FourierFT(64)], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("family", ["llama3", "gemma3", "qwen3"])
def test_every_matrix_of_each_family_adapts_and_equals_merge(family, method, logits):
  """All of a model's matrices, the embedding and its head included: Llama3's separate ``lm_head``,
  Gemma3's and Qwen3's tied head (``Embedder.decode``, like ``encode`` wrapped by ``jax.named_scope``)."""
  model = _llm.build(family, SIZE)
  paths = _matrices(model)
  assert "embedder/input_embedding" in paths
  sp.nnx.adapt(model, method, lambda path, leaf: path in paths, key=jax.random.key(1))
  rng = np.random.default_rng(4)
  nnx.update(model, jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.05),
                                 nnx.state(model, nnx.LoRAParam)))
  adapters = sp.nnx.adapters_of(model)
  merged = _llm.build(family, SIZE)
  nnx.update(merged, sp.peft.merge(nnx.state(merged, nnx.Param), adapters))
  want = logits(merged)
  assert float(jnp.max(jnp.abs(want - logits(_llm.build(family, SIZE))))) > 1e-2  # the adapters act
  np.testing.assert_allclose(logits(model), want, rtol=1e-5, atol=1e-5 * (float(jnp.max(jnp.abs(want))) + 1.0))
  if isinstance(method, sp.peft.LoRA):  # and in gradient, through the embedding's rebuilt encode/decode
    tokens = jnp.asarray(_llm.token_batches(SIZE.vocab, 2, 8, 1, seed=5)[0].input_tokens)
    inputs = _llm.model_inputs(tokens, np.ones((2, 8), bool))

    def loss_of(m):
      return jnp.sum(jnp.sin(m(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])[0]))

    grads = nnx.grad(loss_of, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    copy = nnx.clone(model)
    nnx.update(copy, grads)

    def merged_loss(ad):
      plain = _llm.build(family, SIZE)
      nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), ad))
      return loss_of(plain)

    ref = jax.grad(merged_loss)(adapters)
    for path, adapter in sp.nnx.adapters_of(copy).items():
      for g, w in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(ref[path].params)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * (float(jnp.max(jnp.abs(w))) + 1.0))


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_mixed_adapter_batch_on_the_projections_equals_each_examples_merge(family, logits):
  """A bank of two LoRA adapters on the 14 projection einsums/Linears: example ``b`` sees adapter ``index[b]``."""
  terms = []
  for k in range(2):
    model = _llm.build(family, SIZE)
    sp.nnx.adapt(model, sp.peft.LoRA(RANK), lambda path, leaf: path.startswith("layers/") and np.ndim(leaf) >= 2,
                 key=jax.random.key(10 + k))
    rng = np.random.default_rng(k)
    nnx.update(model, jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape, np.float32) * 0.05),
                                   nnx.state(model, nnx.LoRAParam)))
    terms.append(sp.nnx.adapters_of(model))
  mixed = _llm.build(family, SIZE)
  sp.nnx.attach(mixed, sp.peft.stack_adapters(terms))
  tokens = jnp.asarray(_llm.token_batches(SIZE.vocab, 2, 8, 1, seed=5)[0].input_tokens)
  inputs = _llm.model_inputs(tokens, np.ones((2, 8), bool))

  @nnx.jit
  def forward(model, index):
    with sp.nnx.adapter_index(index):
      return model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])[0]

  got = forward(mixed, jnp.array([1, 0]))
  for b, k in enumerate([1, 0]):
    merged = _llm.build(family, SIZE)
    nnx.update(merged, sp.peft.merge(nnx.state(merged, nnx.Param), terms[k]))
    want = logits(merged)[b]
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5 * (float(jnp.max(jnp.abs(want))) + 1.0))
  assert float(jnp.max(jnp.abs(got[0] - logits(_llm.build(family, SIZE))[0]))) > 1e-2  # the adapters act
