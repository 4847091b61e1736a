"""The command line: one line and exit code 2 on bad input; the step benchmark end to end."""

import json
import subprocess
import sys

import pytest

from nanoadam_lab.cli import main


@pytest.mark.parametrize("argv", [["bench", "step", "--density", "2"], ["bench", "step", "--blocks", "0"],
                                  ["bench", "step", "--threads", "x"], ["frobnicate"],
                                  ["bench", "--optimizers", "adamw,sgd"], ["bench", "memory", "--params", "-1"]])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_reports_bad_input_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "nanoadam_lab.cli", "bench", "step", "--density", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "density" in proc.stderr


def test_bench_step_tiny_writes_json(tmp_path, capsys):
    assert main(["bench", "step", "--tiny", "--blocks", "1", "--mask-interval", "5", "--out", str(tmp_path)]) == 0
    out = tmp_path / "step.json"
    assert "x fused AdamW" in (tmp_path / "step.md").read_text()
    table = capsys.readouterr().out
    assert "x fused AdamW" in table and "nanoadam" in table
    result = json.loads(out.read_text())
    nano = result["results"]["nanoadam"]
    assert nano["state_bytes_per_param"] < 1.0
    assert result["results"]["adamw_fused"]["state_bytes_per_param"] == pytest.approx(8.0, rel=1e-3)
    assert nano["amortized_step_ms"] > 0 and result["machine"]["torch"]


@pytest.mark.parametrize("argv", [["reproduce", "forgetting", "--domains", "audio"],
                                  ["reproduce", "forgetting", "--tie-breaks", "larger"], ["reproduce"],
                                  ["reproduce", "forgetting", "--domains", "language", "--task2", "qnli"],
                                  ["reproduce", "forgetting", "--domains", "language", "--task2", "sst2"],
                                  ["reproduce", "toy", "--fraction", "1.5"]])
def test_reproduce_bad_input(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bench_decoder_tiny_pairs_blocks(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "decoder", "--hidden", "64", "--layers", "1", "--blocks", "2", "--steps-per-block", "1",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "decoder.json").read_text())
    adamw, nano = result["results"]["adamw"], result["results"]["nanoadam"]
    assert adamw["block_ratios"] == [1.0, 1.0] and len(nano["block_ratios"]) == 2 and nano["ratio_to_adamw"] > 0
    assert "x adamw" in capsys.readouterr().out and "command" in result
