"""Gradient-weight correlation (paper Sec. 2.1, Eq. 1, Table 1, Fig. 1, Appendices B and D).

The paper's ratio for one weight tensor: ``A`` = median of ``|w|`` over the top ``top_fraction`` entries by
``|grad|``, ``B`` = max of ``|w|`` over the bottom ``bottom_fraction`` entries by ``|grad|``, ``rho = A / B``.
A small ``rho`` means that the largest gradients sit on small weights (the "hyperbolic" pattern).

``run(CorrelationConfig) -> dict`` finetunes a pretrained BERT-architecture classifier (default: MiniLM-L6) and,
side by side on the same batches, the same architecture randomly initialized (``from_config``, same seed); it
measures ``rho`` on the gradient of the first batch ("start") and on the gradient after ``steps`` AdamW steps
("later") for the query/key/value weights of every layer (also concatenated per layer, like the fused ``qkv``
matrix of the paper's timm ViTs), the attention output, the two feed-forward weights, the word and position
embeddings and the classifier. ``write_outputs`` writes ``correlation.json`` and the scatter samples, and
``render`` draws ``correlation.md`` and log-log scatter plots of ``|grad|`` against ``|w|`` from them.

Exact zero gradients are excluded (by default) from ``rho`` and from the plots: in the embeddings only the rows
of tokens / positions present in the batch receive a gradient, and ranking the millions of structurally zero
entries as "smallest gradients" would make ``B`` the max over the whole table, a statement about the batch's
vocabulary rather than about the gradient-weight relationship.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .. import experiment as ex

_REPRODUCE_MODULE = "nanoadam_lab.analysis.correlation"
KINDS = ("query", "key", "value", "qkv", "attn_out", "ffn_in", "ffn_out")
PLOT_TAG = {"finetune": "pretrained init (finetune)", "scratch": "random init (scratch)"}


@dataclass
class CorrelationConfig:
    seed: int = 0
    task: str = "sst2"
    data_dir: str | None = None  # a folder with <task>/train.jsonl (e.g. ../shared/data/glue); None: the hub
    model: str = "minilm"  # "minilm" (offline all-MiniLM-L6-v2) or a path / hub id of a BERT-architecture model
    tiny: bool = False  # a 2-layer, hidden-32 random BERT as the "pretrained" model (smoke tests only)
    steps: int = 30  # AdamW steps between the "start" and the "later" measurement
    budget_s: float | None = None  # stop training early after this many seconds (both models stop at the same step)
    measure_batches: int = 1  # batches whose gradients are summed at each measurement (1: one minibatch, as in Fig. 1)
    batch_size: int = 16
    max_length: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.0
    top_fraction: float = 1e-4  # 0.01 %
    bottom_fraction: float = 0.8  # 80 %
    exclude_zero_grad: bool = True
    train_mode: bool = True  # dropout on while measuring (the gradient the optimizer sees)
    scatter_sample: int = 4000  # points per scatter panel (plus every top-gradient entry)
    plot_layer: int | None = None  # None: the middle layer (num_layers // 2)
    threads: int = 1
    out_dir: str = "docs/results/correlation"

    def __post_init__(self):
        if not 0 < self.top_fraction < 1 or not 0 < self.bottom_fraction < 1:
            raise ValueError("top_fraction and bottom_fraction must lie in (0, 1)")
        if self.steps < 0 or self.batch_size < 1 or self.measure_batches < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and measure_batches >= 1 required")


# ----------------------------------------------------------------------------------------------------------------
# the metric


def rho_details(weight: torch.Tensor, grad: torch.Tensor, top_fraction: float = 1e-4, bottom_fraction: float = 0.8,
                exclude_zero_grad: bool = True, with_spearman: bool = True) -> dict:
    """Eq. (1) of the paper with its ingredients, loop-free.

    Entries are ranked by ``|grad|`` (one stable ascending sort; ties broken by flat index). ``top`` = the
    ``max(1, ceil(top_fraction * n))`` largest, ``bottom`` = the ``max(1, floor(bottom_fraction * n))``
    smallest, where ``n`` counts the entries kept (non-zero gradient when ``exclude_zero_grad``).
    ``A`` = median ``|w|`` over ``top`` (mean of the two middle values for an even count), ``B`` = max ``|w|``
    over ``bottom``, ``rho = A / B`` (``inf`` if ``B == 0``, ``nan`` if nothing is kept).

    Also returns a gradient-free reference ``rho_ref = median(|w|) / max(|w|)`` over the kept entries (what
    ``rho`` is, up to sampling noise, when the ranking by ``|grad|`` ignores ``|w|``: the top entries are then
    typical weights and the bottom 80 % almost surely contain the largest one), ``rho_norm = rho / rho_ref``
    (below 1: the large gradients sit on smaller-than-typical weights) and the Spearman rank correlation of
    ``|w|`` and ``|grad|`` over the kept entries (negative: large gradients on small weights).
    """
    w = weight.detach().reshape(-1).float().abs()
    g = grad.detach().reshape(-1).float().abs()
    if w.shape != g.shape:
        raise ValueError(f"weight and grad differ in size: {w.numel()} vs {g.numel()}")
    total = w.numel()
    if exclude_zero_grad:
        keep = g != 0
        w, g = w[keep], g[keep]
    n = w.numel()
    out = {"numel": total, "n": n, "zero_grad": int((grad == 0).sum()), "k_top": 0, "k_bottom": 0,
           "A": math.nan, "B": math.nan, "rho": math.nan, "median_w": math.nan, "max_w": math.nan,
           "rho_ref": math.nan, "rho_norm": math.nan, "spearman": math.nan}
    if n == 0:
        return out
    k_top = min(n, max(1, math.ceil(top_fraction * n)))
    k_bottom = min(n, max(1, math.floor(bottom_fraction * n)))
    order = torch.argsort(g, stable=True)  # ascending |grad|
    top_w = torch.sort(w[order[n - k_top:]]).values
    a = float((top_w[(k_top - 1) // 2] + top_w[k_top // 2]) / 2)
    b = float(w[order[:k_bottom]].max())
    r = a / b if b > 0 else math.inf
    ws = torch.sort(w).values
    med, mx = float((ws[(n - 1) // 2] + ws[n // 2]) / 2), float(ws[-1])
    ref = med / mx if mx > 0 else math.nan
    out.update(k_top=k_top, k_bottom=k_bottom, A=a, B=b, rho=r, median_w=med, max_w=mx, rho_ref=ref,
               rho_norm=r / ref if ref and math.isfinite(ref) and ref > 0 else math.nan,
               spearman=spearman(w, g) if with_spearman else math.nan)
    return out


def rho(weight: torch.Tensor, grad: torch.Tensor, top_fraction: float = 1e-4, bottom_fraction: float = 0.8,
        exclude_zero_grad: bool = True) -> float:
    """``median(|w| over top-|grad| entries) / max(|w| over bottom-|grad| entries)``; see ``rho_details``."""
    return rho_details(weight, grad, top_fraction, bottom_fraction, exclude_zero_grad)["rho"]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks would handle ties exactly; ties in float gradients/weights are rare, so ordinal ranks."""
    r = torch.empty(x.numel(), dtype=torch.float64)
    r[torch.argsort(x, stable=True)] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 2:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


