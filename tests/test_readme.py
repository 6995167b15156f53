"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_quickstart_runs(tmp_path, monkeypatch):
  with open(README) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
  assert len(blocks) == 4
  code = "\n".join(blocks).replace("/tmp/qv_adapter", str(tmp_path / "qv_adapter"))
  code = code.replace("/tmp/nnx_adapter", str(tmp_path / "nnx_adapter"))
  code = code.replace("/tmp/peft_lora", str(tmp_path / "peft_lora"))
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
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
