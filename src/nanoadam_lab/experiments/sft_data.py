"""Supervised finetuning data for causal LMs: formats, loss masks and answer extraction.

Three formats, from the hub or local JSON Lines with the same fields:
- ``gsm8k`` (``openai/gsm8k``, config ``main``): ``question``, ``answer`` (worked solution ending in
  ``#### <number>``); scored by exact match of the final number of a greedy generation.
- ``commonsense`` (LLM-Adapters / DoRA: ``commonsense_170k`` for training, BoolQ, PIQA, SIQA,
  HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA for evaluation): ``instruction``, ``output``,
  ``answer`` (``true``/``false``, ``solution1``, ``answer3``, ``ending2``, ``option1``); scored by
  the first answer word in the generation, as DoRA's evaluation extracts it.
- ``instruction``: any JSON Lines with an instruction field and an answer field (names given);
  scored by exact match of the stripped generation.

The prompt is never trained on: its labels are -100, so the loss counts answer tokens only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .glue_data import DataError

ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# DoRA's commonsense evaluation: the answer vocabulary of each dataset, first match wins.
_COMMONSENSE_ANSWER = re.compile(r"\b(true|false|solution[12]|answer[1-5]|ending[1-4]|option[12])\b")


def _number(text: str) -> str | None:
    """The final number of a text (after ``####`` where there is one), commas dropped."""
    text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def _commonsense_answer(text: str) -> str | None:
    match = _COMMONSENSE_ANSWER.search(text.lower())
    return match.group(1) if match else None


@dataclass(frozen=True)
class SFTFormat:
    name: str
    fields: tuple[str, ...]
    prompt: Callable[[dict], str]
    target: Callable[[dict], str]  # what is trained on, after the prompt
    reference: Callable[[dict], str]  # what a generation is scored against
    extract: Callable[[str], str | None]  # the answer in a generation


def sft_format(name: str, instruction_field: str = "instruction", answer_field: str = "answer") -> SFTFormat:
    if name == "gsm8k":
        return SFTFormat("gsm8k", ("question", "answer"), lambda r: f"Question: {r['question']}\nAnswer: ",
                         lambda r: r["answer"], lambda r: _number(r["answer"]) or "", _number)
    if name == "commonsense":
        return SFTFormat("commonsense", ("instruction", "output", "answer"),
                         lambda r: ALPACA.format(instruction=r["instruction"]), lambda r: r["output"],
                         lambda r: str(r["answer"]).strip().lower(), _commonsense_answer)
    if name == "instruction":
        return SFTFormat("instruction", (instruction_field, answer_field),
                         lambda r: ALPACA.format(instruction=r[instruction_field]), lambda r: str(r[answer_field]),
                         lambda r: str(r[answer_field]).strip(), lambda text: text.strip())
    raise DataError(f"unknown format {name!r}; choose gsm8k, commonsense or instruction")


def load_rows(source: str, split: str, fmt: SFTFormat, limit: int | None = None) -> list[dict]:
    """Rows of ``split`` from a local JSON Lines file, a folder with ``<split>.jsonl``, or a hub
    dataset (``openai/gsm8k:main``), checked for the format's fields."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    path = Path(source)
    if path.is_file():
        rows = datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    elif path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            raise DataError(f"data folder lacks {file}")
        rows = datasets.load_dataset("json", data_files=str(file), split="train").to_list()
    else:
        name, _, config = source.partition(":")
        rows = datasets.load_dataset(name, config or None, split=split).to_list()
    rows = rows[:limit] if limit else rows
    if not rows or not set(fmt.fields) <= set(rows[0]):
        raise DataError(f"{source} ({split}) rows need fields {', '.join(fmt.fields)} for the {fmt.name} format, "
                        f"found {', '.join(sorted(rows[0])) if rows else 'no rows'}")
    return rows


def encode_example(tokenizer, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + target (+ end of sequence) and labels that are -100 on the prompt,
    truncated to ``max_length``."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    target_ids = target_ids + ([eos] if eos is not None else [])
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels
