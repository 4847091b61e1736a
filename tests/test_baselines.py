"""The optimizer registry: every entry builds and steps on CPU, with the paper's grouping."""

import pytest
import torch

from nanoadam import DensityScheduler, NanoAdam
from nanoadam.selection import tensor_chunk_size
from nanoadam_lab.baselines import MissingExtraError, available_optimizers, build_optimizer, optimizer_state_bytes
from nanoadam_lab.baselines.registry import REGISTRY, galore_target_names
from nanoadam_lab.bench.formulas import layout_formula_bytes

transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=5000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def train_steps(model, bundle, steps=3):
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 5000, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=gen)).loss
        loss.backward()
        bundle.step()
        bundle.optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_registry_has_the_optimizers_and_controls():
    assert available_optimizers() == ["adamw", "adamw8bit", "galore", "microadam", "nanoadam", "nanoadam-static",
                                      "lift", "head-only", "adamw-headlr"]


@pytest.mark.parametrize("name", available_optimizers())
def test_every_entry_builds_steps_and_matches_its_memory_formula(name):
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    if name == "galore":
        pytest.importorskip("galore_torch")
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bundle = build_optimizer(name, model, lr=1e-3, **({"head_lr": 1e-2} if name == "adamw-headlr" else {}))
    train_steps(model, bundle)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    body = "bert.encoder.layer.0.attention.self.query.weight"
    assert "classifier.weight" in changed and (body not in changed if name == "head-only" else body in changed)
    from nanoadam_lab.bench.optimizers import tensor_infos

    formula = layout_formula_bytes(name, tensor_infos(model), {**REGISTRY[name].defaults, **bundle.hyperparameters})
    assert optimizer_state_bytes(bundle.optimizer) == pytest.approx(formula, rel=0.02)


def test_nanoadam_entries_use_the_paper_grouping_and_static_mask():
    model = tiny_bert()
    bundle = build_optimizer("nanoadam-static", model, lr=1e-3, density=0.05)
    opt = bundle.optimizer
    assert isinstance(opt, NanoAdam)
    sparse, dense = opt.param_groups
    assert sparse["sparse"] and not dense["sparse"] and sparse["mask_interval"] is None and sparse["density"] == 0.05
    dense_ids = {id(p) for p in dense["params"]}
    assert id(model.classifier.weight) in dense_ids and id(model.bert.embeddings.LayerNorm.weight) in dense_ids
    assert bundle.hyperparameters["lr"] == 1e-3 and bundle.hyperparameters["state_dtype"] == "bfloat16"


def test_nanoadam_density_schedule_comes_with_the_bundle():
    model = tiny_bert()
    bundle = build_optimizer("nanoadam", model, lr=1e-3, final_density=0.02, total_steps=4, density_interval=1)
    assert isinstance(bundle.schedulers[0], DensityScheduler)
    train_steps(model, bundle, steps=4)
    assert bundle.optimizer.param_groups[0]["density"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer("nanoadam", model, lr=1e-3, final_density=0.02)


def test_galore_projects_body_linear_weights_only():
    model = tiny_bert()
    targets = galore_target_names(model)
    assert "bert.encoder.layer.0.attention.self.query.weight" in targets
    assert "classifier.weight" not in targets and "bert.embeddings.word_embeddings.weight" not in targets


def test_microadam_port_is_used_on_cpu():
    bundle = build_optimizer("microadam", tiny_bert(), lr=1e-3)
    assert "port" in bundle.hyperparameters["implementation"]
    assert bundle.hyperparameters["m"] == 10 and bundle.hyperparameters["density"] == 0.01


@pytest.mark.parametrize("name,kwargs,match", [("sgd", {}, "unknown optimizer"),
                                                ("adamw", {"rank": 4}, "no hyperparameter rank"),
                                                ("adamw", {"lr": -1.0}, "lr")])
def test_bad_requests_name_the_problem(name, kwargs, match):
    kwargs = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, tiny_bert(), **kwargs)


def test_missing_library_names_the_extra(monkeypatch):
    from nanoadam_lab.baselines import registry

    real_import = registry.importlib.import_module

    def without_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(registry.importlib, "import_module", without_bitsandbytes)
    with pytest.raises(MissingExtraError, match=r"nanoadam\[baselines\]"):
        build_optimizer("adamw8bit", tiny_bert(), lr=1e-3)


def test_head_only_trains_the_head_alone():
    model = tiny_bert()
    bundle = build_optimizer("head-only", model, lr=1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    assert sum(len(g["params"]) for g in bundle.optimizer.param_groups) == 2


def test_adamw_headlr_trains_the_head_at_its_own_rate():
    model = tiny_bert()
    bundle = build_optimizer("adamw-headlr", model, lr=1e-4, head_lr=3e-3)
    body, head = bundle.optimizer.param_groups
    assert body["lr"] == 1e-4 and head["lr"] == 3e-3
    assert {id(p) for p in head["params"]} == {id(model.classifier.weight), id(model.classifier.bias)}
    with pytest.raises(ValueError, match="head_lr"):
        build_optimizer("adamw-headlr", tiny_bert(), lr=1e-4)


def test_lift_selects_principal_weights_over_whole_tensors():
    model = tiny_bert()
    bundle = build_optimizer("lift", model, lr=1e-3)
    train_steps(model, bundle, steps=1)
    opt = bundle.optimizer
    sparse = opt.param_groups[0]
    assert sparse["selection"] == "principal_weights" and sparse["density"] == 0.1
    w = model.bert.encoder.layer[0].intermediate.dense.weight  # 16384 entries: four default chunks
    assert int(opt.state[w]["mask_chunk_size"]) == tensor_chunk_size("principal_weights", 4096, w.numel()) == w.numel()
