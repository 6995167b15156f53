"""HuggingFace PEFT interoperability: read and write ``save_pretrained`` adapter directories.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module>.<tensor>``, ``<module>`` the dotted name of a torch module. Torch's
``Linear.weight`` is ``(out, in)``; our kernels are Flax's ``(in, out)``, so every matrix is
transposed at the boundary:

========  =====================================  ==============================================
method    PEFT tensors (torch layout)            ours (Flax layout)
========  =====================================  ==============================================
LoRA      ``lora_A.weight (r, in)``,             ``a = lora_A^T (in, r)``, ``b = lora_B^T (r, out)``,
          ``lora_B.weight (out, r)``             ``LoRA(r, alpha=lora_alpha, use_rslora=...)``
DoRA      + ``lora_magnitude_vector (out,)``     ``magnitude (out,)``, ``DoRA(...)``
SHiRA     ``shira_weight (p,)``,                 ``values (p,)`` at flat ``c * out + r``
          ``shira_indices (2, p)`` = ``(r, c)``
FourierFT ``fourierft_spectrum (p,)``            ``values`` at PEFT's frequencies, transposed
WaveFT    ``waveft_spectrum (p,)``               ``values`` at PEFT's positions, ``boundary="zero"``
========  =====================================  ==============================================

FourierFT and WaveFT store no positions: PEFT draws them again when it loads, as the first ``p``
entries of ``torch.randperm(out * in, generator=torch.Generator().manual_seed(random_loc_seed))``
(one seed for every layer). :func:`torch_randperm_prefix` reproduces that draw exactly in numpy
(torch's CPU generator is MT19937, and its ``randperm`` a forward Fisher-Yates shuffle drawing
``random() % (n - i)``), so imported positions are PEFT's. Our own adapters export only when their
positions are PEFT's: build them with ``FourierFT(..., random_loc_seed=s)`` or
``WaveFT(..., boundary="zero", random_loc_seed=s)``; other positions are refused with an error.

Module names and paths. ``name_map`` links PEFT module names and our ``'/'``-joined leaf paths
(:func:`sp.peft.leaf_paths`). For :func:`import_peft` it maps a module name to a kernel path, for
:func:`export_peft` a kernel path to a module name. It is ``None`` (default: ``"encoder.layer.0.query"``
<-> ``"encoder/layer/0/query/kernel"``), a callable, or a sequence of ``(regex, replacement)`` rules:
the first regex that ``re.fullmatch``-es the name gives ``match.expand(replacement)``; a name no rule
matches falls back to the default.

References:
  Mangrulkar et al., "PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods" (HuggingFace,
  2022-), ``peft.tuners.{lora,shira,fourierft,waveft}`` (version 0.21).
  Matsumoto and Nishimura, "Mersenne Twister" (1998) (torch's CPU generator).
"""

from __future__ import annotations

import collections
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft.peft._methods.lowrank import DoRA, LoRA
from spectral_peft.peft._methods.positions import peft_positions, torch_randperm_prefix
from spectral_peft.peft._methods.base import Adapter, matrix_shape
from spectral_peft.peft._methods.spectral import FourierFT, SHiRA, WaveFT, pywt_haar
from spectral_peft.peft._tree import Adapters, PyTree, _resolve_in_axes, count_parameters, leaf_paths, path_to_str

NameMap = Union[None, Callable[[str], str], Sequence[tuple[str, str]]]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# The wavelets PEFT's WaveFT implements (peft/tuners/waveft/wavelet.py in PEFT 0.21).
_PEFT_WAVELETS = frozenset(["haar"] + [f"db{i}" for i in range(1, 11)] + [f"sym{i}" for i in range(2, 11)]
                           + [f"coif{i}" for i in range(1, 6)])

# Config fields export_peft writes that extra_config may change (they do not change Delta W).
_FREE_FIELDS = frozenset({"base_model_name_or_path", "task_type", "inference_mode", "revision", "lora_dropout",
                          "init_lora_weights", "init_weights", "mask_type", "random_seed"})

# Recorded in the safetensors header of our exports: the digest of the config fields that change
# Delta W (all but _FREE_FIELDS), so an import can tell weights from one export beside the config of
# another (an overwrite killed between its two file replacements, or a file copied in by hand).
CONFIG_DIGEST_KEY = "spectral_peft_config_sha256"


def _config_digest(config: Mapping[str, Any]) -> str:
  fields = {k: v for k, v in config.items() if k not in _FREE_FIELDS}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


