"""The GLUE comparison: held-out tuning, resumable run files, tables; and `nanoadam finetune`."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

from nanoadam_lab.cli import main  # noqa: E402
from nanoadam_lab.experiments.compare import CompareConfig, _write_atomic, best_lr, run_compare  # noqa: E402
from nanoadam_lab.experiments.glue import run  # noqa: E402
from nanoadam_lab.experiments.report import glue_table, plot_curves  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
if not os.path.isdir(DATA):
    DATA = "/work/shared/data/glue"
TINY = dict(train_limit=40, eval_limit=40, max_steps=2, max_length=32, batch_size=8, epochs=1.0, eval_points=1)


def in_process(calls):
    def execute(config, path):
        calls.append(path)
        _write_atomic(path, run(config))
    return execute


def test_compare_tunes_on_heldout_resumes_and_reports(tmp_path):
    config = CompareConfig(tasks=["rte"], optimizers=["adamw", "nanoadam"], seeds=2, data_dir=DATA,
                           out=str(tmp_path), lr_grids={"adamw": [1e-4, 1e-3], "nanoadam": [1e-3]}, overrides=TINY)
    calls = []
    summary = run_compare(config, execute=in_process(calls))
    assert len(calls) == 3 + 4 and not summary["failures"]
    tune = json.loads(next((tmp_path / "runs/rte/adamw").glob("tune-*.json")).read_text())
    assert tune["config"]["eval_split"] == "heldout" and tune["eval_examples"] == 8  # 20 % of 40, never validation
    cell = summary["cells"]["rte"]["nanoadam"]
    assert len(cell["scores"]) == 2 and 0 <= cell["untouched_fraction"] <= 1 and cell["untouched_fraction"] > 0.8
    assert summary["cells"]["rte"]["adamw"]["untouched_fraction"] < cell["untouched_fraction"]
    assert set(summary["average"]) == {"adamw", "nanoadam"}
    again = []
    run_compare(config, execute=in_process(again))
    assert again == []  # every finished run is reused
    table = glue_table(summary)
    assert "RTE (acc)" in table and "nanoadam" in table
    assert summary["finished_runs"] == 7 and "7 finished runs" in table
    assert f"adamw **{summary['cells']['rte']['adamw']['lr']:g}** (0.0001: " in table
    assert plot_curves(tmp_path, summary)[0].exists()


def test_optimizers_take_turns_so_machine_drift_is_shared(tmp_path, monkeypatch):
    config = CompareConfig(tasks=["rte"], optimizers=["adamw", "nanoadam"], seeds=2, out=str(tmp_path),
                           lr_grids={"adamw": [1e-4, 1e-3], "nanoadam": [1e-3]})
    calls = []

    def fake(config, path):
        calls.append(str(path.relative_to(tmp_path / "runs/rte")))
        _write_atomic(path, {"score": config.lr, "config": {"lr": config.lr}})

    from nanoadam_lab.experiments import compare
    monkeypatch.setattr(compare, "summarize", lambda config: {})  # the fake runs hold no metrics
    run_compare(config, execute=fake)
    assert calls == ["adamw/tune-lr0.0001-seed0.json", "nanoadam/tune-lr0.001-seed0.json",
                     "adamw/tune-lr0.001-seed0.json",
                     "adamw/final-lr0.001-seed0.json", "nanoadam/final-lr0.001-seed0.json",
                     "adamw/final-lr0.001-seed1.json", "nanoadam/final-lr0.001-seed1.json"]


def test_best_lr_prefers_score_then_smaller_rate():
    assert best_lr({1e-4: {"score": 0.5}, 1e-3: {"score": 0.7}}) == 1e-3
    assert best_lr({1e-4: {"score": 0.7}, 1e-3: {"score": 0.7}}) == 1e-4
    assert best_lr({1e-4: {"score": float("nan")}, 1e-3: {"score": 0.1}}) == 1e-3


def test_finetune_cli_writes_a_result(tmp_path, capsys):
    assert main(["finetune", "--task", "stsb", "--optimizer", "nanoadam", "--lr", "1e-3", "--data-dir", DATA,
                 "--max-steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pearson" in out
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["config"]["optimizer_overrides"] == {"mask_interval": 10} and result["steps"] == 2


@pytest.mark.parametrize("argv,match", [
    (["finetune", "--task", "qqp", "--optimizer", "adamw"], "unknown task"),
    (["finetune", "--task", "rte", "--optimizer", "sgd"], "unknown optimizer"),
    (["finetune", "--task", "rte", "--optimizer", "adamw", "--lr", "0"], "must be > 0"),
    (["finetune", "--task", "rte", "--optimizer", "adamw", "--data-dir", "/nonexistent"], "data folder lacks"),
    (["finetune", "--task", "rte", "--optimizer", "adamw", "--data-dir", DATA, "--model", "/nonexistent/model"],
     "cannot load model"),
    (["compare", "--tasks", "rte,mnli"], "unknown task"),
])
def test_bad_input_is_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_data_folder_without_expected_fields(tmp_path, capsys):
    (tmp_path / "rte").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "rte" / f"{split}.jsonl").write_text('{"text": "a", "label": 0}\n')
    assert main(["finetune", "--task", "rte", "--optimizer", "adamw", "--data-dir", str(tmp_path)]) == 2
    assert "need fields" in capsys.readouterr().err


def test_ablation_miniature(tmp_path):
    from nanoadam_lab.experiments.ablation import AblationConfig, markdown, plot
    from nanoadam_lab.experiments.ablation import run as run_ablation

    config = AblationConfig(task="rte", data_dir=DATA, out=str(tmp_path), seeds=1, small_lr_grid=[1e-3],
                            gradient_lr_grid=[1e-4, 1e-3], intervals=[1], run_settings=TINY)
    calls = []
    result = run_ablation(config, execute=in_process(calls))
    assert not result["failures"]
    assert set(result["variants"]) >= {"small_weights", "random_weights", "large_weights", "large_gradients",
                                       "static_mask", "interval_1"}
    assert result["variants"]["static_mask"]["overrides"] == {"mask_interval": None}
    assert set(result["verdicts"]) == {"small_beats_random", "random_beats_large", "small_beats_large_gradients",
                                       "dynamic_at_least_static"}
    tune = json.loads((tmp_path / "runs" / "tune-large_gradients-lr0.0001.json").read_text())
    assert tune["config"]["eval_split"] == "heldout"
    assert tune["config"]["optimizer_overrides"]["selection"] == "large_gradients"
    assert plot(result, tmp_path).exists()
    assert "Fig. 4a" in markdown(result, "cmd", {})
    again = []
    run_ablation(config, execute=in_process(again))
    assert again == []


def test_slow_runs_are_found_and_set_aside(tmp_path):
    from nanoadam_lab.experiments.compare import _retimed, retime, slow_runs

    folder = tmp_path / "runs" / "rte" / "adamw"
    for name, step in [("final-lr1e-4-seed0", 0.30), ("final-lr1e-4-seed1", 0.33), ("final-lr1e-4-seed2", 0.90),
                       ("tune-lr1e-4-seed0", 0.25)]:
        _write_atomic(folder / f"{name}.json", {"median_step_s": step, "score": 0.5})
    assert slow_runs(tmp_path, 1.3) == [folder / "final-lr1e-4-seed2.json"]
    moved = retime(tmp_path, 1.3)
    assert moved[0]["old_median_step_s"] == 0.90 and not (folder / "final-lr1e-4-seed2.json").exists()
    _write_atomic(folder / "final-lr1e-4-seed2.json", {"median_step_s": 0.31, "score": 0.5})
    assert _retimed(tmp_path) == [{"run": "runs/rte/adamw/final-lr1e-4-seed2.json", "old_median_step_s": 0.9,
                                   "new_median_step_s": 0.31, "old_score": 0.5, "new_score": 0.5}]


def test_retime_finals_sets_aside_every_final_of_the_task_and_the_table_lists_reruns(tmp_path):
    from nanoadam_lab.experiments.compare import _retimed, retime_finals

    for task, name in [("stsb", "adamw/final-lr1e-4-seed0"), ("stsb", "nanoadam/final-lr1e-3-seed1"),
                       ("stsb", "adamw/tune-lr1e-4-seed0"), ("rte", "adamw/final-lr1e-4-seed0")]:
        _write_atomic(tmp_path / "runs" / task / f"{name}.json", {"median_step_s": 0.5, "score": 0.4})
    moved = retime_finals(tmp_path, ["stsb"])
    assert [m["run"] for m in moved] == ["runs/stsb/adamw/final-lr1e-4-seed0.json",
                                         "runs/stsb/nanoadam/final-lr1e-3-seed1.json"]
    assert (tmp_path / "runs/stsb/adamw/tune-lr1e-4-seed0.json").exists()
    assert (tmp_path / "runs/rte/adamw/final-lr1e-4-seed0.json").exists()
    _write_atomic(tmp_path / "runs/stsb/adamw/final-lr1e-4-seed0.json", {"median_step_s": 0.41, "score": 0.4})
    summary = {"config": {"tasks": ["stsb"], "optimizers": []}, "cells": {"stsb": {}}, "average": {},
               "retimed": _retimed(tmp_path)}
    table = glue_table(summary)
    assert "- runs/stsb/adamw/final-lr1e-4-seed0.json: 0.500 s -> 0.410 s; score 40.00 -> 40.00" in table
    assert "- runs/stsb/nanoadam/final-lr1e-3-seed1.json: 0.500 s -> not rerun; score 40.00 -> -" in table
