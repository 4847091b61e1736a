"""Continual finetuning (paper Sec. 4): protocol, head reload, parameter shift, outputs."""

import copy
import json
import math
import os

import pytest
import torch

from nanoadam.grouping import dense_parameter_names
from nanoadam.selection import ChunkLayout
from nanoadam_lab.experiments import forgetting as F

TINY = dict(n_seeds=2, channels=(4, 8, 8), hidden=16, pretrain_epochs=3, epochs=2.0, batch_size=64,
            optimizers=["adamw", "nanoadam"], lr_grids={"adamw": [1e-3, 3e-3], "nanoadam": [1e-2]},
            optimizer_overrides={"nanoadam": {"density": 0.05, "mask_interval": 5}}, tie_breaks=("smaller", "loss"))
DATA = "/work/shared/data/glue"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is faster and leaves the other core alone
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result():
    return F.run(F.ForgettingConfig(vision=F.VisionConfig(**TINY), language=None))


@pytest.fixture(scope="module")
def domain():
    return F.VisionDomain(F.VisionConfig(**TINY))


def test_result_structure(result):
    json.dumps(result, allow_nan=False)  # strict JSON
    vision = result["domains"]["vision"]
    assert set(result["domains"]) == {"vision"}
    assert vision["seeds"] == [0, 1]
    assert set(vision["optimizers"]) == {"adamw", "nanoadam"}
    for opt, entry in vision["optimizers"].items():
        assert entry["lr_task1"] in TINY["lr_grids"][opt] and entry["lr_task2"] in TINY["lr_grids"][opt]
        assert set(entry["tuning"]["task1"]) == {f"{lr:g}" for lr in TINY["lr_grids"][opt]}
        assert len(entry["runs"]) == 2
        for r in entry["runs"]:
            for key in ("task1", "task2", "task1_after"):
                assert 0.0 <= r[key] <= 1.0
            assert r["forgetting"] == pytest.approx(r["task1"] - r["task1_after"])
            assert r["avg"] == pytest.approx((r["task1"] + r["task2"] + r["task1_after"]) / 3)
            assert r["task1_head_reloaded"] is True
            assert r["l2_shift"] > 0 and 0.0 <= r["untouched_fraction"] <= 1.0
        for key in F.METRICS:
            assert entry["mean"][key] == pytest.approx(sum(r[key] for r in entry["runs"]) / 2)
            assert math.isfinite(entry["std"][key]) and entry["std"][key] >= 0
    assert vision["tie_break"] == "smaller" and set(vision["variants"]) == {"loss"}
    variant = vision["variants"]["loss"]
    for opt, entry in variant["optimizers"].items():
        assert entry["tuning"]["tie_break"] == "loss" and len(entry["runs"]) == 2
        assert entry["tuning"]["task1"] == vision["optimizers"][opt]["tuning"]["task1"]  # stage 1 tuned once
        if (entry["lr_task1"], entry["lr_task2"]) == (vision["optimizers"][opt]["lr_task1"],
                                                      vision["optimizers"][opt]["lr_task2"]):
            assert entry["runs"] == vision["optimizers"][opt]["runs"]  # not rerun
    v = vision["verdict"]
    assert set(v) == {"forgetting_vs_adamw", "task2_vs_adamw"}
    nano, adamw = vision["optimizers"]["nanoadam"]["runs"], vision["optimizers"]["adamw"]["runs"]
    diffs = [a["forgetting"] - b["forgetting"] for a, b in zip(nano, adamw)]
    assert v["forgetting_vs_adamw"]["mean"] == pytest.approx(sum(diffs) / 2) and v["forgetting_vs_adamw"]["n"] == 2
    assert v["forgetting_vs_adamw"]["lo"] <= v["forgetting_vs_adamw"]["mean"] <= v["forgetting_vs_adamw"]["hi"]


