# Diagnosis: does SST-2 collapse during CoLA because the representation is lost, or because the
# old head's decision offset moved? Old head vs. recalibrated old head vs. a re-fit linear probe.
import sys, json, torch
from dataclasses import replace
from sklearn.linear_model import LogisticRegression
from nanoadam_lab.experiments.continual_glue import ContinualGlueConfig
from nanoadam_lab.experiments.glue import run, load_model_and_tokenizer, split_data, predict, GlueRunConfig
from nanoadam_lab.experiments.glue_data import load_task, collate

method, lr1, lr, steps = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
cg = ContinualGlueConfig(data_dir="/work/shared/data/glue", out="/work/cg-out")
cfg = replace(cg.task2_config(method, lr1, lr, 0), max_steps=steps, eval_points=0, retention_probe=False,
              save_to=f"/tmp/diag/after-{method}-{lr}-{steps}.pt")
res = run(cfg)
print("cola heldout", res["score"], "watch curve", [(p["step"], round(p["score"], 3)) for p in res["watch"]["curve"]])
own = cg.task1_config(method, lr1, 0)
model, tok = load_model_and_tokenizer("minilm", 2)
train, scored = split_data(own, load_task("sst2", "/work/shared/data/glue"), tok)
torch.set_num_threads(1)

@torch.no_grad()
def feats(data):
    model.eval(); out = []
    for s in range(0, len(data), 64):
        b = collate(data, list(range(s, min(s + 64, len(data)))), tok.pad_token_id); b.pop("labels")
        out.append(model.bert(**b).pooler_output)
    return torch.cat(out).numpy()

for name, path in (("before", cg.checkpoint(method, lr1, 0)), ("after", cfg.save_to)):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if name == "after":  # the saved task-2 model has CoLA's head: put SST-2's back
        start = torch.load(cg.checkpoint(method, lr1, 0), map_location="cpu", weights_only=True)
        state.update({k: v for k, v in start.items() if k.startswith("classifier")})
    model.load_state_dict(state, strict=False)
    xtr, xva = feats(train), feats(scored["validation"])
    ytr, yva = train.labels.numpy(), scored["validation"].labels.numpy()
    W, bias = model.classifier.weight.detach().numpy(), model.classifier.bias.detach().numpy()
    mtr, mva = (xtr @ W.T + bias), (xva @ W.T + bias)
    old = ((mva.argmax(1)) == yva).mean()
    d_tr, d_va = (mtr[:, 1] - mtr[:, 0])[:, None], (mva[:, 1] - mva[:, 0])[:, None]
    recal = LogisticRegression().fit(d_tr, ytr).score(d_va, yva)
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, ytr).score(xva, yva)
    print(name, f"old head {old:.3f}  recalibrated offset {recal:.3f}  refit probe {probe:.3f}  mean margin {d_va.mean():.2f}", flush=True)