# ----------------------------------------------------------------------------------------------------------------
# which tensors


def tracked_tensors(model: torch.nn.Module) -> list[dict]:
    """The weights measured, in model order: ``{"label", "kind", "layer", "params": [names]}``.

    BERT naming (``transformers`` ``BertForSequenceClassification``); ``qkv`` is the concatenation of a
    layer's query, key and value weights.
    """
    names = {n for n, _ in model.named_parameters()}
    base = "bert" if any(n.startswith("bert.") for n in names) else None
    if base is None:
        raise ValueError("expected a BERT-architecture model (parameters named bert.*)")
    out = []
    for table in ("word_embeddings", "position_embeddings"):
        name = f"{base}.embeddings.{table}.weight"
        if name in names:
            out.append({"label": table.replace("_embeddings", "_emb"), "kind": table, "layer": None, "params": [name]})
    layer = 0
    while f"{base}.encoder.layer.{layer}.attention.self.query.weight" in names:
        p = f"{base}.encoder.layer.{layer}"
        qkv = [f"{p}.attention.self.{x}.weight" for x in ("query", "key", "value")]
        for kind, params in (("query", qkv[:1]), ("key", qkv[1:2]), ("value", qkv[2:]), ("qkv", qkv),
                             ("attn_out", [f"{p}.attention.output.dense.weight"]),
                             ("ffn_in", [f"{p}.intermediate.dense.weight"]),
                             ("ffn_out", [f"{p}.output.dense.weight"])):
            out.append({"label": f"L{layer}.{kind}", "kind": kind, "layer": layer, "params": params})
        layer += 1
    if "classifier.weight" in names:
        out.append({"label": "classifier", "kind": "classifier", "layer": None, "params": ["classifier.weight"]})
    return out


