"""PEFT files under hostile and careless use: links planted in the export directory, exports that
fail half way, configs that disagree with their tensors, torch-layout params, GPT-2 Conv1D
directories, corrupt files. Fixtures: tests/fixtures/peft (see tests/test_interop.py)."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_peft as sp
from test_interop import nested  # The fixtures' {path: array} -> nested params helper.

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft")


@pytest.fixture(scope="module")
def flat():
  with np.load(os.path.join(FIXTURES, "base.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def params(flat):
  return nested(flat)


@pytest.fixture(scope="module")
def adapters(params):
  return sp.peft.import_peft(os.path.join(FIXTURES, "lora"), params, return_modules=True)[0]


def _copy(case, tmp_path, **config_changes):
  target = tmp_path / case
  shutil.copytree(os.path.join(FIXTURES, case), target)
  if config_changes:
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(config_changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
  return str(target)


def _deltas(case):
  with np.load(os.path.join(FIXTURES, case, "delta.npz")) as f:
    return {k: f[k] for k in f.files}


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _snapshot(directory):
  return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


# -- class 1: writes outside what the library made -------------------------------------------------
def test_a_planted_config_link_is_never_written_through(adapters, tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("precious")
  out = tmp_path / "export"
  out.mkdir()
  os.symlink(victim, out / "adapter_config.json")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    sp.peft.export_peft(str(out), adapters)
  assert victim.read_text() == "precious"
  sp.peft.export_peft(str(out), adapters, overwrite=True)
  assert victim.read_text() == "precious"
  assert not os.path.islink(out / "adapter_config.json")
  assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_planted_weights_link_is_never_written_through(adapters, tmp_path):
  victim = tmp_path / "victim.bin"
  victim.write_bytes(b"\x00precious")
  out = tmp_path / "export"
  out.mkdir()
  os.symlink(victim, out / "adapter_model.safetensors")
  sp.peft.export_peft(str(out), adapters, overwrite=True)
  assert victim.read_bytes() == b"\x00precious"
  assert not os.path.islink(out / "adapter_model.safetensors")


def test_a_link_as_the_export_directory_is_refused(adapters, tmp_path):
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  os.symlink(elsewhere, tmp_path / "export")
  with pytest.raises(ValueError, match="symbolic link"):
    sp.peft.export_peft(str(tmp_path / "export"), adapters, overwrite=True)
  assert os.listdir(elsewhere) == []


def test_an_existing_export_needs_overwrite_and_other_files_are_kept(adapters, params, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "README.md").write_text("mine")
  sp.peft.export_peft(str(out), adapters)  # Beside unrelated files: fine.
  before = _snapshot(out)
  with pytest.raises(FileExistsError, match="already holds a PEFT export"):
    sp.peft.export_peft(str(out), adapters)
  assert _snapshot(out) == before
  doubled = {p: a.replace(params=jax.tree.map(lambda x: 2 * x, a.params)) for p, a in adapters.items()}
  sp.peft.export_peft(str(out), doubled, overwrite=True)
  assert (out / "README.md").read_text() == "mine"
  back = sp.peft.import_peft(str(out), params)
  np.testing.assert_array_equal(back["layers/0/query/kernel"].params["a"], 2 * adapters["layers/0/query/kernel"].params["a"])
  assert sorted(os.listdir(tmp_path)) == ["export"]  # No private directory left behind.


def test_weights_beside_the_config_of_another_export_are_refused(adapters, params, tmp_path):
  """What an overwrite killed between its two replacements leaves (the weights go first) is refused;
  editing a field that does not change Delta W is not."""
  sp.peft.export_peft(str(tmp_path / "old"), adapters)
  targets = "|".join(re.escape(p) for p in adapters)
  rank = adapters["layers/0/query/kernel"].params["a"].shape[-1] + 1
  other = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(rank), targets)
  sp.peft.export_peft(str(tmp_path / "new"), other)
  shutil.copy(tmp_path / "new" / "adapter_model.safetensors", tmp_path / "old" / "adapter_model.safetensors")
  with pytest.raises(ValueError, match="mixes two exports"):
    sp.peft.import_peft(str(tmp_path / "old"), params)
  config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
  config["base_model_name_or_path"], config["inference_mode"] = "my/model", False
  (tmp_path / "new" / "adapter_config.json").write_text(json.dumps(config))
  back = sp.peft.import_peft(str(tmp_path / "new"), params)
  np.testing.assert_array_equal(back["layers/0/query/kernel"].params["a"], other["layers/0/query/kernel"].params["a"])


@pytest.mark.parametrize("extra", [{"task_type": object()}, {"lora_dropout": float("nan")}, {3: "x"}])
def test_a_failing_extra_config_leaves_the_previous_export_intact(adapters, tmp_path, extra):
  out = tmp_path / "export"
  sp.peft.export_peft(str(out), adapters)
  before = _snapshot(out)
  with pytest.raises(TypeError, match="extra_config"):
    sp.peft.export_peft(str(out), adapters, extra_config=extra, overwrite=True)
  assert _snapshot(out) == before
  assert sorted(os.listdir(tmp_path)) == ["export"]


def test_a_failing_first_export_writes_nothing(adapters, tmp_path):
  with pytest.raises(TypeError, match="extra_config"):
    sp.peft.export_peft(str(tmp_path / "export"), adapters, extra_config={"task_type": object()})
  assert os.listdir(tmp_path) == []


def test_export_of_stacked_adapters_is_refused_with_the_way_out(tmp_path):
  params = {"layers": {"kernel": jnp.ones((3, 6, 4))}}
  stacked = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), "kernel", stack_axes=1)
  with pytest.raises(ValueError, match=r"stacked over layers.*unstacked\(i\)"):
    sp.peft.export_peft(str(tmp_path / "export"), stacked)
  assert os.listdir(tmp_path) == []


# -- class 4: wrong files load, right files are refused -------------------------------------------
@pytest.mark.parametrize("case", ["fourierft", "waveft_db2", "lora", "shira"])
def test_import_onto_torch_layout_params(flat, case):
  """``layout='out_in'`` on (out, in) weights gives PEFT's Delta W in that layout."""
  torch_layout = nested({k: (v.T if v.ndim == 2 else v) for k, v in flat.items()})
  adapters = sp.peft.import_peft(os.path.join(FIXTURES, case), torch_layout, layout="out_in", return_modules=True)[0]
  merged = sp.peft.merge(torch_layout, adapters)
  for path, delta in _deltas(case).items():
    node_m, node_b = merged, torch_layout
    for part in path.split("/"):
      node_m, node_b = node_m[part], node_b[part]
    assert _rel(np.asarray(node_m) - np.asarray(node_b), delta.T) < 1e-5, path


