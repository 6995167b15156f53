"""Tied weights: every read of an adapted weight inside a model call sees W0 + Delta W, or attach refuses.

Tied LM heads read the embedding outside the owner's ``__call__`` (``Embed.attend``, or a Linen
``self.variables`` read); a module that holds another module's weight variable would read it without
the adapter, so attach names it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectral_peft as sp

VOCAB, WIDTH = 11, 8
TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 10]])


class NnxTiedLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(jnp.tanh(self.mlp(self.embed(tokens))))


def _merged_logits(adapters):
  plain = NnxTiedLM(nnx.Rngs(0))
  nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), adapters))
  return plain(TOKENS)


@pytest.mark.parametrize("method", [sp.peft.LoRA(2), sp.peft.WaveFT(12), sp.peft.FourierFT(10)],
                         ids=lambda m: type(m).__name__)
def test_nnx_embed_attend_sees_the_adapted_embedding_in_value_and_gradient(method):
  model = NnxTiedLM(nnx.Rngs(0))
  sp.nnx.adapt(model, method, "embedding", key=jax.random.key(1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.1, nnx.state(model, nnx.LoRAParam)))
  adapters = sp.nnx.adapters_of(model)
  want = _merged_logits(adapters)
  got = nnx.jit(lambda m, t: m(t))(model, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))

  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(TOKENS))), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  copy = nnx.clone(model)
  nnx.update(copy, grads)
  ref = jax.grad(lambda ad: jnp.sum(jnp.sin(_merged_logits(ad))))(adapters)
  for path, adapter in sp.nnx.adapters_of(copy).items():
    for g, w in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(ref[path].params)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * (float(jnp.max(jnp.abs(w))) + 1.0))


class NnxSharedHead(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.head = nnx.Module()
    self.head.table = self.embed.embedding  # The same variable, read by another module.

  def __call__(self, tokens):
    return self.embed(tokens) @ self.head.table[...].T


def test_nnx_attach_refuses_a_weight_another_module_holds():
  model = NnxSharedHead(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'embed/embedding' is shared with \['head.table'\]"):
    sp.nnx.adapt(model, sp.peft.LoRA(2), "embed/embedding", key=jax.random.key(1))
  assert sp.nnx.adapters_of(model) == {}


class NnxHandTiedLM(nnx.Module):
  """A tied head written by hand: the model's own code reads the embedding table of its child."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, tokens):
    hidden = jnp.tanh(self.mlp(self.embed(tokens)))
    return (lambda h: h @ self.embed.embedding[...].T)(hidden)  # nested code is read too


