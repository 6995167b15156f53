"""Saving and loading adapters alone with orbax-checkpoint, without ever losing data.

Layout (format version 3). A checkpoint is a directory that holds

* ``spectral_peft_adapters.json``: the pointer, and the checkpoint's human-readable description,
  e.g. ``{"format": "spectral_peft.adapters", "format_version": 3, "current": "version-<hex>",
  "token": "<hex>", "library": "spectral_peft", "library_version": "0.3.0", "trainable_parameters":
  160, "adapters": [{"path": "enc/query/kernel", "method": {"method": "LoRA", "rank": 4, ...},
  "shape": [8, 6], "dtype": "float32", "in_axes": 1, "layout": "in_out", "stack_axes": 0,
  "trainable_parameters": 56}, ...]}`` (like PEFT's ``adapter_config.json``);
* the version it points to, ``version-<hex>/``: a marker ``spectral_peft_version.json``
  (``{"token", "version"}``) and the orbax checkpoint ``checkpoint/`` with two items, ``arrays`` and
  ``metadata``. ``arrays`` is the *named* adapter tree, one branch per adapter path split at ``'/'``,
  then ``params`` and ``frozen`` with the method's own names, e.g.
  ``encoder/layer_0/query/kernel/params/a``. ``metadata`` is JSON: per adapter its path, weight shape
  and dtype, ``in_axes`` and method spec. The parameter structure of each adapter is rebuilt from
  its method with ``jax.eval_shape`` and checked against the arrays, so nothing is pickled and a
  checkpoint whose metadata disagrees with its arrays is refused.

Nothing else: no lock file (locks are ``flock`` on the directories themselves). Format 2 (the
orbax checkpoint directly in the version directory, no token) is still read.

Why saving is safe (POSIX semantics):

* Never outside what we made. ``path`` itself must not be a link; files are created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and switched in with ``os.replace`` (which replaces a link, never
  writes through it). Nothing is deleted unless proven ours: a version directory only when its
  marker holds the token of the checkpoint's pointer (a random value chosen when the checkpoint was
  created), a hidden staging sibling only when it holds our staging marker (or our pointer and
  marked version); a forged pointer therefore deletes nothing. Files of format 1/2 checkpoints, which
  carry no token, are left in place when such a checkpoint is overwritten.
* A new checkpoint is written completely in a hidden sibling ``.<name>.saving-<random>`` (made by
  ``mkdtemp``) and appears at ``path`` with one ``rename(2)`` of the directory, which fails when
  ``path`` is a non-empty directory: of two concurrent ``overwrite=False`` saves exactly one wins,
  the other raises ``FileExistsError``.
* Overwriting writes the new version *inside* the existing checkpoint, then switches the pointer
  file with one atomic ``os.replace``; the old version is removed afterwards. At every instant
  ``path`` holds the old or the new complete checkpoint, whatever kills the process.
* Writers hold an exclusive ``flock`` on the checkpoint directory (or the staging sibling); readers
  hold a shared ``flock`` on the version they read, and a writer removes an old version only when it
  gets that version's exclusive lock without waiting (else the next save removes it). So a load
  concurrent with overwrites always reads the old or the new checkpoint. The kernel releases locks
  when a process dies, so leftovers of interrupted saves are recognised and removed by the next save.

Multi-host: :func:`save_adapters` is collective under ``jax.distributed`` (every process calls it
with the same arguments, as with orbax). Process 0 alone touches the file system (siblings, locks,
pointer) and broadcasts its decisions; orbax writes each process's shards and finalises the
version directory. :func:`load_adapters` may be called on any subset of processes; each reads the
full arrays as host NumPy arrays.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectral_peft._version import __version__
from spectral_peft.peft._methods.base import Adapter, matrix_shape, method_from_config
from spectral_peft.peft._tree import Adapters, PyTree, _check_adapters, leaf_paths, path_to_str

FORMAT = "spectral_peft.adapters"
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
POINTER = "spectral_peft_adapters.json"
VERSION_PREFIX = "version-"
VERSION_MARKER = "spectral_peft_version.json"  # In each version directory: {"token", "version"}.
STAGING_MARKER = ".spectral_peft_staging.json"  # In a hidden staging directory until its rename.
ORBAX_DIR = "checkpoint"  # The orbax checkpoint inside a (format 3) version directory.


def _orbax():
  import orbax.checkpoint as ocp  # Imported lazily: orbax is slow to import.

  return ocp


def _checkpointer():
  ocp = _orbax()
  return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


# -- the named array tree ------------------------------------------------------------------------
def _named_leaves(adapter_path: str, params: PyTree, frozen: PyTree) -> dict[tuple[str, ...], Any]:
  """``{key tuple: leaf}`` of one adapter: its path split at ``'/'``, then params/frozen and leaf names."""
  out = {}
  for part, tree in (("params", params), ("frozen", frozen)):
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = tuple(path_to_str([k]) for k in key_path)
      out[tuple(adapter_path.split("/")) + (part,) + names] = leaf
  return out


def _nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for keys, leaf in flat.items():
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return tree


def _lookup(tree: Any, keys: tuple[str, ...]) -> Any:
  for k in keys:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _host_array(name: str, x: Any) -> Any:
  if isinstance(x, jax.core.Tracer):
    raise TypeError(
        f"save_adapters writes files, so it cannot run inside jit, grad or vmap: the array {name!r} is a "
        f"tracer ({type(x).__name__}). Return the adapters from the traced function and save them outside it."
    )
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x  # Multi-host global array: orbax writes each process's shards.
  return np.asarray(x)


def _flatten_for_save(adapters: Adapters) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  flat: dict[tuple[str, ...], Any] = {}
  entries = []
  orbax_names: dict[str, str] = {}
  for name, adapter in sorted(adapters.items()):
    for keys, leaf in _named_leaves(name, adapter.params, adapter.frozen).items():
      label = "/".join(keys)
      dotted = ".".join(keys)  # orbax names its arrays by '.'-joined keys: they must stay distinct.
      if dotted in orbax_names:
        raise ValueError(
            f"Cannot save: the arrays {orbax_names[dotted]!r} and {label!r} get the same storage name "
            f"{dotted!r} (keys that contain '.'); rename the parameters."
        )
      orbax_names[dotted] = label
      flat[keys] = _host_array(label, leaf)
    try:
      method_config = adapter.method.to_config()
      json.dumps(method_config)
    except (TypeError, ValueError) as err:
      raise TypeError(f"Cannot save the adapter at {name!r}: its method spec {adapter.method!r} is not JSON "
                      f"serialisable ({err}).") from None
    entries.append({
        "path": name,
        "shape": [int(d) for d in adapter.shape],
        "in_axes": int(adapter.in_axes),
        "dtype": str(adapter.dtype),
        "layout": adapter.layout,
        "stack_axes": int(adapter.stack_axes),
        "method": method_config,
    })
  return _nest(flat), entries


# -- file system helpers -------------------------------------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _open_dir(path: str) -> int:
  """A descriptor of the directory ``path`` itself (``O_NOFOLLOW``: a link there raises ``OSError``)."""
  return os.open(path, _DIR_FLAGS)


@contextlib.contextmanager
def _locked(path: str, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
  """Holds a ``flock`` on the directory ``path`` itself (no lock file); yields whether it got it.

  Also yields ``False`` when ``path`` vanished or was replaced while we waited for the lock.
  """
  try:
    fd = _open_dir(path)
  except OSError:
    yield False
    return
  try:
    try:
      fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      yield False
      return
    try:
      same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
      same = False
    yield same
  finally:
    os.close(fd)  # Releases the lock.


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def _write_new_file(path: str, data: bytes) -> None:
  """Creates ``path`` (never an existing file or link: ``O_EXCL | O_NOFOLLOW``), writes, fsyncs."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
  with os.fdopen(fd, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _read_json_file(path: str) -> Any:
  """The JSON content of the regular file ``path`` (never through a link), or ``None``."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
  except OSError:
    return None
  try:
    with os.fdopen(fd, "rb") as f:
      return json.loads(f.read(1 << 20).decode("utf-8"))
  except (OSError, ValueError):
    return None


def _is_our_version(directory: str, name: str, token: Optional[str]) -> bool:
  """Whether ``directory/name`` is a version this library wrote for the checkpoint of ``token``."""
  full = os.path.join(directory, name)
  if token is None or not name.startswith(VERSION_PREFIX) or os.path.islink(full) or not os.path.isdir(full):
    return False
  marker = _read_json_file(os.path.join(full, VERSION_MARKER))
  return isinstance(marker, dict) and marker.get("token") == token and marker.get("version") == name


def _version_temporary(version: str, token: str) -> str:
  """The hidden name a version directory has until its marker is complete."""
  return f".{version}.{token}.tmp"


def _new_version(root: str, version: str, token: str) -> None:
  """Creates the version directory ``root/version`` with its marker (orbax then writes inside it).

  The directory is made and marked under a hidden name carrying ``token``, then renamed: a version
  directory therefore never exists without its complete marker (a save killed in between leaves a
  temporary that :func:`_remove_unreferenced` recognises by name and contents).
  """
  tmp = os.path.join(root, _version_temporary(version, token))
  os.mkdir(tmp)
  _write_new_file(os.path.join(tmp, VERSION_MARKER), json.dumps({"token": token, "version": version}).encode())
  os.rename(tmp, os.path.join(root, version))


def _remove_version_temporary(full: str) -> None:
  """Removes the directory ``full`` if it holds at most our marker file (a version temporary left by a
  killed save, or a version emptied by :func:`_remove_version`); anything else in it keeps it."""
  if os.path.islink(full) or not os.path.isdir(full):
    return
  with contextlib.suppress(OSError):
    if set(os.listdir(full)) <= {VERSION_MARKER}:
      marker = os.path.join(full, VERSION_MARKER)
      if os.path.lexists(marker) and not os.path.islink(marker) and os.path.isfile(marker):
        os.remove(marker)
      os.rmdir(full)  # Fails (and removes nothing) if anything else appeared meanwhile.


def _remove_version(directory: str, name: str, token: Optional[str]) -> None:
  """Removes our version ``name`` unless a reader holds it (it is then removed by a later save)."""
  full = os.path.join(directory, name)
  if not _is_our_version(directory, name, token):
    return
  with _locked(full, blocking=False) as got:
    if got:
      # The marker goes last, so a removal killed halfway leaves a version still proven ours.
      for entry in os.listdir(full):
        if entry != VERSION_MARKER:
          inner = os.path.join(full, entry)
          if os.path.isdir(inner) and not os.path.islink(inner):
            shutil.rmtree(inner, ignore_errors=True)
          else:
            with contextlib.suppress(OSError):
              os.remove(inner)
      _remove_version_temporary(full)  # The marker and the directory, once nothing else is left.


def _is_legacy(path: str) -> bool:
  """Whether ``path`` is a format-1 checkpoint (one orbax checkpoint, no pointer file)."""
  content = _read_json_file(os.path.join(path, "metadata", "metadata"))
  return isinstance(content, dict) and content.get("format_version") == 1 and "adapters" in content


def _read_pointer(path: str) -> dict[str, Any]:
  """The pointer file of the checkpoint directory ``path``; ``ValueError`` when it is not ours."""
  pointer = os.path.join(path, POINTER)
  if os.path.islink(pointer):
    raise ValueError(f"`path` {path!r} is not an adapter checkpoint: {POINTER!r} is a symbolic link.")
  if not os.path.isfile(pointer):
    if _is_legacy(path):
      raise ValueError(
          f"Checkpoint {path!r} was written by an older spectral_peft (format version 1); load it with that "
          f"version and save it again (save_adapters(..., overwrite=True) may replace it)."
      )
    raise ValueError(f"`path` {path!r} is not an adapter checkpoint: it has no {POINTER!r} file.")
  try:
    with open(pointer, "rb") as f:
      content = json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError) as err:
    raise ValueError(f"`path` {path!r} is not a readable adapter checkpoint: {POINTER!r} is not valid JSON ({err}).") from None
  if not isinstance(content, dict) or content.get("format") != FORMAT:
    raise ValueError(f"`path` {path!r} is not an adapter checkpoint: {POINTER!r} does not name the format {FORMAT!r}.")
  if content.get("format_version") not in READABLE_VERSIONS:
    raise ValueError(
        f"Checkpoint {path!r} has format version {content.get('format_version')!r}; this version of "
        f"spectral_peft reads versions {list(READABLE_VERSIONS)}."
    )
  current = content.get("current")
  if (not isinstance(current, str) or not current.startswith(VERSION_PREFIX) or os.sep in current
      or (os.altsep and os.altsep in current) or current in (".", "..")):
    raise ValueError(f"Checkpoint {path!r} is corrupted: {POINTER!r} names no valid version ({current!r}).")
  token = content.get("token")
  if content["format_version"] >= 3 and not (isinstance(token, str) and len(token) == 32):
    raise ValueError(f"Checkpoint {path!r} is corrupted: {POINTER!r} has no valid token.")
  return content


def _write_pointer(directory: str, version: str, token: str, description: dict[str, Any]) -> None:
  """Atomically makes ``version`` the current version of ``directory`` (write, fsync, rename).

  The pointer is also the checkpoint's human-readable description (format, library version,
  adapters with their methods and shapes), so it always describes the current version.
  """
  content = {"format": FORMAT, "format_version": FORMAT_VERSION, "current": version, "token": token, **description}
  tmp = os.path.join(directory, f".{POINTER}.{token}.{uuid.uuid4().hex}.tmp")
  _write_new_file(tmp, (json.dumps(content, indent=2) + "\n").encode("utf-8"))
  os.replace(tmp, os.path.join(directory, POINTER))  # Replaces a file (or a link) named POINTER, never its target.
  _fsync_dir(directory)


def _remove_unreferenced(directory: str, keep: Optional[str], token: Optional[str]) -> None:
  """Removes our versions other than ``keep`` and our stale temporaries (caller holds the lock).

  "Ours" means proven: a version directory whose marker holds this checkpoint's ``token``; a pointer
  temporary whose name carries it; a version temporary whose name carries it and that holds nothing
  but a marker. Anything else, whatever its name, is left alone.
  """
  if token is None:
    return
  for entry in os.listdir(directory):
    full = os.path.join(directory, entry)
    if entry.startswith(VERSION_PREFIX) and entry != keep:
      _remove_version(directory, entry, token)
    elif entry.startswith(f".{POINTER}.{token}.") and entry.endswith(".tmp") and not os.path.islink(full):
      with contextlib.suppress(OSError):
        os.remove(full)
    elif entry.startswith(f".{VERSION_PREFIX}") and entry.endswith(f".{token}.tmp"):
      _remove_version_temporary(full)


def _staging_prefix(path: str) -> str:
  return f".{os.path.basename(path)}.saving-"


_MKDTEMP_NAME = re.compile(r"\..+\.saving-[a-z0-9_]{8}")


def _is_our_staging(full: str) -> bool:
  """A hidden staging directory this library made: it holds our staging marker, or (killed just before
  its rename) our pointer whose token its current version's marker carries."""
  marker = _read_json_file(os.path.join(full, STAGING_MARKER))
  if isinstance(marker, dict) and marker.get("format") == FORMAT and marker.get("staging") == os.path.basename(full):
    return True
  try:
    pointer = _read_pointer(full)
  except ValueError:
    return False
  return _is_our_version(full, pointer["current"], pointer.get("token"))


