"""PEFT interop: import/export of save_pretrained directories against committed PEFT fixtures.

The fixtures under tests/fixtures/peft/ come from tests/fixtures/generate_peft_fixtures.py (torch +
peft); these tests need neither.
"""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt
from safetensors.numpy import load_file

import spectral_peft as sp
from spectral_peft._sparse import wavelets
from spectral_peft.peft._formats import peft_files as _interop
from spectral_peft.peft._methods import positions as _positions

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peft")
PEFT_CASES = ("lora", "lora_rslora", "dora", "shira", "fourierft", "fourierft_seed", "waveft_db1", "waveft_db2",
              "waveft_sym4", "waveft_coif1", "waveft_noidwt")
EXPORT_CASES = ("lora", "dora_rslora", "shira", "fourierft", "waveft_db2", "waveft_haar", "waveft_sym4")
RTOL = 1e-6  # Relative Frobenius error allowed between our float32 Delta W and PEFT's.


# -- helpers shared with the fixture generator ----------------------------------------------------
def nested(flat: dict) -> dict:
  """``{"a/b/c": x}`` -> ``{"a": {"b": {"c": x}}}`` with jnp arrays."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jnp.asarray(value)
  return out


def _randomised(adapters, key):
  out = {}
  for i, (path, adapter) in enumerate(sorted(adapters.items())):
    k = jax.random.fold_in(key, i)
    new = {}
    for name, value in sorted(adapter.params.items()):
      k, sub = jax.random.split(k)
      noise = jax.random.normal(sub, value.shape, value.dtype)
      new[name] = value * (1.0 + 0.1 * noise) if name == "magnitude" else 0.1 * noise
    out[path] = sp.peft.Adapter(new, adapter.frozen, adapter.method, adapter.shape, adapter.dtype, adapter.in_axes)
  return out


def our_export_cases(params: dict) -> dict:
  """``{case: (adapters, modules)}``: adapters built by us, with random values, for export checks."""
  key = jax.random.key(2024)
  targets = ["query", "value"]
  specs = {
      "lora": {"value": sp.peft.LoRA(3, alpha=6.0), "query": sp.peft.LoRA(2)},
      "dora_rslora": sp.peft.DoRA(rank=2, alpha=4.0, use_rslora=True),
      "shira": sp.peft.SHiRA(n_params=13, scale=2.0),
      "fourierft": {"value": sp.peft.FourierFT(n_frequency=5, scale=100.0, random_loc_seed=42),  # n_frequency_pattern
                    "query": sp.peft.FourierFT(n_frequency=9, scale=100.0, random_loc_seed=42)},
      "waveft_db2": sp.peft.WaveFT(11, wavelet="db2", boundary="zero", random_loc_seed=777),
      "waveft_haar": sp.peft.WaveFT(11, wavelet="haar", random_loc_seed=5),
      "waveft_sym4": sp.peft.WaveFT(8, wavelet="sym4", boundary="zero", random_loc_seed=1, scale=2.0),
  }
  cases = {}
  for i, (case, spec) in enumerate(specs.items()):
    adapters = _randomised(sp.peft.init_adapters(jax.random.fold_in(key, i), params, spec, targets),
                           jax.random.fold_in(key, 100 + i))
    modules = None
    if case == "lora":
      modules = {p: v + 0.1 * jax.random.normal(jax.random.fold_in(key, 7), v.shape, v.dtype)
                 for p, v in sp.peft.modules_to_save(params, ["head"]).items()}
    cases[case] = (adapters, modules)
  return cases


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def params():
  with np.load(os.path.join(FIXTURES, "base.npz")) as f:
    return nested({k: f[k] for k in f.files})


@pytest.fixture(scope="module")
def export_cases(params):
  return our_export_cases(params)


def _deltas(case_dir):
  with np.load(os.path.join(case_dir, "delta.npz")) as f:
    return {k: f[k] for k in f.files}


# -- torch's random permutation ----------------------------------------------------------------------
def test_torch_randperm_prefix_matches_committed_torch_output():
  with np.load(os.path.join(FIXTURES, "randperm.npz")) as f:
    assert len(f.files) >= 5
    for name in f.files:
      n, k, seed = (int(part[1:]) for part in name.split("_"))
      np.testing.assert_array_equal(_positions.torch_randperm_prefix(n, k, seed), f[name], err_msg=name)


def test_torch_randperm_prefix_is_a_permutation_prefix():
  full = _positions.torch_randperm_prefix(50, 50, 3)
  np.testing.assert_array_equal(np.sort(full), np.arange(50))
  np.testing.assert_array_equal(_positions.torch_randperm_prefix(50, 20, 3), full[:20])


def test_torch_randperm_prefix_refuses_what_it_cannot_reproduce():
  with pytest.raises(ValueError, match="fewer than 214748364 entries"):
    _positions.torch_randperm_prefix(16384 * 16384, 10, 777)
  with pytest.raises(ValueError, match=r"positions must be in \[1, 5\]"):
    _positions.torch_randperm_prefix(5, 6, 777)


# -- import: PEFT's Delta W ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", PEFT_CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_import_gives_peft_delta(params, case, jit):
  adapters = sp.peft.import_peft(os.path.join(FIXTURES, case), params, return_modules=case == "lora")
  if case == "lora":
    adapters, _ = adapters
  expected = _deltas(os.path.join(FIXTURES, case))
  assert sorted(adapters) == sorted(expected)
  fn = (lambda ad: sp.peft.delta_tree(params, ad))
  ours = (jax.jit(fn) if jit else fn)(adapters)
  for path, delta in expected.items():
    assert ours[path].shape == delta.shape
    assert ours[path].dtype == jnp.float32
    assert _rel(ours[path], delta) < RTOL, (case, path, _rel(ours[path], delta))


def test_import_builds_the_expected_specs(params):
  lora = sp.peft.import_peft(os.path.join(FIXTURES, "lora"), params, return_modules=True)[0]
  assert lora["layers/0/query/kernel"].method == sp.peft.LoRA(rank=2, alpha=4.0)
  assert lora["layers/1/value/kernel"].method == sp.peft.LoRA(rank=3, alpha=5.0)  # rank_pattern, alpha_pattern
  rs = sp.peft.import_peft(os.path.join(FIXTURES, "lora_rslora"), params)["layers/0/query/kernel"].method
  assert rs.use_rslora and rs.scale == pytest.approx(8.0 / 2.0)
  assert isinstance(sp.peft.import_peft(os.path.join(FIXTURES, "dora"), params)["layers/0/value/kernel"].method,
                    sp.peft.DoRA)
  wave = sp.peft.import_peft(os.path.join(FIXTURES, "waveft_db2"), params)["layers/0/value/kernel"].method
  assert (wave.wavelet, wave.boundary, wave.random_loc_seed, wave.n_params) == ("db2", "zero", 5, 20)
  noidwt = sp.peft.import_peft(os.path.join(FIXTURES, "waveft_noidwt"), params)["layers/0/value/kernel"].method
  assert isinstance(noidwt, sp.peft.SHiRA) and noidwt.scale == 25.0


@pytest.mark.parametrize("case,spec", [
    ("fourierft", sp.peft.FourierFT(n_frequency=17, random_loc_seed=777)),
    ("fourierft_seed", sp.peft.FourierFT(n_frequency=9, scale=20.0, random_loc_seed=12345)),
    ("waveft_db2", sp.peft.WaveFT(20, wavelet="db2", boundary="zero", random_loc_seed=5)),
    ("waveft_coif1", sp.peft.WaveFT(25, wavelet="coif1", boundary="zero", random_loc_seed=777)),
])
def test_random_loc_seed_specs_draw_peft_positions(params, case, spec):
  imported = sp.peft.import_peft(os.path.join(FIXTURES, case), params)
  ours = sp.peft.init_adapters(jax.random.key(0), params, spec, ["query", "value"])
  for path, adapter in imported.items():
    np.testing.assert_array_equal(ours[path].frozen["indices"], adapter.frozen["indices"])


def test_import_modules_to_save(params):
  adapters, modules = sp.peft.import_peft(os.path.join(FIXTURES, "lora"), params, return_modules=True)
  tensors = load_file(os.path.join(FIXTURES, "lora", "adapter_model.safetensors"))
  assert sorted(modules) == ["head/bias", "head/kernel"]
  np.testing.assert_array_equal(modules["head/kernel"], tensors["base_model.model.head.weight"].T)
  np.testing.assert_array_equal(modules["head/bias"], tensors["base_model.model.head.bias"])
  with pytest.warns(UserWarning, match="modules_to_save"):
    sp.peft.import_peft(os.path.join(FIXTURES, "lora"), params)
  merged = sp.peft.merge_modules(sp.peft.merge(params, adapters), modules)
  np.testing.assert_array_equal(merged["head"]["kernel"], modules["head/kernel"])


def test_import_with_name_map_rules_and_callable(params):
  linen = {"params": params}
  by_rules = sp.peft.import_peft(os.path.join(FIXTURES, "fourierft"), linen, name_map=[(r"layers\.(\d)\.(\w+)", r"params/layers/\1/\2/kernel")])
  by_fn = sp.peft.import_peft(os.path.join(FIXTURES, "fourierft"), linen,
                              name_map=lambda m: "params/" + m.replace(".", "/") + "/kernel")
  assert sorted(by_rules) == sorted(by_fn) == sorted("params/" + p for p in _deltas(os.path.join(FIXTURES, "fourierft")))
  with pytest.raises(ValueError, match="maps to path 'layers/0/query/kernel', which `params` does not have"):
    sp.peft.import_peft(os.path.join(FIXTURES, "fourierft"), linen)


def test_load_adapters_points_peft_directories_to_import_peft(params):
  with pytest.raises(ValueError, match="PEFT adapter directory: read it with sp.peft.import_peft"):
    sp.peft.load_adapters(os.path.join(FIXTURES, "lora"), params)


def test_import_errors(params, tmp_path):
  with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
    sp.peft.import_peft(str(tmp_path), params)
  (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
  (tmp_path / "adapter_model.safetensors").write_bytes(
      open(os.path.join(FIXTURES, "lora", "adapter_model.safetensors"), "rb").read())
  with pytest.raises(ValueError, match="peft_type.*got 'LOHA'"):
    sp.peft.import_peft(str(tmp_path), params)
  small = nested({"layers/0/query/kernel": np.zeros((12, 9), np.float32), "layers/0/value/kernel": np.zeros((12, 7)),
                  "layers/1/query/kernel": np.zeros((12, 10)), "layers/1/value/kernel": np.zeros((12, 7))})
  with pytest.raises(ValueError, match="lora_B.weight of module 'layers.0.query' has shape"):
    sp.peft.import_peft(os.path.join(FIXTURES, "lora"), small, return_modules=True)


# -- export: files PEFT reads ----------------------------------------------------------------------
def _effective(config: dict, module: str) -> dict:
  """Per-module hyperparameters a PEFT config gives (its patterns resolved as PEFT resolves them)."""
  kind = config["peft_type"]
  if kind == "LORA":
    return {"r": _interop._pattern_value(config.get("rank_pattern"), module, config["r"]),
            "lora_alpha": float(_interop._pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])),
            "use_rslora": config["use_rslora"], "use_dora": config["use_dora"]}
  if kind == "SHIRA":
    return {"r": config["r"]}
  style = "dotted" if kind == "FOURIERFT" else "suffix"
  out = {"n_frequency": _interop._pattern_value(config.get("n_frequency_pattern"), module, config["n_frequency"], style=style),
         "scaling": float(config["scaling"]), "random_loc_seed": config["random_loc_seed"]}
  if kind == "WAVEFT":
    out.update(wavelet_family=config["wavelet_family"], use_idwt=config["use_idwt"])
  return out


@pytest.mark.parametrize("case", [c for c in PEFT_CASES if c != "waveft_noidwt"])
def test_export_of_imported_matches_peft_files(params, case, tmp_path):
  source = os.path.join(FIXTURES, case)
  adapters, modules = sp.peft.import_peft(source, params, return_modules=True)
  config = sp.peft.export_peft(str(tmp_path), adapters, modules=modules)
  peft_config = json.load(open(os.path.join(source, "adapter_config.json")))
  written = json.load(open(tmp_path / "adapter_config.json"))
  assert written == json.loads(json.dumps(config))
  assert written["peft_type"] == peft_config["peft_type"]
  assert sorted(written["target_modules"]) == sorted({k.split(".lora_")[0].split(".shira_")[0].split(".fourierft_")[0]
                                                      .split(".waveft_")[0][len("base_model.model."):]
                                                      for k in load_file(os.path.join(source, "adapter_model.safetensors"))
                                                      if "head" not in k})
  assert (written["modules_to_save"] or None) == (peft_config["modules_to_save"] or None)
  for module in written["target_modules"]:
    assert _effective(written, module) == _effective(peft_config, module), module
  ours = load_file(str(tmp_path / "adapter_model.safetensors"))
  theirs = load_file(os.path.join(source, "adapter_model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
    np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_export_of_imported_noidwt_writes_shira_with_the_same_delta(params, tmp_path):
  adapters = sp.peft.import_peft(os.path.join(FIXTURES, "waveft_noidwt"), params)
  assert sp.peft.export_peft(str(tmp_path), adapters)["peft_type"] == "SHIRA"
  again = sp.peft.import_peft(str(tmp_path), params)
  for path, delta in _deltas(os.path.join(FIXTURES, "waveft_noidwt")).items():
    assert _rel(again[path].delta(sp.peft.leaf_paths(params)[path]), delta) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_our_export_loads_in_peft_with_our_delta(params, export_cases, case, tmp_path):
  """``export_<case>/delta.npz`` is PEFT's Delta W after loading the committed export of these adapters."""
  adapters, modules = export_cases[case]
  committed = os.path.join(FIXTURES, f"export_{case}")
  sp.peft.export_peft(str(tmp_path), adapters, modules=modules)
  ours_files = load_file(str(tmp_path / "adapter_model.safetensors"))
  committed_files = load_file(os.path.join(committed, "adapter_model.safetensors"))
  assert sorted(ours_files) == sorted(committed_files)
  for key, value in committed_files.items():
    np.testing.assert_allclose(ours_files[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
  assert json.load(open(tmp_path / "adapter_config.json")) == json.load(open(os.path.join(committed, "adapter_config.json")))
  peft_delta = _deltas(committed)
  ours = sp.peft.delta_tree(params, adapters)
  assert sorted(peft_delta) == sorted(ours)
  for path, delta in peft_delta.items():
    assert _rel(ours[path], delta) < RTOL, (case, path, _rel(ours[path], delta))
  # Round trip through our own import.
  again, again_modules = sp.peft.import_peft(str(tmp_path), params, return_modules=True)
  for path, delta in sp.peft.delta_tree(params, again).items():
    assert _rel(delta, ours[path]) < RTOL
  if modules:
    chex.assert_trees_all_close(again_modules, modules)


def test_shira_export_pads_to_peft_budget(params, export_cases, tmp_path):
  adapters, _ = export_cases["shira"]
  config = sp.peft.export_peft(str(tmp_path), adapters)
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert config["r"] == 1
  weights = tensors["base_model.model.layers.0.query.shira_weight"]
  assert weights.shape == (12 + 10,) and np.count_nonzero(weights) == 13
  assert tensors["base_model.model.layers.0.value.shira_indices"].shape == (2, 12 + 7)


def test_export_patterns_follow_peft_lookup(params, tmp_path):
  top = {"query": {"kernel": params["layers"]["0"]["query"]["kernel"]}, "value": {"kernel": params["layers"]["0"]["value"]["kernel"]},
         "other": {"kernel": params["layers"]["1"]["value"]["kernel"]}}
  specs = {"query": sp.peft.FourierFT(9, random_loc_seed=1), "value": sp.peft.FourierFT(5, random_loc_seed=1),
           "other": sp.peft.FourierFT(9, random_loc_seed=1)}
  adapters = sp.peft.init_adapters(jax.random.key(0), top, specs, "kernel")
  with pytest.raises(ValueError, match="cannot address the top-level module 'value'"):
    sp.peft.export_peft(str(tmp_path), adapters)
  nested_names = {"a.layers.0.q": 3, "b.layers.0.q": 2, "c.layers.0.q": 3}  # Same tail: PEFT cannot tell them apart.
  params2 = nested({n.replace(".", "/") + "/kernel": np.zeros((6, 5), np.float32) for n in nested_names})
  lora = sp.peft.init_adapters(jax.random.key(0), params2, {n.replace(".", "/"): sp.peft.LoRA(r) for n, r in nested_names.items()},
                               "kernel")
  config = sp.peft.export_peft(str(tmp_path), lora)  # Full names as suffix keys single them out.
  assert config["rank_pattern"] == {r"b\.layers\.0\.q": 2}
  fourier = sp.peft.init_adapters(jax.random.key(0), params2, {n.replace(".", "/"): sp.peft.FourierFT(4 + r, random_loc_seed=1)
                                                               for n, r in nested_names.items()}, "kernel")
  # FourierFT's keys must follow a dot: b's key "layers\.0\.q" also matches a and c.
  with pytest.raises(ValueError, match="cannot give module 'a.layers.0.q' its value 7"):
    sp.peft.export_peft(str(tmp_path), fourier)


def test_export_refusals(params, tmp_path):
  targets = ["query", "value"]
  key = jax.random.key(0)
  no_seed = sp.peft.init_adapters(key, params, sp.peft.FourierFT(n_frequency=5), targets)
  with pytest.raises(ValueError, match="has no `random_loc_seed`"):
    sp.peft.export_peft(str(tmp_path), no_seed)
  periodic = sp.peft.init_adapters(key, params, sp.peft.WaveFT(5, wavelet="db2", random_loc_seed=None), targets)
  with pytest.raises(ValueError, match="has no `random_loc_seed`"):
    sp.peft.export_peft(str(tmp_path), periodic)
  with pytest.raises(ValueError, match="boundary='zero'"):
    sp.peft.WaveFT(5, wavelet="db2", random_loc_seed=3)
  seeded = sp.peft.init_adapters(key, params, sp.peft.FourierFT(n_frequency=5, random_loc_seed=3), targets)
  moved = {p: sp.peft.Adapter(a.params, {"indices": (a.frozen["indices"] + 1) % 70}, a.method, a.shape, a.dtype, a.in_axes)
           for p, a in seeded.items()}
  with pytest.raises(ValueError, match="are not PEFT's for random_loc_seed=3"):
    sp.peft.export_peft(str(tmp_path), moved)
  mixed = {**sp.peft.init_adapters(key, params, sp.peft.LoRA(2), ["query"]),
           **sp.peft.init_adapters(key, params, sp.peft.SHiRA(3), ["value"])}
  with pytest.raises(ValueError, match="one `method family"):
    sp.peft.export_peft(str(tmp_path), mixed)
  seeds = {**sp.peft.init_adapters(key, params, sp.peft.FourierFT(5, random_loc_seed=1), ["query"]),
           **sp.peft.init_adapters(key, params, sp.peft.FourierFT(5, random_loc_seed=2), ["value"])}
  with pytest.raises(ValueError, match="one `random_loc_seed`"):
    sp.peft.export_peft(str(tmp_path), seeds)
  bior = sp.peft.init_adapters(key, params, sp.peft.WaveFT(5, wavelet="bior2.2", boundary="zero", random_loc_seed=1), targets)
  with pytest.raises(ValueError, match="PEFT's WaveFT does not implement"):
    sp.peft.export_peft(str(tmp_path), bior)
  lfma = sp.peft.init_adapters(key, params, sp.peft.LFMA(0.1, value_init="zeros"), ["query"])
  with pytest.raises(ValueError, match="LFMA has no PEFT counterpart"):
    sp.peft.export_peft(str(tmp_path), lfma)
  with pytest.raises(ValueError, match="does not end so"):
    sp.peft.export_peft(str(tmp_path), sp.peft.init_adapters(key, {"w": jnp.ones((4, 4))}, sp.peft.LoRA(2), "w"))


# -- WaveFT in PEFT's convention ------------------------------------------------------------------
@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym4", "coif1"])
@pytest.mark.parametrize("shape", [(12, 7), (9, 10)])
@pytest.mark.parametrize("jit", [False, True])
def test_waveft_zero_boundary_equals_pywt_zero_mode(wavelet, shape, jit):
  method = sp.peft.WaveFT(17, wavelet=wavelet, boundary="zero", scale=2.0)
  w0 = jnp.zeros(shape)
  frozen = method.init_frozen(jax.random.key(1), w0)
  values = jax.random.normal(jax.random.key(2), (17,))
  delta_fn = jax.jit(method.delta) if jit else method.delta
  got = np.asarray(delta_fn({"values": values}, w0, frozen))
  big_m, big_n = method.grid(shape)
  coeffs = np.zeros(big_m * big_n)
  coeffs[np.asarray(frozen["indices"])] = np.asarray(values, np.float64)
  coeffs = coeffs.reshape(big_m, big_n)
  hm, hn = big_m // 2, big_n // 2
  ref = pywt.waverec2((coeffs[:hm, :hn], (coeffs[hm:, :hn], coeffs[:hm, hn:], coeffs[hm:, hn:])), wavelet, mode="zero")
  np.testing.assert_allclose(got, 2.0 * ref[: shape[0], : shape[1]], rtol=1e-5, atol=1e-6)
  x = jax.random.normal(jax.random.key(3), (4, shape[0]))
  for path in ("dense", "factored") if jit else ("auto",):
    apply = dataclasses.replace(method, path=path).apply
    apply = jax.jit(apply) if jit else apply
    np.testing.assert_allclose(apply({"values": values}, x, w0, frozen), x @ got, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_waveft_zero_boundary_factored_gradients_equal_dense():
  shape = (11, 6)
  dense = sp.peft.WaveFT(12, wavelet="sym4", boundary="zero", path="dense")
  factored = dataclasses.replace(dense, path="factored")
  w0 = jax.random.normal(jax.random.key(8), shape)
  frozen = dense.init_frozen(jax.random.key(9), w0)
  values = jax.random.normal(jax.random.key(10), (12,))
  x = jax.random.normal(jax.random.key(11), (5, shape[0]))

  def loss(spec):
    return lambda v, x: jnp.sum(jnp.sin(spec.apply({"values": v}, x, w0, frozen)))

  got = jax.jit(jax.grad(loss(factored), argnums=(0, 1)))(values, x)
  want = jax.jit(jax.grad(loss(dense), argnums=(0, 1)))(values, x)
  # Both orders sum every coefficient of the (M, N) grid; the sin amplifies an output error by |y|.
  y = dense.apply({"values": values}, x, w0, frozen)
  big_m, big_n = dense.grid(shape)
  tol = float(jnp.finfo(jnp.float32).eps) * big_m * big_n * (1.0 + float(jnp.max(jnp.abs(y))))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(jnp.max(jnp.abs(w))))


def test_waveft_zero_boundary_gradient_is_the_adjoint_synthesis():
  shape, wavelet = (7, 6), "db2"
  method = sp.peft.WaveFT(10, wavelet=wavelet, boundary="zero")
  w0 = jnp.zeros(shape)
  frozen = method.init_frozen(jax.random.key(6), w0)
  cotangent = jax.random.normal(jax.random.key(7), shape)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(method.delta({"values": v}, w0, frozen) * cotangent)))(jnp.zeros(10))
  big_m, big_n = method.grid(shape)
  hm, hn = big_m // 2, big_n // 2
  expected = []
  for index in np.asarray(frozen["indices"]):  # Column i of the synthesis matrix, from PyWavelets.
    unit = np.zeros(big_m * big_n)
    unit[index] = 1.0
    unit = unit.reshape(big_m, big_n)
    column = pywt.waverec2((unit[:hm, :hn], (unit[hm:, :hn], unit[:hm, hn:], unit[hm:, hn:])), wavelet, mode="zero")
    expected.append(method.scale * np.sum(column[: shape[0], : shape[1]] * np.asarray(cotangent)))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)


def test_seeded_zero_boundary_waveft_saves_and_loads(params, export_cases, tmp_path):
  adapters, _ = export_cases["waveft_db2"]
  sp.peft.save_adapters(str(tmp_path / "ckpt"), adapters)
  loaded = sp.peft.load_adapters(str(tmp_path / "ckpt"), params)
  assert loaded["layers/0/query/kernel"].method == adapters["layers/0/query/kernel"].method
  chex.assert_trees_all_close(sp.peft.delta_tree(params, loaded), sp.peft.delta_tree(params, adapters))


def test_waveft_haar_zero_boundary_equals_periodic():
  shape = (10, 7)
  zero = sp.peft.WaveFT(9, wavelet="haar", boundary="zero")
  periodic = sp.peft.WaveFT(9, wavelet="haar")
  assert zero.grid(shape) == periodic.grid(shape)
  frozen = zero.init_frozen(jax.random.key(4), jnp.zeros(shape))
  params = {"values": jax.random.normal(jax.random.key(5), (9,))}
  np.testing.assert_allclose(zero.delta(params, jnp.zeros(shape), frozen), periodic.delta(params, jnp.zeros(shape), frozen),
                             rtol=1e-6, atol=1e-7)


def test_waveft_zero_boundary_checks():
  with pytest.raises(ValueError, match="`level` must be 1"):
    sp.peft.WaveFT(4, wavelet="db2", boundary="zero", level=2)
  with pytest.raises(ValueError, match="`boundary` must be one of"):
    sp.peft.WaveFT(4, boundary="reflect")
  assert wavelets.zero_boundary_coefficient_shape((5, 8), wavelet="db2") == (8, 10)
  with pytest.raises(ValueError, match="even sides"):
    wavelets.idwt2_zero(jnp.ones((5, 8)), "db2")


