"""`nanoadam bench fit`: the decoder ladder, the formula against measured state, the search, the watchdog."""

import math

import pytest

from nanoadam_lab.bench import fit
from nanoadam_lab.cli import main


def test_hidden_4096_is_llama2_7b():
    cfg = fit.decoder_config(4096)
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"]) == (32, 11008, 32)
    assert fit.parameter_count(cfg) == 6_738_415_616  # LLaMA-2 7B's published parameter count


@pytest.mark.parametrize("hidden", [256, 384])
def test_shapes_are_the_transformers_model(hidden):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fit.decoder_config(hidden)))
    assert fit.decoder_shapes(fit.decoder_config(hidden)) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]


@pytest.mark.parametrize("variant", ["adamw", "nanoadam", "nanoadam-in-backward-sparse-head"])
def test_formula_state_is_the_measured_state(variant):
    pytest.importorskip("transformers")
    measured = fit._child(variant, 256, "float32", seq=16, steps=1, threads=1)
    formula = fit.formula_bytes(variant, fit.decoder_config(256), dtype="float32", seq=16, baseline_bytes=0)
    assert measured["params"] == fit.parameter_count(fit.decoder_config(256))
    assert measured["state_bytes"] == pytest.approx(formula["state"], rel=0.01)
    assert all(math.isfinite(x) for x in measured["losses"])


def test_bf16_moments_halve_adamw_state_not_nanoadams():
    cfg = fit.decoder_config(512)
    bf16 = {v: fit.formula_bytes(v, cfg, dtype="bfloat16", seq=512, baseline_bytes=0) for v in ("adamw", "nanoadam")}
    fp32 = {v: fit.formula_bytes(v, cfg, dtype="float32", seq=512, baseline_bytes=0) for v in ("adamw", "nanoadam")}
    assert bf16["adamw"]["state"] == pytest.approx(fp32["adamw"]["state"] / 2, rel=1e-6)
    assert bf16["nanoadam"]["state"] == fp32["nanoadam"]["state"]  # bf16 moments, fp32 dense head, either way
    back = fit.formula_bytes("nanoadam-in-backward", cfg, dtype="bfloat16", seq=512, baseline_bytes=0)
    assert back["gradients"] == 2 * max(math.prod(s) for _, s in fit.decoder_shapes(cfg))


def test_search_brackets_the_largest_size(monkeypatch):
    # A fake probe that fits up to hidden 640: the search must report 640 with 768 probed and failing,
    # whether the formula's first guess is above or below.
    for budget_gb in (0.5, 50.0):
        calls = []

        def fake(variant, hidden, config):
            calls.append(hidden)  # noqa: B023 (called within the iteration)
            if hidden == 0:
                return {"before_model_bytes": 10**8, "fits": True}
            return {"variant": variant, "hidden": hidden, "params": 1, "fits": hidden <= 640, "outcome": "x"}

        monkeypatch.setattr(fit, "probe", fake)
        result = fit.run(fit.FitConfig(memory_gb=budget_gb, variants=["adamw"], min_hidden=128, max_hidden=2048))
        r = result["results"]["adamw"]
        assert r["largest_hidden"] == 640 and 768 in calls and 640 in calls
        assert [p["hidden"] for p in r["probes"]] == sorted(set(calls) - {0})


def test_probe_fits_and_watchdog_kills():
    pytest.importorskip("transformers")
    roomy = fit.probe("nanoadam-in-backward", 128, fit.FitConfig(memory_gb=8, seq=16, steps=1, threads=1,
                                                                  dtype="float32"))
    assert roomy["fits"] and roomy["peak_bytes"] > roomy["before_model_bytes"]
    tight = fit.probe("adamw", 128, fit.FitConfig(memory_gb=0.05, seq=16, steps=1, threads=1))
    assert not tight["fits"] and tight["outcome"].startswith("over budget")


def test_a_failure_that_is_not_memory_raises():
    with pytest.raises(RuntimeError, match="failed"):
        fit.probe("no-such-optimizer", 128, fit.FitConfig(memory_gb=8, seq=16, steps=1, threads=1))


@pytest.mark.parametrize("argv", [["bench", "fit", "--memory-gb", "0"], ["bench", "fit", "--optimizers", "sgd"],
                                  ["bench", "fit", "--min-hidden", "200"], ["bench", "fit", "--dtype", "half"],
                                  ["bench", "fit", "--min-hidden", "1024", "--max-hidden", "512"]])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
