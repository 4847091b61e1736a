"""The ``nanoadam`` command line: parses arguments, calls an experiment's ``run``, prints.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _density(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanoadam", description="NanoAdam: finetuning that updates only the smallest weights.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    tasks = "sst2, cola, mrpc, stsb, rte"
    finetune = commands.add_parser("finetune", help="finetune a sequence-classification model on a GLUE task or "
                                                    "your own data")
    finetune.add_argument("--task", type=_task, help=f"{tasks}; or give --dataset")
    finetune.add_argument("--dataset", help="your own data instead of --task: a hub dataset ('imdb', 'glue:qnli') or "
                                            "a folder with train and validation .jsonl/.json/.csv files")
    finetune.add_argument("--text-fields", help="with --dataset: the text field, or two comma-separated for pairs")
    finetune.add_argument("--label-field", default="label", help="with --dataset (default: label)")
    finetune.add_argument("--num-labels", type=_positive_int, help="with --dataset: classes (1: regression)")
    finetune.add_argument("--metric", choices=["accuracy", "matthews", "pearson"],
                          help="with --dataset (default: accuracy, or pearson for regression)")
    finetune.add_argument("--optimizer", required=True, type=_name, help="a registry name, e.g. nanoadam")
    finetune.add_argument("--lr", type=_positive_float, default=None,
                          help="learning rate (default: the middle of the optimizer's tuning grid)")
    _add_common_glue_args(finetune)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--epochs", type=_positive_float)
    finetune.add_argument("--max-steps", type=_positive_int)
    finetune.add_argument("--no-retention", action="store_true",
                          help="skip the retention probe (zero-shot STS-B Spearman after training, about 15 s)")

    sft = commands.add_parser("sft", help="supervised finetuning of a causal LM (GSM8K, the commonsense suite, or "
                                          "your instruction/answer JSON Lines)")
    sft.add_argument("--model", required=True, help="an AutoModelForCausalLM: hub name or local folder")
    sft.add_argument("--format", choices=["gsm8k", "commonsense", "instruction"], default="gsm8k",
                     help="gsm8k: openai/gsm8k (question, answer ending in '#### n'), exact match of the final "
                          "number; commonsense: LLM-Adapters format (instruction, output, answer; train on "
                          "commonsense_170k, evaluate BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA), "
                          "answer accuracy; instruction: your fields (--instruction-field, --answer-field)")
    sft.add_argument("--train", default="openai/gsm8k:main",
                     help="hub dataset ('openai/gsm8k:main'), a .jsonl file, or a folder with <split>.jsonl")
    sft.add_argument("--eval", help="the same for evaluation (default: --train)")
    sft.add_argument("--train-split", default="train")
    sft.add_argument("--eval-split", default="test")
    sft.add_argument("--instruction-field", default="instruction")
    sft.add_argument("--answer-field", default="answer")
    sft.add_argument("--optimizer", type=_name, default="nanoadam", help="a registry name")
    sft.add_argument("--lr", type=_positive_float, default=1e-4)
    sft.add_argument("--budget", choices=["quick", "paper"], default="quick",
                     help="quick: 512 examples, 1 epoch, length 256 (a CPU check); paper: 3 epochs, batch 32, "
                          "length 512, bf16, gradient checkpointing (for a GPU)")
    sft.add_argument("--epochs", type=_positive_float)
    sft.add_argument("--max-steps", type=_positive_int)
    sft.add_argument("--eval-limit", type=_positive_int)
    sft.add_argument("--peft", choices=["lora"])
    sft.add_argument("--lora-r", type=_positive_int, default=32)
    sft.add_argument("--bf16", action="store_true", help="bf16 weights (NanoAdam rounds its updates stochastically)")
    sft.add_argument("--gradient-checkpointing", action="store_true")
    sft.add_argument("--step-in-backward", action="store_true", help="NanoAdam only: update inside backward()")
    sft.add_argument("--seed", type=int, default=0)
    sft.add_argument("--threads", type=_positive_int, default=2)
    sft.add_argument("--save-every", type=_positive_int, default=200,
                     help="steps between checkpoints in --out; a rerun resumes from one, bit for bit")
    sft.add_argument("--out", type=Path, default=Path("results/sft"))

    compare = commands.add_parser("compare", help="optimizers x GLUE tasks: one recipe, LR tuned on held-out data, "
                                                  "5 seeds, paired intervals against AdamW, retention probe")
    compare.add_argument("--tasks", type=_task_list, default=None, help=f"comma-separated, default all: {tasks}")
    compare.add_argument("--optimizers", type=_optimizer_set, default=None,
                         help="comma-separated registry names (default: the primary set, adamw, nanoadam, lift, "
                              "head-only, adamw-headlr; 'secondary': adamw8bit, galore, microadam, nanoadam-static)")
    compare.add_argument("--seeds", type=_positive_int, default=5)
    compare.add_argument("--max-extensions", type=int, default=3, help="steps a grid may extend at an edge")
    compare.add_argument("--render-only", action="store_true",
                         help="run nothing: summarize the run files already in --out and render the tables and "
                              "figures (for results still being computed)")
    compare.add_argument("--rerun-slower-than", type=_positive_float, metavar="FACTOR",
                         help="first rerun every finished run whose median step took more than FACTOR times the "
                              "fastest run of the same task, optimizer and phase (a machine disturbed by other work)")
    compare.add_argument("--retime-finals", type=_task_list, metavar="TASKS",
                         help="first rerun every final run of these tasks, optimizers taking turns (for grids "
                              "run one optimizer after another, whose step times carry the machine's drift)")
    _add_common_glue_args(compare)

    reproduce = commands.add_parser("reproduce", help="the paper's analyses, each writing tables, figures and JSON")
    analyses = reproduce.add_subparsers(dest="analysis", parser_class=_Parser)
    cont = analyses.add_parser("continual", help="vision continual finetuning: frontiers of new-task accuracy "
                                                 "against old-task retention (AdamW, NanoAdam, LIFT, MicroAdam)")
    cont.add_argument("--methods", type=_continual_methods, help="comma-separated (default: all): "
                                                                 "adamw, nanoadam-1%%, nanoadam-0.1%%, lift-1%%, "
                                                                 "lift-0.1%%, microadam-1%%, microadam-0.1%%")
    cont.add_argument("--task2", default="similar,dissimilar", help="similar (15 degrees) and/or dissimilar (90)")
    cont.add_argument("--seeds", type=_positive_int, default=10)
    cont.add_argument("--epochs", type=_positive_float, default=30.0)
    cont.add_argument("--threads", type=_positive_int, default=1)
    cont.add_argument("--out", type=Path, default=Path("results/continual"))
    cont.add_argument("--render-only", action="store_true",
                      help="run nothing: tables and figures of the methods whose runs are all in --out")
    toy = analyses.add_parser("toy", help="two-layer ReLU teacher-student: small weights vs large gradients")
    toy.add_argument("--seed", type=int, default=0, help="first seed")
    toy.add_argument("--seeds", type=_positive_int, default=10, help="number of seeds")
    toy.add_argument("--updates", type=_toy_updates, default=("gd", "adam"),
                     help="comma-separated update rules: gd (masked gradient descent), adam (NanoAdam's own step)")
    toy.add_argument("--input-dim", type=_positive_int, default=2)
    toy.add_argument("--student-width", type=_positive_int, default=50)
    toy.add_argument("--finetune-steps", type=_positive_int, default=5000)
    toy.add_argument("--fraction", type=_density, default=0.1, help="fraction of each layer finetuned")
    toy.add_argument("--mask-interval", type=_positive_int, default=10)
    toy.add_argument("--out", type=Path, default=Path("results/toy"))

    corr = analyses.add_parser("correlation", help="gradient-weight correlation rho, pretrained vs scratch")
    corr.add_argument("--seed", type=int, default=0)
    corr.add_argument("--steps", type=_positive_int, default=30, help="AdamW steps before the 'later' measurement")
    corr.add_argument("--model", default="minilm")
    corr.add_argument("--data-dir", help="folder with sst2/train.jsonl (default: the hub)")
    corr.add_argument("--top-fraction", type=_density, default=1e-4)
    corr.add_argument("--bottom-fraction", type=_density, default=0.8)
    corr.add_argument("--threads", type=_positive_int, default=1)
    corr.add_argument("--out", type=Path, default=Path("results/correlation"))

    abl = analyses.add_parser("ablation", help="small vs random vs large weights, large gradients, LIFT's principal "
                                               "weights, static mask, mask interval and density (SST-2, MiniLM)")
    abl.add_argument("--task", type=_task, default="sst2")
    abl.add_argument("--seeds", type=_positive_int, default=5)
    abl.add_argument("--model", default="minilm")
    abl.add_argument("--data-dir", help="folder with <task>/train.jsonl and validation.jsonl (default: the hub)")
    abl.add_argument("--budget", choices=["standard", "quick", "paper"], default="standard",
                     help="the GLUE comparison's budgets (standard: its recipe, held-out slice and epochs)")
    abl.add_argument("--reuse", type=Path, help="a `nanoadam compare` output folder whose identical runs are copied")
    abl.add_argument("--threads", type=_positive_int, default=2)
    abl.add_argument("--out", type=Path, default=Path("results/ablation"))
    abl.add_argument("--render-only", action="store_true", help="run nothing: summarize and render what is finished")

    cglue = analyses.add_parser("continual-glue", help="language continual finetuning (MiniLM): task 1, then task 2 "
                                                       "with task 1 scored along the way; frontiers against AdamW")
    cglue.add_argument("--task1", type=_task, default="sst2")
    cglue.add_argument("--task2", type=_task, default="cola")
    cglue.add_argument("--methods", type=_names, default=None,
                       help="comma-separated registry names (default: adamw, nanoadam, lift, head-only)")
    cglue.add_argument("--seeds", type=_positive_int, default=5, help="seeds at the chosen task-2 rate")
    cglue.add_argument("--frontier-seeds", type=_positive_int, default=3, help="seeds at every task-2 rate tried")
    cglue.add_argument("--reuse", type=Path, help="a `nanoadam compare` output folder whose identical task-1 runs "
                                                  "are copied")
    cglue.add_argument("--checkpoints", type=Path, help="where the task-1 models go (default: OUT/checkpoints; "
                                                        "about 90 MB each)")
    cglue.add_argument("--render-only", action="store_true", help="run nothing: summarize and render what is finished")
    _add_common_glue_args(cglue)

    forget = analyses.add_parser("forgetting", help="continual finetuning: task 1, task 2, task 1 again")
    forget.add_argument("--domains", default="vision", help="vision, language or vision,language")
    forget.add_argument("--seeds", type=_positive_int, default=None, help="seeds per domain (default 3 / 1)")
    forget.add_argument("--data-dir", help="GLUE folder for the language domain (default: the hub)")
    forget.add_argument("--tie-breaks", default="smaller,loss",
                        help="held-out tie rules for learning rates: smaller, loss, or both (the second a variant)")
    forget.add_argument("--task1", type=_task, default="sst2", help=f"language: first GLUE task ({tasks})")
    forget.add_argument("--task2", type=_task, default="stsb", help="language: second GLUE task")
    forget.add_argument("--merge", action="store_true", help="keep domains of an existing result this run skips")
    forget.add_argument("--seed", type=int, default=0, help="first seed")
    forget.add_argument("--epochs", type=_positive_float, help="vision: epochs per task (default 15)")
    forget.add_argument("--budget", choices=["quick", "paper"], default="quick",
                        help="language: quick (1000 examples, 1 epoch) or paper (whole sets, 5 epochs, batch 8)")
    forget.add_argument("--out", type=Path, default=Path("results/forgetting"))

    demo = commands.add_parser("demo", help="the main job: at equal new-task accuracy, does NanoAdam keep more of "
                                            "the old task than AdamW? Frontiers over each one's rates (digits CNN, "
                                            "offline, about a minute)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("results/demo"))

    bench = commands.add_parser(
        "bench", help="speed and memory benchmarks",
        description="Without a subcommand: every registry optimizer side by side on one model (step time, "
                    "state bytes, peak training memory).")
    bench.add_argument("--model", default="minilm", help="'minilm' (offline MiniLM-L6), a transformers name or path")
    bench.add_argument("--config", help="a transformers config name/path: random weights instead of pretrained")
    bench.add_argument("--optimizers", type=_names, help="comma-separated registry names (default: all)")
    bench.add_argument("--blocks", type=_positive_int, default=2)
    bench.add_argument("--steps-per-block", type=_positive_int, default=100)
    bench.add_argument("--batch", type=_positive_int, default=32, help="batch size of the peak-memory steps")
    bench.add_argument("--seq", type=_positive_int, default=128, help="sequence length of the peak-memory steps")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    bench.add_argument("--threads", type=_positive_int, default=2)
    bench.add_argument("--out", type=Path, help="write bench.json and bench.md here")
    bench_kinds = bench.add_subparsers(dest="bench", parser_class=_Parser)
    backward = bench_kinds.add_parser("backward", help="peak training memory: step in backward vs NanoAdam vs "
                                                       "fused AdamW (each in a fresh process)")
    backward.add_argument("--settings", default="llama,minilm", help="llama (>= 300 M decoder), minilm, or both")
    backward.add_argument("--steps", type=_positive_int, default=2)
    backward.add_argument("--threads", type=_positive_int, default=2)
    backward.add_argument("--out", type=Path, help="write backward.json and backward.md here")
    decoder = bench_kinds.add_parser("decoder", help="end-to-end step time on a LLaMA-style decoder (134 M), "
                                                     "NanoAdam vs fused AdamW taking turns")
    decoder.add_argument("--blocks", type=_positive_int, default=5)
    decoder.add_argument("--steps-per-block", type=_positive_int, default=3)
    decoder.add_argument("--hidden", type=_positive_int, default=768)
    decoder.add_argument("--layers", type=_positive_int, default=12)
    decoder.add_argument("--threads", type=_positive_int, default=2)
    decoder.add_argument("--out", type=Path, help="write decoder.json and decoder.md here")
    fit = bench_kinds.add_parser("fit", help="the largest LLaMA-style decoder each optimizer trains in a memory "
                                             "budget, by real steps in child processes, formula beside it")
    fit.add_argument("--memory-gb", type=_positive_float, help="budget in GiB of process memory (default: the "
                                                               "memory available when it starts)")
    fit.add_argument("--optimizers", type=_fit_variants, help="comma-separated, from: " + ", ".join(_FIT_VARIANTS))
    fit.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights' dtype")
    fit.add_argument("--seq", type=_positive_int, default=512)
    fit.add_argument("--steps", type=_positive_int, default=2, help="training steps a probe")
    fit.add_argument("--threads", type=_positive_int, default=2)
    fit.add_argument("--min-hidden", type=_positive_int, default=256, help="smallest width of the ladder (x128)")
    fit.add_argument("--max-hidden", type=_positive_int, default=8192, help="largest width of the ladder (x128)")
    fit.add_argument("--out", type=Path, help="write fit.json and fit.md here")
    memory = bench_kinds.add_parser("memory", help="the paper's Appendix G state-memory table for N parameters")
    memory.add_argument("--params", type=_positive_float, default=6.74e9, help="parameter count (default LLaMA-2 7B)")
    memory.add_argument("--density", type=_density, default=0.1)
    memory.add_argument("--galore-rank", type=_positive_int, default=8)
    memory.add_argument("--hidden", type=_positive_int, default=4096, help="GaLore: width of the projected matrices")
    memory.add_argument("--no-measure", action="store_true", help="formulas only, no measurement on MiniLM")
    memory.add_argument("--out", type=Path, help="write memory.json and memory.md here")
    glue = bench_kinds.add_parser("glue", help="a GLUE comparison's step times: its optimizers at their chosen "
                                               "rates, on its data and recipe, taking turns (adds them to "
                                               "steps.json in the comparison's folder; its next render shows them)")
    glue.add_argument("--tasks", type=_task_list, default=None, help="comma-separated, default all")
    glue.add_argument("--optimizers", type=_optimizer_set, default=None, help="as for compare (default: primary)")
    glue.add_argument("--seeds", type=_positive_int, default=5, help="the comparison's")
    glue.add_argument("--max-extensions", type=int, default=3, help="the comparison's")
    glue.add_argument("--blocks", type=_positive_int, default=5)
    glue.add_argument("--steps-per-block", type=_positive_int, default=4)
    _add_common_glue_args(glue)
    step = bench_kinds.add_parser("step", help="NanoAdam vs torch AdamW (fused, foreach) step time on MiniLM shapes")
    step.add_argument("--density", type=_density, default=0.1)
    step.add_argument("--mask-interval", type=_positive_int, default=100)
    step.add_argument("--chunk-size", type=_positive_int, default=4096)
    step.add_argument("--blocks", type=_positive_int, default=5, help="timed blocks of mask-interval steps")
    step.add_argument("--threads", type=_positive_int, default=2)
    step.add_argument("--tiny", action="store_true", help="a 2-layer, 1000-word model (for smoke tests)")
    step.add_argument("--out", type=Path, help="also write step.json and step.md (table, command, machine) here")
    return parser


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"nanoadam: this command needs {module}: pip install 'nanoadam[{extra}]'") from None


def _add_common_glue_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="'minilm' (offline MiniLM-L6) or a transformers name/path")
    p.add_argument("--data-dir", help="folder with <task>/train.jsonl and validation.jsonl (default: the hub)")
    p.add_argument("--budget", choices=["standard", "quick", "paper"], default="standard",
                   help="standard: every task learns (hours a task on 2 cores); quick: a smoke test that cannot "
                        "rank optimizers; paper: the paper's, for a GPU")
    p.add_argument("--peft", choices=["lora"], help="train LoRA adapters (peft) instead of the full model")
    p.add_argument("--lora-r", type=_positive_int, default=32)
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: results/<command>)")


def _task(text: str) -> str:
    from .experiments.glue_data import TASKS

    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; choose from {', '.join(TASKS)}")
    return text


def _task_list(text: str) -> list[str]:
    return [_task(t.strip()) for t in text.split(",") if t.strip()]


def _name(text: str) -> str:
    names = _names(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected one optimizer, got {text!r}")
    return names[0]


def _names(text: str) -> list[str]:
    from .baselines import available_optimizers

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_optimizers()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(available_optimizers())}")
    return names


_FIT_VARIANTS = ("adamw", "adamw8bit", "galore", "microadam", "nanoadam", "nanoadam-in-backward",
                 "nanoadam-in-backward-sparse-head")  # bench/fit.py's VARIANTS, without importing it at parse time


def _continual_methods(text: str) -> list[str]:
    from .experiments.continual import METHODS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(METHODS):
        raise argparse.ArgumentTypeError(f"takes {', '.join(METHODS)}, got {text!r}")
    return names


def _toy_updates(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or set(names) - {"gd", "adam"}:
        raise argparse.ArgumentTypeError(f"takes gd and/or adam, got {text!r}")
    return names


def _fit_variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _FIT_VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(_FIT_VARIANTS)}")
    return names


def _optimizer_set(text: str) -> list[str]:
    from .experiments.compare import PRIMARY, SECONDARY

    sets = {"primary": PRIMARY, "secondary": ["adamw", "head-only", *SECONDARY]}
    return list(sets[text]) if text in sets else _names(text)


def _check_glue_inputs(args, tasks: list) -> None:
    """Fails early, with one line, on data (GLUE names or task specs) or a model that cannot be used."""
    from .experiments.glue import resolve_model_path
    from .experiments.glue_data import DataError, as_spec, load_task

    for task in tasks:
        try:
            load_task(task, args.data_dir)
        except DataError as e:
            raise UsageError(f"nanoadam: {e}") from None
        except Exception as e:  # datasets/hub errors: no network, unknown dataset
            raise UsageError(f"nanoadam: cannot load {as_spec(task).dataset or as_spec(task).name} data "
                             f"({_brief(e)})") from None
    _model_config(resolve_model_path(args.model), args.model, "nanoadam")


def _brief(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _model_config(path: str, name: str, command: str):
    """The transformers config at ``path``, or one line naming the model ``name`` that would not load."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UsageError(f"{command}: cannot load model {name!r} ({_brief(e)})") from None