def _remove_stale_staging(path: str) -> None:
  """Removes hidden ``.<name>.saving-*`` siblings of ``path`` left by interrupted saves.

  Only directories proven ours (:func:`_is_our_staging`) whose lock is free are removed (a held lock
  is a running save); an empty directory with mkdtemp's exact name (a save killed before it wrote
  its marker) is removed with ``rmdir``, which cannot remove anything in it.
  """
  parent = os.path.dirname(path)
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  for entry in entries:
    full = os.path.join(parent, entry)
    if not _MKDTEMP_NAME.fullmatch(entry) or os.path.islink(full) or not os.path.isdir(full):
      continue
    with _locked(full, blocking=False) as got:
      if not got:
        continue
      if _is_our_staging(full):
        shutil.rmtree(full, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.rmdir(full)  # Succeeds only on an empty directory.


def _new_staging(path: str, stack: contextlib.ExitStack) -> str:
  """A new hidden sibling of ``path`` that this process holds locked (until ``stack`` closes).

  Another save's cleanup may remove a staging directory in the instant between its creation and
  its lock; the locked directory is therefore checked to still be the one at its path.
  """
  for _ in range(100):
    staging = tempfile.mkdtemp(prefix=_staging_prefix(path), dir=os.path.dirname(path))
    try:
      fd = _open_dir(staging)
    except OSError:
      continue
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
      same = os.stat(staging, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except OSError:
      same = False
    if same:
      stack.callback(os.close, fd)  # Closing the descriptor releases the lock.
      marker = {"format": FORMAT, "staging": os.path.basename(staging)}
      _write_new_file(os.path.join(staging, STAGING_MARKER), json.dumps(marker).encode())
      return staging
    os.close(fd)
  raise OSError(f"Could not create a staging directory next to `path` {path!r}.")


def _check_target(path: str, overwrite: bool) -> str:
  """``"new"`` (nothing or an empty directory at ``path``) or ``"overwrite"`` (our checkpoint)."""
  if os.path.islink(path):
    raise ValueError(
        f"`path` {path!r} is a symbolic link; save_adapters never writes through links. Pass the directory it "
        f"points to ({os.path.realpath(path)!r}) if the checkpoint belongs there.")
  if os.path.lexists(path) and not os.path.isdir(path):
    raise FileExistsError(f"`path` {path!r} exists and is not a directory; adapters are saved as a directory.")
  if not os.path.exists(path) or not os.listdir(path):
    return "new"
  if not overwrite:
    raise FileExistsError(f"`path` {path!r} already exists; pass overwrite=True to replace it.")
  if _is_legacy(path) and not os.path.lexists(os.path.join(path, POINTER)):
    return "overwrite"  # Format 1: the new version and pointer are added; its files are left in place.
  try:
    _read_pointer(path)
  except ValueError as err:
    raise ValueError(
        f"Refusing to overwrite `path` {path!r}: overwrite=True only replaces an adapter checkpoint written by "
        f"save_adapters, and this directory is not one ({err}). Choose another path or remove it yourself."
    ) from None
  return "overwrite"


# -- multi-host coordination ---------------------------------------------------------------------
#: Seconds a process waits for the others to enter a collective save before it raises.
BARRIER_TIMEOUT_S = 300
_save_calls = 0


def _enter_collective(what: str) -> None:
  """A barrier with a timeout: a save called on only some processes raises instead of hanging."""
  global _save_calls
  _save_calls += 1
  if jax.process_count() == 1:
    return
  ocp = _orbax()
  try:
    ocp.multihost.sync_global_processes(f"spectral_peft_{what}_{_save_calls}", timeout=BARRIER_TIMEOUT_S,
                                        processes=set(range(jax.process_count())))
  except Exception as err:
    raise RuntimeError(
        f"{what} is collective under jax.distributed: every process must call it (the same number of times); "
        f"process {jax.process_index()} waited {BARRIER_TIMEOUT_S} s for the other {jax.process_count() - 1} "
        f"process(es) ({_first_line(err)})."
    ) from None


_ERRORS = {"FileExistsError": FileExistsError, "ValueError": ValueError, "TypeError": TypeError, "OSError": OSError}


def _run_on_primary(fn) -> Any:
  """``fn()`` on process 0; its JSON result (or its exception) is broadcast to every process."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils

  payload = ""
  if jax.process_index() == 0:
    try:
      payload = json.dumps({"ok": fn()})
    except Exception as err:  # Re-raised on every process below.
      payload = json.dumps({"error": type(err).__name__, "message": str(err)})
  data = np.zeros(4096, np.uint8)
  encoded = payload.encode("utf-8")[:4096]
  data[: len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  message = json.loads(bytes(data[data != 0]).decode("utf-8"))
  if "error" in message:
    raise _ERRORS.get(message["error"], RuntimeError)(message["message"])
  return message["ok"]


def _normalize_path(path: Any) -> str:
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"`path` must be a str or os.PathLike directory name, got {type(path).__name__}.")
  raw = os.fspath(path)
  if isinstance(raw, bytes):
    raw = os.fsdecode(raw)
  if raw.strip() in ("", ".", "./", ".."):
    raise ValueError(f"`path` must name a checkpoint directory of its own, got {raw!r} (the working directory or its parent).")
  full = os.path.abspath(raw)
  if full in (os.path.abspath(os.sep), os.path.abspath(os.getcwd()), os.path.expanduser("~")):
    raise ValueError(f"`path` must name a checkpoint directory of its own, got {raw!r} ({full}).")
  return full


# -- public API ----------------------------------------------------------------------------------
def save_adapters(path: str | os.PathLike, adapters: Adapters, *, overwrite: bool = False) -> None:
  """Saves ``adapters`` (only the adapters, not the base parameters) to the directory ``path``.

  The checkpoint appears at ``path`` only once complete; with ``overwrite=True`` the new version is
  switched in by one atomic rename, so at every instant ``path`` holds the old or the new complete
  checkpoint (see the module docstring). Only a directory written by ``save_adapters`` is ever
  replaced, no link is followed, and nothing is deleted that this library cannot prove it wrote.
  Leftovers of interrupted saves are removed by the next save to the same ``path``. The directory
  describes itself in ``spectral_peft_adapters.json`` (methods, paths, shapes, library version).

  Multi-host (``jax.distributed``): a collective; call it on every process with the same arguments.
  Called on some processes only, it raises ``RuntimeError`` after ``BARRIER_TIMEOUT_S`` seconds
  (300) instead of hanging.

  Args:
    path: target directory; must not exist (an empty directory is fine) unless ``overwrite``.
    adapters: ``{path: Adapter}`` from :func:`init_adapters` or training (an empty dict saves an
      empty checkpoint). Arrays must be concrete: call it outside ``jit``.
    overwrite: replace an existing adapter checkpoint at ``path``.

  Raises:
    FileExistsError: ``path`` exists and ``overwrite`` is False, or another save won the race to
      create it, or it is a file.
    ValueError: ``path`` is ``""``/``"."``/the working directory or a symbolic link, or
      ``overwrite=True`` but ``path`` is not an adapter checkpoint.
    TypeError: ``adapters`` is not an adapters dict, holds tracers (inside ``jit``), or a method spec
      that is not JSON-serialisable.
    RuntimeError: (multi-host) not every process called it.

  Example:
    >>> import jax, jax.numpy as jnp, tempfile, os, spectral_peft as sp
    >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
    >>> adapters = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.LoRA(2), "kernel")
    >>> path = os.path.join(tempfile.mkdtemp(), "adapters")
    >>> sp.peft.save_adapters(path, adapters)
    >>> sorted(sp.peft.load_adapters(path, params))
    ['dense/kernel']
  """
  _check_adapters(adapters)
  if not isinstance(overwrite, bool):
    raise TypeError(f"`overwrite` must be a bool, got {overwrite!r}.")
  path = _normalize_path(path)
  arrays, entries = _flatten_for_save(adapters)
  metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapters": entries}
  sizes = {name: int(sum(np.size(x) for x in jax.tree.leaves(a.params))) for name, a in adapters.items()}
  description = {
      "library": "spectral_peft",
      "library_version": __version__,
      "trainable_parameters": int(sum(sizes.values())),
      "adapters": [{**entry, "trainable_parameters": sizes[entry["path"]]} for entry in entries],
  }
  json.dumps(description)  # Checked serialisable before anything is written (entries already are).
  version = VERSION_PREFIX + uuid.uuid4().hex  # Process 0's choice is broadcast below.
  ocp, checkpointer = _checkpointer()
  _enter_collective("save_adapters")
  primary = jax.process_index() == 0

  with contextlib.ExitStack() as stack:
    stack.callback(_close, checkpointer)

    def prepare() -> dict[str, str]:
      mode = _check_target(path, overwrite)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      _remove_stale_staging(path)
      known: Optional[str] = None
      if mode == "new":
        root = _new_staging(path, stack)
      else:
        if not stack.enter_context(_locked(path)):
          raise FileExistsError(f"`path` {path!r} was removed or replaced while this save waited for it; save again.")
        if os.path.lexists(os.path.join(path, POINTER)):
          pointer = _read_pointer(path)  # Still ours, under the lock.
          known = pointer.get("token")
          _remove_unreferenced(path, keep=pointer["current"], token=known)
        root = path
      token = known or uuid.uuid4().hex
      _new_version(root, version, token)
      return {"mode": mode, "root": root, "version": version, "token": token}

    plan = _run_on_primary(prepare)
    target = os.path.join(plan["root"], plan["version"], ORBAX_DIR)
    items = {"metadata": ocp.args.JsonSave(metadata)}
    if arrays:
      items["arrays"] = ocp.args.PyTreeSave(arrays)
    try:
      checkpointer.save(target, args=ocp.args.Composite(**items))
    except Exception:
      if primary and plan["mode"] == "new":
        shutil.rmtree(plan["root"], ignore_errors=True)
      elif primary:
        _remove_version(plan["root"], plan["version"], plan["token"])
      raise

    def commit() -> bool:
      root, version, token = plan["root"], plan["version"], plan["token"]
      _write_pointer(root, version, token, description)
      if plan["mode"] == "overwrite":
        _remove_unreferenced(path, keep=version, token=token)
        return True
      os.remove(os.path.join(root, STAGING_MARKER))
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(root, 0o777 & ~umask)  # mkdtemp made it private; a checkpoint gets ordinary permissions.
      try:
        os.rename(root, path)  # Atomic; fails if another save already created `path`.
        _fsync_dir(os.path.dirname(path))
        return True
      except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
          shutil.rmtree(root, ignore_errors=True)
          raise
      # Another save created `path` while we wrote: we lost the race.
      if not overwrite:
        shutil.rmtree(root, ignore_errors=True)
        raise FileExistsError(
            f"`path` {path!r} was created by another save while this one was writing; pass overwrite=True to "
            "replace it."
        )
      try:
        _check_target(path, overwrite=True)
        with _locked(path) as got:
          if not got:
            raise FileExistsError(f"`path` {path!r} was removed or replaced while this save waited for it; save again.")
          theirs = _read_pointer(path).get("token") or token
          marker = os.path.join(root, version, VERSION_MARKER)
          _write_new_file(marker + ".tmp", json.dumps({"token": theirs, "version": version}).encode())
          os.replace(marker + ".tmp", marker)
          os.rename(os.path.join(root, version), os.path.join(path, version))
          _write_pointer(path, version, theirs, description)
          _remove_unreferenced(path, keep=version, token=theirs)
      finally:
        shutil.rmtree(root, ignore_errors=True)
      return True

    _run_on_primary(commit)


def load_adapters(path: str | os.PathLike, params: Optional[PyTree] = None) -> Adapters:
  """Loads adapters saved by :func:`save_adapters`.

  Everything is checked before anything is returned: the pointer file, the metadata (methods,
  shapes), and every array's name, shape and dtype against the structure the method builds for the
  recorded weight shape. A damaged checkpoint gives one ``ValueError`` naming ``path`` and what is
  wrong. Loading while other processes overwrite ``path`` reads the old or the new checkpoint,
  never a mixture and never a spurious error: the version being read is held with a shared
  ``flock`` (a writer leaves it for a later save to remove), and a version switched away before it
  could be locked is followed to the new one. Format 2 and 3 checkpoints are read.

  Args:
    path: checkpoint directory.
    params: the base parameters the adapters will be merged into. When given, every adapter's path
      must exist in ``params`` with the shape it was trained for, or nothing is loaded.

  Returns:
    ``{path: Adapter}`` with host NumPy arrays, equal (bit for bit) to what was saved.

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: if ``path`` is not an adapter checkpoint, is corrupted, truncated or inconsistent
      (e.g. metadata saying rank 2 over arrays of rank 4), or does not fit ``params``.
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"`path` must be a str or os.PathLike directory name, got {type(path).__name__}.")
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"`path` {path!r} does not exist.")
  if not os.path.isdir(path):
    raise ValueError(f"`path` {path!r} is a file, not an adapter checkpoint directory.")
  if os.path.isfile(os.path.join(path, "adapter_config.json")):
    raise ValueError(f"`path` {path!r} is a HuggingFace PEFT adapter directory: read it with sp.peft.import_peft(path, params).")
  for _ in range(1000):
    pointer = _read_pointer(path)
    version_dir = os.path.join(path, pointer["current"])
    # A shared lock on the version keeps a concurrent overwrite from removing it while we read it.
    with _locked(version_dir, shared=True) as got:
      if got:
        orbax_dir = version_dir if pointer["format_version"] == 2 else os.path.join(version_dir, ORBAX_DIR)
        return _load_version(path, orbax_dir, params)
    if _read_pointer(path)["current"] == pointer["current"]:
      raise ValueError(f"Checkpoint {path!r} is corrupted: its current version {pointer['current']!r} is missing "
                       "(or is not a directory).")
    # An overwrite switched versions meanwhile: read the new one.
  raise ValueError(f"Checkpoint {path!r} changed more than 1000 times while it was being read.")


