"""Processes that save adapter checkpoints, for tests/test_checkpoint_safety.py.

Modes:

* ``race --tag T --paths P1,P2,... --go-dir D``: for each path, waits for the file ``D/go-<i>``,
  then saves adapters marked with ``T`` (every trainable value offset by ``T``) with
  ``overwrite=False``; prints ``won <i>`` or ``lost <i> <error type>``.
* ``loop --path P``: saves once, prints ``ready``, then overwrites ``P`` forever with adapters
  marked ``1, 2, 3, ...`` (printing ``saved <k>`` after each), each followed by a fresh save to a
  new name in ``P-fresh/``; the test kills it with SIGKILL.
* ``multihost --process-id I --num-processes 2 --port N --path P``: two ``jax.distributed``
  processes save adapters sharded over both processes, overwrite them, and load them back.
* ``alone ...`` (same flags): only process 0 calls ``save_adapters``; it must raise, not hang.
* ``overwrite --path P --tag T --count N``: overwrites ``P`` N times with adapters marked ``T``
  (prints ``done``).
* ``read --path P --count N``: loads ``P`` N times; prints ``tag <t>`` or ``error <type>: <message>``
  per load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import spectral_peft as sp  # noqa: E402


def base_params():
  return {"enc": {"query": {"kernel": jnp.ones((8, 6))}, "value": {"kernel": jnp.ones((8, 6))}},
          "mlp": {"kernel": jnp.ones((8, 4))}}


def marked_adapters(tag: float):
  """LoRA adapters whose trainable arrays all equal ``tag`` (so a checkpoint tells who wrote it)."""
  adapters = sp.peft.init_adapters(jax.random.key(0), base_params(), sp.peft.LoRA(rank=4), "kernel")
  return {p: sp.peft.Adapter(jax.tree.map(lambda x: jnp.full_like(x, tag), a.params), a.frozen, a.method,
                             a.shape, a.dtype, a.in_axes) for p, a in adapters.items()}


def tag_of(adapters) -> float:
  """The tag of adapters made by :func:`marked_adapters` (checks every array carries the same one)."""
  values = {float(v) for a in adapters.values() for x in jax.tree.leaves(a.params) for v in np.ravel(x)}
  assert len(values) == 1, values
  return values.pop()


def race(args):
  for i, path in enumerate(args.paths.split(",")):
    go = os.path.join(args.go_dir, f"go-{i}")
    while not os.path.exists(go):
      time.sleep(0.001)
    try:
      sp.peft.save_adapters(path, marked_adapters(args.tag))
      print(f"won {i}", flush=True)
    except Exception as err:  # The test checks the type.
      print(f"lost {i} {type(err).__name__}", flush=True)


def loop(args):
  sp.peft.save_adapters(args.path, marked_adapters(0.0), overwrite=True)
  print("ready", flush=True)
  k = 1
  fresh = args.path + "-fresh"
  while True:
    sp.peft.save_adapters(args.path, marked_adapters(float(k)), overwrite=True)
    print(f"saved {k}", flush=True)
    # A fresh save (no overwrite) of a new name: a kill here leaves a hidden staging directory.
    sp.peft.save_adapters(os.path.join(fresh, f"ck-{os.getpid()}-{k}"), marked_adapters(float(k)))
    k += 1


def multihost(args):
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id, initialization_timeout=120)
  mesh = jax.make_mesh((jax.device_count(),), ("model",))
  for tag, overwrite in ((3.0, False), (5.0, True)):
    adapters = marked_adapters(tag)
    # Shard every trainable array over all 4 devices of both processes: no process holds it all.
    sharded = {}
    for p, a in adapters.items():
      params = {k: jax.device_put(v, NamedSharding(mesh, P(None, "model") if k == "a" else P("model", None)))
                for k, v in a.params.items()}
      assert all(not x.is_fully_addressable for x in params.values())
      sharded[p] = sp.peft.Adapter(params, a.frozen, a.method, a.shape, a.dtype, a.in_axes)
    sp.peft.save_adapters(args.path, sharded, overwrite=overwrite)
    loaded = sp.peft.load_adapters(args.path, base_params())
    assert tag_of(loaded) == tag, (tag_of(loaded), tag)
    print(f"process {jax.process_index()} loaded tag {tag_of(loaded)}", flush=True)
  try:
    sp.peft.save_adapters(args.path, marked_adapters(7.0))
    print(f"process {jax.process_index()} no error", flush=True)
  except FileExistsError:
    print(f"process {jax.process_index()} FileExistsError", flush=True)
  jax.distributed.shutdown()


def alone(args):
  """Only process 0 saves: it must raise (not hang) once the barrier times out."""
  from spectral_peft.peft._formats import checkpoint as _checkpoint

  jax.config.update("jax_num_cpu_devices", 2)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                             process_id=args.process_id, initialization_timeout=120)
  if jax.process_index() == 0:
    _checkpoint.BARRIER_TIMEOUT_S = 5
    try:
      sp.peft.save_adapters(args.path, marked_adapters(1.0))
      print("process 0 saved alone", flush=True)
    except RuntimeError as err:
      print(f"process 0 RuntimeError: {err}", flush=True)
  else:
    time.sleep(15)
  os._exit(0)  # The coordination service is in a failed barrier: skip the orderly shutdown.


def overwrite(args):
  for _ in range(args.count):
    sp.peft.save_adapters(args.path, marked_adapters(args.tag), overwrite=True)
  print("done", flush=True)


def read(args):
  for _ in range(args.count):
    try:
      print(f"tag {tag_of(sp.peft.load_adapters(args.path, base_params()))}", flush=True)
    except Exception as err:  # The test counts these: there must be none.
      print(f"error {type(err).__name__}: {str(err).splitlines()[0][:300]}", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=("race", "loop", "multihost", "alone", "overwrite", "read"))
  parser.add_argument("--count", type=int, default=1)
  parser.add_argument("--tag", type=float, default=0.0)
  parser.add_argument("--paths", default="")
  parser.add_argument("--go-dir", default="")
  parser.add_argument("--path", default="")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args(argv)
  {"race": race, "loop": loop, "multihost": multihost, "alone": alone, "overwrite": overwrite,
   "read": read}[args.mode](args)


if __name__ == "__main__":
  main(sys.argv[1:])