def test_nnx_attach_refuses_a_weight_a_parent_reads_directly_and_adapts_the_rest():
  model = NnxHandTiedLM(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'embed/embedding' is read by NnxHandTiedLM.__call__ of the root module, outside"):
    sp.nnx.adapt(model, sp.peft.LoRA(2), "embed/embedding", key=jax.random.key(1))
  assert sp.nnx.adapters_of(model) == {}
  # The layers whose weights the model's code does not name adapt as usual and equal the merged model.
  sp.nnx.adapt(model, sp.peft.LoRA(2), "mlp/kernel", key=jax.random.key(1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.1, nnx.state(model, nnx.LoRAParam)))
  plain = NnxHandTiedLM(nnx.Rngs(0))
  nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), sp.nnx.adapters_of(model)))
  want = plain(TOKENS)
  np.testing.assert_allclose(model(TOKENS), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


class NnxDynamicTiedLM(nnx.Module):
  """A tied head whose read of the table no code analysis can see: the attribute name is built at run time."""

  def __init__(self, rngs, via="getattr"):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.via = via

  def __call__(self, tokens):
    hidden = jnp.tanh(self.mlp(self.embed(tokens)))
    table = getattr(self.embed, "".join(["embed", "ding"]))
    if self.via == "getattr":
      return hidden @ table[...].T
    if self.via == "attribute":  # the variable's own array attribute, read without [...]
      return hidden @ table.T
    return hidden @ jnp.asarray(table).T  # __jax_array__


@pytest.mark.parametrize("via", ["getattr", "attribute", "asarray"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_nnx_a_read_outside_the_layer_that_no_code_names_raises_at_call_time(via, jit):
  model = NnxDynamicTiedLM(nnx.Rngs(0), via)
  sp.nnx.adapt(model, sp.peft.LoRA(2), "embed/embedding", key=jax.random.key(1))  # passes the static check
  call = nnx.jit(lambda m, t: m(t)) if jit else (lambda m, t: m(t))
  with pytest.raises(ValueError, match=r"adapted weight 'embed/embedding' \(Embed.embedding\) was read by "
                                       r"NnxDynamicTiedLM.__call__ .*outside the methods of its layer"):
    call(model, TOKENS)
  # Reads that are not the model computing: a script inspecting the weight, and the library's own.
  base = NnxDynamicTiedLM(nnx.Rngs(0), via)
  np.testing.assert_array_equal(model.embed.embedding[...], base.embed.embedding[...])
  assert sp.nnx.base_params(model)["embed"]["embedding"][...].shape == (VOCAB, WIDTH)
  # With the adapter inactive the base weight is what the model computes with: the read is right, and passes.
  with sp.nnx.disable_adapters(model):
    np.testing.assert_allclose(call(model, TOKENS), base(TOKENS), rtol=1e-6, atol=1e-6)
  # Merged, the weight is a plain nnx.Param again and the model runs (as its merged form).
  sp.nnx.merge_adapters(model)
  assert type(model.embed.embedding) is nnx.Param
  np.testing.assert_allclose(call(model, TOKENS), base(TOKENS), rtol=1e-6, atol=1e-6)


def test_nnx_adapted_weights_keep_their_variable_type_for_filters_and_go_back_on_detach():
  model = NnxTiedLM(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(2), r"embedding|mlp/kernel", key=jax.random.key(1))
  for variable in (model.embed.embedding, model.mlp.kernel):
    assert isinstance(variable, nnx.Param) and not isinstance(variable, nnx.LoRAParam)
  assert type(model.mlp.bias) is nnx.Param  # not adapted: untouched
  assert set(sp.peft.leaf_paths(sp.nnx.base_params(model))) == {"embed/embedding", "mlp/kernel", "mlp/bias"}
  copy = nnx.merge(*nnx.split(model))  # the type travels through split/merge with the layer's
  np.testing.assert_allclose(copy(TOKENS), model(TOKENS), rtol=1e-6, atol=1e-6)
  sp.nnx.detach_adapters(model)
  assert type(model.embed.embedding) is nnx.Param and type(model.mlp.kernel) is nnx.Param


def _opaque(fn):
  """A decorator that hides the method's code (no ``functools.wraps``)."""
  def wrapper(*args, **kwargs):
    return fn(*args, **kwargs)
  return wrapper


class ScopedEmbedder(nnx.Module):
  """Tunix's Gemma3 ``Embedder``: ``encode``/``decode`` wrapped by ``jax.named_scope``, the tied head in ``decode``."""

  def __init__(self, rngs):
    self.input_embedding = nnx.Param(jax.random.normal(rngs.params(), (VOCAB, WIDTH)))

  @jax.named_scope("embedder_encode")
  def encode(self, tokens):
    return self.input_embedding[(tokens,)] * jnp.sqrt(WIDTH)

  @jax.named_scope("embedder_decode")
  def decode(self, x):
    return jnp.dot(x, self.input_embedding[...].T)

  @_opaque
  def decode_opaque(self, x):
    return jnp.dot(x, self.input_embedding[...].T)


class ScopedLM(nnx.Module):
  def __init__(self, rngs, opaque=False):
    self.embedder = ScopedEmbedder(rngs)
    self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.opaque = opaque

  def __call__(self, tokens):
    hidden = jnp.tanh(self.mlp(self.embedder.encode(tokens)))
    return self.embedder.decode_opaque(hidden) if self.opaque else self.embedder.decode(hidden)


@pytest.mark.parametrize("method", [sp.peft.LoRA(2), sp.peft.FourierFT(10)], ids=lambda m: type(m).__name__)
def test_nnx_decorated_methods_of_the_layer_see_the_adapted_weight_in_value_and_gradient(method):
  model = ScopedLM(nnx.Rngs(0))
  sp.nnx.adapt(model, method, "input_embedding", key=jax.random.key(1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.1, nnx.state(model, nnx.LoRAParam)))
  adapters = sp.nnx.adapters_of(model)

  def merged_loss(ad):
    plain = ScopedLM(nnx.Rngs(0))
    nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), ad))
    return jnp.sum(jnp.sin(plain(TOKENS)))

  value, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(TOKENS))),
                                            argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
  ref_value, ref_grads = jax.value_and_grad(merged_loss)(adapters)
  base_value = float(jnp.sum(jnp.sin(ScopedLM(nnx.Rngs(0))(TOKENS))))
  assert abs(float(ref_value) - base_value) > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-5 * TOKENS.size)
  copy = nnx.clone(model)
  nnx.update(copy, grads)
  for path, adapter in sp.nnx.adapters_of(copy).items():
    for g, w in zip(jax.tree.leaves(adapter.params), jax.tree.leaves(ref_grads[path].params)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * (float(jnp.max(jnp.abs(w))) + 1.0))