_ADAPTER_SUFFIXES = {
    "LORA": (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"),
    "SHIRA": (".shira_weight", ".shira_indices"),
    "FOURIERFT": (".fourierft_spectrum",),
    "WAVEFT": (".waveft_spectrum",),
}


# -- names -------------------------------------------------------------------------------------
def _apply_name_map(name: str, name_map: NameMap, default: Callable[[str], str], what: str) -> str:
  if name_map is None:
    return default(name)
  if callable(name_map):
    out = name_map(name)
    if not isinstance(out, str):
      raise TypeError(f"`name_map` must return a str for {what} {name!r}, got {out!r}.")
    return out
  if isinstance(name_map, (list, tuple)):
    for rule in name_map:
      if not (isinstance(rule, (list, tuple)) and len(rule) == 2):
        raise TypeError(f"`name_map` rules must be (regex, replacement) pairs, got {rule!r}.")
      match = re.fullmatch(rule[0], name)
      if match:
        return match.expand(rule[1])
    return default(name)
  raise TypeError(f"`name_map` must be None, a callable or a sequence of (regex, replacement) pairs, got {type(name_map).__name__}.")


def _default_path(module: str) -> str:
  return module.replace(".", "/") + "/kernel"


def _default_module(path: str) -> str:
  if not path.endswith("/kernel"):
    raise ValueError(
        f"The default `name_map` turns a path ending in '/kernel' into a PEFT module name; {path!r} does not end "
        "so: pass `name_map` (a callable path -> module name, or (regex, replacement) rules)."
    )
  return path[: -len("/kernel")].replace("/", ".")


def _pattern_value(patterns: Optional[Mapping[str, Any]], module: str, default: Any, *, style: str = "suffix") -> Any:
  """PEFT's lookup of a ``*_pattern`` dict: the value of the first key that matches ``module``.

  ``style="suffix"`` (LoRA's ``rank_pattern``/``alpha_pattern``, WaveFT's ``n_frequency_pattern``):
  ``re.match(rf"(.*\\.)?({key})$", module)``; ``style="dotted"`` (FourierFT's ``n_frequency_pattern``):
  ``re.match(rf".*\\.{key}$", module)``, which never matches a module name without a dot.
  """
  for key, value in (patterns or {}).items():
    regex = rf"(.*\.)?({key})$" if style == "suffix" else rf".*\.{key}$"
    if re.match(regex, module):
      return value
  return default


def _patterns(name: str, values: Mapping[str, Any], names: Mapping[str, str], default: Any, style: str) -> dict[str, Any]:
  """A PEFT ``*_pattern`` dict giving each module its value, checked against PEFT's own lookup."""
  out: dict[str, Any] = {}
  for path, value in values.items():
    if value == default:
      continue
    module = names[path]
    if style == "suffix":
      out[re.escape(module)] = value
    elif "." in module:
      out[re.escape(module.split(".", 1)[1])] = value
    else:
      raise ValueError(
          f"PEFT's FourierFT `n_frequency_pattern` cannot address the top-level module {module!r} (its keys must "
          f"follow a dot); give it the most common n_frequency ({default}) or rename the module."
      )
  for path, value in values.items():
    got = _pattern_value(out, names[path], default, style=style)
    if got != value:
      raise ValueError(
          f"PEFT's `{name}` cannot give module {names[path]!r} its value {value} apart from the other modules "
          f"(PEFT's lookup gives {got}); give these layers the same {name.replace('_pattern', '')}."
      )
  return out


# -- import ------------------------------------------------------------------------------------
def _not_an_adapter_directory(directory: Any, missing: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"`path` {os.fspath(directory)!r} is not a PEFT adapter directory: {missing} is missing "
      "(PEFT's save_pretrained writes adapter_config.json and adapter_model.safetensors; .bin files are not read).")


def _read_config(directory: Any) -> dict[str, Any]:
  """The JSON object in ``directory/adapter_config.json``; errors name the file and what is wrong."""
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"`path` must be a directory path (str or os.PathLike), got {type(directory).__name__}.")
  config_file = os.path.join(os.fspath(directory), CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise _not_an_adapter_directory(directory, CONFIG_NAME)
  try:
    with open(config_file, "rb") as f:
      text = f.read().decode("utf-8")
    config = json.loads(text)
  except (UnicodeDecodeError, ValueError) as err:
    raise ValueError(
        f"{config_file!r} is not valid JSON ({type(err).__name__}: {err}); the file is truncated or corrupt. "
        "Write it again with PEFT's save_pretrained or sp.peft.export_peft."
    ) from None
  if not isinstance(config, dict):
    raise ValueError(f"{config_file!r} must hold a JSON object (PEFT's config fields), got a {type(config).__name__}.")
  return config


def _read(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  import ml_dtypes  # noqa: F401  Registers bfloat16 with numpy, so BF16 tensors load (JAX imports it anyway).
  from safetensors import safe_open
  from safetensors.numpy import load_file

  config = _read_config(directory)
  weights_file = os.path.join(os.fspath(directory), WEIGHTS_NAME)
  if not os.path.isfile(weights_file):
    raise _not_an_adapter_directory(directory, WEIGHTS_NAME)
  try:
    tensors = load_file(weights_file)
    with safe_open(weights_file, framework="numpy") as f:
      header = f.metadata() or {}
  except Exception as err:  # safetensors raises SafetensorError (and others) for damaged files.
    text = str(err).strip().splitlines()
    raise ValueError(
        f"{weights_file!r} is not a readable safetensors file ({type(err).__name__}: {text[0] if text else ''}); "
        "the file is truncated or corrupt."
    ) from None
  recorded = header.get(CONFIG_DIGEST_KEY)
  if recorded is not None and recorded != _config_digest(config):
    raise ValueError(
        f"`path` {os.fspath(directory)!r} mixes two exports: {WEIGHTS_NAME} was written with another "
        f"{CONFIG_NAME} than the one beside it (they differ in a field that changes the update; fields that "
        f"do not, such as {', '.join(sorted(_FREE_FIELDS)[:3])}, may be edited freely). An overwrite was "
        "interrupted between its two file replacements, or one file was copied in by hand: export again.")
  return config, tensors


# -- config checks shared by import_peft and from_peft_config -------------------------------------
# Fields PEFT LoRA configs may set that change the model in ways these adapters do not represent.
_LORA_UNSUPPORTED = ("lora_bias", "use_qalora", "layer_replication", "target_parameters", "trainable_token_indices")
# init_lora_weights values whose saved adapter belongs to a *modified* base model (PiSSA, OLoRA,
# CorDA and LoftQ subtract or quantise the base weights).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_MAX_INT = 2**31 - 1


def _config_int(config: Mapping[str, Any], field: str, default: int, where: str, *, minimum: int = 1) -> int:
  value = config.get(field, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_INT:
    raise ValueError(f"{where}: `{field}` must be an int in [{minimum}, {_MAX_INT}], got {value!r}.")
  return value


def _config_float(config: Mapping[str, Any], field: str, default: float, where: str) -> float:
  value = config.get(field, default)
  if value is None:
    value = default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{where}: `{field}` must be a finite number, got {value!r}.")
  return float(value)


def _config_bool(config: Mapping[str, Any], field: str, default: bool, where: str) -> bool:
  value = config.get(field, default)
  if value is None:
    value = default
  if not isinstance(value, bool):
    raise ValueError(f"{where}: `{field}` must be true or false, got {value!r}.")
  return value


def _config_pattern(config: Mapping[str, Any], field: str, where: str, kind: str) -> dict[str, Any]:
  patterns = config.get(field) or {}
  if not isinstance(patterns, Mapping):
    raise ValueError(f"{where}: `{field}` must be a {{module regex: value}} object, got {patterns!r}.")
  for key, value in patterns.items():
    ok = (isinstance(value, int) and 1 <= value <= _MAX_INT) if kind == "int" else (
        isinstance(value, (int, float)) and math.isfinite(value))
    if isinstance(value, bool) or not ok:
      expected = f"an int in [1, {_MAX_INT}]" if kind == "int" else "a finite number"
      raise ValueError(f"{where}: `{field}[{key!r}]` must be {expected}, got {value!r}.")
    try:
      re.compile(key)
    except re.error as err:
      raise ValueError(f"{where}: `{field}` key {key!r} is not a valid regular expression ({err}).") from None
  return dict(patterns)


def _check_config(config: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
  """Checks the fields of a PEFT config that this module reads: ``(peft_type, config)``.

  The returned copy has PEFT's default in place of every checked field that is absent or null.

  The same checks guard :func:`import_peft` and :func:`from_peft_config`, so a config one refuses
  the other refuses too. ``where`` names the config in messages (its file or "`config`").
  """
  peft_type = config.get("peft_type")
  if peft_type not in _ADAPTER_SUFFIXES:
    raise ValueError(f"{where}: `peft_type` must be one of {sorted(_ADAPTER_SUFFIXES)}, got {peft_type!r}.")
  bias = config.get("bias", "none")
  if bias not in (None, "none"):
    raise ValueError(
        f"{where}: `bias` = {bias!r} trains the biases of the base model, which sp.peft adapters do not; only "
        "bias='none' is supported (train biases beside the adapters with sp.peft.modules_to_save)."
    )
  config = dict(config)
  fan_in_fan_out = config["fan_in_fan_out"] = _config_bool(config, "fan_in_fan_out", False, where)
  if peft_type == "LORA":
    for field in _LORA_UNSUPPORTED:
      value = config.get(field)
      if value not in (None, False, [], {}):
        raise ValueError(f"{where}: PEFT LoRA `{field}` = {value!r} is not supported by sp.peft.")
    config["r"] = _config_int(config, "r", 8, where)
    config["lora_alpha"] = _config_float(config, "lora_alpha", 8, where)
    config["rank_pattern"] = _config_pattern(config, "rank_pattern", where, "int")
    config["alpha_pattern"] = _config_pattern(config, "alpha_pattern", where, "float")
    config["use_rslora"] = _config_bool(config, "use_rslora", False, where)
    config["use_dora"] = _config_bool(config, "use_dora", False, where)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
      raise ValueError(
          f"{where}: `init_lora_weights` = {init!r} belongs to a modified base model ({init} changes the base "
          "weights), so these adapters do not apply to the original weights. Convert it to plain LoRA with PEFT "
          "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) first."
      )
  elif peft_type == "SHIRA":
    if fan_in_fan_out:
      raise ValueError(f"{where}: PEFT's SHiRA adapts torch Linear layers only; `fan_in_fan_out` = true is not one.")
    config["r"] = _config_int(config, "r", 32, where)
  else:
    config["n_frequency"] = _config_int(config, "n_frequency", 1000 if peft_type == "FOURIERFT" else 2592, where)
    config["n_frequency_pattern"] = _config_pattern(config, "n_frequency_pattern", where, "int")
    config["scaling"] = _config_float(config, "scaling", 150.0 if peft_type == "FOURIERFT" else 25.0, where)
    seed = config.get("random_loc_seed", 777)
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise ValueError(f"{where}: `random_loc_seed` must be an int, got {seed!r}.")
    config["random_loc_seed"] = seed
    if peft_type == "WAVEFT":
      wavelet = config.get("wavelet_family", "db1")
      if wavelet not in _PEFT_WAVELETS:
        raise ValueError(f"{where}: `wavelet_family` must be one of PEFT's wavelets {sorted(_PEFT_WAVELETS)}, got {wavelet!r}.")
      config["use_idwt"] = _config_bool(config, "use_idwt", True, where)
      config["proportional_parameters"] = _config_bool(config, "proportional_parameters", False, where)
  return peft_type, config


def _group(tensors: Mapping[str, np.ndarray], peft_type: str, prefix: str, modules_to_save: Sequence[str]):
  """``({module: {suffix: tensor}}, {module_to_save key: tensor})``."""
  suffixes = _ADAPTER_SUFFIXES[peft_type]
  grouped: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  extra: dict[str, np.ndarray] = {}
  for key, value in tensors.items():
    name = key[len(prefix):] if key.startswith(prefix) else key
    suffix = next((s for s in suffixes if name.endswith(s)), None)
    if suffix is not None:
      grouped[name[: -len(suffix)]][suffix] = value
      continue
    if any(name == m or name.startswith(m + ".") or f".{m}." in f".{name}" for m in modules_to_save):
      extra[name] = value
      continue
    raise ValueError(
        f"Unsupported tensor {key!r} in the {peft_type} checkpoint: expected keys ending in {suffixes} "
        f"(or the weights of `modules_to_save` {list(modules_to_save)}). LoRA on embeddings or convolutions, "
        "lora_bias and other PEFT extensions are not supported."
    )
  return dict(grouped), extra


def _target(params_paths, module, name_map, in_axes, layout="in_out"):
  path = _apply_name_map(module, name_map, _default_path, "module")
  if path not in params_paths:
    from spectral_peft.peft._tree import _available_paths

    raise ValueError(
        f"PEFT module {module!r} maps to path {path!r}, which `params` does not have. Pass `name_map` "
        f"(module name -> path). Available paths: {_available_paths(params_paths)}."
    )
  leaf = params_paths[path]
  shape = tuple(int(d) for d in np.shape(leaf))
  axes = _resolve_in_axes(in_axes, path, shape)
  return path, leaf, shape, axes, Adapter({}, {}, None, shape, jnp.dtype(leaf.dtype).name, axes, layout).matrix_shape


def _check_tensor(module: str, what: str, array: np.ndarray, expected: tuple[int, ...], mshape: tuple[int, int]) -> None:
  if tuple(array.shape) != tuple(expected):
    hint = ""
    if len(expected) == 2 and mshape[0] != mshape[1] and set(array.shape) <= set(expected) | set(mshape):
      hint = (" If `params` holds torch-layout (out, in) weights, pass layout='out_in'; Flax kernels are (in, out) "
              "(layout='in_out', the default).")
    raise ValueError(
        f"PEFT tensor {what} of module {module!r} has shape {tuple(array.shape)}, but the target kernel of matrix "
        f"shape (in, out) = {tuple(mshape)} needs {tuple(expected)} (torch's (out, in) layout).{hint}"
    )


def _sorted(flat: np.ndarray, values: np.ndarray) -> tuple[jax.Array, jax.Array]:
  order = np.argsort(flat, kind="stable")
  return jnp.asarray(flat[order], jnp.int32), jnp.asarray(values[order])


def _import_layer(peft_type, config, module, tensors, leaf, shape, axes, mshape, layout, where):
  m, n = mshape
  dtype = jnp.dtype(leaf.dtype).name
  shell = Adapter({}, {}, None, shape, dtype, axes, layout)
  if peft_type == "LORA":
    for suffix in (".lora_A.weight", ".lora_B.weight"):
      if suffix not in tensors:
        raise ValueError(f"PEFT LoRA module {module!r} has no {suffix[1:]} tensor.")
    lora_a, lora_b = tensors[".lora_A.weight"], tensors[".lora_B.weight"]
    if lora_a.ndim != 2:
      raise ValueError(f"PEFT LoRA module {module!r}: lora_A must be a Linear (r, in) matrix, got shape {lora_a.shape}.")
    r = lora_a.shape[0]
    config_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    if r != config_r:
      raise ValueError(
          f"{where}: module {module!r} has rank {config_r} by the config (`r`/`rank_pattern`), but its lora_A.weight "
          f"has shape {tuple(lora_a.shape)} (rank {r}); PEFT refuses such a checkpoint, and so does import_peft."
      )
    _check_tensor(module, "lora_A.weight", lora_a, (r, m), mshape)
    _check_tensor(module, "lora_B.weight", lora_b, (n, r), mshape)
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    use_dora = bool(config.get("use_dora", False))
    if use_dora != (".lora_magnitude_vector" in tensors):
      raise ValueError(f"PEFT module {module!r}: use_dora={use_dora} but lora_magnitude_vector is {'absent' if use_dora else 'present'}.")
    cls = DoRA if use_dora else LoRA
    spec = cls(rank=r, alpha=alpha, use_rslora=bool(config.get("use_rslora", False)))
    params = {"a": jnp.asarray(lora_a.T), "b": jnp.asarray(lora_b.T)}
    if use_dora:
      magnitude = tensors[".lora_magnitude_vector"]
      _check_tensor(module, "lora_magnitude_vector", magnitude, (n,), mshape)
      params["magnitude"] = jnp.asarray(magnitude)
    frozen = spec.init_frozen(jax.random.key(0), shell.to_matrix(jnp.asarray(leaf)))
    return Adapter(params, frozen, spec, shape, dtype, axes, layout)
  if peft_type == "SHIRA":
    weight, indices = tensors.get(".shira_weight"), tensors.get(".shira_indices")
    if weight is None or indices is None:
      raise ValueError(f"PEFT SHiRA module {module!r} needs shira_weight and shira_indices tensors.")
    if indices.ndim != 2 or indices.shape[0] != 2 or weight.shape != (indices.shape[1],):
      raise ValueError(f"PEFT SHiRA module {module!r}: shira_indices must be (2, p) and shira_weight (p,), got {indices.shape}, {weight.shape}.")
    budget = _config_int(config, "r", 32, where) * (m + n)
    if weight.shape[0] != budget:
      raise ValueError(
          f"{where}: SHiRA module {module!r} holds {weight.shape[0]} weights, but the config's r = {config.get('r', 32)} "
          f"gives r * (in + out) = {budget} for its ({n}, {m}) torch weight; PEFT refuses such a checkpoint."
      )
    if not np.all(np.isfinite(indices)) or not np.all(indices == np.round(indices)):
      raise ValueError(f"{where}: SHiRA module {module!r} has shira_indices that are not whole numbers.")
    rows_t, cols_t = indices.astype(np.int64)  # Saved as float32 on Windows; integers otherwise.
    if rows_t.min(initial=0) < 0 or rows_t.max(initial=0) >= n or cols_t.min(initial=0) < 0 or cols_t.max(initial=0) >= m:
      raise ValueError(f"PEFT SHiRA module {module!r}: shira_indices fall outside the ({n}, {m}) torch weight.")
    flat, values = _sorted(cols_t * n + rows_t, weight)
    spec = SHiRA(n_params=int(weight.shape[0]))
    return Adapter({"values": values}, {"indices": flat}, spec, shape, dtype, axes, layout)
  # FourierFT / WaveFT: positions regenerated from the seed, as PEFT does.
  key = ".fourierft_spectrum" if peft_type == "FOURIERFT" else ".waveft_spectrum"
  spectrum = tensors[key]
  if spectrum.ndim != 1:
    raise ValueError(f"PEFT module {module!r}: {key[1:]} must be (n_frequency,), got {spectrum.shape}.")
  p = int(spectrum.shape[0])
  if not (peft_type == "WAVEFT" and config.get("proportional_parameters")):
    default = config.get("n_frequency", 1000 if peft_type == "FOURIERFT" else 2592)
    style = "dotted" if peft_type == "FOURIERFT" else "suffix"
    expected_p = _pattern_value(config.get("n_frequency_pattern"), module, default, style=style)
    if p != expected_p:
      raise ValueError(
          f"{where}: module {module!r} has n_frequency {expected_p} by the config (`n_frequency`/"
          f"`n_frequency_pattern`), but its {key[1:]} holds {p} values; PEFT refuses such a checkpoint."
      )
  if p > m * n:
    raise ValueError(f"PEFT module {module!r}: {p} frequencies for a weight of only {m * n} entries.")
  seed = config.get("random_loc_seed")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"PEFT config `random_loc_seed` must be an int, got {seed!r}.")
  scaling = float(config.get("scaling", 150.0 if peft_type == "FOURIERFT" else 25.0))
  if peft_type == "FOURIERFT":
    spec = FourierFT(n_frequency=p, scale=scaling, random_loc_seed=seed)
    flat = peft_positions("fourierft", (m, n), p, seed)
  elif not config.get("use_idwt", True):
    perm = torch_randperm_prefix(m * n, p, seed)
    spec = SHiRA(n_params=p, scale=scaling)
    flat = (perm % m) * n + perm // m
  else:
    spec = WaveFT(n_params=p, scale=scaling, wavelet=str(config.get("wavelet_family", "db1")), level=1,
                  boundary="zero", random_loc_seed=seed)
    flat = peft_positions("waveft", (m, n), p, seed, spec.grid((m, n)))
  flat, values = _sorted(flat, spectrum)
  return Adapter({"values": values}, {"indices": flat}, spec, shape, dtype, axes, layout)


def import_peft(
    path: str,
    params: PyTree,
    *,
    name_map: NameMap = None,
    in_axes: Any = None,
    layout: str = "in_out",
    prefix: str = PEFT_PREFIX,
    return_modules: bool = False,
) -> Union[Adapters, tuple[Adapters, dict[str, jax.Array]]]:
  """Loads a PEFT ``save_pretrained`` directory as our adapters on ``params``.

  Supports PEFT's LoRA (with ``use_dora``, ``use_rslora``, ``rank_pattern``, ``alpha_pattern``),
  SHiRA, FourierFT and WaveFT (``use_idwt=False`` loads as :class:`SHiRA`) on ``Linear`` layers, and
  on GPT-2 ``Conv1D`` layers (``fan_in_fan_out=true``: PEFT's update of a Conv1D weight ``(in, out)``
  is the transpose of its ``(out, in)`` delta, which is exactly what the ``(in, out)`` kernel receives).
  ``merge(params, import_peft(...))`` then holds PEFT's merged weights (in the layout of ``params``);
  FourierFT/WaveFT positions are PEFT's, redrawn from ``random_loc_seed`` exactly.

  The config is checked as PEFT checks it when it loads: ``r`` (and ``rank_pattern``) must be the
  rank of the LoRA tensors, ``r * (in + out)`` the number of SHiRA weights, ``n_frequency`` (and its
  pattern) the length of each FourierFT/WaveFT spectrum; numbers must be finite and in range.

  Args:
    path: the directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    params: our base parameters (the torch model's weights in the Flax layout); used for shapes,
      dtypes and DoRA's reference norms.
    name_map: PEFT module name -> our kernel path (see the module docstring); default
      ``"a.b.query"`` -> ``"a/b/query/kernel"``. For Linen's ``{"params": ...}`` dicts pass e.g.
      ``lambda m: "params/" + m.replace(".", "/") + "/kernel"``.
    in_axes: reshape rule for kernels with more than 2 axes, as in :func:`sp.peft.init_adapters`.
    layout: how ``params`` store each weight: ``"in_out"`` (default: Flax kernels ``(in, out)``, and
      GPT-2 ``Conv1D`` weights) or ``"out_in"`` (torch ``Linear`` weights ``(out, in)`` kept as they
      are). A square weight cannot tell the two apart, so pass the layout your ``params`` use; the
      adapters record it (``Adapter.layout``) and ``merge`` updates ``params`` in that layout.
    prefix: the key prefix PEFT writes (``"base_model.model."``), stripped from every key.
    return_modules: also return the ``modules_to_save`` weights (see :func:`modules_to_save`).

  Returns:
    ``{path: Adapter}``, or ``(adapters, modules)`` with ``return_modules=True``, ``modules`` a
    ``{path: array}`` dict in our layout (``weight`` of a 2-D module -> ``kernel`` transposed, or
    ``embedding``/``scale`` when ``params`` has that leaf instead; ``bias`` unchanged).

  Raises:
    FileNotFoundError: not a PEFT adapter directory.
    TypeError: ``path`` is not a str or os.PathLike.
    ValueError: a truncated or corrupt ``adapter_config.json`` / ``adapter_model.safetensors`` (the
      message names the file), an unsupported PEFT type or option (``bias`` other than ``"none"``,
      ``lora_bias``, PiSSA/OLoRA/CorDA/LoftQ initialisation...), a config that disagrees with its
      tensors (``r``, ``n_frequency``), a ``layout`` other than ``"in_out"``/``"out_in"``, a module with
      no matching path, tensor shapes that do not fit the kernel, or a weight too large for an exact
      FourierFT/WaveFT position draw.

  Example:
    >>> import spectral_peft as sp  # doctest: +SKIP
    >>> adapters = sp.peft.import_peft("my_peft_adapter", params)  # doctest: +SKIP
    >>> merged = sp.peft.merge(params, adapters)  # doctest: +SKIP
  """
  if layout not in ("in_out", "out_in"):
    raise ValueError(f"`layout` must be 'in_out' (Flax kernels, (in, out)) or 'out_in' (torch Linear weights, "
                     f"(out, in)), got {layout!r}.")
  config, tensors = _read(path)
  where = repr(os.path.join(os.fspath(path), CONFIG_NAME))
  peft_type, config = _check_config(config, where)
  saved = config.get("modules_to_save") or []
  if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
    raise ValueError(f"{where}: `modules_to_save` must be a list of module names, got {saved!r}.")
  grouped, extra = _group(tensors, peft_type, prefix, saved)
  if not grouped:
    raise ValueError(f"The checkpoint in {str(path)!r} holds no {peft_type} tensors.")
  paths = leaf_paths(params)
  adapters: Adapters = {}
  for module in sorted(grouped):
    target, leaf, shape, axes, mshape = _target(paths, module, name_map, in_axes, layout)
    if target in adapters:
      raise ValueError(f"`name_map` maps several PEFT modules to the path {target!r} (one of them is {module!r}).")
    adapters[target] = _import_layer(peft_type, config, module, grouped[module], leaf, shape, axes, mshape, layout,
                                     where)
  modules = _import_modules(extra, paths, name_map, layout)
  if return_modules:
    return adapters, modules
  if modules:
    warnings.warn(
        f"The PEFT checkpoint also holds modules_to_save {saved}; they are not returned. Pass "
        "`return_modules=True` to get them.", stacklevel=2)
  return adapters


def _module_prefix(module: str, name_map: NameMap) -> str:
  """Our path prefix of a torch module: the kernel path ``name_map`` gives, without its last step."""
  return _apply_name_map(module, name_map, _default_path, "module").rsplit("/", 1)[0]


def _import_modules(extra: Mapping[str, np.ndarray], paths: Mapping[str, Any], name_map: NameMap,
                    layout: str = "in_out") -> dict[str, jax.Array]:
  modules: dict[str, jax.Array] = {}
  for key, value in extra.items():
    module, leaf_name = key.rsplit(".", 1)
    base = _module_prefix(module, name_map)
    if leaf_name == "weight":
      candidates = [(f"{base}/kernel", layout == "in_out"), (f"{base}/embedding", False), (f"{base}/scale", False)]
    else:
      candidates = [(f"{base}/{leaf_name}", False)]
    for target, transpose in candidates:
      if target in paths:
        array = value.T if transpose and value.ndim == 2 else value
        if tuple(array.shape) != tuple(np.shape(paths[target])):
          raise ValueError(f"PEFT module-to-save tensor {key!r} has shape {value.shape}; {target!r} has {np.shape(paths[target])}.")
        modules[target] = jnp.asarray(array)
        break
    else:
      raise ValueError(f"PEFT module-to-save tensor {key!r} has no leaf in `params` (tried {[c for c, _ in candidates]}).")
  return modules


# -- export ------------------------------------------------------------------------------------
def _family(method: Any) -> str:
  if isinstance(method, (LoRA, DoRA)):
    return "LORA"
  if isinstance(method, SHiRA):
    return "SHIRA"
  if isinstance(method, FourierFT):
    return "FOURIERFT"
  if isinstance(method, WaveFT):
    return "WAVEFT"
  raise ValueError(
      f"{type(method).__name__} has no PEFT counterpart that sp.peft.export_peft writes; exportable: LoRA, "
      "DoRA, SHiRA, FourierFT and WaveFT (zero boundary or haar at level 1, with random_loc_seed)."
  )


def _common(values: Sequence[Any]) -> Any:
  return collections.Counter(values).most_common(1)[0][0]


def _uniform(name: str, values: Mapping[str, Any]) -> Any:
  distinct = sorted(set(values.values()), key=repr)
  if len(distinct) != 1:
    raise ValueError(f"PEFT stores one `{name}` for every layer, but the adapters use {distinct}.")
  return distinct[0]


def _np(x: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def _export_sparse_values(path: str, adapter: Adapter, expected: np.ndarray) -> np.ndarray:
  """``values`` in PEFT's order, given PEFT's flat positions ``expected`` (refuses other positions)."""
  indices = _np(adapter.frozen["indices"]).astype(np.int64)
  values = _np(adapter.params["values"])
  order = np.argsort(indices, kind="stable")
  sorted_indices = indices[order]
  where = np.searchsorted(sorted_indices, expected)
  where = np.minimum(where, len(sorted_indices) - 1)
  if len(indices) != len(expected) or not np.array_equal(sorted_indices[where], expected):
    raise ValueError(
        f"The positions of adapter {path!r} are not PEFT's for random_loc_seed={adapter.method.random_loc_seed}; "
        "PEFT redraws them from the seed when it loads, so they cannot be exported. Build the adapter with "
        "this `random_loc_seed` in the spec (sp.peft.init_adapters then uses PEFT's positions)."
    )
  return values[order][where]


def export_peft(
    path: str,
    adapters: Adapters,
    *,
    name_map: NameMap = None,
    modules: Optional[Mapping[str, Any]] = None,
    base_model_name_or_path: Optional[str] = None,
    extra_config: Optional[Mapping[str, Any]] = None,
    prefix: str = PEFT_PREFIX,
    overwrite: bool = False,
) -> dict[str, Any]:
  """Writes ``adapters`` as a PEFT adapter directory that ``PeftModel.from_pretrained`` loads.

  Safe to point at any directory: everything is computed and serialised in memory first, then
  written into a fresh private directory that this call creates beside ``path`` and moved into
  place with ``rename(2)``; links planted at ``path`` or at its file names are never followed
  (a link named ``adapter_config.json`` is replaced, not written through), and nothing but the two
  files PEFT reads is ever replaced or removed. An existing export is replaced only with
  ``overwrite=True``, and a failed export (a bad ``extra_config``, a refused adapter, a full disk)
  leaves the previous one as it was. Replacing an export swaps two files (the weights, then the
  config); the weights' safetensors header records the digest of the config fields that change
  Delta W, so a process killed between the two swaps leaves a directory that :func:`import_peft`
  refuses ("mixes two exports") instead of loading the new weights under the old config.

  The torch model must have ``Linear`` layers at the mapped module names with
  ``weight = kernel.T`` (``(out, in)``); PEFT's merged weight (or ``get_delta_weight``) then equals
  ours transposed. One PEFT config covers all adapters, so they must share one method family and
  its PEFT-global hyperparameters (``use_rslora``/``use_dora``; ``scale``, ``wavelet`` and
  ``random_loc_seed`` for FourierFT/WaveFT); per-layer ranks, alphas and budgets are written as
  ``rank_pattern``, ``alpha_pattern`` and ``n_frequency_pattern`` keyed by escaped module names.

  * LoRA/DoRA: ``lora_alpha`` is our ``alpha``, or ``r`` (``sqrt(r)`` with ``use_rslora``) for
    ``alpha=None`` (scale 1).
  * SHiRA: PEFT sizes a layer as ``r * (in + out)`` weights for one ``r``; with
    ``r = max ceil(p / (in + out))`` over the layers, each layer is padded with zero weights at unused
    positions (the same ``Delta W``), and our ``scale`` is folded into the weights.
  * FourierFT/WaveFT: positions must be PEFT's (``random_loc_seed`` set in the spec); WaveFT must be
    PEFT's function (``boundary="zero"``, or ``"haar"`` at level 1, written as ``"db1"``).

  Args:
    path: output directory: created if missing; an existing directory may hold other files (they are
      kept), but not ``adapter_config.json``/``adapter_model.safetensors`` unless ``overwrite``.
    adapters: ``{path: Adapter}``, one weight per adapter (``stack_axes=0``: for ``nn.scan``-stacked
      kernels export ``adapter.unstacked(i)`` per layer under per-layer paths).
    name_map: our kernel path -> PEFT module name (see the module docstring); default
      ``"a/b/query/kernel"`` -> ``"a.b.query"``.
    modules: optional ``modules_to_save`` weights ``{path: array}`` (:func:`modules_to_save`),
      written as ``<module>.weight`` (a ``kernel`` transposed, ``embedding``/``scale`` as is) and
      ``<module>.bias``, and listed in the config's ``modules_to_save``.
    base_model_name_or_path: recorded in the config.
    extra_config: more PEFT config fields, by PEFT's names (``{"task_type": "CAUSAL_LM",
      "lora_dropout": 0.05}``); a field that fixes ``Delta W`` (``r``, ``lora_alpha``, ``scaling``...)
      may only repeat the value the adapters give.
    prefix: key prefix PEFT expects.
    overwrite: replace an existing export at ``path`` (its two files; other files are kept).

  Returns:
    The config dict written to ``adapter_config.json``.

  Raises:
    FileExistsError: ``path`` already holds an export and ``overwrite`` is False, or ``path`` is a file.
    TypeError: ``extra_config`` is not a dict of JSON values, ``overwrite`` not a bool, ``path`` not a str.
    ValueError: empty or mixed adapters, a method or option PEFT cannot represent, positions that are
      not PEFT's, a stacked (``nn.scan``) adapter, a path the name map cannot turn into a module name,
      or ``path`` is a symbolic link.

  Example:
    >>> sp.peft.export_peft("my_adapter", adapters)  # doctest: +SKIP
  """
  import ml_dtypes  # noqa: F401  bfloat16 adapters are written as BF16.
  from safetensors.numpy import save as save_tensors

  from spectral_peft.peft._tree import _check_adapters

  _check_adapters(adapters)
  if not isinstance(overwrite, bool):
    raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}.")
  target = _export_target(path)
  if not adapters:
    raise ValueError("`adapters` is empty: nothing to export.")
  if extra_config is not None and not isinstance(extra_config, Mapping):
    raise TypeError(f"`extra_config` must be a dict of PEFT config fields, got {type(extra_config).__name__}.")
  stacked = {p: a.shape for p, a in adapters.items() if a.stack_axes}
  if stacked:
    raise ValueError(
        f"PEFT holds one 2-D adapter per torch module, but these adapters are stacked over layers (nn.scan / "
        f"nnx.vmap; stack_axes > 0): {stacked}. Export one adapter per layer: e.g. "
        "{f'layers/{i}/query/kernel': adapter.unstacked(i) for i in range(n_layers)} with a matching `name_map`."
    )
  families = {p: _family(a.method) for p, a in adapters.items()}
  family = _uniform("method family (peft_type)", families)
  names = {p: _apply_name_map(p, name_map, _default_module, "path") for p in adapters}
  if len(set(names.values())) != len(names):
    raise ValueError(f"`name_map` gives the same module name to several paths: {names}.")
  tensors: dict[str, np.ndarray] = {}
  config: dict[str, Any] = {"peft_type": family, "base_model_name_or_path": base_model_name_or_path, "task_type": None,
                            "inference_mode": True, "fan_in_fan_out": False, "revision": None,
                            "target_modules": sorted(names.values())}

  if family == "LORA":
    use_dora = _uniform("use_dora", {p: isinstance(a.method, DoRA) for p, a in adapters.items()})
    rslora = _uniform("use_rslora", {p: a.method.use_rslora for p, a in adapters.items()})
    ranks = {p: a.method.rank for p, a in adapters.items()}
    alphas = {p: (float(a.method.alpha) if a.method.alpha is not None
                  else (math.sqrt(a.method.rank) if rslora else float(a.method.rank))) for p, a in adapters.items()}
    r, alpha = _common(list(ranks.values())), _common(list(alphas.values()))
    config.update(r=int(r), lora_alpha=alpha, rank_pattern=_patterns("rank_pattern", ranks, names, r, "suffix"),
                  alpha_pattern=_patterns("alpha_pattern", alphas, names, alpha, "suffix"),
                  use_rslora=rslora, use_dora=use_dora, lora_dropout=0.0, bias="none", init_lora_weights=True,
                  lora_bias=False)
    for p, a in adapters.items():
      key = prefix + names[p]
      tensors[key + ".lora_A.weight"] = _np(a.params["a"]).T.copy()
      tensors[key + ".lora_B.weight"] = _np(a.params["b"]).T.copy()
      if use_dora:
        tensors[key + ".lora_magnitude_vector"] = _np(a.params["magnitude"])
  elif family == "SHIRA":
    shapes = {p: a.matrix_shape for p, a in adapters.items()}
    r = max(-(-a.method.n_params // (sum(shapes[p]))) for p, a in adapters.items())
    config.update(r=int(r), mask_type="random", random_seed=None, init_weights=True)
    for p, a in adapters.items():
      m, n = shapes[p]
      budget = r * (m + n)
      if budget > m * n:
        raise ValueError(
            f"PEFT's SHiRA holds r * (in + out) = {budget} weights in layer {p!r} of {m * n} entries (r = {r}, the "
            "largest ceil(p / (in + out)) over the layers); PEFT refuses more weights than entries."
        )
      flat = _np(a.frozen["indices"]).astype(np.int64)
      values = _np(a.params["values"]) * np.asarray(a.method.scale, _np(a.params["values"]).dtype)
      rows_t, cols_t = flat % n, flat // n
      torch_flat = rows_t * m + cols_t
      if len(np.unique(torch_flat)) != len(torch_flat):
        raise ValueError(f"Adapter {p!r} has repeated positions; PEFT's SHiRA needs distinct ones.")
      if budget > len(torch_flat):  # Pad with zero weights at the first unused positions.
        free = np.setdiff1d(np.arange(min(m * n, budget + len(torch_flat))), torch_flat)[: budget - len(torch_flat)]
        torch_flat = np.concatenate([torch_flat, free])
        values = np.concatenate([values, np.zeros(len(free), values.dtype)])
      order = np.argsort(torch_flat, kind="stable")
      torch_flat, values = torch_flat[order], values[order]
      key = prefix + names[p]
      tensors[key + ".shira_weight"] = np.ascontiguousarray(values)
      tensors[key + ".shira_indices"] = np.stack([torch_flat // m, torch_flat % m]).astype(np.int32)
  else:
    kind = family.lower()
    for p, a in adapters.items():
      if a.method.random_loc_seed is None:
        raise ValueError(
            f"Adapter {p!r} has no `random_loc_seed`: PEFT redraws {kind} positions from one seed when it loads, so "
            f"only adapters built with e.g. sp.peft.{type(a.method).__name__}(..., random_loc_seed=777) export."
        )
      if family == "WAVEFT" and a.method.wavelet not in _PEFT_WAVELETS:
        raise ValueError(
            f"Adapter {p!r} uses wavelet {a.method.wavelet!r}, which PEFT's WaveFT does not implement; PEFT has "
            "haar/db1-db10, sym2-sym10 and coif1-coif5."
        )
      if family == "WAVEFT" and not a.method.peft_compatible:
        raise ValueError(
            f"Adapter {p!r} is WaveFT(boundary={a.method.boundary!r}, wavelet={a.method.wavelet!r}, level={a.method.level}), "
            "which PEFT cannot compute: PEFT's WaveFT is one level of zero-boundary synthesis (boundary='zero')."
        )
    seed = _uniform("random_loc_seed", {p: int(a.method.random_loc_seed) for p, a in adapters.items()})
    scaling = _uniform("scaling", {p: float(a.method.scale) for p, a in adapters.items()})
    budgets = {p: int(a.method.n_frequency if family == "FOURIERFT" else a.method.n_params) for p, a in adapters.items()}
    n_frequency = _common(list(budgets.values()))
    style = "dotted" if family == "FOURIERFT" else "suffix"
    config.update(n_frequency=int(n_frequency), scaling=scaling,
                  n_frequency_pattern=_patterns("n_frequency_pattern", budgets, names, n_frequency, style),
                  random_loc_seed=seed, bias="none", init_weights=True)
    if family == "WAVEFT":
      wavelet = _uniform("wavelet", {p: a.method.wavelet for p, a in adapters.items()})
      config.update(wavelet_family="db1" if pywt_haar(wavelet) else wavelet, use_idwt=True, proportional_parameters=False)
    for p, a in adapters.items():
      shape = a.matrix_shape
      grid = a.method.grid(shape) if family == "WAVEFT" else None
      expected = peft_positions(kind, shape, budgets[p], seed, grid)
      tensors[prefix + names[p] + f".{kind}_spectrum"] = _export_sparse_values(p, a, expected)
  saved = _export_modules(modules, name_map, prefix, tensors)
  config["modules_to_save"] = saved or None
  for field, value in dict(extra_config or {}).items():
    if not isinstance(field, str):
      raise TypeError(f"`extra_config` keys must be PEFT field names (str), got {field!r}.")
    try:
      as_json = json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as err:
      raise TypeError(f"`extra_config[{field!r}]` = {value!r} is not a JSON value ({err}); nothing was written.") from None
    if field in config and field not in _FREE_FIELDS and as_json != json.loads(json.dumps(config[field])):
      raise ValueError(
          f"`extra_config[{field!r}]` = {value!r} contradicts the adapters ({field} = {config[field]!r}); "
          f"only fields that do not change Delta W can be set freely: {sorted(_FREE_FIELDS)} and fields not written."
      )
    config[field] = value
  config_bytes = (json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
  weights_bytes = save_tensors(tensors, metadata={"format": "pt", CONFIG_DIGEST_KEY: _config_digest(config)})
  _publish(target, {WEIGHTS_NAME: weights_bytes, CONFIG_NAME: config_bytes}, overwrite)
  return config


# -- writing a directory safely ------------------------------------------------------------------
def _export_target(path: Any) -> str:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"`path` must be a directory path (str or os.PathLike), got {type(path).__name__}.")
  raw = os.fsdecode(os.fspath(path))
  if raw.strip() in ("", ".", "./", "..") or os.path.abspath(raw) in (os.path.abspath(os.sep), os.getcwd()):
    raise ValueError(f"`path` must name an export directory of its own, got {raw!r}.")
  return os.path.abspath(raw)


def _publish(path: str, files: Mapping[str, bytes], overwrite: bool) -> None:
  """Puts ``files`` (``{name: content}``) in the directory ``path`` without following any link there.

  The files are written (``O_CREAT | O_EXCL | O_NOFOLLOW``, fsync) into a fresh private directory
  made by ``mkdtemp`` beside ``path``. A missing ``path`` then appears whole with one ``rename``; in
  an existing directory (opened ``O_NOFOLLOW``, so a directory swapped for a link meanwhile is not
  used) each file is moved in with ``os.replace``, which replaces a link at that name rather than
  writing through it. Only our private directory is ever removed.
  """
  name = os.path.basename(path)
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    st = None
  if st is not None:
    if stat.S_ISLNK(st.st_mode):
      raise ValueError(
          f"`path` {path!r} is a symbolic link; export_peft never writes through links. Pass the directory it "
          f"points to ({os.path.realpath(path)!r}) if that is where the export belongs.")
    if not stat.S_ISDIR(st.st_mode):
      raise FileExistsError(f"`path` {path!r} exists and is not a directory; a PEFT export is a directory.")
    present = [f for f in files if os.path.lexists(os.path.join(path, f))]
    if present and not overwrite:
      raise FileExistsError(f"`path` {path!r} already holds a PEFT export ({', '.join(present)}); pass overwrite=True "
                            "to replace it.")
    for f in present:
      if stat.S_ISDIR(os.lstat(os.path.join(path, f)).st_mode):
        raise FileExistsError(f"{os.path.join(path, f)!r} is a directory; export_peft replaces only files.")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
  try:
    for file, data in files.items():
      fd = os.open(os.path.join(staging, file), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
      with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    if st is None:
      try:
        os.rename(staging, path)  # Atomic; fails if `path` appeared meanwhile (then nothing is changed).
        return
      except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
          raise
        raise FileExistsError(f"`path` {path!r} was created by someone else while the export was written; nothing "
                              "was changed: export again (with overwrite=True to replace an export there).") from None
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
      if os.fstat(dir_fd).st_ino != st.st_ino:
        raise FileExistsError(f"`path` {path!r} was replaced while the export was written; nothing was changed.")
      for file in files:  # The weights first, the config (which PEFT reads first) last.
        _replace_into(staging, file, dir_fd)
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _replace_into(staging: str, file: str, dir_fd: int) -> None:
  src_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
  try:
    os.replace(file, file, src_dir_fd=src_fd, dst_dir_fd=dir_fd)
  finally:
    os.close(src_fd)


def _export_modules(modules, name_map, prefix, tensors) -> list[str]:
  if not modules:
    return []
  if not isinstance(modules, Mapping):
    raise TypeError(f"`modules` must be the {{path: array}} dict of sp.peft.modules_to_save, got {type(modules).__name__}.")
  saved: list[str] = []
  for p, value in modules.items():
    base, leaf_name = p.rsplit("/", 1) if "/" in p else ("", p)
    module = _apply_name_map(base + "/kernel", name_map, _default_module, "path")
    array = _np(value)
    if leaf_name == "kernel":
      torch_name, array = "weight", array.T.copy() if array.ndim == 2 else array
    elif leaf_name in ("embedding", "scale"):
      torch_name = "weight"
    else:
      torch_name = leaf_name
    tensors[f"{prefix}{module}.{torch_name}"] = np.ascontiguousarray(array)
    if module not in saved:
      saved.append(module)
  return saved


# -- PEFT configs as our specs ----------------------------------------------------------------------
def from_peft_config(config: Union[str, Mapping[str, Any]], *, name_map: NameMap = None) -> Callable[[str, tuple[int, ...]], Any]:
  """Our adapter spec per target from a PEFT config, written with PEFT's names.

  Translates ``peft_type`` and PEFT's fields, with PEFT's defaults where a field is absent:
  LoRA (``r`` 8, ``lora_alpha`` 8, ``use_rslora``, ``use_dora`` -> :class:`DoRA`, ``rank_pattern``,
  ``alpha_pattern``), SHiRA (``r``: ``n_params = r * (in + out)``), FourierFT (``n_frequency`` 1000,
  ``n_frequency_pattern``, ``scaling`` 150, ``random_loc_seed`` 777, ``init_weights`` False ->
  ``value_init="normal"``) and WaveFT (``n_frequency`` 2592, ``scaling`` 25, ``wavelet_family``
  ``"db1"``, ``random_loc_seed`` 777, zero boundary; ``init_weights=False`` -> ``value_init="normal"``
  with ``init_std=0.01``). Positions then equal PEFT's; random initial values are drawn from our
  keys, not torch's. ``lora_dropout`` is not part of a spec: it is a training-time argument,
  ``sp.peft.apply_adapters(..., adapter_dropout=config["lora_dropout"], dropout_key=key)``
  (``sp.nnx.set_adapter_dropout`` in NNX).

  Args:
    config: a PEFT config dict (``json.load`` of ``adapter_config.json``, or
      ``peft_config.to_dict()``), or the path of a directory holding ``adapter_config.json``.
    name_map: our path -> PEFT module name, to resolve PEFT's ``*_pattern`` keys (as in :func:`export_peft`).

  Returns:
    ``(path, shape) -> spec``, to pass as ``method`` to :func:`sp.peft.init_adapters` (with
    ``targets=config["target_modules"]`` when it is a list of names).

  Raises:
    FileNotFoundError: ``config`` is a directory without ``adapter_config.json``.
    TypeError: ``config`` is neither a dict nor a path.
    ValueError: what :func:`import_peft` refuses (an unsupported ``peft_type``; ``bias`` other than
      ``"none"``; ``lora_bias`` and other LoRA extensions; PiSSA-style initialisations; ``r``,
      ``n_frequency``, ``lora_alpha``, ``scaling`` or a ``*_pattern`` value of the wrong type or out of
      range; a corrupt ``adapter_config.json``), and options with no counterpart here
      (``proportional_parameters``, ``use_idwt=False``, ``init_lora_weights`` other than
      ``true``/``"gaussian"``).

  Example:
    >>> import jax, jax.numpy as jnp, spectral_peft as sp
    >>> method = sp.peft.from_peft_config({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": True})
    >>> method("mlp/fc1/kernel", (8, 8))
    LoRA(rank=4, alpha=16.0, param_dtype=None, use_rslora=True)
  """
  if isinstance(config, (str, os.PathLike)):
    where = repr(os.path.join(os.fspath(config), CONFIG_NAME))
    config = _read_config(config)
  elif isinstance(config, Mapping):
    where = "`config`"
  else:
    raise TypeError(f"`config` must be a PEFT config dict or a directory path, got {type(config).__name__}.")
  config = dict(config)
  peft_type, config = _check_config(config, where)
  init = config.get("init_lora_weights", True)
  if peft_type == "LORA" and init not in (True, None, "gaussian"):
    raise ValueError(
        f"{where}: `init_lora_weights` = {init!r} has no counterpart in sp.peft's LoRA/DoRA (which start at "
        "Delta W = 0, as PEFT's default true and 'gaussian' do); import trained adapters with sp.peft.import_peft."
    )
  if peft_type == "WAVEFT" and config.get("proportional_parameters"):
    raise ValueError("WaveFT `proportional_parameters=True` needs every layer at once: use sp.peft.proportional_allocation.")
  if peft_type == "WAVEFT" and not config.get("use_idwt", True):
    raise ValueError("WaveFT `use_idwt=False` has no seeded counterpart here: use sp.peft.SHiRA (positions from our keys).")

  def choose(path: str, shape: tuple[int, ...]):
    module = _apply_name_map(path, name_map, _default_module, "path")
    if peft_type == "LORA":
      cls = DoRA if config.get("use_dora") else LoRA
      return cls(rank=int(_pattern_value(config.get("rank_pattern"), module, config.get("r", 8))),
                 alpha=float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))),
                 use_rslora=bool(config.get("use_rslora", False)))
    if peft_type == "SHIRA":
      if len(shape) != 2:
        raise ValueError(f"PEFT's SHiRA adapts Linear layers: {path!r} has shape {shape}, not a 2-D kernel.")
      return SHiRA(n_params=int(config.get("r", 32)) * (shape[0] + shape[1]))
    random_init = not config.get("init_weights", peft_type == "WAVEFT")
    if peft_type == "FOURIERFT":
      n = int(_pattern_value(config.get("n_frequency_pattern"), module, config.get("n_frequency", 1000), style="dotted"))
      return FourierFT(n_frequency=n, scale=float(config.get("scaling", 150.0)),
                       random_loc_seed=int(config.get("random_loc_seed", 777)),
                       value_init="normal" if random_init else "zeros")
    n = int(_pattern_value(config.get("n_frequency_pattern"), module, config.get("n_frequency", 2592)))
    return WaveFT(n, scale=float(config.get("scaling", 25.0)), wavelet=str(config.get("wavelet_family", "db1")),
                  level=1, boundary="zero", random_loc_seed=int(config.get("random_loc_seed", 777)),
                  value_init="normal" if random_init else "zeros", init_std=0.01 if random_init else 1.0)

  return choose