def test_splits_are_fixed_disjoint_and_tuning_never_sees_the_test_images(domain):
    idx = domain.indices
    assert not set(idx["train"]) & set(idx["test"])
    assert sorted(idx["fit"] + idx["heldout"]) == idx["train"] and not set(idx["fit"]) & set(idx["heldout"])
    assert F.VisionDomain(F.VisionConfig(**TINY)).indices == idx  # deterministic
    # task 2 = the same images rotated, under another label map
    assert torch.equal(domain.images[1], torch.rot90(domain.images[0], 1, dims=(2, 3)))
    assert not torch.equal(domain.labels[0], domain.labels[1])
    assert set(domain.pre_y.tolist()) == set(range(5))
    calls = []
    original = domain.evaluate

    def spy(model, task, part):
        calls.append(part)
        return original(model, task, part)

    domain.evaluate = spy
    try:
        F.tune(domain, "adamw", [1e-3, 3e-3], 0, F.Progress(None, 0), ("smaller", "loss"))
    finally:
        domain.evaluate = original
    assert calls and set(calls) == {"tune"}


def test_task1_after_is_scored_with_the_task1_head(domain):
    seen = []
    original = domain.evaluate

    def spy(model, task, part):
        seen.append((task, copy.deepcopy(model.fc.state_dict())))
        return original(model, task, part)

    domain.evaluate = spy
    try:
        out = F.continual_finetune(domain, "adamw", 3e-3, 3e-3, seed=0)
    finally:
        domain.evaluate = original
    assert [t for t, _ in seen] == [0, 1, 0]
    head_after_task1, head_task2, head_at_reload = (s for _, s in seen)
    for k in head_after_task1:
        assert torch.equal(head_at_reload[k], head_after_task1[k])  # bitwise the head trained on task 1
        assert not torch.equal(head_task2[k], head_after_task1[k])
    assert torch.equal(out.model.fc.weight, out.heads[0].weight)
    assert domain.evaluate(out.model, 0, "final")["score"] == out.record["task1_after"]
    # the model after task 2 carrying the task-2 head (another label map) does not reproduce task1_after
    model = copy.deepcopy(out.model)
    model.fc = out.heads[1]
    assert domain.evaluate(model, 0, "final")["score"] != out.record["task1_after"]


def _conv_untouched(model, pretrained) -> float:
    ref = dict(pretrained.named_parameters())
    same = total = 0
    for name, p in model.named_parameters():
        if p.ndim == 4:
            same += int((p == ref[name]).sum())
            total += p.numel()
    return same / total


def test_untouched_fraction_matches_the_optimizer(domain):
    pretrained = domain.pretrained_model()
    adamw = F.continual_finetune(domain, "adamw", 1e-3, 1e-3, seed=0)
    assert _conv_untouched(adamw.model, pretrained) < 0.01  # every conv weight moves
    assert adamw.record["untouched_fraction"] < 0.2

    overrides = TINY["optimizer_overrides"]["nanoadam"]
    nano = F.continual_finetune(domain, "nanoadam", 1e-2, 1e-2, seed=0)
    rec = nano.record
    # upper bound on what NanoAdam can touch: dense backbone tensors (BatchNorm) fully, each sparse tensor
    # ceil(density * L) entries per chunk per mask, one mask every mask_interval steps in each stage
    masks = sum(math.ceil(rec[s]["steps"] / overrides["mask_interval"]) for s in ("stage1", "stage2"))
    dense = dense_parameter_names(nano.model)
    backbone = {n: p for n, p in nano.model.named_parameters() if not n.startswith("fc.")}
    total = sum(p.numel() for p in backbone.values())
    touchable = 0
    for name, p in backbone.items():
        if name in dense:
            touchable += p.numel()
        else:
            per_mask = ChunkLayout.build(p.numel(), 4096, overrides["density"]).kept
            touchable += min(p.numel(), masks * per_mask)
    assert rec["backbone_params"] == total
    assert 1 - touchable / total <= rec["untouched_fraction"] < 1.0
    assert _conv_untouched(nano.model, pretrained) > 0.5
    assert rec["untouched_fraction"] > adamw.record["untouched_fraction"]
    # the shift after task 1 is part of the shift after both tasks
    assert rec["shift_after_task1"]["untouched_fraction"] >= rec["untouched_fraction"]