def _load_version(path: str, version_dir: str, params: Optional[PyTree]) -> Adapters:
  """Reads the orbax checkpoint ``version_dir`` of the checkpoint ``path`` (see :func:`load_adapters`)."""
  ocp, checkpointer = _checkpointer()
  try:
    return _restore(path, version_dir, params, ocp, checkpointer)
  finally:
    _close(checkpointer)


def _close(checkpointer: Any) -> None:
  with contextlib.suppress(Exception):
    checkpointer.close()


def _restore(path, version_dir, params, ocp, checkpointer) -> Adapters:
  try:
    metadata = checkpointer.restore(version_dir, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  except Exception as err:  # orbax raises many types for missing or damaged files.
    raise ValueError(f"Checkpoint {path!r} is corrupted: its metadata cannot be read ({_first_line(err)}).") from None
  entries = _check_metadata(path, metadata)

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

  structures = [_structure(path, entry) for entry in entries]
  expected: dict[tuple[str, ...], Any] = {}
  for entry, (_, p, f) in zip(entries, structures):
    expected.update(_named_leaves(entry["path"], p, f))
  restored: dict[str, Any] = {}
  if expected:
    restore_args = _nest({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in expected})
    try:
      restored = checkpointer.restore(
          version_dir,
          args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(_nest(expected), restore_args=restore_args)),
      )["arrays"]
    except Exception as err:
      raise ValueError(f"Checkpoint {path!r} is corrupted or incomplete: its arrays cannot be read ({_first_line(err)}).") from None

  adapters: Adapters = {}
  for entry, (method, p, f) in zip(entries, structures):
    leaves = {}
    for keys, want in _named_leaves(entry["path"], p, f).items():
      got = _lookup(restored, keys)
      label = "/".join(keys)
      if got is None or not hasattr(got, "shape"):
        raise ValueError(f"Checkpoint {path!r} is corrupted: the array {label!r} is missing.")
      if tuple(got.shape) != tuple(want.shape) or jnp.dtype(got.dtype) != jnp.dtype(want.dtype):
        raise ValueError(
            f"Checkpoint {path!r} is inconsistent: the metadata of {entry['path']!r} ({method!r} on shape "
            f"{tuple(entry['shape'])}) needs {label!r} of shape {tuple(want.shape)} and dtype {jnp.dtype(want.dtype)}, "
            f"but the stored array has shape {tuple(got.shape)} and dtype {got.dtype}."
        )
      leaves[keys] = got
    params_tree = jax.tree.unflatten(jax.tree.structure(p), [leaves[k] for k in _named_leaves(entry["path"], p, {})])
    frozen_keys = [k for k in _named_leaves(entry["path"], {}, f)]
    frozen_tree = jax.tree.unflatten(jax.tree.structure(f), [leaves[k] for k in frozen_keys])
    adapters[entry["path"]] = Adapter(
        params=params_tree,
        frozen=frozen_tree,
        method=method,
        shape=tuple(entry["shape"]),
        dtype=entry["dtype"],
        in_axes=entry["in_axes"],
        layout=entry.get("layout", "in_out"),
        stack_axes=int(entry.get("stack_axes", 0)),
    )
  return adapters


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _check_metadata(path: str, metadata: Any) -> list[dict[str, Any]]:
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"Checkpoint {path!r} is corrupted: its metadata does not describe a {FORMAT!r} checkpoint.")
  entries = metadata.get("adapters")
  if not isinstance(entries, list):
    raise ValueError(f"Checkpoint {path!r} is corrupted: its metadata has no list of adapters.")
  seen = set()
  for i, entry in enumerate(entries):
    ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("shape"), list)
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry["shape"])
          and isinstance(entry.get("in_axes"), int)
          and 1 <= entry["in_axes"] < max(len(entry["shape"]) - int(entry.get("stack_axes", 0)), 2)
          and isinstance(entry.get("dtype"), str) and isinstance(entry.get("method"), dict))
    if not ok:
      raise ValueError(f"Checkpoint {path!r} is corrupted: metadata entry {i} is not a valid adapter description: {entry!r}.")
    if entry["path"] in seen:
      raise ValueError(f"Checkpoint {path!r} is corrupted: the adapter path {entry['path']!r} appears twice.")
    seen.add(entry["path"])
  return entries


def _structure(path: str, entry: dict[str, Any]):
  """``(method, abstract params, abstract frozen)`` of one adapter, from its metadata alone."""
  try:
    method = method_from_config(entry["method"])
    dtype = jnp.dtype(entry["dtype"])
    stack = int(entry.get("stack_axes", 0))
    shape = tuple(entry["shape"])
    shell = Adapter({}, {}, method, shape[stack:], entry["dtype"], entry["in_axes"], entry.get("layout", "in_out"))
    mshape = shell.matrix_shape
    method.check_shape(mshape)
    w0 = jax.ShapeDtypeStruct(mshape, dtype)
    key = jax.random.key(0)
    params = jax.eval_shape(method.init, key, w0)
    frozen = jax.eval_shape(method.init_frozen, key, w0)
    stacked = lambda x: jax.ShapeDtypeStruct(shape[:stack] + tuple(x.shape), x.dtype)
    params, frozen = jax.tree.map(stacked, params), jax.tree.map(stacked, frozen)
  except Exception as err:
    raise ValueError(
        f"Checkpoint {path!r} is corrupted: the metadata of adapter {entry['path']!r} does not describe a valid "
        f"adapter ({_first_line(err)})."
    ) from None
  return method, params, frozen
