"""Run under torchrun (2 CPU processes, gloo): transformers.Trainer with NanoAdamFactory under DDP.
Each rank saves its final weights and whether its optimizer was a NanoAdam to OUT/rank<r>.pt."""

import os
import sys

import torch
import transformers

from nanoadam import NanoAdam
from nanoadam.integrations.hf import NanoAdamCallback, NanoAdamFactory

out = sys.argv[1]
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
model = transformers.BertForSequenceClassification(config)
gen = torch.Generator().manual_seed(3)
ids = torch.randint(5, 300, (32, 12), generator=gen)
data = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": (ids[i, 0] > 150).long()}
        for i in range(32)]
args = transformers.TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                                      save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", seed=7,
                                      logging_strategy="no", disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[NanoAdamCallback()],
                               optimizer_cls_and_kwargs=(NanoAdamFactory, {"lr": 1e-2, "density": 0.2,
                                                                           "mask_interval": 2, "chunk_size": 256}))
trainer.train()
optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
rank = int(os.environ.get("RANK", 0))
torch.save({"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "nanoadam": isinstance(optimizer, NanoAdam), "world": int(os.environ.get("WORLD_SIZE", 1)),
            "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)},
           os.path.join(out, f"rank{rank}.pt"))