def test_write_outputs_and_merge(result, tmp_path):
    written = F.write_outputs(result, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["forgetting.json", "forgetting.md",
                                                            "forgetting_vision.png"]
    assert json.loads((tmp_path / "forgetting.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "forgetting_vision.png").stat().st_size > 10_000
    md = (tmp_path / "forgetting.md").read_text()
    for text in ("| optimizer | lr task 1 | lr task 2 |", "forgetting", "untouched", "| adamw |", "| nanoadam |",
                 result["command"], "| NanoAdam minus |", "forgetting vs. adamw", "held-out", "## Vision"):
        assert text in md
    assert "**Yes.**" not in md and "**No.**" not in md  # numbers only: a person writes what they mean
    fake = copy.deepcopy(result)
    fake["domains"] = {"language": copy.deepcopy(result["domains"]["vision"])}
    merged = F.merge_results(result, fake)
    assert set(merged["domains"]) == {"vision", "language"} and len(merged["runs"]) == 2


def test_best_rate_tie_rules():
    nan = float("nan")
    tied = {1e-3: {"score": 1.0, "loss": 0.2}, 1e-2: {"score": 1.0, "loss": 0.1}}
    assert F.best_rate(tied) == F.best_rate(tied, "smaller") == 1e-3
    assert F.best_rate(tied, "loss") == 1e-2
    for rule in F.TIE_BREAKS:
        assert F.best_rate({1e-3: {"score": 0.9, "loss": 0.1}, 1e-2: {"score": 1.0, "loss": 0.5}}, rule) == 1e-2
        assert F.best_rate({1e-3: {"score": 1.0, "loss": 0.1}, 1e-2: {"score": 1.0, "loss": 0.1}}, rule) == 1e-3
        assert F.best_rate({1e-3: {"score": nan, "loss": nan}, 1e-2: {"score": 0.2, "loss": 3.0}}, rule) == 1e-2
    with pytest.raises(ValueError, match="tie_break"):
        F.best_rate(tied, "larger")


def test_config_validation():
    with pytest.raises(ValueError, match="unknown optimizer"):
        F.VisionConfig(optimizers=["sgd"])
    with pytest.raises(ValueError, match="tie_breaks"):
        F.VisionConfig(tie_breaks=())
    with pytest.raises(ValueError, match="task2_transform"):
        F.VisionConfig(task2_transform="blur")
    with pytest.raises(ValueError, match="unknown task"):
        F.LanguageConfig(task2="mnli")
    full = F.LanguageConfig()  # the full language run: every optimizer, the GLUE quick budget
    assert full.optimizers == ["adamw", "adamw8bit", "galore", "microadam", "nanoadam", "nanoadam-static"]
    assert (full.task1, full.task2, full.train_limit, full.max_length) == ("sst2", "stsb", 1000, 64)


@pytest.mark.skipif(not os.path.isdir(DATA), reason="shared GLUE data not at hand")
def test_language_miniature(tmp_path):
    pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = F.LanguageConfig(train_limit=40, eval_limit=16, max_length=24, batch_size=8, epochs=1.0,
                           optimizers=["adamw", "nanoadam"], lr_grids={"adamw": [1e-4], "nanoadam": [1e-3]},
                           data_dir=DATA, threads=1)
    domain = F.LanguageDomain(cfg)
    assert domain.sizes["sst2_tune_eval"] == 8 and domain.sizes["sst2_final_train"] == 40
    assert domain.sizes["stsb_final_eval"] == 16
    out = F.continual_finetune(domain, "nanoadam", 1e-3, 1e-3, seed=0)
    rec = out.record
    assert rec["task1_head_reloaded"] and rec["forgetting"] == pytest.approx(rec["task1"] - rec["task1_after"])
    assert torch.equal(out.model.classifier.weight, out.heads[0].weight)
    assert 0.5 < rec["untouched_fraction"] < 1.0 and rec["l2_shift"] > 0
    result = F.run(F.ForgettingConfig(vision=None, language=cfg))
    lang = result["domains"]["language"]
    assert set(lang["optimizers"]) == {"adamw", "nanoadam"} and lang["metric"] == "accuracy / pearson"
    F.write_outputs(result, str(tmp_path))
    md = (tmp_path / "forgetting.md").read_text()
    assert "SST2 (task 1)" in md and "STSB (task 2)" in md
