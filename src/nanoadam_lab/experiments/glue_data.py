"""GLUE tasks: loading (the hub or a local folder with the same schema), tokenization, batches, metrics.

A local folder holds ``<task>/train.jsonl`` and ``<task>/validation.jsonl`` with the field names of
the ``glue`` configurations of ``datasets`` (see shared/data/glue/README.md); both sources go
through ``datasets.load_dataset`` and the same code afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TaskSpec:
    name: str
    text_fields: tuple[str, ...]
    num_labels: int  # 1: regression
    metric: str  # the metric averaged in the paper's Table 2


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy"),
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "accuracy"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy"),
}


class DataError(ValueError):
    """A task's data is missing or malformed."""


def load_task(task: str, data_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...]}`` rows of ``task``: from ``data_dir/<task>/*.jsonl``
    or, without ``data_dir``, from the hub's ``glue`` dataset."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    import datasets

    datasets.utils.logging.disable_progress_bar()
    if data_dir is not None:
        folder = Path(data_dir) / task
        files = {split: folder / f"{split}.jsonl" for split in ("train", "validation")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise DataError(f"data folder lacks {', '.join(missing)}")
        loaded = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    else:
        loaded = datasets.load_dataset("glue", task)
    spec = TASKS[task]
    out = {}
    for split in ("train", "validation"):
        rows = loaded[split].to_list()
        needed = set(spec.text_fields) | {"label"}
        if not rows or not needed <= set(rows[0]):
            raise DataError(f"{task} {split} rows need fields {', '.join(sorted(needed))}, "
                            f"found {', '.join(sorted(rows[0])) if rows else 'no rows'}")
        out[split] = rows
    return out


@dataclass
class Encoded:
    """Token ids of one split, unpadded, and labels (float for regression)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices) -> Encoded:
        idx = list(indices)
        return Encoded([self.input_ids[i] for i in idx],
                       [self.token_type_ids[i] for i in idx] if self.token_type_ids is not None else None,
                       self.labels[torch.as_tensor(idx, dtype=torch.long)])


def encode(rows: list[dict], spec: TaskSpec, tokenizer, max_length: int) -> Encoded:
    texts = [[row[f] for row in rows] for f in spec.text_fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    dtype = torch.float32 if spec.num_labels == 1 else torch.long
    labels = torch.tensor([row["label"] for row in rows], dtype=dtype)
    return Encoded(enc["input_ids"], enc.get("token_type_ids"), labels)


def collate(data: Encoded, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch padded to its longest sequence."""
    length = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    types = torch.zeros((len(indices), length), dtype=torch.long) if data.token_type_ids is not None else None
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = torch.tensor(data.token_type_ids[i])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": data.labels[indices]}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def compute_metrics(task: str, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The GLUE metrics of ``task`` (scikit-learn / scipy); ``"score"`` is the one the paper averages."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = TASKS[task]
    y = labels.numpy()
    if spec.num_labels == 1:
        p = predictions.reshape(-1).numpy()
        out = {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}
    else:
        p = predictions.argmax(-1).numpy()
        out = {"accuracy": float(accuracy_score(y, p))}
        if task == "cola":
            out["matthews"] = float(matthews_corrcoef(y, p))
        if task == "mrpc":
            out["f1"] = float(f1_score(y, p))
    score = out[spec.metric]
    out["score"] = 0.0 if score != score else score  # constant predictions: correlation undefined -> 0
    return out
