"""Retention of the pretrained skill: all-MiniLM-L6-v2 was trained to embed sentences, and its
zero-shot STS-B Spearman (cosine of mean-pooled token embeddings, no head, no training on STS-B)
measures how much of that skill a finetuned backbone keeps (DESIGN.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SentencePairs:
    first: list[str]
    second: list[str]
    gold: list[float]

    @classmethod
    def from_rows(cls, rows: list[dict], limit: int | None = None) -> SentencePairs:
        rows = rows[:limit] if limit else rows
        return cls([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["label"]) for r in rows])


@torch.no_grad()
def mean_pooled(encoder: torch.nn.Module, tokenizer, sentences: list[str], max_length: int = 128,
                batch_size: int = 128) -> torch.Tensor:
    """Mean of the last hidden states over each sentence's tokens (padding excluded), as
    sentence-transformers pools all-MiniLM-L6-v2."""
    was_training = encoder.training
    encoder.eval()
    # Batches of similar length waste little on padding (padding does not change a mean-pooled
    # embedding: padded positions are masked in attention and in the mean).
    ids = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(sentences)), key=lambda i: len(ids[i]))
    out = torch.empty(len(sentences), encoder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in chunk]}, return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out[chunk] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    encoder.train(was_training)
    return out


def sts_spearman(encoder: torch.nn.Module, tokenizer, pairs: SentencePairs, max_length: int = 128) -> float:
    """Spearman correlation between the cosine of the two sentences' embeddings and the gold score."""
    from scipy.stats import spearmanr

    a = mean_pooled(encoder, tokenizer, pairs.first, max_length)
    b = mean_pooled(encoder, tokenizer, pairs.second, max_length)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float(spearmanr(cosine.numpy(), pairs.gold)[0])
