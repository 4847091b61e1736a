"""DensityScheduler and param_groups."""

import os
import warnings

import pytest
import torch
from torch import nn

from nanoadam import DensityScheduler, NanoAdam, param_groups
from nanoadam.grouping import dense_parameter_names

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_linear_density_schedule_changes_every_interval():
    p = nn.Parameter(torch.randn(10_000))
    opt = NanoAdam([p], density=0.1, chunk_size=1000)
    sched = DensityScheduler(opt, final_density=0.01, total_steps=100, interval=10)
    seen = []
    for _ in range(120):
        p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["density"])
    assert seen[0] == seen[8] == pytest.approx(0.1)  # constant inside an interval
    assert seen[9] == pytest.approx(0.1 - 0.09 * 0.1)  # after 10 steps: 10 % of the way
    assert seen[49] == pytest.approx(0.055)
    assert seen[99] == seen[119] == pytest.approx(0.01)
    assert opt.state[p]["index"].numel() == 10 * 10  # the masks followed the density


def test_scheduler_state_dict_round_trip_and_dense_groups_untouched():
    params = [nn.Parameter(torch.randn(100)), nn.Parameter(torch.randn(10))]
    opt = NanoAdam([{"params": params[:1]}, {"params": params[1:], "sparse": False}], density=0.2)
    sched = DensityScheduler(opt, final_density=0.05, total_steps=10, interval=1)
    for _ in range(4):
        sched.step()
    assert opt.param_groups[1]["density"] == 0.2
    twin = DensityScheduler(opt, final_density=0.05, total_steps=10)
    twin.load_state_dict(sched.state_dict())
    assert twin.densities() == sched.densities() and twin.last_step == 4


@pytest.mark.parametrize("kwargs,match", [(dict(final_density=0.0), "final_density"),
                                          (dict(final_density=2.0), "final_density"),
                                          (dict(total_steps=0), "total_steps"),
                                          (dict(interval=0), "interval"),
                                          (dict(final_density=[0.1, 0.2]), "final_density")])
def test_scheduler_bad_input(kwargs, match):
    opt = NanoAdam([nn.Parameter(torch.randn(10))])
    args = dict(final_density=0.01, total_steps=10, interval=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DensityScheduler(opt, **args)
    with pytest.raises(TypeError, match="optimizer"):
        DensityScheduler("adam", final_density=0.1, total_steps=10)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)  # a numbered block's "fc" is not a head
        self.norm = nn.GroupNorm(2, 4)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 4)
        self.layers = nn.ModuleList([Block(), Block()])
        self.final_norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 50, bias=False)
        self.lm_head.weight = self.embed.weight


def test_param_groups_resnet_like():
    groups = param_groups(TinyResNet(), density=0.05)
    assert groups[0]["sparse"] and groups[0]["density"] == 0.05 and not groups[1]["sparse"]
    model = TinyResNet()
    assert dense_parameter_names(model) == {"bn1.weight", "bn1.bias", "layer1.1.weight", "layer1.1.bias",
                                            "fc.weight", "fc.bias"}


def test_param_groups_tied_head_numbered_blocks_and_frozen_params():
    model = TiedLM()
    model.layers[1].fc.bias.requires_grad_(False)
    names = dense_parameter_names(model)
    assert "embed.weight" in names and "lm_head.weight" in names  # tied to the head: dense
    assert "layers.0.fc.weight" not in names and "layers.0.norm.weight" in names
    groups = param_groups(model)
    sparse_ids = {id(p) for p in groups[0]["params"]}
    assert id(model.layers[0].fc.weight) in sparse_ids and id(model.layers[1].fc.bias) not in sparse_ids
    total = sum(len(g["params"]) for g in groups)
    assert total == len([p for p in model.parameters() if p.requires_grad])


def test_param_groups_on_huggingface_bert_and_llama():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=3))
    names = dense_parameter_names(bert)
    assert {"classifier.weight", "classifier.bias", "bert.embeddings.LayerNorm.weight"} <= names
    assert "bert.pooler.dense.weight" not in names and "bert.encoder.layer.0.attention.self.query.weight" not in names
    assert all("LayerNorm" in n or n.startswith("classifier") for n in names)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False))
    names = dense_parameter_names(llama)
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert "model.layers.0.input_layernorm.weight" in names and "model.embed_tokens.weight" not in names
    opt = NanoAdam(param_groups(llama), lr=1e-3, density=0.1)
    out = llama(torch.randint(0, 100, (2, 8)), labels=torch.randint(0, 100, (2, 8)))
    out.loss.backward()
    opt.step()


def test_param_groups_without_a_named_head_keeps_the_output_layer_dense_and_says_so():
    net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.warns(UserWarning, match=r"'3' \(Linear\)"):
        groups = param_groups(net)
    dense = {id(p) for p in groups[1]["params"]}
    assert {id(net[3].weight), id(net[3].bias), id(net[1].weight)} <= dense and id(net[0].weight) not in dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = param_groups(net, head_names=())  # no head, said on purpose: no guess, no warning
        assert {id(p) for p in explicit[0]["params"]} == {id(net[0].weight), id(net[0].bias), id(net[3].weight),
                                                         id(net[3].bias)}
        named = nn.Sequential()
        named.add_module("body", nn.Linear(8, 16))
        named.add_module("classifier", nn.Linear(16, 3))
        assert {id(p) for p in param_groups(named)[1]["params"]} == {id(named.classifier.weight),
                                                                     id(named.classifier.bias)}
        ends_in_norm = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))  # a base model without a head
        assert len(param_groups(ends_in_norm)[0]["params"]) == 2


def test_head_lr_puts_the_head_in_a_group_of_its_own():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    model = BertForSequenceClassification(config)
    groups = param_groups(model, head_lr=3e-3, density=0.2)
    by_kind = {(g["sparse"], g.get("lr")): g["params"] for g in groups}
    head = {id(p) for p in model.classifier.parameters()}
    assert {id(p) for p in by_kind[(False, 3e-3)]} == head
    dense = {id(p) for p in by_kind[(False, None)]}
    assert not dense & head and {id(p) for p in model.bert.embeddings.LayerNorm.parameters()} <= dense
    assert groups[0]["density"] == 0.2 and "lr" not in groups[0]
    total = sum(len(g["params"]) for g in groups)
    assert total == len([p for p in model.parameters() if p.requires_grad])
    opt = NanoAdam(groups, lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4, 3e-3]


@pytest.mark.parametrize("bad", [0, -1e-3, True, "1e-3"])
def test_bad_head_lr_is_refused(bad):
    with pytest.raises(ValueError, match="head_lr"):
        param_groups(torch.nn.Linear(3, 3), head_lr=bad)


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_lm_head_dense_by_default_and_sparse_on_request(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=tied))
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert (embed is head) == tied

    def dense_ids(groups):
        return {id(p) for g in groups if not g["sparse"] for p in g["params"]}

    # The paper's default: lm_head dense; tied, that puts the whole embedding on dense AdamW.
    default = dense_ids(param_groups(model))
    assert id(head) in default and (id(embed) in default) == tied
    # head_names=() trains lm_head (and the embedding tied to it) sparsely; the norms stay dense.
    sparse_head = dense_ids(param_groups(model, head_names=()))
    assert id(head) not in sparse_head and id(embed) not in sparse_head
    assert id(model.model.norm.weight) in sparse_head
