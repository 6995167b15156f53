"""Tests for the experiments' shared plumbing (experiments/_common.py): the helpers every script relies on."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import _common


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [0.5, 4.0, -1.0, 2.5]])
def test_sample_std_is_numpy_ddof1_and_zero_for_one_value(values):
  expected = np.std(values, ddof=1) if len(values) > 1 else 0.0
  assert _common.sample_std(values) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("keyed", [False, True])
def test_optimize_equals_a_handwritten_optax_loop(keyed):
  target = jnp.asarray([1.0, -2.0, 0.5])

  def loss(p, key=None):
    noise = 0.0 if key is None else 0.1 * jax.random.normal(key, p.shape)
    return jnp.sum(jnp.square(p - target + noise))

  tx = optax.adam(0.1)
  key = jax.random.key(3) if keyed else None
  got = _common.optimize(loss, jnp.zeros(3), tx, 7, key=key)
  params, state = jnp.zeros(3), tx.init(jnp.zeros(3))
  for i in range(7):
    grads = jax.grad(loss)(params, *(() if key is None else (jax.random.fold_in(key, i),)))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(got, params, rtol=1e-6, atol=1e-7)


def test_transformer_parameter_paths_are_the_ones_the_benchmarks_target():
  model = _common.Transformer(embed=8, heads=2, mlp=16, layers=2)
  x = jnp.ones((1, 3, 8))
  params = model.init(jax.random.key(0), x)["params"]
  paths = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  for i in range(2):
    assert {f"block_{i}/attention/query/kernel", f"block_{i}/attention/value/kernel",
            f"block_{i}/mlp_in/kernel", f"block_{i}/mlp_out/kernel"} <= paths
  assert params["block_0"]["mlp_in"]["kernel"].shape == (8, 16)
  assert model.apply({"params": params}, x).shape == x.shape


def test_time_interleaved_runs_every_call_once_per_round_in_order():
  calls = []
  times = _common.time_interleaved({k: (lambda k=k: calls.append(k)) for k in "ab"}, 3, desc=None)
  assert calls == ["a", "b"] * 3
  assert list(times) == ["a", "b"] and all(len(t) == 3 for t in times.values())
  assert set(_common.milliseconds([0.001, 0.003, 0.002])) == {"min_ms", "median_ms", "max_ms"}
  assert _common.milliseconds([0.001, 0.003, 0.002])["median_ms"] == pytest.approx(2.0)


def test_save_and_write_preset_results_file_names(tmp_path):
  out = str(tmp_path)
  _common.save(out, {"table": "| a |\n"}, stem="step_time")
  _common.save(out, {"table": "| b |\n"})
  _common.write_preset_results(out, "demo", "quick", "| c |\n", {"x": np.float32(1.5)})
  assert sorted(os.listdir(out)) == ["results.json", "results_quick.json", "step_time.json", "step_time.md",
                                     "table.md", "table_quick.md"]
  assert open(tmp_path / "table_quick.md").read() == "# demo (quick)\n\n| c |\n"
  assert json.load(open(tmp_path / "results_quick.json")) == {"x": 1.5}
  assert "environment" in json.load(open(tmp_path / "results.json"))


def test_cli_prints_what_show_returns_and_rejects_an_unknown_preset(monkeypatch, capsys):
  main = lambda preset: {"table": f"table of {preset}", "verdict": "verdict"}  # noqa: E731
  monkeypatch.setattr(sys, "argv", ["prog", "--preset", "full"])
  _common.cli(main, {"quick": 0, "full": 1}, "Doc line.\nmore")
  assert capsys.readouterr().out == "table of full\nverdict\n"
  _common.cli(main, ("quick", "full"), "Doc.", show=lambda r: r["table"])
  assert capsys.readouterr().out == "table of full\n"
  monkeypatch.setattr(sys, "argv", ["prog", "--preset", "huge"])
  with pytest.raises(SystemExit):
    _common.cli(main, ("quick", "full"), "Doc.")
  assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_measured_returns_the_value_and_non_negative_times():
  value, usage = _common.measured(lambda: sum(range(10_000)))
  assert value == sum(range(10_000))
  assert usage.wall_s >= 0.0 and usage.cpu_s >= 0.0 and usage.children_cpu_s >= 0.0 and usage.max_rss_mb > 0.0


def test_machine_and_versions_say_what_a_run_was_measured_on():
  m = _common.machine()
  assert set(m) == {"cpu", "cores", "platform", "backend", "devices"}
  assert isinstance(m["cpu"], str) and m["cpu"] and m["cores"] >= 1
  v = _common.versions()
  assert v["jax"] == jax.__version__ and v["spectral_peft"] and v["python"]
  assert set(_common.git_revision(str(os.path.dirname(__file__)))) == {"commit", "dirty"}
  assert _common.git_revision("/") in ({"commit": None, "dirty": None},) or _common.git_revision("/")["commit"]


@pytest.mark.parametrize("config, expected", [(None, 1), (type("C", (), {"seeds": 5})(), 5),
                                              (type("C", (), {"seeds": (0, 1, 2)})(), 3),
                                              (type("C", (), {"init_seeds": (0, 1)})(), 2)])
def test_seeds_of_reads_an_int_or_a_sequence(config, expected):
  assert _common.seeds_of(config) == expected


def test_record_writes_a_loadable_run_with_its_command_machine_and_cost(tmp_path, monkeypatch):
  import dataclasses
  import datetime

  @dataclasses.dataclass(frozen=True)
  class Config:
    steps: int = 10
    seeds: int = 3

  monkeypatch.setattr(_common, "RECORD_SIZE_LIMIT", 1000)
  result = {"table": "| a |\n", "verdict": "Matches (3 seeds)", "config": Config(), "plot": "results/x.png",
            "rows": [{"psnr": np.float32(1.5)}], "curves": list(range(1000))}
  usage = _common.Usage(wall_s=120.0, cpu_s=230.0, children_cpu_s=0.0, max_rss_mb=512.0)
  when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
  path = _common.record("demo", "long", result, usage, command="python -m experiments --preset long --only demo --record",
                        root=str(tmp_path), date=when)
  assert path == str(tmp_path / "demo" / "long.json")
  rec = json.load(open(path))
  assert rec["experiment"] == "demo" and rec["preset"] == "long" and rec["seeds"] == 3
  assert rec["date"] == "2026-01-02T03:04:05Z" and rec["command"].startswith("python -m experiments")
  assert rec["config"] == {"steps": 10, "seeds": 3} and rec["verdict"] == "Matches (3 seeds)" and rec["table"] == "| a |\n"
  assert rec["usage"] == {"wall_s": 120.0, "cpu_s": 230.0, "children_cpu_s": 0.0, "max_rss_mb": 512.0}
  assert rec["result"] == {"rows": [{"psnr": 1.5}]} and sorted(rec["left_out"]) == ["curves", "plot"]
  assert {"jax", "spectral_peft"} <= set(rec["versions"]) and rec["machine"]["cores"] >= 1
  md = open(tmp_path / "demo" / "long.md").read()
  assert "wall 2.0 min, CPU 3.8 min" in md and "3 seeds" in md and "Matches (3 seeds)" in md
  # load_recorded orders by the preset list (small to large budgets), then by name; nothing -> [].
  _common.record("demo", "short", result, usage, command="c", root=str(tmp_path), date=when)
  _common.record("demo", "other", result, usage, command="c", root=str(tmp_path), date=when)
  assert [r["preset"] for r in _common.load_recorded("demo", str(tmp_path), ("short", "long"))] == ["short", "long", "other"]
  assert _common.load_recorded("missing", str(tmp_path)) == []


def test_report_shows_the_recorded_run_beside_and_rests_on_it(tmp_path, monkeypatch):
  from experiments import report

  result = {"table": "| recorded |\n", "verdict": "Matches (5 seeds)", "config": None}
  _common.record("sinusoidal_init", "seeds3", result, _common.Usage(1.0, 2.0, 0.0, 1.0), command="cmd",
                 root=str(tmp_path))
  (tmp_path / "sinusoidal_init" / "NOTES.md").write_text("Settled by the recorded run.\n")
  text, rests_on = report.recorded_section("sinusoidal_init", str(tmp_path))
  assert rests_on["preset"] == "seeds3" and "| recorded |" in text and "Matches (5 seeds)" in text
  assert "Settled by the recorded run." in text
  assert report.recorded_section("sinusoidal_init", str(tmp_path / "none")) == ("", None)
  assert report._headline("Does not match (3 seeds): x") == "Does not match"
  with pytest.raises(ValueError, match="not defined"):
    report._check_presets(report._known(("sinusoidal_init",)), "no_such_preset")


def test_report_shows_a_partial_recorded_run_without_resting_on_it(tmp_path):
  from experiments import finetune_comparison, report

  assert "sparse" in finetune_comparison.PARTIAL_PRESETS
  result = {"table": "| two methods |\n", "verdict": "Does not match (0/4)", "config": None}
  _common.record("finetune_comparison", "sparse", result, _common.Usage(1.0, 2.0, 0.0, 1.0), command="cmd",
                 root=str(tmp_path))
  text, rests_on = report.recorded_section("finetune_comparison", str(tmp_path))
  assert "| two methods |" in text and rests_on is None
  _common.record("finetune_comparison", "full", {**result, "table": "| all |\n"}, _common.Usage(1.0, 2.0, 0.0, 1.0),
                 command="cmd", root=str(tmp_path))
  _, rests_on = report.recorded_section("finetune_comparison", str(tmp_path))
  assert rests_on["preset"] == "full"  # the whole claim, though "sparse" comes later in PRESETS


def test_report_benchmark_section_shows_each_recorded_benchmark_or_says_it_has_none(tmp_path):
  from experiments import report

  result = {"table": "| sharded table |\n", "verdict": "TP within 1.1x", "config": None}
  _common.record("bench_sharded", "full", result, _common.Usage(1.0, 2.0, 0.0, 1.0), command="cmd-sharded",
                 root=str(tmp_path))
  text = report.recorded_benchmarks(str(tmp_path))
  assert text.startswith("## Recorded benchmarks")
  assert "| sharded table |" in text and "cmd-sharded" in text
  for module, title in report.RECORDED_BENCHMARKS:
    assert f"### {title}" in text
    if module != "bench_sharded":
      assert f"*No recorded run of `{module}`.*" in text


def test_sine_lora_summarize_recorded_pairs_the_val_chosen_omega_with_lora():
  from experiments import sine_lora_finetune

  runs = [{"rank": 4, "method": "LoRA", "paper_omega": None, "learning_rate": 0.01, "val": [0.5, 0.5], "test": [0.70, 0.72]},
          {"rank": 4, "method": "sine LoRA", "paper_omega": 100.0, "learning_rate": 0.01, "val": [0.4, 0.4], "test": [0.9, 0.9]},
          {"rank": 4, "method": "sine LoRA", "paper_omega": 400.0, "learning_rate": 0.003, "val": [0.6, 0.6], "test": [0.75, 0.78]}]
  records = [{"preset": "steps250", "config": {"finetune_steps": 250}, "result": {"runs": runs}},
             {"preset": "other", "config": {"finetune_steps": 1}, "result": {}}]
  text = sine_lora_finetune.summarize_recorded(records)
  assert "| steps250 | 250 | 4 | 2 |" in text and "omega 400" in text and "+0.0550 +- 0.0071" in text
  assert sine_lora_finetune.summarize_recorded(records[1:]) == ""


def test_collective_bytes_reads_gathers_and_reductions_from_hlo_text():
  from experiments.bench_sharded import collective_bytes

  hlo = "\n".join([
      "%all-gather = f32[2048,4096]{1,0} all-gather(%p), channel_id=1, dimensions={1}",
      "%ag-start = (bf16[16,8]{1,0}, bf16[64,8]{1,0}) all-gather-start(%q), dimensions={0}",
      "%all-reduce.3 = f32[8,4096]{1,0} all-reduce(%g), to_apply=%add",
      "%reduce-scatter = c64[10]{0} reduce-scatter(%h), dimensions={0}",
      "%dot = f32[2048,4096]{1,0} dot(%a, %b)  // not a collective",
  ])
  got = collective_bytes(hlo)
  assert got["gathered"] == 2048 * 4096 * 4 + 64 * 8 * 2  # an async start counts its result only
  assert got["largest_gather"] == 2048 * 4096 * 4
  assert got["reduced"] == 8 * 4096 * 4 + 10 * 8
  assert collective_bytes("%x = f32[4]{0} add(%a, %b)") == {"gathered": 0.0, "largest_gather": 0.0, "reduced": 0.0}
