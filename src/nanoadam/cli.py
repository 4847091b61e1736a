"""The ``nanoadam`` command line: parses arguments, calls an experiment's ``run``, prints.

Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
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
    memory = bench_kinds.add_parser("memory", help="the paper's Appendix G state-memory table for N parameters")
    memory.add_argument("--params", type=_positive_float, default=6.74e9, help="parameter count (default LLaMA-2 7B)")
    memory.add_argument("--density", type=_density, default=0.1)
    memory.add_argument("--galore-rank", type=_positive_int, default=8)
    memory.add_argument("--hidden", type=_positive_int, default=4096, help="GaLore: width of the projected matrices")
    memory.add_argument("--no-measure", action="store_true", help="formulas only, no measurement on MiniLM")
    memory.add_argument("--out", type=Path, help="write memory.json and memory.md here")
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


def _names(text: str) -> list[str]:
    from .baselines import available_optimizers

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_optimizers()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer {', '.join(unknown) or text!r}; "
                                         f"choose from {', '.join(available_optimizers())}")
    return names


def _bench_optimizers(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .baselines import MissingExtraError, available_optimizers
    from .bench.optimizers import BenchConfig, format_table, run

    config = BenchConfig(model=args.model, config=args.config, optimizers=args.optimizers or available_optimizers(),
                         blocks=args.blocks, steps_per_block=args.steps_per_block, batch=args.batch, seq=args.seq,
                         memory=not args.no_memory, threads=args.threads)
    total = config.blocks * len(config.optimizers) + (len(config.optimizers) if config.memory else 0)
    try:
        with tqdm(total=total, desc="bench", unit="run") as bar:
            result = run(config, progress=lambda done, _total: bar.update(1))
    except (MissingExtraError, OSError) as e:
        raise UsageError(f"nanoadam bench: {e}") from None
    table = format_table(result)
    print(table)
    if args.out:
        write_result(args.out, "bench", result, table, "Every optimizer side by side")
    return 0


def _bench_memory(args) -> int:
    from .bench.memory import MemoryTableConfig, format_memory_table, run_table

    result = run_table(MemoryTableConfig(params=args.params, density=args.density, galore_rank=args.galore_rank,
                                         hidden=args.hidden, measure=not args.no_measure))
    table = format_memory_table(result)
    print(table)
    if args.out:
        write_result(args.out, "memory", result, table, "Optimizer-state memory (paper Appendix G)")
    return 0


def _bench_step(args) -> int:
    tqdm = _require("tqdm.auto", "cli").tqdm
    from .bench.step import StepBenchConfig, format_table, minilm_shapes, run

    config = StepBenchConfig(density=args.density, mask_interval=args.mask_interval, chunk_size=args.chunk_size,
                             blocks=args.blocks, threads=args.threads)
    if args.tiny:
        config.shapes = minilm_shapes(vocab=1000, hidden=64, layers=2, ffn=256, positions=64)
        config.foreach_steps = 2
    with tqdm(total=config.blocks, desc="bench step", unit="block") as bar:
        result = run(config, progress=lambda done, total: bar.update(1))
    table = format_table(result)
    print(table)
    if args.out:
        write_result(args.out, "step", result, table, "Step time: NanoAdam vs torch.optim.AdamW")
    return 0


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_result(out: Path, name: str, result: dict, table: str, title: str) -> None:
    """``out/name.json`` (the result) and ``out/name.md`` (title, command, machine, date, table)."""
    machine = result.get("machine", {})
    command = "nanoadam " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("nanoadam") else " ".join(sys.argv)
    header = [f"# {title}", "", f"Command: `{command}`", ""]
    if machine:
        header.append(f"Machine: {machine.get('processor')}, {machine.get('threads')} threads, "
                      f"torch {machine.get('torch')}, {machine.get('platform')}; date: {machine.get('date')}")
        header.append("")
    _atomic_write(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    _atomic_write(out / f"{name}.md", "\n".join(header) + "\n" + table + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        if args.command == "bench":
            return {"step": _bench_step, "memory": _bench_memory, None: _bench_optimizers}[args.bench](args)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
