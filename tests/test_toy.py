"""Toy teacher-student experiment (Sec. 2.3): structure, masked updates, pretraining, outputs."""

import json
import math

import pytest
import torch

from nanoadam_lab.analysis import stats
from nanoadam_lab.experiments import toy
from nanoadam_lab.experiments.recipe import rate_beyond_edge

TINY = dict(n_seeds=3, student_width=12, n_train=200, n_test=500, n_val=300, pretrain_steps=1500, pretrain_lr=0.2,
            finetune_steps=60, lr_grids={"gd": (0.05, 0.1), "adam": (3e-3, 1e-2)}, max_grid_extensions=1,
            fraction=0.25, mask_interval=5)


@pytest.fixture(scope="module")
def result():
    return toy.run(toy.ToyConfig(**TINY))


def test_result_structure(result):
    json.dumps(result)  # JSON-serializable
    assert result["seeds"] == [0, 1, 2]
    assert set(result["tasks"]) == {"1", "2"}
    for task in result["tasks"].values():
        assert set(task["updates"]) == {"gd", "adam"}
        for u in task["updates"].values():
            assert set(u["methods"]) == set(toy.STRATEGIES)
            for m in u["methods"].values():
                assert m["lr"] in [float(r) for r in m["rates"]]  # the chosen rate was tried
                for metric in ("test_loss", "distance", "path_length", "large_neuron_distance"):
                    st = m[metric]
                    assert len(st["values"]) == 3
                    assert all(math.isfinite(v) and v >= 0 for v in st["values"])
                    assert math.isfinite(st["mean"]) and math.isfinite(st["std"]) and st["std"] >= 0
                # the straight-line distance never exceeds the path length
                assert all(d <= p + 1e-12 for d, p in zip(m["distance"]["values"], m["path_length"]["values"]))
    rows = result["comparisons"]
    assert {(r["update"], r["regime"], r["added"]) for r in rows} == {
        (u, g, k) for u in ("gd", "adam") for g in ("dynamic", "static") for k in ("1", "2")}
    for r in rows:
        assert r["n"] == 3 and r["lo"] <= r["mean"] <= r["hi"]
        assert r["verdict"] == ("lower" if r["hi"] < 0 else "higher" if r["lo"] > 0 else stats.UNDECIDED)
    fig = result["figure"]
    assert set(fig["finetuned"]) == {"1", "2"} and set(fig["finetuned"]["1"]["adam"]) == set(toy.STRATEGIES)
    assert len(fig["teacher"]["W"]) == 2 + 2


def test_rate_is_chosen_on_validation_and_grid_extends_at_an_edge():
    runs = {0.01: [{"val_loss": 1e-2}, {"val_loss": 1e-2}], 0.1: [{"val_loss": 1e-3}, {"val_loss": float("inf")}],
            0.03: [{"val_loss": 1e-3}, {"val_loss": 1e-3}]}
    assert toy.choose_rate(runs) == 0.03  # a diverged seed rules its rate out
    assert rate_beyond_edge([0.01, 0.03, 0.1], 0.1) == pytest.approx(0.1 * 0.1 / 0.03, rel=2e-3)
    assert rate_beyond_edge([0.01, 0.03, 0.1], 0.01) == pytest.approx(0.01 * 0.01 / 0.03, rel=2e-3)
    assert rate_beyond_edge([0.01, 0.03, 0.1], 0.03) is None


@pytest.mark.parametrize("strategy", ["small_weights", "large_gradients", "small_weights_static", "full"])
def test_adam_update_is_nanoadam(strategy):
    # The toy's Adam rule is the library's NanoAdam: each step moves at most the kept count of each
    # layer, a static mask moves the same entries every step, full updates equal torch's Adam.
    cfg = toy.ToyConfig(**TINY)
    p = toy.make_problem(cfg, 1)
    y = toy.forward(p.Wt, p.at, p.X_ft)
    W, a = p.W0 * 100, p.a0 * 100
    kW, ka = toy.kept(cfg.fraction, W.numel()), toy.kept(cfg.fraction, a.numel())
    moved = []

    def check(t, before, after, masks):
        if strategy != "full":
            assert int(masks[0].sum()) <= kW and int(masks[1].sum()) <= ka
        moved.append(tuple(m.clone() for m in masks))

    out = toy.finetune(W, a, p.X_ft, y, strategy, 12, 1e-2, cfg.fraction, cfg.mask_interval, callback=check,
                       update="adam")
    if strategy == "small_weights_static":
        union = moved[0][0].clone()
        for mW, _ in moved:
            union |= mW
        assert int(union.sum()) <= kW  # one mask for the whole run
    if strategy == "full":
        Wr, ar = torch.nn.Parameter(W.clone()), torch.nn.Parameter(a.clone())
        ref = torch.optim.Adam([Wr, ar], lr=1e-2)
        for _ in range(12):
            _, gW, ga = toy.loss_and_grads(Wr.detach(), ar.detach(), p.X_ft, y)
            Wr.grad, ar.grad = gW, ga
            ref.step()
        # float32 moments against torch's float64 ones
        torch.testing.assert_close(out["W"], Wr.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["a"], ar.detach(), rtol=1e-5, atol=1e-6)


