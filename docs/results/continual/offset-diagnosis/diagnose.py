# Vision continual: task 1 after task 2 with its old head, with the head's offset refit, and with a
# linear probe refit on the body's features (the input of fc), at each method's tuned rates.
import copy, sys, torch
from nanoadam_lab.experiments.continual import ContinualConfig, Digits, pretrain, train_stage
from nanoadam_lab.experiments.refit import LinearProbe, refit_offset
from nanoadam_lab.experiments.glue_data import compute_metrics, TASKS

torch.set_num_threads(1)
cfg = ContinualConfig()
data = Digits(cfg)
pre = pretrain(data, cfg)
rates = {"adamw": (1e-3, {"similar": 3e-4, "dissimilar": 1e-3}),
         "nanoadam-1%": (0.09, {"similar": 0.01, "dissimilar": 0.09}),
         "head-only": (None, None)}

@torch.no_grad()
def views(model, idx):
    model.eval()
    x = data.tasks["task1"][0][torch.tensor(idx)]
    feats = model.neck(model.features(x)); logits = model.fc(feats)
    model.train()
    return logits, feats

def three(model, head):
    m = copy.deepcopy(model); m.fc = head
    (lf, ff), (lt, ft) = views(m, data.fit), views(m, data.test)
    yf, yt = data.y[torch.tensor(data.fit)], data.y[torch.tensor(data.test)]
    old = float((lt.argmax(1) == yt).float().mean())
    off = float(((lt + refit_offset(lf, yf)).argmax(1) == yt).float().mean())
    probe = float((LinearProbe(ff, yf, 5).logits(ft).argmax(1) == yt).float().mean())
    return old, off, probe

seeds = [int(s) for s in sys.argv[1:]] or [0]
for method, (lr1, lr2s) in rates.items():
    lr1 = lr1 or 3e-3
    for seed in seeds:
        m1 = copy.deepcopy(pre)
        r = train_stage(m1, data, "task1", method, lr1 if method != "head-only" else 0.03, seed, cfg)
        head1 = copy.deepcopy(m1.fc)
        before = three(m1, head1)
        for kind in ("similar", "dissimilar"):
            m2 = copy.deepcopy(m1)
            lr2 = lr2s[kind] if lr2s else 0.03
            train_stage(m2, data, kind, method, lr2, seed, cfg)
            after = three(m2, head1)
            print(method, seed, kind, "before old/offset/probe", [round(100 * v, 1) for v in before],
                  "after", [round(100 * v, 1) for v in after], flush=True)