# -- PEFT habits ---------------------------------------------------------------------------------------
def test_select_paths_module_names_and_all_linear(params):
  chosen = sp.peft.select_paths(params, ["query", "value"])
  assert chosen == ["layers/0/query/kernel", "layers/0/value/kernel", "layers/1/query/kernel", "layers/1/value/kernel"]
  assert sp.peft.select_paths(params, ["layers.1.query"]) == ["layers/1/query/kernel"]
  assert sp.peft.select_paths(params, "all-linear") == chosen  # PEFT's rule: the output head is left out.
  with pytest.raises(ValueError, match="matched no parameter"):
    sp.peft.select_paths(params, ["bias"])  # Leaf names are not module names, and vectors never match.
  with pytest.raises(TypeError, match="non-empty module names"):
    sp.peft.select_paths(params, [])


@pytest.mark.slow
def test_all_linear_is_pefts_choice_on_an_attention_block():
  """Attention projections (3-D DenseGeneral kernels, in_axes by default) and the MLP; not the head."""
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x + nn.SelfAttention(num_heads=2)(nn.LayerNorm()(x))
      x = x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
      return nn.Dense(3, name="lm_head")(x)

  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  params = Block().init(jax.random.key(1), x)["params"]
  adapters = sp.peft.init_adapters(jax.random.key(2), params, sp.peft.LoRA(2), "all-linear")
  assert sorted(adapters) == ["Dense_0/kernel", "Dense_1/kernel"] + [
      f"SelfAttention_0/{n}/kernel" for n in ("key", "out", "query", "value")]
  assert adapters["SelfAttention_0/query/kernel"].matrix_shape == (8, 8)  # (embed) -> (heads, head_dim)
  assert adapters["SelfAttention_0/out/kernel"].in_axes == 2
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)
  got = sp.peft.apply_adapters(Block(), params, adapters, x)
  want = Block().apply({"params": sp.peft.merge(params, adapters)}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_use_rslora_scale():
  assert sp.peft.LoRA(4, alpha=8.0, use_rslora=True).scale == pytest.approx(4.0)
  assert sp.peft.DoRA(4, alpha=8.0).scale == pytest.approx(2.0)
  assert sp.peft.LoRA(4, use_rslora=True).scale == 1.0
  with pytest.raises(TypeError, match="use_rslora"):
    sp.peft.LoRA(4, use_rslora="yes")


def test_modules_to_save_and_trainable_summary(params):
  modules = sp.peft.modules_to_save(params, ["head"])
  assert sorted(modules) == ["head/bias", "head/kernel"]
  assert sorted(sp.peft.modules_to_save(params, r"head/bias$")) == ["head/bias"]
  adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), ["query", "value"])
  summary = sp.peft.trainable_summary(params, adapters, modules)
  base = 2 * (12 * 10 + 10 + 12 * 7 + 7) + 10 * 3 + 3
  adapter = 2 * (2 * (12 + 10) + 2 * (12 + 7))
  assert summary == (adapter + 33, adapter, 33, base, base + adapter + 33)
  assert str(summary) == (f"trainable params: {adapter + 33:,d} || all params: {base + adapter + 33:,d} || "
                          f"trainable%: {100 * (adapter + 33) / (base + adapter + 33):.4f}")
  new = {p: v + 1.0 for p, v in modules.items()}
  merged = sp.peft.merge_modules(params, new)
  np.testing.assert_array_equal(merged["head"]["bias"], params["head"]["bias"] + 1.0)
  with pytest.raises(ValueError, match="no leaf at module path"):
    sp.peft.merge_modules(params, {"nope/kernel": jnp.ones(2)})