def test_masked_updates_change_only_the_fraction(result):
    kept = result["checks"]["kept"]
    for update in ("gd", "adam"):
        assert kept[f"{update}/small_weights"] == {"W": math.ceil(0.25 * 12 * 2), "a": math.ceil(0.25 * 12)}
        for s in ("small_weights", "large_gradients", "small_weights_static", "large_gradients_static"):
            assert kept[f"{update}/{s}"] == kept[f"{update}/small_weights"]
            mc = result["checks"]["max_changed_per_step"][f"{update}/{s}"]
            assert 0 < mc["W"] <= kept[f"{update}/{s}"]["W"] and 0 < mc["a"] <= kept[f"{update}/{s}"]["a"]


@pytest.mark.parametrize("strategy", ["small_weights", "large_gradients", "small_weights_static"])
def test_each_step_moves_only_the_selected_entries(strategy):
    cfg = toy.ToyConfig(**TINY)
    p = toy.make_problem(cfg, 3)
    y = toy.forward(p.Wt, p.at, p.X_ft)
    W, a = p.W0 * 100, p.a0 * 100  # not pretrained: fine for the mask rule
    kW, ka = toy.kept(cfg.fraction, W.numel()), toy.kept(cfg.fraction, a.numel())
    seen, first = [], []
    static = strategy.endswith("_static")

    def check(t, before, after, masks):
        for old, new, mask, k in zip(before, after, masks, (kW, ka)):
            assert int(mask.sum()) == k
            assert torch.equal(new[~mask], old[~mask])  # frozen entries did not move
        if t == 0 or (t % cfg.mask_interval == 0 and not static):  # a fresh mask follows the rule
            _, gW, ga = toy.loss_and_grads(*before, p.X_ft, y)
            for w, g, mask, k in zip(before, (gW, ga), masks, (kW, ka)):
                key = (w.abs() if strategy.startswith("small_weights") else -g.abs()).flatten()
                chosen = set(torch.argsort(key)[:k].tolist())
                assert chosen == set(mask.flatten().nonzero().flatten().tolist())
        elif static:  # the static mask never changes
            assert all(torch.equal(m, m0) for m, m0 in zip(masks, first))
        if t == 0:
            first.extend(m.clone() for m in masks)
        seen.append(t)

    toy.finetune(W, a, p.X_ft, y, strategy, 23, 0.05, cfg.fraction, cfg.mask_interval, callback=check)
    assert seen == list(range(23))


def test_gradients_match_autograd():
    cfg = toy.ToyConfig(**TINY)
    p = toy.make_problem(cfg, 0)
    y = toy.forward(p.Wt, p.at, p.X_pre)
    W = (p.W0 * 300).requires_grad_()
    a = (p.a0 * 300).requires_grad_()
    loss = 0.5 * ((toy.forward(W, a, p.X_pre) - y) ** 2).mean()
    loss.backward()
    ref, gW, ga = toy.loss_and_grads(W.detach(), a.detach(), p.X_pre, y)
    torch.testing.assert_close(ref, loss.detach())
    torch.testing.assert_close(gW, W.grad)
    torch.testing.assert_close(ga, a.grad)


def test_pretraining_fits_the_teacher(result):
    assert result["pretrain"]["train_loss"]["mean"] < 1e-3
    assert result["pretrain"]["test_loss"]["mean"] < 1e-2
    # the new tasks are not solved by the pretrained student
    assert result["tasks"]["1"]["pretrained_test_loss"]["mean"] > 10 * result["pretrain"]["test_loss"]["mean"]


def test_a_stopped_run_resumes_from_its_cells(tmp_path, monkeypatch):
    cfg = toy.ToyConfig(**{**TINY, "n_seeds": 2, "pretrain_steps": 200, "finetune_steps": 20, "added_neurons": (1,),
                           "updates": ("gd",)})
    first = toy.run(cfg, cells_dir=str(tmp_path))
    assert len(list(tmp_path.rglob("lr*.json"))) >= len(cfg.strategies) * 2
    monkeypatch.setattr(toy, "finetune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran again")))
    again = toy.run(cfg, cells_dir=str(tmp_path))
    first.pop("elapsed_s"), again.pop("elapsed_s")
    assert again == json.loads(json.dumps(first))


def test_deterministic():
    cfg = toy.ToyConfig(**{**TINY, "n_seeds": 2, "pretrain_steps": 200, "finetune_steps": 20})
    r1, r2 = toy.run(cfg), toy.run(cfg)
    r1.pop("elapsed_s"), r2.pop("elapsed_s")
    assert r1 == r2


def test_result_is_written_then_rendered_from_disk(result, tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "run", lambda config, progress=None, cells_dir=None: result)
    written = toy.main(toy.ToyConfig(out_dir=str(tmp_path)), command="test")
    names = {p.name for p in written}
    assert names == {"toy.json", "toy.md", *(f"toy_{k}_added_{u}.png" for k in (1, 2) for u in ("gd", "adam"))}
    for p in written:
        assert p.stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp*"))
    assert json.loads((tmp_path / "toy.json").read_text())["seeds"] == [0, 1, 2]
    md = (tmp_path / "toy.md").read_text()
    assert "| Small weights |" in md and "| Large gradients |" in md and "±" in md and "95 %" in md
    assert (tmp_path / "toy_1_added_adam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