def _finetune(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .experiments.compare import BUDGET_OPTIMIZER_OVERRIDES, LR_GRIDS, budget_settings
    from .experiments.glue import GlueRunConfig, run

    if (args.task is None) == (args.dataset is None):
        raise UsageError("nanoadam finetune: give --task (a GLUE task) or --dataset (your own data), not both")
    own = {}
    if args.dataset is not None:
        if not args.text_fields or args.num_labels is None:
            raise UsageError("nanoadam finetune: --dataset needs --text-fields and --num-labels")
        own = dict(dataset=args.dataset, text_fields=[f.strip() for f in args.text_fields.split(",") if f.strip()],
                   label_field=args.label_field, num_labels=args.num_labels, metric=args.metric)
    settings = budget_settings(args.budget, args.task)
    if args.epochs:
        settings["epochs"] = args.epochs
    grid = LR_GRIDS.get(args.optimizer, [1e-4])
    try:
        config = GlueRunConfig(task=args.task or "custom", optimizer=args.optimizer,
                               lr=args.lr or grid[len(grid) // 2], seed=args.seed, model=args.model,
                               data_dir=args.data_dir, max_steps=args.max_steps,
                               lora_r=args.lora_r if args.peft == "lora" else None, threads=args.threads,
                               optimizer_overrides=dict(BUDGET_OPTIMIZER_OVERRIDES[args.budget].get(args.optimizer,
                                                                                                    {})),
                               retention_probe=not args.no_retention, **own, **settings)
    except ValueError as e:
        raise UsageError(f"nanoadam finetune: {e}") from None
    _check_glue_inputs(args, [config.spec])
    task = config.spec.name
    with tqdm(desc=f"{task} {args.optimizer}", unit="step") as bar:
        def progress(step, total):
            bar.total = total
            bar.update(1)
        result = run(config, progress=progress)
    out = args.out or Path("results/finetune")
    name = f"{config.spec.name}-{args.optimizer}-lr{config.lr:g}-seed{args.seed}"
    metrics = {k: v for k, v in result["metrics"].items()
               if k not in ("score", "trivial_prediction") and isinstance(v, float)}
    if result["retention"] is not None:
        metrics["retention (STS-B Spearman)"] = result["retention"]
    table = "\n".join([
        "| task | optimizer | lr | " + " | ".join(metrics) + " | steps | step time (s) | untouched | L2 shift |",
        "|---|---|---|" + "---|" * (len(metrics) + 4),
        f"| {task} | {args.optimizer} | {config.lr:g} | " + " | ".join(f"{v:.4f}" for v in metrics.values())
        + f" | {result['steps']} | {result['median_step_s']:.3f} | {100 * result['untouched_fraction']:.1f} % | "
        f"{result['l2_shift']:.3f} |"])
    print(table)
    write_result(out, name, result, table, f"Finetuning {task} with {args.optimizer}")
    return 0


def _check_causal_lm(model: str) -> None:
    config = _model_config(model, model, "nanoadam sft")
    architectures = config.architectures or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise UsageError(f"nanoadam sft: {model!r} is not a causal LM (architectures: "
                         f"{', '.join(architectures) or 'none'}); give an AutoModelForCausalLM")


def _sft(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .experiments.glue_data import DataError
    from .experiments.sft import BUDGETS, SFTConfig, run
    from .experiments.sft_data import load_rows, sft_format

    _check_causal_lm(args.model)
    settings = dict(BUDGETS[args.budget])
    settings.update({k: v for k, v in (("epochs", args.epochs), ("eval_limit", args.eval_limit)) if v})
    if args.bf16:
        settings["bf16"] = True
    if args.gradient_checkpointing:
        settings["gradient_checkpointing"] = True
    try:
        config = SFTConfig(model=args.model, optimizer=args.optimizer, lr=args.lr, format=args.format,
                           train=args.train, eval=args.eval, train_split=args.train_split,
                           eval_split=args.eval_split, instruction_field=args.instruction_field,
                           answer_field=args.answer_field, max_steps=args.max_steps, seed=args.seed,
                           step_in_backward=args.step_in_backward, threads=args.threads,
                           lora_r=args.lora_r if args.peft == "lora" else None, **settings)
        fmt = sft_format(config.format, config.instruction_field, config.answer_field)
        load_rows(config.train, config.train_split, fmt, 1)
        load_rows(config.eval or config.train, config.eval_split, fmt, 1)
    except (ValueError, DataError) as e:
        raise UsageError(f"nanoadam sft: {e}") from None
    except Exception as e:  # datasets/hub errors: no network, unknown dataset
        raise UsageError(f"nanoadam sft: cannot load data ({_brief(e)})") from None
    name = f"{Path(args.model).name}-{config.format}-{args.optimizer}-lr{config.lr:g}-seed{config.seed}"
    if (args.out / f"{name}.json").exists():
        print(f"{args.out / name}.json exists: skipped (delete it to rerun)")
        return 0
    with tqdm(desc=f"sft {config.format} {args.optimizer}", unit="step") as bar:
        def progress(step, total):
            bar.total = total
            bar.update(1)
        args.out.mkdir(parents=True, exist_ok=True)
        checkpoint = args.out / f"{name}.ckpt"
        result = run(config, progress=progress, checkpoint=checkpoint, save_every=args.save_every)
    table = "\n".join(["| model | format | optimizer | lr | steps | final loss | accuracy | eval examples |",
                       "|---|---|---|---|---|---|---|---|",
                       f"| {args.model} | {config.format} | {args.optimizer} | {config.lr:g} | {result['steps']} | "
                       f"{result['loss_curve'][-1]:.4f} | {100 * result['accuracy']:.2f} % | "
                       f"{result['eval_examples']} |"])
    _publish(args.out, name, result, table, f"Supervised finetuning ({config.format}) with {args.optimizer}")
    checkpoint.unlink(missing_ok=True)  # the result is written: the checkpoint has done its job
    return 0


def _compare(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .experiments.compare import run_compare
    from .experiments.glue_data import TASKS
    from .experiments.report import glue_table, plot_curves, plot_frontiers

    tasks = args.tasks or list(TASKS)
    _check_glue_inputs(args, tasks)
    out = args.out or Path("results/glue")
    config = _compare_config(args, tasks, out, "nanoadam compare")
    if args.budget == "quick":
        print("note: the quick budget is a smoke test; it cannot rank optimizers", file=sys.stderr)
    from .experiments.compare import retime, retime_finals

    moved = retime(out, args.rerun_slower_than) if args.rerun_slower_than else []
    moved += retime_finals(out, args.retime_finals) if args.retime_finals else []
    for run in moved:
        print(f"rerunning {run['run']} (median step {run['old_median_step_s']:.3f} s)", file=sys.stderr)
    if args.render_only:
        from .experiments.compare import summarize

        summary = {**summarize(config), "failures": [], "retimed": []}
    else:
        with tqdm(desc="compare", unit="run") as bar:
            summary = run_compare(config, progress=_run_progress(bar, lambda path: path.relative_to(out / "runs")))
    table = glue_table(summary)
    print(table)
    plot_curves(out, summary)
    plot_frontiers(out, summary)
    write_result(out, "glue", {**summary, "machine": _machine()}, table, "GLUE comparison")
    for failure in summary["failures"]:
        print(f"failed: {failure['run']}: {failure['error']}", file=sys.stderr)
    return 1 if summary["failures"] else 0


def _compare_config(args, tasks: list[str], out: Path, command: str):
    """The ``CompareConfig`` that ``args`` (compare's options) describe, or one line naming what is wrong."""
    from .experiments.compare import CompareConfig

    try:
        return CompareConfig(tasks=tasks, budget=args.budget, seeds=args.seeds, model=args.model,
                             data_dir=args.data_dir, out=str(out), max_extensions=args.max_extensions,
                             lora_r=args.lora_r if args.peft == "lora" else None, threads=args.threads,
                             **({"optimizers": args.optimizers} if args.optimizers else {}))
    except ValueError as e:
        raise UsageError(f"{command}: {e}") from None


def _run_progress(bar, name):
    """A ``RunLedger`` progress callback that advances ``bar`` and shows ``name(path)`` of the last run."""
    def progress(done, total, path):
        bar.total = total
        bar.set_postfix_str(str(name(path)))
        bar.update(1)
    return progress


def _machine() -> dict:
    from .experiment import machine_info

    return machine_info()


def _reproduce_continual(args) -> int:
    from .experiments.continual import METHODS, ContinualConfig, main

    try:
        config = ContinualConfig(methods=args.methods or list(METHODS), seeds=args.seeds, epochs=args.epochs,
                                 task2=[x.strip() for x in args.task2.split(",") if x.strip()], threads=args.threads)
    except ValueError as e:
        raise UsageError(f"nanoadam reproduce continual: {e}") from None
    for path in main(config, str(args.out), _command_line(), render_only=args.render_only,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True)):
        print(path)
    return 0


def _reproduce_toy(args) -> int:
    from .experiments.toy import ToyConfig, main

    config = ToyConfig(seed=args.seed, n_seeds=args.seeds, input_dim=args.input_dim,
                       student_width=args.student_width, finetune_steps=args.finetune_steps, fraction=args.fraction,
                       mask_interval=args.mask_interval, updates=args.updates, out_dir=str(args.out))
    for path in main(config, progress=True, command=_command_line()):
        print(path)
    return 0


def _reproduce_correlation(args) -> int:
    from .analysis.correlation import CorrelationConfig, main

    config = CorrelationConfig(seed=args.seed, steps=args.steps, model=args.model, data_dir=args.data_dir,
                               top_fraction=args.top_fraction, bottom_fraction=args.bottom_fraction,
                               threads=args.threads, out_dir=str(args.out))
    if args.data_dir is not None:
        _check_glue_inputs(argparse.Namespace(data_dir=args.data_dir, model=args.model), ["sst2"])
    for path in main(config, progress=print, command=_command_line()):
        print(path)
    return 0


def _reproduce_ablation(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .experiments.ablation import AblationConfig, main

    _check_glue_inputs(args, [args.task])
    try:
        config = AblationConfig(task=args.task, model=args.model, data_dir=args.data_dir, out=str(args.out),
                                budget=args.budget, seeds=args.seeds, threads=args.threads,
                                reuse=str(args.reuse) if args.reuse else None)
    except ValueError as e:
        raise UsageError(f"nanoadam reproduce ablation: {e}") from None
    with tqdm(desc="ablation", unit="run", disable=args.render_only) as bar:
        result = main(config, command=_command_line(), progress=_run_progress(bar, lambda path: path.name),
                      render_only=args.render_only)
    print((args.out / "ablation.md").read_text())
    return 1 if result["failures"] else 0


def _reproduce_continual_glue(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .experiments.continual_glue import ContinualGlueConfig, main

    if args.peft:
        raise UsageError("nanoadam reproduce continual-glue: --peft is not supported (task-1 models are full models)")
    out = args.out or Path("results/continual-glue")
    try:
        config = ContinualGlueConfig(task1=args.task1, task2=args.task2, budget=args.budget, seeds=args.seeds,
                                     frontier_seeds=args.frontier_seeds, model=args.model, data_dir=args.data_dir,
                                     out=str(out), checkpoints=str(args.checkpoints) if args.checkpoints else None,
                                     threads=args.threads, reuse=str(args.reuse) if args.reuse else None,
                                     **({"methods": args.methods} if args.methods else {}))
    except ValueError as e:
        raise UsageError(f"nanoadam reproduce continual-glue: {e}") from None
    _check_glue_inputs(args, [args.task1, args.task2])
    with tqdm(desc="continual-glue", unit="run", disable=args.render_only) as bar:
        result = main(config, command=_command_line(), render_only=args.render_only,
                      progress=_run_progress(bar, lambda path: path.relative_to(out / "runs")))
    print((out / "continual_glue.md").read_text())
    for failure in result["failures"]:
        print(f"failed: {failure['run']}: {failure['error']}", file=sys.stderr)
    return 1 if result["failures"] else 0


def _reproduce_forgetting(args) -> int:
    from .experiments.forgetting import ForgettingConfig, LanguageConfig, VisionConfig, main

    domains = {d.strip() for d in args.domains.split(",") if d.strip()}
    if not domains or domains - {"vision", "language"}:
        raise UsageError(f"nanoadam reproduce forgetting: --domains takes vision and/or language, got {args.domains!r}")
    ties = tuple(t.strip() for t in args.tie_breaks.split(",") if t.strip())
    if not ties or set(ties) - {"smaller", "loss"}:
        raise UsageError("nanoadam reproduce forgetting: --tie-breaks takes smaller and/or loss, "
                         f"got {args.tie_breaks!r}")
    seeds = {"n_seeds": args.seeds} if args.seeds else {}
    epochs = {"epochs": args.epochs} if args.epochs else {}
    vision = VisionConfig(seed=args.seed, tie_breaks=ties, **seeds, **epochs) if "vision" in domains else None
    language = None
    if "language" in domains:
        from .experiments.compare import budget_settings

        budget = {k: v for k, v in budget_settings(args.budget).items() if k != "eval_points"}
        try:
            language = LanguageConfig(task1=args.task1, task2=args.task2, seed=args.seed, data_dir=args.data_dir,
                                      **seeds, **budget)
        except ValueError as e:
            raise UsageError(f"nanoadam reproduce forgetting: {e}") from None
        _check_glue_inputs(argparse.Namespace(data_dir=args.data_dir, model="minilm"), [args.task1, args.task2])
    main(ForgettingConfig(vision=vision, language=language, command=_command_line()), out_dir=str(args.out),
         merge=args.merge)
    print(f"wrote {args.out}/forgetting.md")
    return 0


def _demo(args) -> int:
    from .experiments.demo import run_demo

    run_demo(str(args.out), seed=args.seed, command=_command_line())
    return 0


def _command_line() -> str:
    return "nanoadam " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("nanoadam") else " ".join(sys.argv)


def _bench_optimizers(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .baselines import MissingExtraError, available_optimizers
    from .bench.optimizers import BenchConfig, format_table, run

    optimizers = args.optimizers or available_optimizers(controls=False)
    config = BenchConfig(model=args.model, config=args.config, optimizers=optimizers,
                         blocks=args.blocks, steps_per_block=args.steps_per_block, batch=args.batch, seq=args.seq,
                         memory=not args.no_memory, threads=args.threads)
    total = config.blocks * len(config.optimizers) + (len(config.optimizers) if config.memory else 0)
    try:
        with tqdm(total=total, desc="bench", unit="run") as bar:
            result = run(config, progress=lambda done, _total: bar.update(1))
    except (MissingExtraError, OSError) as e:
        raise UsageError(f"nanoadam bench: {e}") from None
    return _publish(args.out, "bench", result, format_table(result), "Every optimizer side by side")


def _bench_memory(args) -> int:
    from .bench.memory import MemoryTableConfig, format_memory_table, run_table

    result = run_table(MemoryTableConfig(params=args.params, density=args.density, galore_rank=args.galore_rank,
                                         hidden=args.hidden, measure=not args.no_measure))
    title = "Optimizer-state memory (paper Appendix G)"
    return _publish(args.out, "memory", result, format_memory_table(result), title)


def _bench_decoder(args) -> int:
    from .bench.decoder import DECODER, DecoderBenchConfig, format_table, run

    shape = dict(DECODER, hidden_size=args.hidden, num_hidden_layers=args.layers,
                 intermediate_size=max(64, (8 * args.hidden // 3 + 255) // 256 * 256),
                 num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64))
    config = DecoderBenchConfig(decoder=shape, blocks=args.blocks, steps_per_block=args.steps_per_block,
                                threads=args.threads)
    result = run(config, progress=lambda block, name: print(f"block {block}: {name}", file=sys.stderr))
    return _publish(args.out, "decoder", result, format_table(result), "End-to-end step time on a decoder")


def _bench_backward(args) -> int:
    from .bench.backward import BackwardBenchConfig, format_table, run

    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    if not settings or set(settings) - {"llama", "minilm"}:
        raise UsageError(f"nanoadam bench backward: --settings takes llama and/or minilm, got {args.settings!r}")
    result = run(BackwardBenchConfig(settings=settings, steps=args.steps, threads=args.threads),
                 progress=lambda row: print(f"{row['setting']} / {row['optimizer']}: "
                                            f"{row['peak_training_mb']:.0f} MB", file=sys.stderr))
    return _publish(args.out, "backward", result, format_table(result), "Peak training memory with step in backward")


def _bench_fit(args) -> int:
    from .bench.fit import FitConfig, format_table, run

    try:
        config = FitConfig(memory_gb=args.memory_gb, variants=args.optimizers or list(_FIT_VARIANTS),
                           dtype=args.dtype, seq=args.seq, steps=args.steps, threads=args.threads,
                           min_hidden=args.min_hidden, max_hidden=args.max_hidden)
    except ValueError as e:
        raise UsageError(f"nanoadam bench fit: {e}") from None

    def progress(p):
        peak = f", peak {p['peak_bytes'] / 2**30:.2f} GiB" if "peak_bytes" in p else ""
        print(f"{p['variant']} hidden {p['hidden']} ({p['params'] / 1e9:.2f} B): {p['outcome']}{peak}, "
              f"formula {p['formula']['total'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    result = run(config, progress=progress)
    return _publish(args.out, "fit", result, format_table(result), "Largest decoder that trains in a memory budget")


def _bench_glue(args) -> int:
    from .bench.glue_steps import GlueStepsConfig, cpu_busy_fraction, format_table, run
    from .experiment import read_result
    from .experiments.glue_data import TASKS

    if args.out is None:
        raise UsageError("nanoadam bench glue: --out must name the comparison's folder (where compare wrote runs/)")
    if not (args.out / "runs").is_dir():
        raise UsageError(f"nanoadam bench glue: {args.out} holds no runs/ of a comparison")
    tasks = args.tasks or list(TASKS)
    _check_glue_inputs(args, tasks)
    compare = _compare_config(args, tasks, args.out, "nanoadam bench glue")
    config = GlueStepsConfig(blocks=args.blocks, steps_per_block=args.steps_per_block)
    busy = cpu_busy_fraction()
    if busy is not None and busy > 0.1:
        print(f"warning: the CPUs are {100 * busy:.0f} % busy: the times mean something only on an otherwise "
              "idle machine", file=sys.stderr)
    earlier = read_result(args.out, "steps") if (args.out / "steps.json").exists() else None
    try:
        result = run(compare, config, earlier=earlier,
                     progress=lambda task, block, name: print(f"{task} block {block}: {name}", file=sys.stderr,
                                                              flush=True))
    except ValueError as e:
        raise UsageError(f"nanoadam bench glue: {e}") from None
    if not result["timed_now"]:
        raise UsageError("nanoadam bench glue: no task has a chosen rate for every optimizer yet ("
                         + "; ".join(f"{t}: {r}" for t, r in result["skipped"].items()) + ")")
    return _publish(args.out, "steps", result, format_table(result), "GLUE step times, optimizers taking turns")


def _bench_step(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .bench.step import StepBenchConfig, format_table, minilm_shapes, run

    config = StepBenchConfig(density=args.density, mask_interval=args.mask_interval, chunk_size=args.chunk_size,
                             blocks=args.blocks, threads=args.threads)
    if args.tiny:
        config.shapes = minilm_shapes(vocab=1000, hidden=64, layers=2, ffn=256, positions=64)
        config.foreach_steps = 2
    with tqdm(total=config.blocks + 1 + config.include_reference, desc="bench step", unit="block") as bar:
        result = run(config, progress=lambda done, total: bar.update(1))
    return _publish(args.out, "step", result, format_table(result), "Step time: NanoAdam vs torch.optim.AdamW")


def _publish(out: Path | None, name: str, result: dict, table: str, title: str) -> int:
    """Prints ``table`` and, with an output folder, writes the result and its Markdown there."""
    print(table)
    if out:
        write_result(out, name, result, table, title)
    return 0


def write_result(out: Path, name: str, result: dict, table: str, title: str) -> None:
    """``out/name.json`` (the result, with the command that produced it) and ``out/name.md``
    (title, command, machine, date, table)."""
    from . import experiment

    result = {"command": _command_line(), **result}
    experiment.write_result(out, name, result)
    experiment.write_markdown(out, name, title, result, [table])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "demo":
            return _demo(args)
        if args.command == "finetune":
            return _finetune(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "sft":
            return _sft(args)
        if args.command == "reproduce":
            handlers = {"toy": _reproduce_toy, "continual": _reproduce_continual, "correlation": _reproduce_correlation,
                        "ablation": _reproduce_ablation, "forgetting": _reproduce_forgetting,
                        "continual-glue": _reproduce_continual_glue}
            if args.analysis not in handlers:
                raise UsageError(f"nanoadam reproduce: choose one of {', '.join(handlers)}")
            return handlers[args.analysis](args)
        if args.command == "bench":
            return {"step": _bench_step, "memory": _bench_memory, "backward": _bench_backward,
                    "decoder": _bench_decoder, "fit": _bench_fit, "glue": _bench_glue,
                    None: _bench_optimizers}[args.bench](args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
