"""The GLUE comparison: held-out tuning, resumable run files, tables; and `nanoadam finetune`."""

import json
import math
import os
from dataclasses import asdict, replace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

from glue_helpers import DATA, TINY, in_process  # noqa: E402

from nanoadam_lab.cli import main  # noqa: E402
from nanoadam_lab.experiments.compare import (  # noqa: E402
    CompareConfig,
    _write_atomic,
    best_lr,
    next_rate,
    run_compare,
)
from nanoadam_lab.experiments.glue import run  # noqa: E402
from nanoadam_lab.experiments.report import glue_table, plot_curves, plot_frontiers  # noqa: E402


def test_compare_tunes_on_heldout_resumes_and_reports(tmp_path):
    grids = {"adamw": [1e-4, 1e-3], "nanoadam": [1e-3], "head-only": [1e-3]}
    config = CompareConfig(tasks=["rte"], optimizers=list(grids), seeds=2, data_dir=DATA, out=str(tmp_path),
                           lr_grids=grids, max_extensions=0, overrides=TINY)
    calls = []
    summary = run_compare(config, execute=in_process(calls))
    assert len(calls) == 4 + 3 and not summary["failures"]
    for path in calls:
        result = json.loads(path.read_text())
        # Trained without the held-out slice (15 % of 60), scored on it and on the validation set.
        assert result["config"]["eval_split"] == "heldout" and result["train_examples"] == 51
        assert len(result["heldout"]["labels"]) == 9 and len(result["validation"]["predictions"]) == 40
        assert result["score"] == result["heldout"]["score"] and -1 <= result["retention"] <= 1
        assert result["warmup_steps"] == 1 and len(result["grad_norm_curve"]) == 2
    assert 0.5 < summary["pretrained_retention"] < 1
    cells = summary["tasks"]["rte"]["cells"]
    nano = cells["nanoadam"]
    assert nano["seeds"] == [0, 1] and nano["untouched_fraction"] > 0.8 > cells["adamw"]["untouched_fraction"]
    assert set(nano["vs_adamw"]) == {"score", "retention", "retention_at_equal_score"}
    assert nano["vs_adamw"]["score"]["n"] == 2
    assert [row["lr"] for row in cells["adamw"]["grid"]] == [1e-4, 1e-3]
    gate = summary["tasks"]["rte"]["gate"]
    assert gate["passed"] in (True, False) and {"vs_trivial", "vs_head_only"} <= set(gate)
    again = []
    run_compare(config, execute=in_process(again))
    assert again == []  # every finished run is reused
    table = glue_table(summary)
    assert "### RTE (acc)" in table and "| nanoadam | 0.001 (edge) |" in table and "gate (" in table
    assert "7 finished runs" in table and "adamw 0.0001: " in table
    assert plot_curves(tmp_path, summary)[0].exists() and plot_frontiers(tmp_path, summary)[0].exists()


def _fake_runs(calls, tmp_path, score_of):
    def fake(config, path):
        calls.append(str(path.relative_to(tmp_path / "runs/rte")))
        score = score_of(config)
        _write_atomic(path, {"score": score, "metrics": {"score": score, "loss": 1.0}, "config": asdict(config)})
    return fake


def test_optimizers_take_turns_and_ties_wait_for_their_rate(tmp_path, monkeypatch):
    grids = {"adamw": [1e-4, 1e-3], "nanoadam": [1e-3, 3e-3], "adamw-headlr": [1e-4]}
    config = CompareConfig(tasks=["rte"], optimizers=list(grids), seeds=2, out=str(tmp_path), lr_grids=grids,
                           max_extensions=0, overrides={"retention_probe": False})
    calls = []
    from nanoadam_lab.experiments import compare
    monkeypatch.setattr(compare, "summarize", lambda config: {})  # the fake runs hold no metrics
    # Scores fall with the rate: every search settles on its smallest rate.
    run_compare(config, execute=_fake_runs(calls, tmp_path, lambda c: -c.lr))
    assert calls == ["adamw/lr0.0001-seed0.json", "nanoadam/lr0.001-seed0.json",
                     "adamw/lr0.001-seed0.json", "nanoadam/lr0.003-seed0.json",
                     "adamw-headlr/lr0.0001-head_lr0.001-seed0.json",  # after nanoadam settled, at its rate
                     "adamw/lr0.0001-seed1.json", "nanoadam/lr0.001-seed1.json",
                     "adamw-headlr/lr0.0001-head_lr0.001-seed1.json"]
    run = json.loads((tmp_path / "runs/rte/adamw-headlr/lr0.0001-head_lr0.001-seed1.json").read_text())
    assert run["config"]["optimizer_overrides"]["head_lr"] == 1e-3


