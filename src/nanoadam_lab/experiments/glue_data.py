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
    label_field: str = "label"
    dataset: str | None = None  # your own data: a hub dataset name ("name" or "name:config") or a local folder


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy"),
    "cola": TaskSpec("cola", ("sentence",), 2, "matthews"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "accuracy"),
    "stsb": TaskSpec("stsb", ("sentence1", "sentence2"), 1, "pearson"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy"),
}


METRICS = ("accuracy", "matthews", "pearson")


class DataError(ValueError):
    """A task's data is missing or malformed."""


def custom_task(dataset: str, text_fields: tuple[str, ...] | list[str], num_labels: int, label_field: str = "label",
                metric: str | None = None) -> TaskSpec:
    """A task on your own data: ``dataset`` is a hub dataset (``"imdb"``, ``"glue:qnli"``) or a local
    folder holding ``train`` and ``validation`` files (``.jsonl``, ``.json`` or ``.csv``) with the
    ``text_fields`` (one, or two for sentence pairs) and ``label_field`` (class ids, or a float for
    ``num_labels=1``, regression). ``metric``: accuracy (default), matthews or pearson (regression)."""
    text_fields = tuple(text_fields)
    if not 1 <= len(text_fields) <= 2 or not all(isinstance(f, str) and f for f in text_fields):
        raise DataError(f"text_fields must name one or two fields, got {list(text_fields)!r}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise DataError(f"num_labels must be an int >= 1 (1: regression), got {num_labels!r}")
    metric = metric or ("pearson" if num_labels == 1 else "accuracy")
    regression = num_labels == 1
    if metric not in METRICS or (metric == "pearson") != regression or (metric == "matthews" and num_labels != 2):
        raise DataError(f"metric {metric!r} does not fit num_labels={num_labels} (accuracy or matthews for "
                        "classes, matthews for two; pearson for regression)")
    name = Path(dataset).name if Path(dataset).exists() else dataset.replace(":", "-").replace("/", "-")
    return TaskSpec(name, text_fields, num_labels, metric, label_field, dataset)


def as_spec(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def _local_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split in ("train", "validation"):
        candidates = [folder / f"{split}{ext}" for ext in (".jsonl", ".json", ".csv")]
        found[split] = next((p for p in candidates if p.is_file()), candidates[0])
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        raise DataError(f"data folder lacks {', '.join(missing)}")
    return found


def load_task(task: str | TaskSpec, data_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...]}`` rows of ``task``. A GLUE name: from
    ``data_dir/<task>/*.jsonl`` or, without ``data_dir``, the hub's ``glue`` dataset; a
    :func:`custom_task`: from its local folder or hub dataset."""
    spec = as_spec(task)
    import datasets

    datasets.utils.logging.disable_progress_bar()
    source = spec.dataset
    if source is None and data_dir is not None:
        source = str(Path(data_dir) / spec.name)
        if not Path(source).is_dir():
            _local_files(Path(source))  # names the missing files
    if source is not None and Path(source).is_dir():
        files = _local_files(Path(source))
        kinds = {".jsonl": "json", ".json": "json", ".csv": "csv"}
        loaded = {split: datasets.load_dataset(kinds[f.suffix], data_files=str(f), split="train")
                  for split, f in files.items()}
    elif source is not None:
        name, _, config = source.partition(":")
        loaded = datasets.load_dataset(name, config or None)
        if "validation" not in loaded:
            raise DataError(f"{source} has no validation split (it has {', '.join(loaded)})")
    else:
        loaded = datasets.load_dataset("glue", spec.name)
    out = {}
    for split in ("train", "validation"):
        rows = loaded[split].to_list()
        needed = set(spec.text_fields) | {spec.label_field}
        if not rows or not needed <= set(rows[0]):
            raise DataError(f"{spec.name} {split} rows need fields {', '.join(sorted(needed))}, "
                            f"found {', '.join(sorted(rows[0])) if rows else 'no rows'}")
        if spec.dataset is not None:
            _check_labels(spec, split, rows)
        out[split] = rows
    return out


def _check_labels(spec: TaskSpec, split: str, rows: list[dict]) -> None:
    """Own data: class ids in [0, num_labels) or, for regression, numbers; named when wrong."""
    for i, row in enumerate(rows):
        label = row[spec.label_field]
        if spec.num_labels == 1:
            ok = isinstance(label, (int, float)) and not isinstance(label, bool)
        else:
            ok = isinstance(label, int) and not isinstance(label, bool) and 0 <= label < spec.num_labels
        if not ok:
            expected = "a number" if spec.num_labels == 1 else f"a class id in 0..{spec.num_labels - 1}"
            raise DataError(f"{spec.name} {split} row {i}: {spec.label_field}={label!r} is not {expected}")


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
    labels = torch.tensor([row[spec.label_field] for row in rows], dtype=dtype)
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


def compute_metrics(task: str | TaskSpec, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The GLUE metrics of ``task`` (scikit-learn / scipy); ``"score"`` is the one the paper averages."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = as_spec(task)
    task = spec.name
    y = labels.numpy()
    if spec.num_labels == 1:
        p = predictions.reshape(-1).numpy()
        out = {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}
    else:
        p = predictions.argmax(-1).numpy()
        out = {"accuracy": float(accuracy_score(y, p))}
        if spec.metric == "matthews" or task == "cola":
            out["matthews"] = float(matthews_corrcoef(y, p))
        if task == "mrpc" or (spec.dataset is not None and spec.num_labels == 2):
            out["f1"] = float(f1_score(y, p))
    score = out[spec.metric]
    out["score"] = 0.0 if score != score else score  # constant predictions: correlation undefined -> 0
    return out