def _flat(model_params: dict, names: list[str], attr: str) -> torch.Tensor:
    parts = []
    for n in names:
        p = model_params[n]
        t = p.detach() if attr == "data" else p.grad
        parts.append(torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# ----------------------------------------------------------------------------------------------------------------
# experiment


def reproduce_call(config: CorrelationConfig) -> str:
    """The Python call that reproduces ``config``'s outputs (non-default fields only)."""
    default = CorrelationConfig()
    args = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in fields(config)
                     if getattr(config, f.name) != getattr(default, f.name))
    return f"from {_REPRODUCE_MODULE} import CorrelationConfig, main; main(CorrelationConfig({args}))"


def _tiny_models(num_labels: int, seed: int):
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg)


def _load_models(config: CorrelationConfig, num_labels: int):
    """(pretrained, scratch, tokenizer, description). Both initialized under ``torch.manual_seed(seed)``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..experiments.glue import load_model_and_tokenizer, resolve_model_path

    if config.tiny:
        path = resolve_model_path("minilm")  # only its tokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
        pretrained = _tiny_models(num_labels, config.seed)
        desc = "tiny random BERT (2 layers, hidden 32) standing in for a pretrained model"
    else:
        torch.manual_seed(config.seed)
        pretrained, tokenizer = load_model_and_tokenizer(config.model, num_labels)
        path = resolve_model_path(config.model)
        desc = f"{config.model} ({path})"
    torch.manual_seed(config.seed)
    scratch = AutoModelForSequenceClassification.from_config(pretrained.config)
    return pretrained, scratch, tokenizer, desc


def _batches(config: CorrelationConfig, rows: dict, tokenizer, n_batches: int) -> list[dict]:
    from ..experiments.glue_data import TASKS, collate, encode

    train = rows["train"]
    gen = torch.Generator().manual_seed(config.seed)
    need = n_batches * config.batch_size
    order: list[int] = []
    while len(order) < need:
        order += torch.randperm(len(train), generator=gen).tolist()
    data = encode([train[i] for i in order[:need]], TASKS[config.task], tokenizer, config.max_length)
    pad_id = tokenizer.pad_token_id or 0
    return [collate(data, list(range(b * config.batch_size, (b + 1) * config.batch_size)), pad_id)
            for b in range(n_batches)]


def _measure(model, batches: list[dict], tracked: list[dict], config: CorrelationConfig, plot_labels: set,
             gen: torch.Generator) -> tuple[dict, dict, float]:
    """Gradient of ``batches`` (summed) at the current weights; rho per tracked tensor and scatter samples."""
    model.zero_grad(set_to_none=True)
    model.train(config.train_mode)
    loss = 0.0
    for batch in batches:
        out = model(**batch)
        out.loss.backward()
        loss += out.loss.item() / len(batches)
    model.train()
    params = dict(model.named_parameters())
    rhos, scatter = {}, {}
    for t in tracked:
        w, g = _flat(params, t["params"], "data"), _flat(params, t["params"], "grad")
        rhos[t["label"]] = rho_details(w, g, config.top_fraction, config.bottom_fraction, config.exclude_zero_grad)
        rhos[t["label"]].update(_top_location(params, t["params"], g, rhos[t["label"]]["k_top"]))
        if t["label"] in plot_labels:
            scatter[t["label"]] = _scatter_sample(w, g, rhos[t["label"]], config, gen)
    model.zero_grad(set_to_none=True)
    return rhos, scatter, loss


def _top_location(params: dict, names: list[str], g: torch.Tensor, k_top: int) -> dict:
    """Where the top-|grad| entries sit: for one matrix, how many distinct input columns / output rows they
    span (few columns = an outlier input feature, whose large activation scales a whole gradient column); for a
    concatenation (qkv), how many fall in each part."""
    if k_top == 0:
        return {}
    top = torch.topk(g.abs().float(), k_top).indices  # zero gradients never rank in the top unless all are 0
    if len(names) == 1:
        shape = params[names[0]].shape
        if len(shape) != 2:
            return {}
        return {"top_distinct_cols": int(torch.unique(top % shape[1]).numel()),
                "top_distinct_rows": int(torch.unique(top // shape[1]).numel())}
    bounds = torch.tensor([params[n].numel() for n in names]).cumsum(0)
    part = torch.bucketize(top, bounds, right=True)
    counts = torch.bincount(part, minlength=len(names)).tolist()
    return {"top_in_part": {n.rsplit(".", 2)[-2]: c for n, c in zip(names, counts)}}


def _scatter_sample(w: torch.Tensor, g: torch.Tensor, details: dict, config: CorrelationConfig,
                    gen: torch.Generator) -> dict:
    """A uniform sample of the plottable entries (``|w| > 0`` and ``|g| > 0``: log axes) plus every top entry."""
    w, g = w.float().abs(), g.float().abs()
    keep = (g > 0) if config.exclude_zero_grad else torch.ones_like(g, dtype=torch.bool)
    wk, gk = w[keep], g[keep]
    k_top = details["k_top"]
    top = torch.topk(gk, k_top).indices if k_top else torch.empty(0, dtype=torch.long)
    idx = torch.randperm(wk.numel(), generator=gen)[: config.scatter_sample]
    pos = lambda x: x[(x[:, 0] > 0) & (x[:, 1] > 0)]  # noqa: E731
    sample = pos(torch.stack([wk[idx], gk[idx]], 1))
    tops = pos(torch.stack([wk[top], gk[top]], 1))
    return {"w": sample[:, 0].tolist(), "g": sample[:, 1].tolist(), "top_w": tops[:, 0].tolist(),
            "top_g": tops[:, 1].tolist(), "A": details["A"], "B": details["B"], "rho": details["rho"],
            "n": details["n"], "numel": details["numel"], "k_top": k_top, "median_w": details["median_w"],
            "unplottable": int(((wk == 0) | (gk == 0)).sum())}


def run(config: CorrelationConfig, rows: dict | None = None, progress=None) -> dict:
    """Run the experiment; returns a JSON-serializable dict (the ``"scatter"`` samples are only used for plots).

    ``rows``: ``load_task`` output (or any ``{"train": [{"sentence", "label"}, ...]}``) to skip loading.
    ``progress``: ``None``, or a callable receiving one message per unit of work.
    """
    from ..experiments.glue_data import TASKS, load_task

    say = progress if callable(progress) else (lambda msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        spec = TASKS[config.task]
        rows = rows if rows is not None else load_task(config.task, config.data_dir)
        models = {}
        models["finetune"], models["scratch"], tokenizer, desc = _load_models(config, spec.num_labels)
        tracked = tracked_tensors(models["finetune"])
        n_layers = models["finetune"].config.num_hidden_layers
        plot_layer = n_layers // 2 if config.plot_layer is None else config.plot_layer
        plot_labels = {f"L{plot_layer}.query", f"L{plot_layer}.key", f"L{plot_layer}.value", f"L{plot_layer}.ffn_in",
                       "word_emb"}
        m = config.measure_batches
        batches = _batches(config, rows, tokenizer, config.steps + m)  # batch i trains step i; then m to measure
        opts = {k: torch.optim.AdamW(v.parameters(), lr=config.lr, weight_decay=config.weight_decay)
                for k, v in models.items()}
        gen = torch.Generator().manual_seed(config.seed)
        rhos = {k: {} for k in models}
        scatter = {k: {} for k in models}
        losses = {k: [] for k in models}
        measured_loss = {k: {} for k in models}
        torch.manual_seed(config.seed)  # dropout

        def measure(phase: str, first: int) -> None:
            for k, model in models.items():
                rhos[k][phase], scatter[k][phase], measured_loss[k][phase] = _measure(
                    model, batches[first:first + m], tracked, config, plot_labels, gen)
            say(f"measured {phase}")

        # "start": the gradient of the first batch(es) at the initial weights
        measure("start", 0)
        done = 0
        for step in range(config.steps):
            if config.budget_s is not None and time.perf_counter() - started > config.budget_s:
                say(f"budget reached after {step} steps")
                break
            for k, model in models.items():
                model.train()
                out = model(**batches[step])
                out.loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                losses[k].append(out.loss.item())
            done = step + 1
            say(f"step {done}/{config.steps}")
        # "later": the gradient of the next unseen batch(es) after `done` AdamW steps
        measure("later", config.steps)
        result = {
            "config": asdict(config),
            "reproduce": reproduce_call(config),
            "machine": ex.machine_info(),
            "model": {"description": desc, "num_layers": n_layers, "hidden_size": models["finetune"].config.hidden_size,
                      "scratch": "AutoModelForSequenceClassification.from_config(same config), same seed"},
            "steps_done": done,
            "phases": {"start": {"after_steps": 0}, "later": {"after_steps": done}},
            "train_loss": losses,
            "measured_loss": measured_loss,
            "tensors": [{**{k: t[k] for k in ("label", "kind", "layer", "params")},
                         "rho": {k: {ph: rhos[k][ph][t["label"]] for ph in ("start", "later")} for k in models}}
                        for t in tracked],
            "plot_layer": plot_layer,
            "scatter": scatter,
        }
        result["summary"] = summarize(result)
        result["seconds"] = time.perf_counter() - started
        return result
    finally:
        torch.set_num_threads(threads)


def summarize(result: dict) -> dict:
    """Per phase and kind: in how many tensors rho(finetune) < rho(scratch), and the mean rho of each side."""
    out = {}
    for phase in ("start", "later"):
        per_kind = {}
        for kind in KINDS + ("word_embeddings", "position_embeddings", "classifier"):
            ts = [t for t in result["tensors"] if t["kind"] == kind]
            d = {}
            for key, suffix in (("rho", ""), ("rho_norm", "_norm")):
                pairs = [(t["rho"]["finetune"][phase][key], t["rho"]["scratch"][phase][key]) for t in ts]
                pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
                if pairs:
                    d.update({f"lower_finetune{suffix}": sum(a < b for a, b in pairs), f"count{suffix}": len(pairs),
                              f"mean_finetune{suffix}": sum(a for a, _ in pairs) / len(pairs),
                              f"mean_scratch{suffix}": sum(b for _, b in pairs) / len(pairs)})
            if "count" in d:
                per_kind[kind] = d
        qkv_sep = [per_kind[k] for k in ("query", "key", "value") if k in per_kind]
        out[phase] = {"per_kind": per_kind,
                      "qkv_matrices_lower_finetune": sum(d["lower_finetune"] for d in qkv_sep),
                      "qkv_matrices": sum(d["count"] for d in qkv_sep),
                      "qkv_layers_lower_finetune": per_kind.get("qkv", {}).get("lower_finetune", 0),
                      "qkv_layers": per_kind.get("qkv", {}).get("count", 0),
                      "qkv_matrices_lower_finetune_norm": sum(d.get("lower_finetune_norm", 0) for d in qkv_sep),
                      "qkv_layers_lower_finetune_norm": per_kind.get("qkv", {}).get("lower_finetune_norm", 0)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# outputs


def _f(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def render(result: dict, out_dir: str, scatter: dict | None = None) -> list[Path]:
    """``correlation.md`` (the result's numbers and settings as tables) and, where the scatter
    samples are at hand (``correlation_scatter.json``), one ``scatter_<tensor>.png`` per tensor."""
    cfg, s = result["config"], result["summary"]
    if scatter is None and (Path(out_dir) / "correlation_scatter.json").exists():
        scatter = ex.read_result(out_dir, "correlation_scatter")
    model = result["model"]
    sections = [
        f"Model: {model['description']}, {model['num_layers']} layers, hidden {model['hidden_size']}; scratch = "
        f"{model['scratch']}. `rho = A / B` (Eq. 1): A = median |w| of the top {100 * cfg['top_fraction']:g} % "
        f"entries by |grad|, B = max |w| of the bottom {100 * cfg['bottom_fraction']:g} %; `ref` = median(|w|) / "
        f"max(|w|); start = the first batch's gradient, later = an unseen batch's after {result['steps_done']} "
        "AdamW steps; `qkv` = a layer's query, key and value weights concatenated.", "",
        "## Summary: tensors with rho(finetune) < rho(scratch)", "",
        ex.markdown_table(["phase", "after steps", "fused qkv layers", "separate q/k/v matrices", "layers (rho/ref)",
                        "matrices (rho/ref)"],
                       [[phase, result["phases"][phase]["after_steps"],
                         f"{s[phase]['qkv_layers_lower_finetune']}/{s[phase]['qkv_layers']}",
                         f"{s[phase]['qkv_matrices_lower_finetune']}/{s[phase]['qkv_matrices']}",
                         f"{s[phase]['qkv_layers_lower_finetune_norm']}/{s[phase]['qkv_layers']}",
                         f"{s[phase]['qkv_matrices_lower_finetune_norm']}/{s[phase]['qkv_matrices']}"]
                        for phase in ("start", "later")]), "",
        "## Per kind: lower / count, mean rho finetune / scratch", "", _kind_table(s), "",
        "## rho per tensor: rho (rho/ref); n = entries with a non-zero gradient at the start", "",
        _tensor_table(result), "",
        "## Spearman correlation of |w| and |grad|, mean per kind", "", _spearman_table(result), "",
        "## Distinct input columns spanned by the top-gradient entries, mean per kind", "",
        *_location_table(result), "",
        "## Loss", "", _loss_table(result), ""]
    written = []
    for label in _plot_labels({"scatter": scatter} if scatter else {}):
        written.append(plot_tensor({**result, "scatter": scatter}, label, os.path.join(out_dir, _figure_name(label))))
    sections += [f"![{p.name}]({p.name})" for p in written]
    if not written:
        sections += [f"![{f}]({f})" for f in _existing_figures(out_dir)]
    sections += ["", "## Settings", "", ex.settings_table(cfg)]
    title = "Gradient-weight correlation: finetuning vs training from scratch (Sec. 2.1, Eq. 1, Fig. 1)"
    return [*written, ex.write_markdown(out_dir, "correlation", title, result, sections)]


def _existing_figures(out_dir: str) -> list[str]:
    return sorted(p.name for p in Path(out_dir).glob("scatter_*.png"))


def _kind_table(s: dict) -> str:
    rows = []
    for kind in s["start"]["per_kind"]:
        cells = [kind]
        for phase in ("start", "later"):
            d = s[phase]["per_kind"].get(kind, {})
            for suffix in ("", "_norm"):
                if f"count{suffix}" in d:
                    cells += [f"{d['lower_finetune' + suffix]}/{d['count' + suffix]}",
                              f"{_f(d['mean_finetune' + suffix])} / {_f(d['mean_scratch' + suffix])}"]
                else:
                    cells += ["-", "-"]
        rows.append(cells)
    return ex.markdown_table(["kind", "start: lower", "start: mean ft / scr", "start rho/ref: lower",
                           "start rho/ref: mean ft / scr", "later: lower", "later: mean ft / scr",
                           "later rho/ref: lower", "later rho/ref: mean ft / scr"], rows)


def _tensor_table(result: dict) -> str:
    rows = []
    for t in result["tensors"]:
        r = t["rho"]
        n_start = f"{r['finetune']['start']['n']} / {r['scratch']['start']['n']}"
        cells = [t["label"], r["finetune"]["start"]["numel"], n_start]
        for phase in ("start", "later"):
            for side in ("finetune", "scratch"):
                d = r[side][phase]
                cells.append(f"{_f(d['rho'])} ({_f(d['rho_norm'])})")
        rows.append(cells)
    return ex.markdown_table(["tensor", "entries", "n start (ft / scr)", "start ft", "start scr", "later ft",
                           "later scr"], rows)


def _spearman_table(result: dict) -> str:
    rows = []
    for kind in result["summary"]["start"]["per_kind"]:
        ts = [t for t in result["tensors"] if t["kind"] == kind]
        cells = [kind]
        for phase in ("start", "later"):
            for side in ("finetune", "scratch"):
                vals = [t["rho"][side][phase]["spearman"] for t in ts]
                vals = [v for v in vals if v is not None and math.isfinite(v)]
                cells.append(_f(sum(vals) / len(vals)) if vals else "-")
        rows.append(cells)
    return ex.markdown_table(["kind", "start ft", "start scr", "later ft", "later scr"], rows)


def _loss_table(result: dict) -> str:
    ml = result["measured_loss"]
    return ex.markdown_table(["model", "training loss (mean over the steps)", "measured batch, start",
                           "measured batch, later"],
                          [[side, _loss(result["train_loss"][side]), _f(ml[side]["start"]), _f(ml[side]["later"])]
                           for side in ("finetune", "scratch")])


def _location_table(result: dict) -> list[str]:
    """Distinct input columns spanned by the top-|grad| entries (mean per kind) and the qkv split."""
    kinds = [k for k in result["summary"]["start"]["per_kind"] if k not in ("qkv", "classifier")]
    rows = []
    for kind in kinds:
        ts = [t for t in result["tensors"] if t["kind"] == kind]
        cells = [kind, "/".join(map(str, sorted({t["rho"]["finetune"]["start"]["k_top"] for t in ts})))]
        for phase in ("start", "later"):
            for side in ("finetune", "scratch"):
                vals = [v for v in (t["rho"][side][phase].get("top_distinct_cols") for t in ts) if v is not None]
                cells.append(f"{sum(vals) / len(vals):.3g}" if vals else "-")
        rows.append(cells)
    lines = [ex.markdown_table(["kind", "k_top", "start ft", "start scr", "later ft", "later scr"], rows)]
    qkv = [t for t in result["tensors"] if t["kind"] == "qkv"]
    if qkv:
        cells = ["top entries q / k / v (fused qkv, summed over layers)"]
        for phase in ("start", "later"):
            for side in ("finetune", "scratch"):
                tot = {"query": 0, "key": 0, "value": 0}
                for t in qkv:
                    for part, c in t["rho"][side][phase].get("top_in_part", {}).items():
                        tot[part] = tot.get(part, 0) + c
                cells.append(" / ".join(str(tot[p]) for p in ("query", "key", "value")))
        lines += ["", ex.markdown_table(["", "start ft", "start scr", "later ft", "later scr"], [cells])]
    return lines


def _loss(xs: list[float]) -> str:
    return _f(sum(xs) / len(xs)) if xs else "-"


def _plot_labels(result: dict) -> list[str]:
    labels = []
    for side in result.get("scatter", {}).values():
        for phase in side.values():
            labels += [lab for lab in phase if lab not in labels]
    return labels


def _figure_name(label: str) -> str:
    return f"scatter_{label.replace('.', '_')}.png"


def plot_tensor(result: dict, label: str, path: str) -> Path:
    plt = ex.pyplot()

    sides, phases = ("finetune", "scratch"), ("start", "later")
    fig, axes = plt.subplots(2, 2, figsize=(10, 8.5), squeeze=False)
    for i, side in enumerate(sides):
        for j, phase in enumerate(phases):
            ax = axes[i][j]
            d = result["scatter"][side][phase].get(label)
            if d is None:
                ax.set_axis_off()
                continue
            ax.scatter(d["w"], d["g"], s=3, c="0.55", alpha=0.5, linewidths=0, rasterized=True,
                       label=f"sample ({len(d['w'])} of {d['n']})")
            ax.scatter(d["top_w"], d["top_g"], s=18, c="tab:red", marker="o", linewidths=0,
                       label=f"top {100 * result['config']['top_fraction']:g} % |grad| ({d['k_top']})")
            for x, color, name in ((d["A"], "tab:red", "A"), (d["B"], "tab:blue", "B")):
                if x and math.isfinite(x) and x > 0:
                    ax.axvline(x, color=color, ls="--", lw=1, label=f"{name} = {x:.3g}")
            if d.get("median_w") and d["median_w"] > 0:
                ax.axvline(d["median_w"], color="k", ls=":", lw=1, label=f"median |w| = {d['median_w']:.3g}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("|w|")
            ax.set_ylabel("|grad|")
            steps = result["phases"][phase]["after_steps"]
            zero = f", {d['numel'] - d['n']} zero-grad entries excluded" if d["numel"] != d["n"] else ""
            ax.set_title(f"{PLOT_TAG[side]}, {phase} (step {steps})\nrho = {_f(d['rho'])}{zero}", fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
    name = "tiny random BERT" if result["config"]["tiny"] else result["config"]["model"]
    fig.suptitle(f"{label}: |grad| vs |w| ({name}, {result['config']['task']}, seed {result['config']['seed']})",
                 fontsize=10)
    fig.tight_layout()
    return ex.save_figure(fig, path)


def write_outputs(result: dict, out_dir: str) -> list[Path]:
    """Writes ``correlation.json`` (without the scatter samples) and ``correlation_scatter.json``
    (the samples, four significant digits), then renders from them."""
    slim = {k: v for k, v in result.items() if k != "scatter"}
    written = [ex.write_result(out_dir, "correlation", slim)]
    if result.get("scatter"):
        written.append(ex.write_result(out_dir, "correlation_scatter", _rounded(result["scatter"])))
    return written + render(ex.read_result(out_dir, "correlation"), out_dir)


def _rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def main(config: CorrelationConfig | None = None, progress=print, command: str | None = None) -> list[Path]:
    """Run with ``config`` (default: ``CorrelationConfig()``), write the result to ``config.out_dir``
    and render from it."""
    config = config or CorrelationConfig()
    result = run(config, progress=progress)
    if command:
        result["command"] = command
    return write_outputs(result, config.out_dir)


if __name__ == "__main__":
    main()