def test_a_best_rate_at_an_edge_extends_the_grid(tmp_path, monkeypatch):
    config = CompareConfig(tasks=["rte"], optimizers=["adamw"], seeds=1, out=str(tmp_path),
                           lr_grids={"adamw": [1e-4, 3e-4]}, max_extensions=2, overrides={"retention_probe": False})
    calls = []
    from nanoadam_lab.experiments import compare
    monkeypatch.setattr(compare, "summarize", lambda config: {})
    # The score peaks at 9e-4: two steps up from the grid, found, and the search stops there.
    run_compare(config, execute=_fake_runs(calls, tmp_path, lambda c: -abs(math.log(c.lr / 9e-4))))
    assert calls == ["adamw/lr0.0001-seed0.json", "adamw/lr0.0003-seed0.json", "adamw/lr0.0009-seed0.json",
                     "adamw/lr0.0027-seed0.json"]


def test_next_rate_extends_at_either_edge_up_to_the_limit():
    def tried(scores):
        return {lr: {"score": s} for lr, s in scores.items()}
    grid = [1e-4, 1e-3]
    assert next_rate({}, grid, 3) == 1e-4
    assert next_rate(tried({1e-4: 0.5, 1e-3: 0.7}), grid, 3) == pytest.approx(1e-2)
    assert next_rate(tried({1e-4: 0.7, 1e-3: 0.5}), grid, 3) == pytest.approx(1e-5)
    assert next_rate(tried({1e-5: 0.1, 1e-4: 0.7, 1e-3: 0.5}), grid, 3) is None  # best inside
    assert next_rate(tried({1e-4: 0.5, 1e-3: 0.7}), grid, 0) is None  # no extensions allowed


def test_best_lr_prefers_score_then_lower_heldout_loss():
    def r(score, loss):
        return {"score": score, "metrics": {"loss": loss}}
    assert best_lr({1e-4: r(0.5, 1.0), 1e-3: r(0.7, 2.0)}) == 1e-3
    assert best_lr({1e-4: r(0.7, 0.9), 1e-3: r(0.7, 0.6)}) == 1e-3  # a tie goes to the lower loss
    assert best_lr({1e-4: r(0.0, 0.6), 1e-3: r(0.0, 0.6)}) == 1e-4  # then to the smaller rate
    assert best_lr({1e-4: r(float("nan"), 0.1), 1e-3: r(0.1, 5.0)}) == 1e-3


def test_rate_ties_need_their_source_among_the_optimizers():
    with pytest.raises(ValueError, match="head_lr from nanoadam"):
        CompareConfig(optimizers=["adamw", "adamw-headlr"])