def test_layout_is_checked(params):
  with pytest.raises(ValueError, match=r"`layout` must be 'in_out'.*got 'io'"):
    sp.peft.import_peft(os.path.join(FIXTURES, "lora"), params, layout="io")


def test_a_non_square_lora_on_the_wrong_layout_suggests_layout(flat):
  torch_layout = nested({k: (v.T if v.ndim == 2 else v) for k, v in flat.items()})
  with pytest.raises(ValueError, match="layout='out_in'"):
    sp.peft.import_peft(os.path.join(FIXTURES, "lora"), torch_layout, return_modules=True)


@pytest.mark.parametrize("r, message", [(8, r"rank 8 by the config.*rank 2"), (-5, r"`r` must be an int in \[1"),
                                        (10**12, r"`r` must be an int in \[1"), ("2", "`r` must be an int"),
                                        (2.0, "`r` must be an int"), (True, "`r` must be an int")])
def test_lora_r_is_checked_against_the_tensors(params, tmp_path, r, message):
  directory = _copy("dora", tmp_path, r=r)
  with pytest.raises(ValueError, match=message) as err:
    sp.peft.import_peft(directory, params)
  assert "adapter_config.json" in str(err.value)


def test_lora_rank_pattern_is_checked_against_the_tensors(params, tmp_path):
  directory = _copy("lora", tmp_path, rank_pattern={"value": 2})
  with pytest.raises(ValueError, match="'layers.0.value' has rank 2 by the config"):
    sp.peft.import_peft(directory, params, return_modules=True)


@pytest.mark.parametrize("field, value", [("lora_alpha", float("inf")), ("lora_alpha", "8"), ("use_rslora", "yes"),
                                          ("alpha_pattern", {"value": None}), ("fan_in_fan_out", "false")])
def test_lora_fields_are_checked_for_sanity(params, tmp_path, field, value):
  directory = _copy("dora", tmp_path, **{field: value})
  with pytest.raises(ValueError, match=f"`{field}"):
    sp.peft.import_peft(directory, params)