def test_nnx_a_method_whose_decorator_hides_its_code_raises_instead_of_reading_the_base_weight():
  model = ScopedLM(nnx.Rngs(0), opaque=True)
  sp.nnx.adapt(model, sp.peft.LoRA(2), "input_embedding", key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"'embedder/input_embedding' \(ScopedEmbedder.input_embedding\) was read by "
                                       r"ScopedEmbedder.decode_opaque "):
    model(TOKENS)


class SelfCallingLayer(nnx.Module):
  """A layer whose ``__call__`` reaches its weight through another of its own methods."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (WIDTH, 5)))

  def project(self, x):
    return x @ self.kernel[...]

  def __call__(self, x):
    return jnp.tanh(self.project(x))


@pytest.mark.parametrize("method", [sp.peft.LoRA(2), sp.peft.FourierFT(10)], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_nnx_a_layer_calling_its_own_methods_applies_the_adapter_once(method, jit):
  model = SelfCallingLayer(nnx.Rngs(0))
  sp.nnx.adapt(model, method, "kernel", key=jax.random.key(1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.3, nnx.state(model, nnx.LoRAParam)))
  x = jax.random.normal(jax.random.key(2), (3, WIDTH))
  plain = SelfCallingLayer(nnx.Rngs(0))
  nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), sp.nnx.adapters_of(model)))
  want = plain(x)
  assert float(jnp.max(jnp.abs(want - SelfCallingLayer(nnx.Rngs(0))(x)))) > 1e-2  # the adapter acts
  call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
  np.testing.assert_allclose(call(model, x), want, rtol=1e-5, atol=1e-5)
  # The method called from outside routes the adapter itself.
  np.testing.assert_allclose(model.project(x), x @ plain.kernel[...], rtol=1e-5, atol=1e-5)


class ScaledAttendEmbed(nnx.Embed):
  def attend(self, query):  # names no weight: the read is in nnx.Embed.attend, through super()
    return 2.0 * super().attend(query)


class SuperAttendLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = ScaledAttendEmbed(VOCAB, WIDTH, rngs=rngs)

  def __call__(self, tokens):
    return self.embed.attend(jnp.tanh(self.embed(tokens)))


def test_nnx_an_override_calling_super_reads_the_adapted_weight():
  model = SuperAttendLM(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "embedding", key=jax.random.key(1))
  nnx.update(model, jax.tree.map(lambda v: v + 0.2, nnx.state(model, nnx.LoRAParam)))
  plain = SuperAttendLM(nnx.Rngs(0))
  nnx.update(plain, sp.peft.merge(nnx.state(plain, nnx.Param), sp.nnx.adapters_of(model)))
  want = plain(TOKENS)
  assert float(jnp.max(jnp.abs(want - SuperAttendLM(nnx.Rngs(0))(TOKENS)))) > 1e-2
  np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, TOKENS), want, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))


class TableEmbed(nnx.Embed):
  @property
  def table(self):  # a property is not a method the runtime routes
    return self.embedding[...]


class NnxPropertyTiedLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = TableEmbed(VOCAB, WIDTH, rngs=rngs)

  def __call__(self, tokens):
    return self.embed(tokens) @ self.embed.table.T


def test_nnx_a_property_of_the_layer_read_by_its_parent_raises_naming_the_property():
  model = NnxPropertyTiedLM(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "embed/embedding", key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"'embed/embedding' \(TableEmbed.embedding\) was read by TableEmbed.table "):
    model(TOKENS)


def test_nnx_the_guard_stays_while_a_named_adapter_remains_on_the_weight():
  model = NnxDynamicTiedLM(nnx.Rngs(0))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "embed/embedding", key=jax.random.key(1))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "embed/embedding", key=jax.random.key(2), adapter_name="other")
  sp.nnx.delete_adapter(model, "default")
  sp.nnx.set_adapter(model, "other")
  with pytest.raises(ValueError, match="was read by NnxDynamicTiedLM.__call__"):
    model(TOKENS)
  sp.nnx.delete_adapter(model, "other")
  assert type(model.embed.embedding) is nnx.Param
  np.testing.assert_allclose(model(TOKENS), NnxDynamicTiedLM(nnx.Rngs(0))(TOKENS), rtol=1e-6, atol=1e-6)


class LinenTiedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, WIDTH)
    return embed.attend(jnp.tanh(nn.Dense(WIDTH)(embed(tokens))))


def test_linen_embed_attend_sees_the_adapted_embedding():
  model = LinenTiedLM()
  params = model.init(jax.random.key(0), TOKENS)["params"]
  adapters = jax.tree.map(lambda a: a + 0.1,
                          sp.peft.init_adapters(jax.random.key(1), params, sp.peft.LoRA(2), "embedding"))
  want = model.apply({"params": sp.peft.merge(params, adapters)}, TOKENS)
  got = jax.jit(lambda ad: sp.peft.apply_adapters(model, params, ad, TOKENS))(adapters)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


class LinenRawReadLM(nn.Module):
  """A tied head that reads the embedding through ``self.variables`` (not through ``Embed.attend``)."""

  @nn.compact
  def __call__(self, tokens):
    h = jnp.tanh(nn.Dense(WIDTH)(nn.Embed(VOCAB, WIDTH, name="embed")(tokens)))
    return h @ self.variables["params"]["embed"]["embedding"].T


@pytest.mark.parametrize("method", [sp.peft.LoRA(2), sp.peft.SHiRA(12), sp.peft.FourierFT(10)],
                         ids=lambda m: type(m).__name__)
def test_linen_raw_variables_reads_see_the_adapted_weight_in_value_and_gradient(method):
  model = LinenRawReadLM()
  params = model.init(jax.random.key(0), TOKENS)["params"]
  adapters = jax.tree.map(lambda a: a + 0.1, sp.peft.init_adapters(jax.random.key(1), params, method, "embedding"))

  def loss_merged(ad):
    return jnp.sum(jnp.sin(model.apply({"params": sp.peft.merge(params, ad)}, TOKENS)))

  def loss_runtime(ad):
    return jnp.sum(jnp.sin(sp.peft.apply_adapters(model, params, ad, TOKENS)))

  def loss_context(ad):
    with sp.peft.factored(ad):
      return jnp.sum(jnp.sin(model.apply({"params": params}, TOKENS)))

  want, want_grad = jax.value_and_grad(loss_merged)(adapters)
  assert abs(float(want) - float(loss_merged(jax.tree.map(jnp.zeros_like, adapters)))) > 1e-3  # the read matters
  scale = TOKENS.size * VOCAB  # summed terms of magnitude <= 1
  for fn in (jax.jit(jax.value_and_grad(loss_runtime)), jax.jit(jax.value_and_grad(loss_context)),
             jax.value_and_grad(loss_runtime)):
    got, got_grad = fn(adapters)
    assert abs(float(got) - float(want)) <= 1e-5 * scale
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale * (float(jnp.max(jnp.abs(b))) + 1.0))
  # Outside adapted calls flax's own property is back, and reads give the stored (base) values.
  assert nn.Module.variables is sp.peft._runtime.linen._FLAX_VARIABLES
  bound = model.bind({"params": params})
  np.testing.assert_array_equal(bound.variables["params"]["embed"]["embedding"], params["embed"]["embedding"])


def test_nnx_merge_adapters_with_a_non_finite_result_changes_nothing():
  model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1)))
  sp.nnx.adapt(model, sp.peft.LoRA(2), "kernel", key=jax.random.key(1))
  state = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  leaves[-1] = jnp.full_like(leaves[-1], jnp.nan)  # The last layer's adapter alone is poisoned.
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  before = jax.tree.map(np.asarray, nnx.state(model))
  with pytest.raises(ValueError, match="nothing was merged"):
    sp.nnx.merge_adapters(model)
  after = jax.tree.map(np.asarray, nnx.state(model))
  assert jax.tree.structure(before) == jax.tree.structure(after)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert len(sp.nnx.adapters_of(model)) == 2
