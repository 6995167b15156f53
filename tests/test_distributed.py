"""Two-process ``jax.distributed`` adapter training on loopback: both processes agree, and equal one device.

The workers (tests/distributed_worker.py) run with CPU collectives (gloo over TCP on 127.0.0.1),
each with 2 CPU devices, on a (data=2, model=2) mesh whose data axis spans the two processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import distributed_worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def loopback_available() -> bool:
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
    return True
  except OSError:
    return False


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
  if not loopback_available():
    pytest.skip("no TCP loopback interface (127.0.0.1) to run jax.distributed's coordinator on")
  tmp = tmp_path_factory.mktemp("distributed")
  port = free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
         "XLA_FLAGS": "--xla_backend_optimization_level=0"}
  outs = [tmp / f"process_{i}.npz" for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, "--process-id", str(i), "--num-processes", "2", "--port", str(port),
           "--out", str(outs[i])],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      )
      for i in range(2)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=240)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
  return [dict(np.load(out)) for out in outs], logs


@pytest.mark.slow
def test_both_processes_end_with_identical_adapters(distributed_results):
  results, logs = distributed_results
  assert set(results[0]) == set(results[1])
  assert set(results[0]) == {"mlp_in/kernel/a", "mlp_in/kernel/b", "mlp_out/kernel/a", "mlp_out/kernel/b", "losses"}
  for name in results[0]:
    np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)
  for i, log in enumerate(logs):
    assert f"process {i} losses" in log


@pytest.mark.slow
def test_data_parallel_run_equals_single_device_training(distributed_results):
  results, _ = distributed_results
  adapters, losses = distributed_worker.train(mesh=None)
  expected = distributed_worker.flat_arrays(adapters, losses)
  assert set(expected) == set(results[0])
  for name, want in expected.items():
    np.testing.assert_allclose(results[0][name], want, rtol=2e-5, atol=1e-6, err_msg=name)
  # The adapters trained: the loss went down and b left its zero initialisation.
  assert losses[-1] < 0.9 * losses[0]
  assert all(np.any(expected[f"{kernel}/kernel/b"] != 0) for kernel in ("mlp_in", "mlp_out"))