def test_shira_r_is_checked_against_the_tensors(params, tmp_path):
  with pytest.raises(ValueError, match=r"holds \d+ weights, but the config's r = 2"):
    sp.peft.import_peft(_copy("shira", tmp_path, r=2), params)


@pytest.mark.parametrize("case", ["fourierft", "waveft_db2"])
def test_n_frequency_is_checked_against_the_spectrum(params, tmp_path, case):
  with pytest.raises(ValueError, match="n_frequency 5 by the config"):
    sp.peft.import_peft(_copy(case, tmp_path, n_frequency=5), params)
  with pytest.raises(ValueError, match="`n_frequency` must be an int"):
    sp.peft.import_peft(_copy(case, tmp_path / "b", n_frequency=0), params)
  with pytest.raises(ValueError, match="`scaling` must be a finite number"):
    sp.peft.import_peft(_copy(case, tmp_path / "c", scaling=float("nan")), params)


@pytest.mark.parametrize("case", ["fourierft", "fourierft_seed", "waveft_db2", "waveft_sym4"])
def test_gpt2_conv1d_directories_load_with_the_in_out_kernel(params, tmp_path, case):
  """PEFT writes fan_in_fan_out=true for GPT-2 Conv1D layers (weight (in, out)); its update of that
  weight is the transpose of its (out, in) delta, i.e. exactly the (in, out) kernel's Delta W."""
  adapters = sp.peft.import_peft(_copy(case, tmp_path, fan_in_fan_out=True), params)
  merged = sp.peft.merge(params, adapters)
  for path, delta in _deltas(case).items():
    node_m, node_b = merged, params
    for part in path.split("/"):
      node_m, node_b = node_m[part], node_b[part]
    assert _rel(np.asarray(node_m) - np.asarray(node_b), delta) < 1e-5, path


@pytest.mark.parametrize("changes, message", [
    ({"bias": "lora_only"}, "`bias` = 'lora_only'"), ({"bias": "all"}, "`bias` = 'all'"),
    ({"lora_bias": True}, "`lora_bias`"), ({"r": -5}, "`r` must be an int"), ({"r": 2.5}, "`r` must be an int"),
    ({"init_lora_weights": "pissa"}, "modified base model"), ({"rank_pattern": {"q": 0}}, "rank_pattern"),
])
def test_from_peft_config_refuses_what_import_peft_refuses(params, tmp_path, changes, message):
  directory = _copy("dora", tmp_path, **changes)
  with pytest.raises(ValueError, match=message):
    sp.peft.import_peft(directory, params)
  with pytest.raises(ValueError, match=message):
    sp.peft.from_peft_config(directory)
  config = json.loads(open(os.path.join(directory, "adapter_config.json")).read())
  with pytest.raises(ValueError, match=message):
    sp.peft.from_peft_config(config)


def test_from_peft_config_refuses_inits_it_cannot_reproduce():
  with pytest.raises(ValueError, match="init_lora_weights"):
    sp.peft.from_peft_config({"peft_type": "LORA", "r": 4, "init_lora_weights": "olora"})
  with pytest.raises(ValueError, match="init_lora_weights"):
    sp.peft.from_peft_config({"peft_type": "LORA", "r": 4, "init_lora_weights": False})
  assert sp.peft.from_peft_config({"peft_type": "LORA", "r": 4, "init_lora_weights": "gaussian"})("a/kernel", (8, 8)).rank == 4


@pytest.mark.parametrize("content", [b'{"peft_type": "LORA", "r": 2, "lora_al', b"", b"\xff\xfe", b"[1, 2]"])
def test_a_corrupt_config_names_the_file(params, tmp_path, content):
  directory = _copy("lora", tmp_path)
  with open(os.path.join(directory, "adapter_config.json"), "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match="adapter_config.json") as err:
    sp.peft.import_peft(directory, params)
  assert directory in str(err.value)
  with pytest.raises(ValueError, match="adapter_config.json"):
    sp.peft.from_peft_config(directory)


@pytest.mark.parametrize("cut", [0, 7, 100, -10])
def test_a_truncated_safetensors_names_the_file(params, tmp_path, cut):
  directory = _copy("lora", tmp_path)
  weights = os.path.join(directory, "adapter_model.safetensors")
  data = open(weights, "rb").read()
  with open(weights, "wb") as f:
    f.write(data[:cut])
  with pytest.raises(ValueError, match="adapter_model.safetensors.*truncated or corrupt") as err:
    sp.peft.import_peft(directory, params)
  assert directory in str(err.value)
