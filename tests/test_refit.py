"""Task 1 after task 2 three ways: the old head, the old head with its offset refit, a linear probe
refit on the body's features (``experiments.refit``, ``glue.WatchedTask``)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from nanoadam_lab.experiments.refit import LinearProbe, refit_offset  # noqa: E402


def test_the_offset_refit_undoes_a_shift_of_every_logit():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=gen)
    clean = torch.randn(400, 3, generator=gen) + 3 * torch.nn.functional.one_hot(labels, 3)
    shift = torch.tensor([4.0, -2.0, 0.5])
    offset = refit_offset(clean + shift, labels)
    fitted = clean + shift + offset
    # Cross-entropy ignores a constant added to every class: compare the offsets up to one.
    assert torch.allclose((shift + offset) - (shift + offset).mean(), refit_offset(clean, labels)
                          - refit_offset(clean, labels).mean(), atol=1e-3)
    assert (fitted.argmax(1) == labels).float().mean() > 0.9 > ((clean + shift).argmax(1) == labels).float().mean()
    # A regression's single output: the mean residual.
    y = torch.randn(50, generator=gen)
    assert torch.allclose(refit_offset((y - 2.5).reshape(-1, 1), y), torch.tensor([2.5]), atol=1e-5)


def test_the_probe_reads_what_the_features_hold():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (300,), generator=gen)
    features = torch.randn(300, 16, generator=gen)
    features[:, 3] += 4 * labels  # one informative feature among noise
    probe = LinearProbe(features[:200], labels[:200], 2)
    assert (probe.logits(features[200:]).argmax(1) == labels[200:]).float().mean() > 0.95
    noise = LinearProbe(torch.randn(200, 16, generator=gen), labels[:200], 2)
    assert (noise.logits(features[200:]).argmax(1) == labels[200:]).float().mean() < 0.7
    scores = torch.randn(200, generator=gen)
    ridge = LinearProbe(torch.stack([scores, torch.randn(200, generator=gen)], 1), 2 * scores + 1, 1)
    assert ridge.logits(torch.tensor([[1.0, 0.0]])).shape == (1, 1)
    assert abs(float(ridge.logits(torch.tensor([[1.0, 0.0]]))) - 3.0) < 0.1


def test_a_watched_head_pushed_off_by_an_offset_is_recovered_by_the_refits(tmp_path):
    pytest.importorskip("transformers")
    from glue_helpers import DATA

    from nanoadam_lab.experiments.glue import GlueRunConfig, WatchedTask, load_body, load_model_and_tokenizer, run

    tiny = dict(train_limit=120, eval_limit=60, max_steps=8, max_length=32, batch_size=8, epochs=1.0, eval_points=0,
                retention_probe=False, data_dir=DATA, eval_split="heldout")
    saved = tmp_path / "task1.pt"
    run(GlueRunConfig(task="rte", optimizer="adamw", lr=1e-3, save_to=str(saved), **tiny))
    start = torch.load(saved, weights_only=True)
    config = GlueRunConfig(task="mrpc", optimizer="adamw", lr=1e-3, init_from=str(saved), watch_task="rte",
                           watch_train_limit=120, **tiny)
    model, tokenizer = load_model_and_tokenizer("minilm", 2)
    load_body(model, start)
    watch = WatchedTask.of(config, model, tokenizer, start)
    assert watch.refit_examples == 96  # the watched task's training examples, fewer than asked for
    # The refits learn from training examples only: none of them is a scored (held-out or validation) one.
    refit_inputs = {tuple(ids) for ids in watch.refit_train.input_ids}
    for split in ("heldout", "validation"):
        assert not refit_inputs & {tuple(ids) for ids in watch.splits[split].input_ids}, split
    pad = tokenizer.pad_token_id
    plain = watch.scored(model, pad)
    # The same body, the old head's bias pushed far towards one class: the old head predicts that
    # class only, the refits do not care (the offset absorbs the push; the probe never reads the head).
    watch.head["classifier.bias"] = watch.head["classifier.bias"] + torch.tensor([50.0, 0.0])
    pushed = watch.scored(model, pad)
    assert set(pushed["validation"]["predictions"]) == {0} and 1 in plain["validation"]["predictions"]
    for split in ("heldout", "validation"):
        assert pushed["refit"]["probe"][split] == plain["refit"]["probe"][split]
        assert pushed["refit"]["offset"][split]["score"] == pytest.approx(plain["refit"]["offset"][split]["score"])
    # The run records both refits, before and after, and the curve starts at the old head's score.
    result = run(config)
    refit = result["watch"]["refit"]
    assert refit["examples"] == 96 and set(refit["before"]) == {"offset", "probe", "offset_value"}
    assert refit["before"]["probe"]["validation"] == plain["refit"]["probe"]["validation"]
    assert result["watch"]["curve"][0]["score"] == plain["validation"]["score"]
    none = run(GlueRunConfig(**{**config.__dict__, "watch_refit_examples": 0}))
    assert "refit" not in none["watch"] and none["loss_curve"] == result["loss_curve"]
    with pytest.raises(ValueError, match="watch_refit_examples"):
        GlueRunConfig(**{**config.__dict__, "watch_refit_examples": -1})
