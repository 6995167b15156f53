"""Checkpoints under hostile use: forged pointer files, planted links, concurrent overwrite + load,
and what a saved directory says about itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import checkpoint_worker
import spectral_peft as sp
from test_checkpoint_safety import ENV, PARAMS, WORKER, adapters, versions

POINTER = "spectral_peft_adapters.json"


def _user_folders(path):
  for name in ("version-a", "version-b"):
    (path / name).mkdir(parents=True)
    (path / name / "results.csv").write_text(f"{name} data")


@pytest.mark.parametrize("format_version", [2, 3])
def test_a_forged_pointer_file_deletes_nothing(tmp_path, format_version):
  path = tmp_path / "experiment"
  _user_folders(path)
  forged = {"format": "spectral_peft.adapters", "format_version": format_version, "current": "version-a"}
  if format_version == 3:
    forged["token"] = "0" * 32
  (path / POINTER).write_text(json.dumps(forged))
  sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
  for name in ("version-a", "version-b"):
    assert (path / name / "results.csv").read_text() == f"{name} data"
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 2.0
  sp.peft.save_adapters(path, adapters(3.0), overwrite=True)  # Our own old version goes, theirs stay.
  assert (path / "version-a" / "results.csv").exists() and (path / "version-b" / "results.csv").exists()
  assert len(versions(path)) == 3


def test_a_copied_token_without_our_marker_deletes_nothing(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  _user_folders(path)  # Folders named like versions, inside a real checkpoint.
  sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
  assert (path / "version-a" / "results.csv").read_text() == "version-a data"
  assert (path / "version-b" / "results.csv").read_text() == "version-b data"


def test_a_link_as_the_checkpoint_path_is_refused(tmp_path):
  real = tmp_path / "real"
  sp.peft.save_adapters(real, adapters(1.0))
  os.symlink(real, tmp_path / "link")
  for overwrite in (False, True):
    with pytest.raises(ValueError, match="symbolic link"):
      sp.peft.save_adapters(tmp_path / "link", adapters(2.0), overwrite=overwrite)
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(real, PARAMS)) == 1.0
  empty = tmp_path / "empty"
  empty.mkdir()
  os.symlink(empty, tmp_path / "link2")
  with pytest.raises(ValueError, match="symbolic link"):
    sp.peft.save_adapters(tmp_path / "link2", adapters(2.0))
  assert os.listdir(empty) == []


def test_a_planted_pointer_link_is_never_written_through(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  victim = tmp_path / "victim.json"
  victim.write_text(json.dumps(json.loads((path / POINTER).read_text())))
  os.remove(path / POINTER)
  os.symlink(victim, path / POINTER)
  before = victim.read_text()
  with pytest.raises(ValueError, match="symbolic link"):
    sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
  assert victim.read_text() == before


def test_a_planted_link_in_place_of_a_version_is_not_followed(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  token = json.loads((path / POINTER).read_text())["token"]
  outside = tmp_path / "outside"
  outside.mkdir()
  (outside / "spectral_peft_version.json").write_text(json.dumps({"token": token, "version": "version-zz"}))
  (outside / "keep.txt").write_text("mine")
  os.symlink(outside, path / "version-zz")
  sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
  assert (outside / "keep.txt").read_text() == "mine"


def test_a_saved_directory_describes_itself_and_holds_no_stray_files(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  sp.peft.save_adapters(path, adapters(2.0), overwrite=True)
  (version,) = versions(path)
  assert sorted(os.listdir(path)) == sorted([POINTER, version])  # No '.lock', no temporaries.
  assert sorted(os.listdir(path / version)) == ["checkpoint", "spectral_peft_version.json"]
  text = (path / POINTER).read_text()
  assert "\n" in text  # Indented for people.
  about = json.loads(text)
  assert about["library"] == "spectral_peft" and about["library_version"] == sp.__version__
  assert about["current"] == version and about["format_version"] == 3
  by_path = {entry["path"]: entry for entry in about["adapters"]}
  assert sorted(by_path) == sorted(adapters())
  assert by_path["enc/query/kernel"]["method"]["rank"] == 4 and by_path["enc/query/kernel"]["shape"] == [8, 6]
  assert by_path["enc/query/kernel"]["trainable_parameters"] == 4 * (8 + 6)
  assert about["trainable_parameters"] == sum(e["trainable_parameters"] for e in about["adapters"])
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # Ordinary permissions, not mkdtemp's private 0o700.


@pytest.mark.slow
def test_loads_during_concurrent_overwrites_always_get_the_old_or_the_new_checkpoint(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(1.0))
  writers = [subprocess.Popen([sys.executable, WORKER, "overwrite", "--path", str(path), "--tag", str(tag),
                               "--count", "25"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in (1.0, 2.0)]
  reader = subprocess.Popen([sys.executable, WORKER, "read", "--path", str(path), "--count", "150"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out, err = reader.communicate(timeout=500)
    writer_logs = [w.communicate(timeout=500) for w in writers]
  finally:
    for p in writers + [reader]:
      if p.poll() is None:
        p.kill()
  assert all(w.returncode == 0 and "done" in log for w, (log, _) in zip(writers, writer_logs)), writer_logs
  lines = out.splitlines()
  assert len(lines) == 150, (out[-2000:], err[-3000:])
  errors = [l for l in lines if not l.startswith("tag ")]
  assert not errors, errors[:5]
  assert {l for l in lines} <= {"tag 1.0", "tag 2.0"}
  assert "Event loop is closed" not in err, err[-3000:]
  assert len(versions(path)) >= 1 and sorted(e for e in os.listdir(tmp_path)) == ["ckpt"]


def _as_format_2(path):
  """Rewrites a fresh checkpoint into the format-2 layout (orbax files in the version, no token)."""
  (version,) = versions(path)
  inner = path / version / "checkpoint"
  os.remove(path / version / "spectral_peft_version.json")
  for name in os.listdir(inner):
    os.rename(inner / name, path / version / name)
  os.rmdir(inner)
  (path / POINTER).write_text(json.dumps({"format": "spectral_peft.adapters", "format_version": 2, "current": version}))
  (path / ".lock").write_text("")
  return version


def test_format_2_checkpoints_load_and_are_overwritten_without_deleting_their_files(tmp_path):
  path = tmp_path / "ckpt"
  sp.peft.save_adapters(path, adapters(5.0))
  old = _as_format_2(path)
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 5.0
  sp.peft.save_adapters(path, adapters(6.0), overwrite=True)
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 6.0
  assert old in versions(path) and (path / ".lock").exists()  # No token proves them ours: left in place.
  sp.peft.save_adapters(path, adapters(7.0), overwrite=True)
  assert checkpoint_worker.tag_of(sp.peft.load_adapters(path, PARAMS)) == 7.0
  assert len(versions(path)) == 2  # The format-2 version and the current one; our own old one is gone.
