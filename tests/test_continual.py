"""Vision continual finetuning: the protocol in miniature, resume, the comparisons, bad input."""

import json
import math

import pytest
import torch

from nanoadam_lab.experiments import continual

TINY = dict(methods=["adamw", "nanoadam-1%"], task2=["dissimilar"], seeds=2, epochs=1, channels=(4, 8, 8),
            widths=(32, 16), pretrain_epochs=2, lr_grids={"adamw": (1e-3, 1e-2), "nanoadam": (1e-2, 1e-1)},
            max_grid_extensions=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("continual")
    written = continual.main(continual.ContinualConfig(**TINY), str(out), command="test")
    return out, written


def test_result_has_frontiers_tuned_rates_and_intervals(finished):
    out, written = finished
    result = json.loads((out / "continual.json").read_text())
    assert {p.name for p in written} == {"continual.json", "continual.md", "continual_dissimilar.png",
                                         "continual_dissimilar_probe.png"}
    for m in result["methods"].values():
        grid = m["task2"]["dissimilar"]["grid"]
        assert len(grid) >= 2 and m["task2"]["dissimilar"]["tuned_lr"] in [g["lr"] for g in grid.values()]
        for g in grid.values():
            assert len(g["task2"]) == len(g["task1_after"]) == 2  # one point per seed
            assert all(0 <= x <= 1 for x in g["task2"] + g["task1_after"])
            assert g["forgetting"] == [b - a for b, a in zip(g["task1_before"], g["task1_after"])]
    (row,) = result["comparisons"]
    assert row["method"] == "nanoadam-1%" and row["kind"] == "dissimilar"
    assert set(row["frontier_dominance"]) == set(result["methods"]["nanoadam-1%"]["task2"]["dissimilar"]["grid"])
    adamw_rates = set(result["methods"]["adamw"]["task2"]["dissimilar"]["grid"])
    for found in row["frontier_dominance"].values():
        assert set(found["dominated_by"]) | set(found["dominates"]) <= adamw_rates
    for key in ("task2", "task1_after", "forgetting"):
        d = row[key]
        assert d["n"] == 2 and d["lo"] <= d["mean"] <= d["hi"]
    assert "95 % interval" in (out / "continual.md").read_text()
    # Task 1 also read by a probe and an offset refit on the body, before and after task 2.
    for g in result["methods"]["adamw"]["task2"]["dissimilar"]["grid"].values():
        assert len(g["task1_after_probe"]) == 2 and all(0 <= x <= 1 for x in g["task1_after_probe"])
        assert g["forgetting_probe"] == [b - a for b, a in zip(g["task1_before_probe"], g["task1_after_probe"])]
    assert row["task1_after_probe"]["n"] == 2 and "retention_at_equal_task2_probe" in row
    assert set(row["frontier_dominance_probe"]) == set(row["frontier_dominance"])
    assert "Task 1 read by a refit probe" in (out / "continual.md").read_text()
    # one file per run: task 1 over the first seed's grid, task 2 over every rate and seed
    for method, m in result["methods"].items():
        n1 = len(list((out / "runs" / "task1" / method).glob("*.json")))
        n2 = len(list((out / "runs" / "dissimilar" / method).glob("*.json")))
        stored = json.loads(next((out / "runs" / "dissimilar" / method).glob("*.json")).read_text())
        assert stored["machine"]["processor"] and set(stored) == {"settings", "record", "machine"}
        assert n1 == len(m["task1_tuning"]) and n2 == 2 * len(m["task2"]["dissimilar"]["grid"])
        rates = m["task2"]["dissimilar"]["grid"].values()
        assert len({tuple(g["task2"]) + tuple(g["task1_after"]) for g in rates}) > 1  # rates differ


def test_rerun_resumes_from_the_run_files(finished, monkeypatch):
    out, _ = finished
    calls = []
    monkeypatch.setattr(continual, "train_stage", lambda *a, **k: calls.append(a) or {})
    again = continual.run(continual.ContinualConfig(**TINY), str(out))
    assert calls == []  # every run was on disk
    first = json.loads((out / "continual.json").read_text())
    assert again["methods"] == first["methods"]


def test_render_only_reports_the_finished_methods(finished, monkeypatch, tmp_path):
    out, _ = finished
    calls = []
    monkeypatch.setattr(continual, "train_stage", lambda *a, **k: calls.append(a) or {})
    config = continual.ContinualConfig(**{**TINY, "methods": ["adamw", "nanoadam-1%", "lift-1%"],
                                          "lr_grids": {**TINY["lr_grids"], "lift": (1e-2,)}})
    result = continual.run(config, str(out), render_only=True)
    assert calls == []  # nothing trains
    assert set(result["methods"]) == {"adamw", "nanoadam-1%"} and list(result["unfinished"]) == ["lift-1%"]
    assert "no run file" in result["unfinished"]["lift-1%"]
    assert [row["method"] for row in result["comparisons"]] == ["nanoadam-1%"]
    continual.render(result, str(tmp_path))
    assert "Still running, left out of every table: lift-1% (no run file" in (tmp_path / "continual.md").read_text()
    # Part way through recomputing older run files: the tuned cells have the probe, some grid cell not yet.
    del result["comparisons"][0]["retention_at_equal_task2_probe"]
    continual.render(result, str(tmp_path))
    assert "| not measured |" in (tmp_path / "continual.md").read_text()


def test_task1_head_is_reloaded_and_only_the_body_carries_over():
    pytest.importorskip("sklearn")
    cfg = continual.ContinualConfig(**TINY)
    data = continual.Digits(cfg)
    model = continual.pretrain(data, cfg)
    continual.train_stage(model, data, "task1", "adamw", 1e-2, 0, cfg)
    head1 = {k: v.clone() for k, v in model.fc.state_dict().items()}
    continual.train_stage(model, data, "dissimilar", "nanoadam-1%", 1e-2, 0, cfg)
    assert not torch.equal(model.fc.weight, head1["weight"])  # task 2 trained a new head


def test_rotation_is_exact_at_90_and_small_rotations_stay_close():
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(continual.rotate(x, 90), torch.rot90(x, 1, dims=(2, 3)))
    small = continual.rotate(x, 15)
    assert small.shape == x.shape and not torch.equal(small, x)
    assert (small - x).abs().mean() < (continual.rotate(x, 90) - x).abs().mean()


def test_net_has_a_million_parameters_mostly_in_body_linear_layers():
    net = continual.DigitsNet()
    total = sum(p.numel() for p in net.parameters())
    body_linear = sum(p.numel() for n, p in net.named_parameters() if n.startswith("neck"))
    assert total > 1_000_000 and body_linear > 0.8 * total
    assert math.isclose(total, 1_145_573, rel_tol=0)


@pytest.mark.parametrize("bad", [dict(methods=["sgd"]), dict(methods=["nanoadam-1%"]), dict(task2=["rot45"]),
                                 dict(seeds=0), dict(lr_grids={"adamw": ()})])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        continual.ContinualConfig(**{**TINY, **bad})


def test_demo_prints_the_frontier_tables(tmp_path, capsys):
    from nanoadam_lab.experiments.demo import run_demo

    written = run_demo(str(tmp_path), seed=1, progress=False, channels=(4, 8, 8), widths=(16, 8), pretrain_epochs=1,
                       epochs=0.5, seeds=2, task2=["dissimilar"], max_grid_extensions=0)
    assert {p.name for p in written} == {"continual.json", "continual.md", "continual_dissimilar.png",
                                         "continual_dissimilar_probe.png"}
    printed = capsys.readouterr().out
    assert "| adamw |" in printed and "| nanoadam-1% |" in printed and "95 % interval" in printed
    assert "## Settings" not in printed


def test_a_diverged_run_never_chooses_its_rate():
    assert continual._best({1e-3: [None], 3e-3: [0.5]}) == 3e-3  # null: an infinite loss read back from JSON
    assert continual._best({1e-3: [0.2, float("inf")], 3e-3: [0.5, 0.5]}) == 3e-3


def test_head_only_control_leaves_the_body_untouched():
    pytest.importorskip("sklearn")
    cfg = continual.ContinualConfig(**TINY)
    data = continual.Digits(cfg)
    model = continual.pretrain(data, cfg)
    body = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("fc.")}
    continual.train_stage(model, data, "task1", "head-only", 1e-2, 0, cfg)
    continual.train_stage(model, data, "dissimilar", "head-only", 1e-2, 0, cfg)
    assert all(torch.equal(p, body[n]) for n, p in model.named_parameters() if not n.startswith("fc."))
    assert "head-only" in continual.ContinualConfig().methods


def test_a_run_file_without_the_newer_measures_is_computed_again_unless_read_only(tmp_path):
    settings = {"epochs": 1}
    continual.Runs(tmp_path, settings).get("x", "lr1-seed0", compute=lambda: {"old": 1})
    complete = lambda r: "new" in r  # noqa: E731
    assert continual.Runs(tmp_path, settings, read_only=True).get("x", "lr1-seed0", compute=None,
                                                                  complete=complete) == {"old": 1}
    assert continual.Runs(tmp_path, settings).get("x", "lr1-seed0", compute=lambda: {"new": 2},
                                                   complete=complete) == {"new": 2}
    assert continual.Runs(tmp_path, settings).get("x", "lr1-seed0", compute=lambda: {"never": 3},
                                                   complete=complete) == {"new": 2}