@pytest.mark.parametrize("case", [c for c in PEFT_CASES if c != "waveft_noidwt"])
def test_from_peft_config_gives_the_imported_specs(params, case):
  directory = os.path.join(FIXTURES, case)
  choose = sp.peft.from_peft_config(directory)
  imported = sp.peft.import_peft(directory, params, return_modules=True)[0]
  ours = sp.peft.init_adapters(jax.random.key(0), params, choose, json.load(open(os.path.join(directory, "adapter_config.json")))["target_modules"])
  assert sorted(ours) == sorted(imported)
  for path, adapter in imported.items():
    spec = ours[path].method
    if hasattr(spec, "value_init"):  # Initial values are not part of a checkpoint.
      spec = dataclasses.replace(spec, value_init=adapter.method.value_init, init_std=adapter.method.init_std)
    assert spec == adapter.method, path
    if case != "shira":  # SHiRA's positions are stored in the checkpoint, not drawn from a seed.
      chex.assert_trees_all_equal(ours[path].frozen, adapter.frozen)


def test_from_peft_config_refusals():
  with pytest.raises(ValueError, match="peft_type"):
    sp.peft.from_peft_config({"peft_type": "IA3"})
  with pytest.raises(ValueError, match="proportional_parameters"):
    sp.peft.from_peft_config({"peft_type": "WAVEFT", "proportional_parameters": True})


