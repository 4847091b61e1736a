"""Language continual finetuning (``reproduce continual-glue``) in miniature: the stages, the
reuse of a comparison's runs, resuming, rebuilding a missing task-1 model, the summary."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from glue_helpers import DATA, TINY, in_process  # noqa: E402

from nanoadam_lab.cli import main as cli  # noqa: E402
from nanoadam_lab.experiments.compare import CompareConfig, _write_atomic, run_path  # noqa: E402
from nanoadam_lab.experiments.continual_glue import ContinualGlueConfig, main  # noqa: E402


def test_continual_glue_miniature(tmp_path):
    grids = {"adamw": [1e-4, 1e-3], "nanoadam": [1e-3]}
    out = tmp_path / "cg"
    config = ContinualGlueConfig(task1="rte", task2="mrpc", methods=["adamw", "nanoadam"], seeds=2,
                                 frontier_seeds=1, data_dir=DATA, out=str(out), lr_grids=grids, max_extensions=0,
                                 task2_eval_points=1, overrides=TINY, reuse=str(tmp_path / "glue"))
    # A comparison's identical task-1 run is copied, not run again.
    compare = CompareConfig(tasks=["rte"], optimizers=["nanoadam"], data_dir=DATA, out=str(tmp_path / "glue"),
                            overrides=TINY)
    shared = compare.run_config("rte", "nanoadam", 1e-3, 0)
    assert config.task1_config("nanoadam", 1e-3, 0) == shared
    in_process([])(shared, run_path(tmp_path / "glue", "rte", "nanoadam", 1e-3, 0))
    calls = []
    result = main(config, command="test", execute=in_process(calls))
    assert not result["failures"] and not result["rebuilt_models"]
    rel = sorted(os.path.relpath(c, out) for c in calls)
    # Seed 0 of every method before any later seed: a job stopped part-way leaves every method's frontier.
    task2_seeds = [(os.path.basename(c).rsplit("seed", 1)[1], os.path.relpath(c, out).split("/")[2])
                   for c in calls if os.path.relpath(c, out).startswith("runs/task2/")]
    assert task2_seeds == sorted(task2_seeds, key=lambda s: s[0])
    assert {m for _, m in task2_seeds[:3]} == {"adamw", "nanoadam"}
    # adamw: 2 task-1 rates, 2 saved models, task 2 at 2 rates (seed 0) + seed 1 at the chosen one;
    # nanoadam: its task-1 search copied, 2 saved models, task 2 seed 0 and 1.
    assert sum(r.startswith("runs/task1/") for r in rel) == 2
    assert sum(r.startswith("runs/task1-saved/") for r in rel) == 4
    assert sum(r.startswith(f"runs/task2/adamw/from-lr{result['methods']['adamw']['lr_task1']:g}/") for r in rel) == 3
    assert sum(r.startswith("runs/task2/nanoadam/from-lr0.001/") for r in rel) == 2
    m = result["methods"]
    assert set(m) == {"adamw", "nanoadam"} and m["nanoadam"]["lr_task1"] == 1e-3
    for name, cell in m.items():
        assert cell["lr_task2"] in grids[name] and not cell["init_mismatches"]
        assert [x["seed"] for x in cell["tuned"]] == [0, 1]
        assert len(cell["frontier"]) == len(grids[name]) and all(p["seeds"] == [0] for p in cell["frontier"])
        for x in cell["tuned"]:
            # Each number is the task-2 run file's: task 1 before = the watched curve's start (the model
            # the run began from), after = its final validation score, the refits' after = theirs.
            file = out / f"runs/task2/{name}/from-lr{cell['lr_task1']:g}/lr{cell['lr_task2']:g}-seed{x['seed']}.json"
            watch = json.loads(file.read_text())["watch"]
            assert x["task1_before"] == watch["curve"][0]["score"] and x["task1_after"] == watch["validation"]["score"]
            assert x["task1_after_probe"] == watch["refit"]["after"]["probe"]["validation"]["score"]
            assert x["forgetting"] == pytest.approx(x["task1_before"] - x["task1_after"])
            assert x["retention"] is not None
    # The task-2 run watched task 1 from the model its own method saved at that seed.
    run2 = json.loads((out / m["nanoadam"]["curve_file"]).read_text())
    saved = json.loads((out / "runs/task1-saved/nanoadam/lr0.001-seed0.json").read_text())
    assert run2["init_sha256"] == saved["saved_sha256"] and run2["machine"]["processor"]
    before = m["nanoadam"]["tuned"][0]["task1_before"]
    assert run2["watch"]["curve"][0]["score"] == saved["validation"]["score"] == before
    assert run2["config"]["watch_train_limit"] == 60 and run2["config"]["eval_points"] == 1
    comp = result["comparisons"]["nanoadam"]
    # Task 1 after, also with its head's offset and with a linear probe refit, before and after task 2.
    for x in m["nanoadam"]["tuned"]:
        assert x["task1_after_offset"] is not None and x["task1_before_offset"] is not None
        assert x["forgetting_probe"] == pytest.approx(x["task1_before_probe"] - x["task1_after_probe"])
    assert comp["task1_after_probe"]["n"] == 2 and set(comp["frontier_dominance_probe"]) == {"0.001"}
    assert "after (probe)" in (out / "continual_glue.md").read_text()
    assert comp["task2"]["n"] == 2 and comp["task2"]["lo"] <= comp["task2"]["mean"] <= comp["task2"]["hi"]
    assert "task1_after_at_equal_task2" in comp and "retention_at_equal_task2" in comp
    assert set(comp["frontier_dominance"]) == {"0.001"}  # nanoadam's one task-2 rate, against adamw's two
    assert "beaten on both by AdamW at" in (out / "continual_glue.md").read_text()
    md = (out / "continual_glue.md").read_text()
    assert "Against AdamW, paired by seed" in md and "| nanoadam |" in md
    assert "MRPC (task 2) gate: undecided (the head-only control" in md  # no head-only among these methods
    assert "RTE (task 1) gate: undecided" in md
    assert (out / "continual_glue_frontier.png").exists() and (out / "continual_glue_curves.png").exists()

    # Resuming runs nothing; a missing task-1 model is rebuilt (bit for bit) only when a task-2 run needs it.
    again = []
    main(config, execute=in_process(again))
    assert again == []
    (out / "checkpoints/adamw").joinpath(f"lr{m['adamw']['lr_task1']:g}-seed1.pt").unlink()
    adamw2 = out / "runs/task2/adamw" / f"from-lr{m['adamw']['lr_task1']:g}"
    (adamw2 / f"lr{m['adamw']['lr_task2']:g}-seed1.json").unlink()
    (out / "checkpoints/nanoadam/lr0.001-seed1.pt").unlink()  # every task-2 run of it is on file: not rebuilt
    result = main(config, execute=in_process(again))
    assert [os.path.relpath(c, out).split("/")[1] for c in again] == ["task1-saved", "task2"]
    (rebuilt,) = result["rebuilt_models"]
    assert rebuilt["old_sha256"] == rebuilt["new_sha256"]
    assert not any(cell["init_mismatches"] for cell in result["methods"].values())


def test_continual_glue_checks_its_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="different label counts"):
        ContinualGlueConfig(task1="sst2", task2="stsb")
    with pytest.raises(ValueError, match="must differ"):
        ContinualGlueConfig(task1="cola", task2="cola")
    with pytest.raises(ValueError, match="frontier_seeds"):
        ContinualGlueConfig(seeds=2, frontier_seeds=3)
    with pytest.raises(ValueError, match="adamw-headlr take a rate"):
        ContinualGlueConfig(methods=["adamw", "adamw-headlr"])
    with pytest.raises(ValueError, match="reference"):
        ContinualGlueConfig(methods=["nanoadam"])
    assert cli(["reproduce", "continual-glue", "--task2", "stsb", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "label counts" in err and len(err.strip().splitlines()) == 1
    assert cli(["reproduce", "continual-glue", "--peft", "lora", "--out", str(tmp_path)]) == 2


def _fake_runs(calls, saved_sha=lambda config: "sha-" + config.save_to, diverge=lambda config: False):
    """Run files with what the summary reads; a saved model is a file holding its fingerprint."""
    def fake(config, path):
        calls.append(path)
        diverged = diverge(config)
        score = 0.5 + config.lr
        sha = None
        if config.save_to and not diverged:
            sha = saved_sha(config)
            Path(config.save_to).parent.mkdir(parents=True, exist_ok=True)
            Path(config.save_to).write_text(sha)
        split = {"score": score, "loss": 1.0, "predictions": [1, 0], "labels": [1, 0], "trivial_prediction": 0}
        watch = None
        if config.watch_task:
            watch = {"validation": {"score": 0.6}, "curve": [{"step": 0, "score": 0.7}],
                     "refit": {"examples": 10, **{when: {way: {"validation": {"score": score}}
                                                         for way in ("offset", "probe")}
                                                  for when, score in (("before", 0.75), ("after", 0.65))}}}
        _write_atomic(path, {"config": asdict(config), "score": score, "metrics": {"score": score, "loss": 1.0,
                                                                                    "diverged": diverged},
                             "validation": split, "heldout": split, "retention": 0.8, "watch": watch,
                             "saved_sha256": sha,
                             "init_sha256": Path(config.init_from).read_text() if config.init_from else None})
    return fake


def test_continual_glue_diverged_and_rebuilt_task1_models(tmp_path):
    out = tmp_path / "cg"
    config = ContinualGlueConfig(task1="rte", task2="mrpc", methods=["adamw"], seeds=3, frontier_seeds=1,
                                 out=str(out), lr_grids={"adamw": [1e-4, 1e-3]}, max_extensions=0,
                                 overrides={"retention_probe": False})
    calls = []
    # Seed 1's task-1 run diverges: it saves no model, its task-2 runs are skipped, and it runs once.
    fake = _fake_runs(calls, diverge=lambda c: bool(c.save_to) and c.seed == 1)
    result = main(config, execute=fake)
    names = [str(p.relative_to(out / "runs")) for p in calls]
    assert names.count("task1-saved/adamw/lr0.001-seed1.json") == 1
    assert not any("seed1" in n for n in names if n.startswith("task2/"))
    tuned = result["methods"]["adamw"]["tuned"]
    assert [x["seed"] for x in tuned] == [0, 2]
    assert tuned[0]["forgetting"] == pytest.approx(0.7 - 0.6)
    calls.clear()
    main(config, execute=fake)
    assert calls == []  # a diverged model is not rebuilt on every resume

    # A fresh machine: the models are gone. Only a task-2 run still to do rebuilds its model; one
    # rebuilt with another fingerprint flags the earlier task-2 runs of that seed.
    for checkpoint in (out / "checkpoints").rglob("*.pt"):
        checkpoint.unlink()
    (out / "runs/task2/adamw/from-lr0.001/lr0.001-seed2.json").unlink()
    result = main(config, execute=_fake_runs(calls, saved_sha=lambda c: "rebuilt"))
    assert [str(p.relative_to(out / "runs")) for p in calls] == ["task1-saved/adamw/lr0.001-seed2.json",
                                                                  "task2/adamw/from-lr0.001/lr0.001-seed2.json"]
    (rebuilt,) = result["rebuilt_models"]
    assert rebuilt["old_sha256"] != rebuilt["new_sha256"] == "rebuilt"
    assert result["methods"]["adamw"]["init_mismatches"] == []  # the rerun task-2 run started from the new one
    (out / "runs/task2/adamw/from-lr0.001/lr0.001-seed0.json").write_text(
        (out / "runs/task2/adamw/from-lr0.001/lr0.001-seed0.json").read_text().replace('"init_sha256": "sha-',
                                                                                       '"init_sha256": "other-'))
    result = main(config, execute=_fake_runs(calls), render_only=True)
    assert result["methods"]["adamw"]["init_mismatches"] == ["lr0.001-seed0"]
    assert "Rebuilt task-1 models" in (out / "continual_glue.md").read_text()


def test_continual_glue_reruns_task2_runs_made_before_the_refits(tmp_path):
    out = tmp_path / "cg"
    config = ContinualGlueConfig(task1="rte", task2="mrpc", methods=["adamw", "nanoadam"], seeds=2, frontier_seeds=2,
                                 out=str(out), lr_grids={"adamw": [1e-4, 1e-3], "nanoadam": [1e-3]},
                                 max_extensions=0, overrides={"retention_probe": False})
    calls = []
    main(config, execute=_fake_runs(calls))
    stale = out / "runs/task2/nanoadam/from-lr0.001/lr0.001-seed1.json"
    record = json.loads(stale.read_text())
    del record["watch"]["refit"]
    stale.write_text(json.dumps(record))
    # Read as it is, that point has no probe mean: seed 0's alone would not pair with the task-2 mean.
    result = main(config, execute=_fake_runs(calls), render_only=True)
    (point,) = result["methods"]["nanoadam"]["frontier"]
    assert point["mean_task1_after_probe"] is None and point["mean_task1_after"] == pytest.approx(0.6)
    assert result["comparisons"]["nanoadam"]["frontier_dominance_probe"] == {"0.001": None}
    assert "not measured" in (out / "continual_glue.md").read_text()
    calls.clear()
    result = main(config, execute=_fake_runs(calls))
    assert calls == [stale]  # only the file without the refits runs again
    assert "refit" in json.loads(stale.read_text())["watch"] and not list(out.rglob("*.old"))
    (point,) = result["methods"]["nanoadam"]["frontier"]
    assert point["mean_task1_after_probe"] == pytest.approx(0.65)


def test_frontier_dominance_pairs_the_seeds_both_points_ran():
    from nanoadam_lab.experiments.continual_glue import _dominance

    point = {"lr": 1e-3, "seeds": [0, 1, 2, 3],
             "per_seed": {"task2": [0.5, 0.99, 0.52, 0.51], "task1_after": [0.8, 0.0, 0.82, 0.81]}}
    better = {"lr": 1e-4, "seeds": [0, 2, 3], "per_seed": {"task2": [0.6, 0.62, 0.61], "task1_after": [0.9, 0.92, 0.9]}}
    worse = {"lr": 1e-5, "seeds": [0, 2, 3], "per_seed": {"task2": [0.4, 0.42, 0.405], "task1_after": [0.7, 0.72, 0.7]}}
    # seed 1 (an outlier that would swing both axes) is left out: only seeds 0, 2 and 3 pair up
    assert _dominance(point, [better, worse]) == {"dominated_by": ["0.0001"], "dominates": ["1e-05"]}
