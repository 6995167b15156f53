"""The README's Python blocks run as written, in sequence, and use no name that is not imported or
defined before them; the quickstart prints its loss falling."""

from __future__ import annotations

import builtins
import os
import re
import symtable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _blocks() -> list[str]:
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def _reads_and_binds(code: str) -> tuple[set[str], set[str]]:
  """Global names the code reads (at top level or inside its functions, lambdas and comprehensions)
  and the names it binds at top level (assignment, import, def, class, loop and with targets)."""
  table = symtable.symtable(code, "README.md", "exec")
  binds = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
  reads: set[str] = set()

  def walk(scope: symtable.SymbolTable, top: bool) -> None:
    for symbol in scope.get_symbols():
      if symbol.is_referenced() and (top or symbol.is_global()):
        reads.add(symbol.get_name())
    for child in scope.get_children():
      walk(child, False)

  walk(table, True)
  return reads, binds


def _undefined_names(blocks: list[str]) -> dict[int, set[str]]:
  """Per block (1-based): the names it reads that neither it nor an earlier block binds."""
  known = set(dir(builtins))
  undefined = {}
  for index, code in enumerate(blocks, start=1):
    reads, binds = _reads_and_binds(code)
    known |= binds
    if reads - known:
      undefined[index] = reads - known
  return undefined


def test_undefined_name_check_catches_a_missing_import():
  assert _undefined_names(["import jax\nx = jax.numpy.ones(3)", "y = P(None, 'model')"]) == {2: {"P"}}
  assert _undefined_names(["f = lambda: jnp.ones(3)"]) == {1: {"jnp"}}
  assert _undefined_names(["def g():\n  return np.zeros(2)"]) == {1: {"np"}}
  assert _undefined_names(["y = x", "x = 1"]) == {1: {"x"}}  # used before the block that defines it
  assert not _undefined_names(["from jax.sharding import PartitionSpec as P", "for i in range(2): print(P(i))"])


def test_readme_blocks_use_only_names_defined_before_them():
  assert not _undefined_names(_blocks()), "README code uses names it never imports or defines (block: names)"


@pytest.mark.slow
def test_readme_quickstart_runs(tmp_path, capsys):
  blocks = _blocks()
  assert len(blocks) == 8
  scope: dict = {}
  for index, code in enumerate(blocks, start=1):  # one namespace, built only by the blocks before
    for old in ("/tmp/qv_adapter", "/tmp/nnx_adapter", "/tmp/peft_lora", "/tmp/task_b"):
      code = code.replace(old, str(tmp_path / os.path.basename(old)))
    exec(compile(code, f"README.md (python block {index})", "exec"), scope)  # noqa: S102
  printed = capsys.readouterr().out
  losses = [float(v) for v in re.findall(r"^step +\d+ +loss ([\d.]+)$", printed, flags=re.M)]
  assert len(losses) >= 3 and all(b < a for a, b in zip(losses, losses[1:])), printed  # the loss falls
  sp, params, adapters, model, x = (scope[k] for k in ("sp", "params", "adapters", "model", "x"))
  assert set(adapters) == {"SelfAttention_0/query/kernel", "SelfAttention_0/value/kernel"}
  untrained = scope["loss"](sp.peft.init_adapters(jax.random.key(2), params, scope["method"], r"(query|value)/kernel", in_axes=1))
  assert scope["loss"](adapters) < untrained
  np.testing.assert_allclose(model.apply({"params": scope["merged"]}, x),
                             model.apply({"params": sp.peft.merge(params, adapters)}, x), atol=1e-6)
  assert jnp.all(jnp.isfinite(scope["merged"]["SelfAttention_0"]["query"]["kernel"]))
  assert sorted(scope["lora"]) == ["Dense_0/kernel", "Dense_1/kernel"]
  assert os.path.isfile(tmp_path / "peft_lora" / "adapter_model.safetensors")
  # NNX: trained adapters saved alone, then merged into plain layers that give the adapted output.
  from flax import nnx
  net = scope["net"]
  assert not nnx.state(net, sp.nnx.AdapterParam) and type(net.layers[0]) is nnx.Linear
  saved = sp.peft.load_adapters(tmp_path / "nnx_adapter", sp.nnx.base_params(net))
  assert sorted(saved) == ["layers/0/kernel", "layers/2/kernel"]
  assert any(float(jnp.max(jnp.abs(a.params["b"]))) > 0 for a in saved.values())
  # Named adapters: one saved alone; mixed batch: each example equals its own adapter's (or the base) output.
  assert sorted(sp.peft.load_adapters(tmp_path / "task_b")) == ["layers/0/kernel", "layers/2/kernel"]
  mixed, index, other = scope["mixed"], np.asarray(scope["index"]), scope["other"]
  for i, ads in ((0, adapters), (1, other), (-1, {})):
    rows = index == i
    want = sp.peft.apply_adapters(model, params, ads, x[rows]) if ads else model.apply({"params": params}, x[rows])
    scale = max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(mixed[rows], want, rtol=0, atol=1e-5 * scale)
  # Quantized base: int4 kernels, gradients for the adapters, a re-quantization error per path.
  q_params = scope["q_params"]
  assert isinstance(q_params["SelfAttention_0"]["query"]["kernel"], sp.peft.QuantizedArray)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(scope["q_grads"]))
  assert set(scope["q_error"]) == set(scope["q_adapters"]) and all(0 <= e < 0.5 / 7 + 1e-6 for e in scope["q_error"].values())
  # Sharding: the base and its adapters placed on the mesh the block built.
  mesh = scope["mesh"]
  assert params["SelfAttention_0"]["query"]["kernel"].sharding.mesh == mesh