def test_export_extra_config(params, export_cases, tmp_path):
  adapters, _ = export_cases["fourierft"]
  config = sp.peft.export_peft(str(tmp_path), adapters, extra_config={"task_type": "CAUSAL_LM", "scaling": 100.0})
  assert config["task_type"] == "CAUSAL_LM"
  with pytest.raises(ValueError, match="contradicts the adapters"):
    sp.peft.export_peft(str(tmp_path), adapters, extra_config={"scaling": 150.0})


def test_bfloat16_adapters_export_and_import(params, export_cases, tmp_path):
  adapters, _ = export_cases["lora"]
  bf16 = {p: sp.peft.Adapter(jax.tree.map(lambda v: v.astype(jnp.bfloat16), a.params), a.frozen, a.method, a.shape,
                             a.dtype, a.in_axes) for p, a in adapters.items()}
  sp.peft.export_peft(str(tmp_path), bf16)
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert tensors["base_model.model.layers.0.query.lora_A.weight"].dtype == jnp.bfloat16
  again = sp.peft.import_peft(str(tmp_path), params)
  chex.assert_trees_all_equal(again["layers/1/value/kernel"].params, bf16["layers/1/value/kernel"].params)


def test_modules_to_save_train_beside_the_adapters(params):
  import optax

  adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), ["query"])
  modules = sp.peft.modules_to_save(params, ["head"])
  x = jax.random.normal(jax.random.key(1), (4, 12))

  def loss(adapters, modules):
    p = sp.peft.merge_modules(sp.peft.merge(params, adapters), modules)
    h = x @ p["layers"]["0"]["query"]["kernel"] + p["layers"]["0"]["query"]["bias"]
    return jnp.sum((h @ p["head"]["kernel"] + p["head"]["bias"] - 1.0) ** 2)

  tx = optax.sgd(1e-2)
  state = (adapters, modules)
  opt_state = tx.init(state)
  before = loss(*state)
  for _ in range(3):
    grads = jax.grad(lambda s: loss(*s))(state)
    updates, opt_state = tx.update(grads, opt_state)
    state = optax.apply_updates(state, updates)
  assert loss(*state) < before
  assert not np.allclose(state[1]["head/kernel"], params["head"]["kernel"])
  assert not np.allclose(state[0]["layers/0/query/kernel"].params["b"], 0.0)
