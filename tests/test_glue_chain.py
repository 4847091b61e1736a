"""Chained GLUE runs (continual finetuning): a run saves its model, the next starts from its body
with a new head and scores the earlier task with that task's own head along the way."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

import torch  # noqa: E402
from glue_helpers import DATA  # noqa: E402

from nanoadam_lab.experiments.glue import GlueRunConfig, load_body, load_model_and_tokenizer, run  # noqa: E402

TINY = dict(train_limit=60, eval_limit=40, max_steps=3, max_length=32, batch_size=8, epochs=1.0, eval_points=1,
            retention_probe=False, data_dir=DATA, eval_split="heldout")


def test_a_second_task_starts_from_the_first_and_watches_it(tmp_path):
    saved = tmp_path / "task1.pt"
    first = run(GlueRunConfig(task="rte", optimizer="adamw", lr=1e-3, save_to=str(saved), **TINY))
    assert saved.exists() and len(first["saved_sha256"]) == 64
    second_cfg = dict(task="mrpc", optimizer="nanoadam", lr=1e-3, seed=1, init_from=str(saved), **TINY)
    watched = run(GlueRunConfig(watch_task="rte", watch_train_limit=60, **second_cfg))
    assert watched["init_sha256"] == first["saved_sha256"]
    watch = watched["watch"]
    # Before training, the first task's body and head again: exactly the first run's predictions.
    assert watch["curve"][0]["step"] == 0 and watch["curve"][0]["score"] == first["validation"]["score"]
    assert [p["step"] for p in watch["curve"]] == [0, 2, 3]
    assert watch["heldout"]["labels"] == first["heldout"]["labels"]  # the same held-out slice
    assert watch["validation"]["score"] == watch["curve"][-1]["score"]
    # Watching swaps heads in place and back: training is exactly as without it.
    blind = run(GlueRunConfig(**second_cfg))
    assert blind["watch"] is None and blind["loss_curve"] == watched["loss_curve"]
    assert blind["validation"] == watched["validation"]
    # The body really came from the first run: a run from the pretrained model differs.
    fresh = run(GlueRunConfig(**{**second_cfg, "init_from": None}))
    assert fresh["loss_curve"][0] != watched["loss_curve"][0]


def test_chained_runs_check_their_settings(tmp_path):
    with pytest.raises(ValueError, match="watch_task needs init_from"):
        GlueRunConfig(task="mrpc", optimizer="adamw", lr=1e-3, watch_task="rte")
    with pytest.raises(ValueError, match="same shape"):
        GlueRunConfig(task="stsb", optimizer="adamw", lr=1e-3, watch_task="rte", init_from="x.pt")
    with pytest.raises(ValueError, match="unknown watch_task"):
        GlueRunConfig(task="mrpc", optimizer="adamw", lr=1e-3, watch_task="mnli", init_from="x.pt")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not fit"):
        load_body(model, {"1.weight": torch.zeros(2, 2)})


def test_a_checkpoint_without_a_head_cannot_be_watched(tmp_path):
    model, _ = load_model_and_tokenizer("minilm", 2)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    torch.save(body, tmp_path / "body.pt")
    config = GlueRunConfig(task="mrpc", optimizer="adamw", lr=1e-3, init_from=str(tmp_path / "body.pt"),
                           watch_task="rte", **TINY)
    with pytest.raises(ValueError, match="no head to watch 'rte' with"):
        run(config)
