"""Saving never destroys data; loading a damaged checkpoint fails with one clear error.

Concurrency, kill and multi-host cases run real subprocesses (tests/checkpoint_worker.py).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoint_worker
import spectral_peft as sp
from test_distributed import free_port, loopback_available

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoint_worker.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
PARAMS = checkpoint_worker.base_params()


def adapters(tag=1.0):
  return checkpoint_worker.marked_adapters(tag)


def versions(path):
  return sorted(e for e in os.listdir(path) if e.startswith("version-"))


# -- overwrite only replaces our own checkpoints -------------------------------------------------
def test_overwrite_refuses_a_directory_with_user_files(tmp_path):
  user = tmp_path / "results"
  user.mkdir()
  (user / "notes.txt").write_text("precious")
  with pytest.raises(ValueError, match=r"Refusing to overwrite `path`.*not an adapter checkpoint"):
    sp.peft.save_adapters(user, adapters(), overwrite=True)
  with pytest.raises(FileExistsError, match="already exists"):
    sp.peft.save_adapters(user, adapters())
  assert sorted(os.listdir(user)) == ["notes.txt"] and (user / "notes.txt").read_text() == "precious"
  assert sorted(os.listdir(tmp_path)) == ["results"]  # No hidden leftovers either.


@pytest.mark.parametrize("bad", ["", ".", "./"])
def test_the_working_directory_is_never_a_checkpoint_path(bad, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mine.txt").write_text("x")
  with pytest.raises(ValueError, match="`path` must name a checkpoint directory of its own"):
    sp.peft.save_adapters(bad, adapters(), overwrite=True)
  with pytest.raises(ValueError, match="`path` must name a checkpoint directory of its own"):
    sp.peft.save_adapters(str(tmp_path), adapters(), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_a_file_path_is_refused_and_kept(tmp_path):
  target = tmp_path / "weights.bin"
  target.write_bytes(b"data")
  for overwrite in (False, True):
    with pytest.raises(FileExistsError, match="not a directory"):
      sp.peft.save_adapters(target, adapters(), overwrite=overwrite)
  assert target.read_bytes() == b"data"
  with pytest.raises(ValueError, match="is a file"):
    sp.peft.load_adapters(target)


def test_an_empty_directory_may_receive_a_checkpoint(tmp_path):
  (tmp_path / "ckpt").mkdir()
  sp.peft.save_adapters(tmp_path / "ckpt", adapters(2.0))
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(tmp_path / "ckpt", PARAMS)) == 2.0


def test_overwrite_switches_versions_and_keeps_foreign_files_inside(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  (path / "README.txt").write_text("trained on X")  # A user's note inside our checkpoint survives.
  old = versions(path)
  sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
  new = versions(path)
  assert len(old) == len(new) == 1 and old != new
  assert (path / "README.txt").read_text() == "trained on X"
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 2.0
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_leftovers_of_interrupted_saves_are_removed_but_running_saves_and_user_folders_are_not(tmp_path):
  import contextlib

  from spectral_peft.peft._formats import checkpoint as _checkpoint

  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  token = json.loads((path / "spectral_peft_adapters.json").read_text())["token"]
  # What a save killed before its rename leaves: a marked hidden sibling whose lock nobody holds.
  with contextlib.ExitStack() as dead_stack:
    dead = _checkpoint._new_staging(str(path), dead_stack)
    os.mkdir(os.path.join(dead, "version-x"))
  empty = tmp_path / ".ckpt.saving-abcd1234"  # Killed before it even wrote its marker.
  empty.mkdir()
  # A save in progress in another process: its staging directory is locked.
  live_stack = contextlib.ExitStack()
  live = _checkpoint._new_staging(str(path), live_stack)
  # An unreferenced, half-written version inside the checkpoint (killed mid-overwrite).
  _checkpoint._new_version(str(path), "version-half", token)
  # Killed between making a version directory and completing its marker: hidden temporaries named
  # with the token, one empty, one with a partly written marker.
  killed_empty = path / _checkpoint._version_temporary("version-aaaa", token)
  killed_empty.mkdir()
  killed_partial = path / _checkpoint._version_temporary("version-bbbb", token)
  killed_partial.mkdir()
  (killed_partial / _checkpoint.VERSION_MARKER).write_text('{"tok')
  # The same name pattern holding anything else is not ours to remove.
  user_temp = path / _checkpoint._version_temporary("version-cccc", token)
  user_temp.mkdir()
  (user_temp / "data.txt").write_text("mine")
  # Look-alikes the library did not write: kept, whatever their names.
  user_sibling = tmp_path / ".ckpt.saving-userdata"
  user_sibling.mkdir()
  (user_sibling / "notes.txt").write_text("mine")
  (path / "version-mine").mkdir()
  (path / "version-mine" / "data.txt").write_text("mine")
  try:
    sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), ".ckpt.saving-userdata", "ckpt"])
    remaining = versions(path)
    assert "version-half" not in remaining and "version-mine" in remaining and len(remaining) == 2
    assert (path / "version-mine" / "data.txt").read_text() == "mine"
    assert not killed_empty.exists() and not killed_partial.exists()
    assert (user_temp / "data.txt").read_text() == "mine"
    assert (user_sibling / "notes.txt").read_text() == "mine"
  finally:
    live_stack.close()


# -- concurrency, kills, multi-host ----------------------------------------------------------------
@pytest.mark.slow
def test_concurrent_saves_without_overwrite_have_exactly_one_winner(tmp_path):
  trials = 8
  paths = [str(tmp_path / f"ckpt{i}") for i in range(trials)]
  go = tmp_path / "go"
  go.mkdir()
  procs = [subprocess.Popen([sys.executable, WORKER, "race", "--tag", str(tag), "--paths", ",".join(paths),
                             "--go-dir", str(go)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for tag in (1.0, 2.0)]
  try:
    time.sleep(0.5)
    for i in range(trials):
      (go / f"go-{i}").write_text("")
      time.sleep(0.05)
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  lines = [dict((l.split()[1], l.split()[0] + " " + " ".join(l.split()[2:])) for l in out.splitlines()) for out, _ in outs]
  for i in range(trials):
    results = [lines[0].get(str(i)), lines[1].get(str(i))]
    winners = [tag for tag, r in zip((1.0, 2.0), results) if r and r.startswith("won")]
    assert len(winners) == 1, (i, results, outs[0][1][-2000:], outs[1][1][-2000:])
    assert any(r == "lost FileExistsError" for r in results), results
    assert checkpoint_worker.tag_of(sp.peft.load_adapters(paths[i], PARAMS)) == winners[0]
  assert sorted(os.listdir(tmp_path)) == sorted(["go"] + [os.path.basename(p) for p in paths])


@pytest.mark.slow
def test_killing_an_overwriting_save_always_leaves_a_complete_checkpoint(tmp_path):
  path, fresh = tmp_path / "ckpt", tmp_path / "ckpt-fresh"
  rng = random.Random(0)
  highest = 0
  for _ in range(4):
    proc = subprocess.Popen([sys.executable, WORKER, "loop", "--path", str(path)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
      assert proc.stdout.readline().strip() == "ready"
      time.sleep(rng.uniform(0.05, 1.0))  # Several saves per second: kills land anywhere in a save.
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    saved = [int(l.split()[1]) for l in proc.stdout.read().splitlines() if l.startswith("saved")]
    last = saved[-1] if saved else 0
    highest = max(highest, last)
    # The path holds the last completed save or the one that was being committed when killed.
    tag = checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS))
    assert tag in (last, last + 1), (tag, last)
    # Every fresh checkpoint that appeared is complete (it appears only once written).
    for name in os.listdir(fresh) if os.path.isdir(fresh) else []:
      if not name.startswith("."):
        assert checkpoint_worker.tag_of(sp.peft.load_adapters(fresh / name, PARAMS)) == float(name.split("-")[-1])
  assert highest > 0  # The kills did interrupt a running loop of saves.
  sp.peft.save_adapters(path, adapters(100.0), overwrite=True)
  sp.peft.save_adapters(fresh / "final", adapters(100.0))
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 100.0
  assert len(versions(path)) == 1
  assert sorted(os.listdir(tmp_path)) == ["ckpt", "ckpt-fresh"]
  assert not [e for e in os.listdir(fresh) if e.startswith(".")]  # No staging leftovers accumulate.


def _two_processes(mode, tmp_path):
  """Runs the checkpoint worker in ``mode`` as two jax.distributed processes; returns (procs, logs, path)."""
  if not loopback_available():
    pytest.skip("no TCP loopback interface (127.0.0.1) to run jax.distributed's coordinator on")
  port, path = free_port(), tmp_path / "ckpt"
  procs = [subprocess.Popen([sys.executable, WORKER, mode, "--process-id", str(i), "--port", str(port),
                             "--path", str(path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return procs, logs, path


@pytest.mark.slow
def test_two_process_save_and_load(tmp_path):
  procs, logs, path = _two_processes("multihost", tmp_path)
  for i, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, log[-4000:]
    assert f"process {i} loaded tag 3.0" in log and f"process {i} loaded tag 5.0" in log
    assert f"process {i} FileExistsError" in log  # The refusal reaches every process, none hangs.
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 5.0
  assert sorted(os.listdir(tmp_path)) == ["ckpt"] and len(versions(path)) == 1


# -- loading damaged checkpoints -------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(3.0))
  return path


def _version(path):
  """The orbax checkpoint of the current version."""
  (v,) = versions(path)
  return path / v / "checkpoint"


def _data_file(path):
  """The OCDBT data file that holds the arrays (the one a restore reads)."""
  (f,) = glob.glob(str(_version(path) / "arrays" / "d" / "*"))
  return f


def test_truncated_arrays(saved):
  f = _data_file(saved)
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 2)
  with pytest.raises(ValueError, match=rf"Checkpoint '{saved}' is corrupted or incomplete: its arrays cannot be read"):
    sp.peft.load_adapters(saved)


def test_bit_flip_in_arrays(saved):
  f = _data_file(saved)
  data = bytearray(open(f, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(f, "wb").write(bytes(data))
  with pytest.raises(ValueError, match=rf"Checkpoint '{saved}' is corrupted"):
    sp.peft.load_adapters(saved)


def test_partly_deleted(saved):
  shutil.rmtree(_version(saved) / "metadata")
  with pytest.raises(ValueError, match=rf"Checkpoint '{saved}' is corrupted: its metadata cannot be read"):
    sp.peft.load_adapters(saved)
  shutil.rmtree(_version(saved).parent)
  with pytest.raises(ValueError, match=rf"Checkpoint '{saved}' is corrupted: its current version .* is missing"):
    sp.peft.load_adapters(saved)
  os.remove(saved / "spectral_peft_adapters.json")
  with pytest.raises(ValueError, match="is not an adapter checkpoint: it has no 'spectral_peft_adapters.json'"):
    sp.peft.load_adapters(saved)


def test_hand_edited_pointer(saved):
  (saved / "spectral_peft_adapters.json").write_text("{not json")
  with pytest.raises(ValueError, match="is not valid JSON"):
    sp.peft.load_adapters(saved)
  (saved / "spectral_peft_adapters.json").write_text(json.dumps({"format": "spectral_peft.adapters",
                                                                  "format_version": 3, "current": "../../etc"}))
  with pytest.raises(ValueError, match="names no valid version"):
    sp.peft.load_adapters(saved)


def _edit_metadata(path, edit):
  f = _version(path) / "metadata" / "metadata"
  metadata = json.loads(f.read_text())
  edit(metadata)
  f.write_text(json.dumps(metadata))


def test_metadata_that_disagrees_with_the_arrays_is_refused(saved):
  # The adapters have rank 4; metadata saying rank 2 would load them with the wrong alpha / rank scale.
  def to_rank_2(metadata):
    for entry in metadata["adapters"]:
      entry["method"]["rank"] = 2

  _edit_metadata(saved, to_rank_2)
  with pytest.raises(ValueError, match=r"is inconsistent: .*LoRA\(rank=2.*needs 'enc/query/kernel/params/a' of shape "
                                       r"\(8, 2\).*stored array has shape \(8, 4\)"):
    sp.peft.load_adapters(saved)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["adapters"][0]["method"].update(method="NoSuchMethod"), "Unknown adapter method 'NoSuchMethod'"),
    (lambda m: m["adapters"][0]["method"].update(rank=-3), "`rank` must be a positive int"),
    (lambda m: m["adapters"][0].update(shape=[8, "six"]), "metadata entry 0 is not a valid adapter description"),
    (lambda m: m["adapters"].append(m["adapters"][0]), "appears twice"),
    (lambda m: m.update(adapters=None), "has no list of adapters"),
])
def test_hand_edited_metadata(saved, edit, message):
  _edit_metadata(saved, edit)
  with pytest.raises(ValueError, match=rf"Checkpoint '{saved}' is corrupted.*{message}"):
    sp.peft.load_adapters(saved)


# -- what may be saved -----------------------------------------------------------------------------
def test_empty_adapters_save_and_load(tmp_path):
  sp.peft.save_adapters(tmp_path / "empty", {})
  assert sp.peft.load_adapters(tmp_path / "empty") == {}


def test_saving_inside_jit_is_a_clear_error(tmp_path):
  def step(ad):
    sp.peft.save_adapters(tmp_path / "inside", ad)
    return ad

  with pytest.raises(TypeError, match="cannot run inside jit"):
    jax.jit(step)(adapters())
  assert not os.path.exists(tmp_path / "inside") and os.listdir(tmp_path) == []


def test_numpy_scalar_specs_save_and_load(tmp_path):
  method = sp.peft.LoRA(rank=np.int64(2), alpha=np.float32(4.0))
  assert method == sp.peft.LoRA(rank=2, alpha=4.0) and type(method.rank) is int and type(method.alpha) is float
  ad = sp.peft.init_adapters(jax.random.key(0), PARAMS, method, "kernel")
  sp.peft.save_adapters(tmp_path / "np", ad)
  chex.assert_trees_all_equal(sp.peft.load_adapters(tmp_path / "np", PARAMS), ad)


def test_the_saved_tree_is_named_by_adapter_path(saved):
  metadata = json.loads((_version(saved) / "arrays" / "_METADATA").read_text())
  names = {tuple(k["key"] for k in v["key_metadata"]) for v in metadata["tree_metadata"].values()}
  assert ("enc", "query", "kernel", "params", "a") in names and ("mlp", "kernel", "params", "b") in names
  assert not any(k.startswith("adapter_") or k.startswith("leaf_") for n in names for k in n)


def test_frozen_constants_are_saved_by_name(tmp_path):
  params = {"w": jnp.ones((6, 5))}
  ad = sp.peft.init_adapters(jax.random.key(0), params, sp.peft.SHiRA(n_params=4), "w")
  sp.peft.save_adapters(tmp_path / "s", ad)
  metadata = json.loads((_version(tmp_path / "s") / "arrays" / "_METADATA").read_text())
  names = {tuple(k["key"] for k in v["key_metadata"]) for v in metadata["tree_metadata"].values()}
  assert names == {("w", "params", "values"), ("w", "frozen", "indices")}
  loaded = sp.peft.load_adapters(tmp_path / "s", params)
  np.testing.assert_array_equal(loaded["w"].frozen["indices"], ad["w"].frozen["indices"])
  np.testing.assert_array_equal(loaded["w"].params["values"], ad["w"].params["values"])


def test_format_1_checkpoints_are_named_and_may_be_overwritten(tmp_path):
  legacy = tmp_path / "old"
  (legacy / "metadata").mkdir(parents=True)
  (legacy / "arrays").mkdir()
  (legacy / "metadata" / "metadata").write_text(json.dumps({"format_version": 1, "adapters": []}))
  (legacy / "_CHECKPOINT_METADATA").write_text("{}")
  with pytest.raises(ValueError, match="older spectral_peft \\(format version 1\\)"):
    sp.peft.load_adapters(legacy)
  sp.peft.save_adapters(legacy, adapters(4.0), overwrite=True)
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(legacy, PARAMS)) == 4.0
  # The format-1 files carry no proof that this library wrote them: they are left, not deleted.
  assert sorted(e for e in os.listdir(legacy) if not e.startswith("version-")) == [
      "_CHECKPOINT_METADATA", "arrays", "metadata", "spectral_peft_adapters.json"]


@pytest.mark.slow
def test_a_save_on_one_process_only_raises_instead_of_hanging(tmp_path):
  procs, logs, path = _two_processes("alone", tmp_path)
  # Process 0 gets a clear error after the (shortened) barrier timeout; the coordination service then
  # reports the failed barrier to process 1 too (JAX aborts it), so the job stops instead of hanging.
  assert "process 0 RuntimeError: save_adapters is collective under jax.distributed" in logs[0], logs[0][-3000:]
  assert not os.path.exists(path) and os.listdir(tmp_path) == []
