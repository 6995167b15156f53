"""Saving and loading adapters alone with orbax-checkpoint.

A checkpoint is a directory with two orbax items: ``arrays`` (every adapter's leaves) and
``metadata`` (JSON: format version, and per adapter its path, weight shape and dtype, ``in_axes``
and method spec). The parameter structure of each adapter is rebuilt from its method with
``jax.eval_shape``, so nothing about it is pickled.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft.peft._method import Adapter, matrix_shape, method_from_config
from spectral_peft.peft._tree import Adapters, PyTree, _check_adapters, leaf_paths

FORMAT_VERSION = 1


def _checkpointer():
  import orbax.checkpoint as ocp  # Imported lazily: orbax is slow to import.

  return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _structure(adapter_meta: dict[str, Any]):
  """Abstract ``(params, frozen)`` of one adapter, from its metadata alone."""
  method = method_from_config(adapter_meta["method"])
  mshape = matrix_shape(tuple(adapter_meta["shape"]), adapter_meta["in_axes"])
  w0 = jax.ShapeDtypeStruct(mshape, jnp.dtype(adapter_meta["dtype"]))
  key = jax.random.key(0)
  params = jax.eval_shape(method.init, key, w0)
  frozen = jax.eval_shape(method.init_frozen, key, w0)
  return method, params, frozen


def save_adapters(path: str | os.PathLike, adapters: Adapters, *, overwrite: bool = False) -> None:
  """Saves ``adapters`` (only the adapters, not the base parameters) to the directory ``path``.

  The checkpoint is written to a temporary sibling directory and moved into place only once it is
  complete, so an interrupted save never leaves a half-written checkpoint at ``path``, and with
  ``overwrite=True`` the previous checkpoint is removed only after the new one is in place.

  Args:
    path: target directory (must not exist unless ``overwrite``).
    adapters: ``{path: Adapter}`` from :func:`init_adapters` or training.
    overwrite: replace an existing checkpoint at ``path``.

  Raises:
    FileExistsError: if ``path`` exists and ``overwrite`` is False.
  """
  _check_adapters(adapters)
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"`path` {path!r} already exists; pass overwrite=True to replace it.")
  entries, arrays = [], {}
  for i, (name, adapter) in enumerate(sorted(adapters.items())):
    leaves = jax.tree.leaves((adapter.params, adapter.frozen))
    arrays[f"adapter_{i:04d}"] = {f"leaf_{j:04d}": np.asarray(x) for j, x in enumerate(leaves)}
    entries.append({
        "path": name,
        "shape": list(adapter.shape),
        "in_axes": adapter.in_axes,
        "dtype": adapter.dtype,
        "method": adapter.method.to_config(),
    })
  metadata = {"format_version": FORMAT_VERSION, "adapters": entries}

  ocp, checkpointer = _checkpointer()
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
  checkpointer.save(tmp, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(metadata)))
  if os.path.exists(path):
    old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)


def load_adapters(path: str | os.PathLike, params: Optional[PyTree] = None) -> Adapters:
  """Loads adapters saved by :func:`save_adapters`.

  Args:
    path: checkpoint directory.
    params: the base parameters the adapters will be merged into. When given, every adapter's path
      must exist in ``params`` with the shape it was trained for, or nothing is loaded.

  Returns:
    ``{path: Adapter}``, equal (bit for bit) to what was saved.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if the checkpoint does not fit ``params``, or is not an adapter checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"`path` {path!r} is not a checkpoint directory.")
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    raise ValueError(f"`path` {path!r} is a HuggingFace PEFT adapter directory: read it with sp.peft.import_peft(path, params).")
  ocp, checkpointer = _checkpointer()
  try:
    metadata = checkpointer.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  except Exception as err:  # orbax raises several types for a foreign directory.
    raise ValueError(f"`path` {path!r} is not an adapter checkpoint: {err}") from err
  if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"`path` {path!r} is not an adapter checkpoint of format version {FORMAT_VERSION}.")

  entries = metadata["adapters"]
  if params is not None:
    available = leaf_paths(params)
    problems = []
    for entry in entries:
      name, shape = entry["path"], tuple(entry["shape"])
      if name not in available:
        problems.append(f"{name!r} is not in `params`")
      elif tuple(np.shape(available[name])) != shape:
        problems.append(f"{name!r} was saved for shape {shape} but `params` has {tuple(np.shape(available[name]))}")
    if problems:
      raise ValueError(f"Checkpoint {path!r} does not fit `params`: " + "; ".join(problems) + ".")

  structures = [_structure(entry) for entry in entries]
  abstract = {}
  for i, (_, p, f) in enumerate(structures):
    leaves = jax.tree.leaves((p, f))
    abstract[f"adapter_{i:04d}"] = {f"leaf_{j:04d}": x for j, x in enumerate(leaves)}
  restored = checkpointer.restore(
      path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract))
  )["arrays"]

  adapters: Adapters = {}
  for i, (entry, (method, p, f)) in enumerate(zip(entries, structures)):
    group = restored[f"adapter_{i:04d}"]
    leaves = [group[f"leaf_{j:04d}"] for j in range(len(group))]
    params_tree, frozen_tree = jax.tree.unflatten(jax.tree.structure((p, f)), leaves)
    adapters[entry["path"]] = Adapter(
        params=params_tree,
        frozen=frozen_tree,
        method=method,
        shape=tuple(entry["shape"]),
        dtype=entry["dtype"],
        in_axes=entry["in_axes"],
    )
  return adapters
