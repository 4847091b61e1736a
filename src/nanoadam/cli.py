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

    bench = commands.add_parser("bench", help="speed and memory benchmarks")
    bench_kinds = bench.add_subparsers(dest="bench", parser_class=_Parser)
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
            if args.bench == "step":
                return _bench_step(args)
            raise UsageError("nanoadam bench: choose a benchmark: step")
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