def test_finetune_cli_writes_a_result(tmp_path, capsys):
    assert main(["finetune", "--task", "stsb", "--optimizer", "nanoadam", "--lr", "1e-3", "--data-dir", DATA,
                 "--budget", "quick", "--max-steps", "2", "--no-retention", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pearson" in out
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert result["config"]["optimizer_overrides"] == {"mask_interval": 10} and result["steps"] == 2
    assert result["retention"] is None and result["config"]["warmup_fraction"] == 0.06


@pytest.mark.parametrize("argv,match", [
    (["finetune", "--task", "qqp", "--optimizer", "adamw"], "unknown task"),
    (["finetune", "--task", "rte", "--optimizer", "sgd"], "unknown optimizer"),
    (["finetune", "--task", "rte", "--optimizer", "adamw", "--lr", "0"], "must be > 0"),
    (["finetune", "--task", "rte", "--optimizer", "adamw", "--data-dir", "/nonexistent"], "data folder lacks"),
    (["finetune", "--task", "rte", "--optimizer", "adamw", "--data-dir", DATA, "--model", "/nonexistent/model"],
     "cannot load model"),
    (["compare", "--tasks", "rte,mnli"], "unknown task"),
    (["bench", "glue", "--tasks", "rte"], "--out must name"),
    (["bench", "glue", "--tasks", "rte", "--out", "/nonexistent"], "holds no runs/"),
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
    from nanoadam_lab.experiments.ablation import AblationConfig, variants
    from nanoadam_lab.experiments.ablation import main as run_ablation
    from nanoadam_lab.experiments.compare import CompareConfig, run_path

    # a comparison's nanoadam run with the same settings is copied, not run again
    compare = CompareConfig(tasks=["rte"], optimizers=["nanoadam"], data_dir=DATA, out=str(tmp_path / "glue"),
                            overrides=dict(TINY, retention_probe=False))
    shared = compare.run_config("rte", "nanoadam", 1e-3, 0)
    in_process([])(shared, run_path(tmp_path / "glue", "rte", "nanoadam", 1e-3, 0))
    config = AblationConfig(task="rte", data_dir=DATA, out=str(tmp_path / "abl"), seeds=2,
                            lr_grids={"nanoadam": [1e-3], "lift": [1e-3]}, max_extensions=0, intervals=[5],
                            densities=[0.3], decays=[0.05], overrides=dict(TINY, retention_probe=False),
                            reuse=str(tmp_path / "glue"),
                            only=["small_weights", "large_gradients_at_small_weights_rate", "principal_weights",
                                  "static_mask", "decay_to_0.05"])
    assert config.run_config("small_weights", 1e-3, 0) == shared
    calls = []
    result = run_ablation(config, execute=in_process(calls))
    assert not result["failures"]
    cells = result["cells"]
    assert set(cells) == set(config.only)
    assert len(calls) == 5 * 2 - 1  # every variant's two seeds, but the copied one
    assert set(config.variants()) == set(config.only)
    every = set(variants([5], [0.3]))
    assert {"random_weights", "large_weights", "large_gradients", "interval_5", "density_0.3"} <= every
    assert cells["static_mask"]["optimizer"] == "nanoadam-static"
    decay = json.loads((tmp_path / "abl" / "runs" / "decay_to_0.05" / "lr0.001-seed0.json").read_text())
    assert decay["config"]["optimizer_overrides"]["final_density"] == 0.05
    run = json.loads((tmp_path / "abl" / "runs" / "large_gradients_at_small_weights_rate" / "lr0.001-seed1.json")
                     .read_text())
    assert run["config"]["eval_split"] == "heldout"
    assert run["config"]["optimizer_overrides"]["selection"] == "large_gradients"
    for name, cell in cells.items():
        if name != "small_weights":
            d = cell["vs_small_weights"]["score"]
            assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "Fig. 4a" in md and "| small weights |" in md and "95 % CI" in md
    assert "| density decay 0.1 to 0.05 |" in md and "refresh every 50 steps, density 0.1 |" in md
    assert (tmp_path / "abl" / "ablation_curves.png").exists()
    again = []
    run_ablation(config, execute=in_process(again))
    assert again == []
    # Render-only reads what is finished and runs nothing: a search with a run missing is still
    # searching, a missing final seed leaves that variant with the seeds it has.
    (tmp_path / "abl" / "runs" / "principal_weights" / "lr0.001-seed0.json").unlink()
    (tmp_path / "abl" / "runs" / "static_mask" / "lr0.001-seed1.json").unlink()

    def refuse(config, path):
        raise AssertionError(f"render-only ran {path}")
    partial = run_ablation(config, execute=refuse, render_only=True)
    assert "principal_weights" not in partial["cells"] and partial["searching"] == {"principal_weights": []}
    assert partial["cells"]["static_mask"]["seeds"] == [0]
    assert "| principal_weights | no run finished | searching |" in (tmp_path / "abl" / "ablation.md").read_text()
    assert not (tmp_path / "abl" / "runs" / "principal_weights" / "lr0.001-seed0.json").exists()


def test_slow_runs_are_found_and_set_aside(tmp_path):
    from nanoadam_lab.experiments.compare import _retimed, retime, slow_runs

    folder = tmp_path / "runs" / "rte" / "adamw"
    for name, step in [("lr1e-05-seed0", 0.30), ("lr1e-05-seed1", 0.33), ("lr1e-05-seed2", 0.90),
                       ("lr3e-05-seed0", 0.29)]:
        _write_atomic(folder / f"{name}.json", {"median_step_s": step, "score": 0.5})
    assert slow_runs(tmp_path, 1.3) == [folder / "lr1e-05-seed2.json"]
    moved = retime(tmp_path, 1.3)
    assert moved[0]["old_median_step_s"] == 0.90 and not (folder / "lr1e-05-seed2.json").exists()
    _write_atomic(folder / "lr1e-05-seed2.json", {"median_step_s": 0.31, "score": 0.5})
    assert _retimed(tmp_path) == [{"run": "runs/rte/adamw/lr1e-05-seed2.json", "old_median_step_s": 0.9,
                                   "new_median_step_s": 0.31, "old_score": 0.5, "new_score": 0.5}]


def test_retime_finals_sets_aside_every_final_of_the_task(tmp_path):
    from nanoadam_lab.experiments.compare import _retimed, retime_finals

    for task, name in [("stsb", "adamw/lr1e-05-seed0"), ("stsb", "adamw/lr1e-05-seed1"),
                       ("stsb", "adamw/lr3e-05-seed0"), ("rte", "adamw/lr1e-05-seed0"), ("rte", "adamw/lr1e-05-seed1")]:
        _write_atomic(tmp_path / "runs" / task / f"{name}.json", {"median_step_s": 0.5, "score": 0.4})
    moved = retime_finals(tmp_path, ["stsb"])
    assert [m["run"] for m in moved] == ["runs/stsb/adamw/lr1e-05-seed0.json", "runs/stsb/adamw/lr1e-05-seed1.json"]
    assert (tmp_path / "runs/stsb/adamw/lr3e-05-seed0.json").exists()
    assert (tmp_path / "runs/rte/adamw/lr1e-05-seed0.json").exists()
    _write_atomic(tmp_path / "runs/stsb/adamw/lr1e-05-seed0.json", {"median_step_s": 0.41, "score": 0.4})
    assert _retimed(tmp_path)[0] == {"run": "runs/stsb/adamw/lr1e-05-seed0.json", "old_median_step_s": 0.5,
                                     "new_median_step_s": 0.41, "old_score": 0.4, "new_score": 0.4}


def test_a_run_repeats_bit_for_bit(tmp_path):
    from nanoadam_lab.experiments.glue import GlueRunConfig

    config = GlueRunConfig(task="mrpc", optimizer="nanoadam", lr=1e-3, data_dir=DATA, eval_split="heldout",
                           optimizer_overrides={"mask_interval": 2}, **{**TINY, "max_steps": 3})
    first, second = run(config), run(config)
    for key in ("loss_curve", "grad_norm_curve", "heldout", "validation", "retention", "l2_shift"):
        assert first[key] == second[key], key


def test_finetune_on_your_own_files(tmp_path, capsys):
    data = tmp_path / "reviews"
    data.mkdir()
    for split, n in (("train", 24), ("validation", 8)):
        rows = ["text,stars"] + [f"{'great fun' if i % 2 else 'dull and slow'} {i},{i % 2}" for i in range(n)]
        (data / f"{split}.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["finetune", "--dataset", str(data), "--text-fields", "text", "--label-field", "stars",
                 "--num-labels", "2", "--optimizer", "nanoadam", "--budget", "quick", "--max-steps", "2",
                 "--no-retention", "--out", str(out)]) == 0
    result = json.loads(next(out.glob("reviews-*.json")).read_text())
    assert result["config"]["dataset"] == str(data) and result["eval_examples"] == 8 and result["steps"] == 2
    assert {"accuracy", "f1"} <= set(result["metrics"])
    assert "| reviews | nanoadam |" in capsys.readouterr().out
    for argv, match in [(["--text-fields", "text"], "needs --text-fields and --num-labels"),
                        (["--text-fields", "body", "--num-labels", "2"], "need fields"),
                        (["--text-fields", "text", "--label-field", "stars", "--num-labels", "1",
                          "--metric", "accuracy"], "does not fit")]:
        assert main(["finetune", "--dataset", str(data), "--optimizer", "adamw", *argv]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert main(["finetune", "--optimizer", "adamw"]) == 2
    assert "--task" in capsys.readouterr().err


def test_own_labels_are_checked_before_training(tmp_path):
    from nanoadam_lab.experiments.glue_data import DataError, custom_task, load_task

    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"t": "a", "y": 0}\n{"t": "b", "y": 3}\n')
    with pytest.raises(DataError, match="row 1: y=3 is not a class id in 0..1"):
        load_task(custom_task(str(tmp_path), ["t"], 2, "y"))
    assert len(load_task(custom_task(str(tmp_path), ["t"], 4, "y"))["validation"]) == 2


def test_summary_keeps_only_the_runs_of_the_chosen_tied_rate(tmp_path):
    def write(opt, lr, seed, score, **overrides):
        name = "".join(f"-{k}{v:g}" for k, v in overrides.items())
        _write_atomic(tmp_path / "runs" / "rte" / opt / f"lr{lr:g}{name}-seed{seed}.json", {
            "score": score, "metrics": {"score": score, "loss": 1.0}, "retention": 0.7, "train_seconds": 1.0,
            "config": {"lr": lr, "seed": seed, "optimizer_overrides": overrides},
            "validation": {"score": score}, "heldout": {"score": score, "labels": [0]},
            "median_step_s": 1.0, "median_optimizer_step_s": 0.1, "peak_memory_increase_mb": None,
            "untouched_fraction": 0.0, "l2_shift": 1.0, "steps": 1, "train_examples": 1})
    for seed in range(2):
        write("nanoadam", 1e-3, seed, 0.6)
        write("adamw-headlr", 1e-4, seed, 0.7, head_lr=1e-3)
        write("adamw-headlr", 1e-4, seed, 0.1, head_lr=3e-4)  # left by an earlier choice of NanoAdam's rate
    write("adamw-headlr", 1e-4, 7, 0.1, head_lr=1e-3)  # a seed beyond this comparison's
    from nanoadam_lab.experiments.compare import summarize

    config = CompareConfig(tasks=["rte"], optimizers=["nanoadam", "adamw-headlr"], seeds=2, out=str(tmp_path),
                           lr_grids={"nanoadam": [1e-3], "adamw-headlr": [1e-4]}, max_extensions=0)
    cell = summarize(config)["tasks"]["rte"]["cells"]["adamw-headlr"]
    assert cell["seeds"] == [0, 1] and cell["scores"] == [0.7, 0.7]


def test_a_search_where_every_run_failed_chooses_nothing(tmp_path, monkeypatch):
    config = CompareConfig(tasks=["rte"], optimizers=["adamw"], seeds=2, out=str(tmp_path),
                           lr_grids={"adamw": [1e-4, 1e-3]}, max_extensions=3, overrides={"retention_probe": False})
    calls = []
    from nanoadam_lab.experiments import compare
    monkeypatch.setattr(compare, "summarize", lambda config: {})
    run_compare(config, execute=_fake_runs(calls, tmp_path, lambda c: float("nan")))
    assert calls == ["adamw/lr0.0001-seed0.json", "adamw/lr0.001-seed0.json"]  # no extensions, no seeds
    assert next_rate({1e-4: {"score": 0.5}, 1.0001e-4: {"score": 0.4}}, [1e-4, 1.0001e-4], 3) is None


def test_retention_probe_runs_under_lora(tmp_path):
    pytest.importorskip("peft")
    from nanoadam_lab.experiments.glue import GlueRunConfig

    result = run(GlueRunConfig(task="rte", optimizer="nanoadam", lr=1e-3, data_dir=DATA, lora_r=4,
                               **{**TINY, "max_steps": 1}))
    assert -1 <= result["retention"] <= 1


def test_a_diverged_run_never_chooses_its_rate():
    diverged = {"score": 0.9, "metrics": {"score": 0.9, "loss": float("nan"), "diverged": True}}
    fine = {"score": 0.6, "metrics": {"score": 0.6, "loss": 0.7, "diverged": False}}
    assert best_lr({1e-3: diverged, 1e-4: fine}) == 1e-4


def test_step_times_are_taken_in_turn_at_the_chosen_rates_and_reach_the_table(tmp_path, monkeypatch):
    import statistics

    import nanoadam_lab.bench.glue_steps as glue_steps
    from nanoadam_lab.experiment import write_result
    from nanoadam_lab.experiments.compare import summarize

    grids = {"adamw": [1e-4], "nanoadam": [1e-3], "adamw-headlr": [3e-4]}
    config = CompareConfig(tasks=["rte", "cola"], optimizers=list(grids), seeds=1, data_dir=DATA, out=str(tmp_path),
                           lr_grids=grids, max_extensions=0, overrides=dict(TINY, max_steps=6))
    rte = replace(config, tasks=["rte"])
    run_compare(rte, execute=in_process([]))
    seen = []  # (optimizer's model, batch, train mode) of every timed step
    real_step = glue_steps.training_step

    def spy(model, batch, *args):
        seen.append((id(model), batch["input_ids"].tolist(), model.training))
        return real_step(model, batch, *args)

    monkeypatch.setattr(glue_steps, "training_step", spy)
    turns = []
    result = glue_steps.run(config, glue_steps.GlueStepsConfig(blocks=2, steps_per_block=2),
                            progress=lambda task, block, name: turns.append((block, name)))
    # Only RTE has chosen rates; its optimizers take turns block by block (warm-up block first), the
    # order rotated every block, every one of them on the same batches in the same order, training.
    assert result["skipped"] == {"cola": "no chosen rate yet for adamw, nanoadam, adamw-headlr"}
    names = list(grids)
    assert turns == [(b, o) for b in range(3) for o in names[b:] + names[:b]]
    by_model = {}
    for model, batch, training in seen:
        by_model.setdefault(model, []).append(batch)
        assert training
    assert len(by_model) == 3 and len({repr(b) for b in by_model.values()}) == 1 and len(seen) == 3 * 6
    timed = result["tasks"]["rte"]["results"]
    for r in timed.values():
        assert len(r["block_ratios"]) == 2 and r["ratio_to_adamw"] == statistics.median(r["block_ratios"])
        assert r["block_ratios"] == [m / a for m, a in zip(r["block_medians_s"], timed["adamw"]["block_medians_s"])]
        assert 0 < r["median_optimizer_step_s"] < r["median_step_s"]
    assert timed["nanoadam"]["optimizer_overrides"] == {"mask_interval": 50}
    assert timed["adamw-headlr"]["optimizer_overrides"] == {"head_lr": 1e-3}  # NanoAdam's chosen rate
    assert "| rte | nanoadam | 0.001 |" in glue_steps.format_table(result)

    assert "*: the mean over seeds" in glue_table(summarize(rte))
    write_result(tmp_path, "steps", result)
    table = glue_table(summarize(rte))
    assert f"| {timed['adamw']['median_step_s']:.3f} (1.00x) |" in table and "taking turns" in table
    assert "*: the mean" not in table
    # Times taken at another rate, head rate or budget than the runs' are not shown as theirs.
    result["tasks"]["rte"]["results"]["nanoadam"]["lr"] = 3e-3
    result["tasks"]["rte"]["results"]["adamw-headlr"]["run_config"]["optimizer_overrides"]["head_lr"] = 3e-3
    result["tasks"]["rte"]["results"]["adamw"]["run_config"]["batch_size"] = 16
    write_result(tmp_path, "steps", result)
    cells = summarize(rte)["tasks"]["rte"]["cells"]
    assert all(cells[o]["timed_in_turn"] is None for o in names)
    # A later run keeps the tasks it did not time; a block count past the run's end is refused.
    again = glue_steps.run(replace(config, tasks=["cola"]), glue_steps.GlueStepsConfig(), earlier=result)
    assert list(again["tasks"]) == ["rte"] and again["timed_now"] == [] and list(again["skipped"]) == ["cola"]
    with pytest.raises(ValueError, match="more than the 6"):
        glue_steps.run(rte, glue_steps.GlueStepsConfig(blocks=3, steps_per_block=2))
    with pytest.raises(ValueError, match="reference optimizer"):
        glue_steps.run(replace(rte, optimizers=["nanoadam"]), glue_steps.GlueStepsConfig())
