"""python benchmarks/gpu.py [--out gpu.json]: NanoAdam's Triton kernels on one CUDA GPU.

Parameters are shaped like a LLaMA-style decoder of about 1.1 B entries (TinyLlama-1.1B: hidden
2048, 22 layers, feed-forward 5632, grouped-query attention with 4 key/value heads of 64,
vocabulary 32000, untied embedding and head), with fixed random gradients. Every matrix is
sparse (NanoAdam), the RMSNorm weights are dense (AdamW), as ``nanoadam.param_groups`` would do.

(i) Sparse update bandwidth. The Triton update over all sparse matrices at once, timed with CUDA
events (median over repeats). Bytes counted are the bytes the update has to move: per kept entry
its index (read) and both moments (read and written), plus every 32-byte memory sector of the
parameter (read and written) and of the gradient (read) that holds at least one kept entry.
Compared with a device-to-device copy (``Tensor.copy_``) moving as many bytes.

(ii) Step time. ``NanoAdam.step()`` at density 0.1, ``mask_interval`` 100, against
``torch.optim.AdamW(fused=True)`` on the same parameters. A plain step (update only) and a
refresh step (mask refresh + update, timed with ``mask_interval=1``) are measured separately; the
amortized NanoAdam step is ``(refresh + (interval - 1) * plain) / interval``. Each figure is the
median over repeats of one ``step()`` call between two device synchronizations, so host overhead
counts.

Needs a CUDA device and Triton (``pip install 'nanoadam[gpu]'``); fails with one line otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama_shapes(vocab=32000, hidden=2048, layers=22, ffn=5632, kv_dim=256) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, sparse) of every parameter of a LLaMA-style decoder (TinyLlama-1.1B by default)."""
    shapes = [((vocab, hidden), True)]
    for _ in range(layers):
        shapes += [((hidden,), False)]  # input RMSNorm
        shapes += [((hidden, hidden), True), ((kv_dim, hidden), True), ((kv_dim, hidden), True),
                   ((hidden, hidden), True)]  # q, k, v, o
        shapes += [((hidden,), False)]  # post-attention RMSNorm
        shapes += [((ffn, hidden), True), ((ffn, hidden), True), ((hidden, ffn), True)]  # gate, up, down
    shapes += [((hidden,), False), ((vocab, hidden), True)]  # final norm, lm head
    return shapes


class Timer:
    """Milliseconds of ``fn()`` between two synchronizations: CUDA events on a GPU, the host clock
    elsewhere (only for trying the script out with the Triton interpreter)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def median(self, fn, repeats: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self(fn) for _ in range(repeats))


def make_params(shapes, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape, sparse in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                               .mul_(0.02).to(dtype))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(1e-3).to(dtype)
        p.sparse_group = sparse
        params.append(p)
    return params


def touched_sectors(positions: torch.Tensor, element_size: int, sector: int = 32) -> int:
    s = positions * element_size // sector  # ascending
    return int((s[1:] != s[:-1]).sum()) + 1 if s.numel() else 0


def update_terms(params, lr, step=10):
    """The per-tensor terms of one update: every entry in a cohort born at step 1."""
    from nanoadam.cohorts import bias_table, new_table
    from nanoadam.masks import UpdateTerms

    bias = bias_table(tuple([1] + new_table().tolist()[1:]), step, lr, (0.9, 0.999))
    return [UpdateTerms(bias, i, step, False, 0) for i in range(len(params))]


def refresh_terms(params):
    from nanoadam.masks import RefreshTerms

    return [RefreshTerms(0, None, 1, 2, 0) for _ in params]


def check_kernels(device) -> None:
    """A quick correctness check of both kernels against the eager reference on this device."""
    from nanoadam import functional
    from nanoadam import triton_kernels as tk
    from nanoadam.selection import ChunkLayout, chunk_bottomk, pack_index, selection_keys

    gen = torch.Generator(device=device).manual_seed(1)
    numel = 1_000_003
    layout = ChunkLayout.build(numel, 4096, 0.1)
    param = torch.randn(numel, generator=gen, device=device)
    grad = torch.randn(numel, generator=gen, device=device)
    positions = tk.chunk_bottomk_triton(param, layout, "small_weights")
    if not torch.equal(positions, chunk_bottomk(selection_keys(param, "small_weights"), layout)):
        raise SystemExit("check failed: chunk_bottomk_triton differs from the reference")
    index = pack_index(positions, torch.zeros_like(positions, dtype=torch.long), layout)
    masks = [functional.Mask(index, torch.full((layout.kept,), 1e-3, device=device).bfloat16(),
                             torch.full((layout.kept,), 1e-6, device=device).bfloat16(), layout) for _ in range(2)]
    ref, got = param.clone(), param.clone()
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    terms = update_terms([param], hyper["lr"])
    functional._reference_sparse_adamw(ref, grad, masks[0], terms[0], **hyper)
    tk.sparse_adamw_triton([got], [grad], [masks[1]], terms, **hyper)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    same = (masks[1].exp_avg_sq == masks[0].exp_avg_sq).float().mean().item()
    if same < 0.999:  # the same random bits: stochastic rounding agrees but where float32 values differ
        raise SystemExit(f"check failed: bf16 moments agree on {same:.4f} of entries only")


def bench_update(params, args, timer, device) -> dict:
    from nanoadam import triton_kernels as tk
    from nanoadam.selection import ChunkLayout, global_positions

    sparse = [p for p in params if p.sparse_group]
    flat = [p.detach().view(-1) for p in sparse]
    grads = [p.grad.view(-1) for p in sparse]
    layouts = [ChunkLayout.build(p.numel(), args.chunk_size, args.density) for p in sparse]
    kw = dict(selection="small_weights", state_dtype=DTYPES[args.state_dtype])
    masks = tk.refresh_triton(flat, grads, [None] * len(sparse), layouts, refresh_terms(flat), **kw)
    for m in masks:
        m.exp_avg_sq.fill_(1e-6)  # ordinary entries: every step reads and writes both moments
    refresh_ms = timer.median(lambda: tk.refresh_triton(flat, grads, masks, layouts, refresh_terms(flat), **kw),
                              args.repeats)

    moved, kept = 0, 0
    for p, m in zip(flat, masks):
        at = global_positions(m.index, m.layout)
        moved += m.layout.kept * (m.index.element_size() + 4 * m.exp_avg.element_size())
        moved += touched_sectors(at, p.element_size()) * 32 * 3  # param read + written, grad read
        kept += m.layout.kept
    hyper = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    terms = update_terms(flat, hyper["lr"])
    update_ms = timer.median(lambda: tk.sparse_adamw_triton(flat, grads, masks, terms, **hyper), args.repeats)

    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = timer.median(lambda: dst.copy_(src), args.repeats)
    update_gbs = moved / update_ms / 1e6
    copy_gbs = 2 * (moved // 2) / copy_ms / 1e6
    print(f"sparse update: {kept / 1e6:.1f} M kept entries, {moved / 1e9:.2f} GB moved in {update_ms:.3f} ms "
          f"= {update_gbs:.0f} GB/s; device copy {copy_gbs:.0f} GB/s; ratio {update_gbs / copy_gbs:.2f}")
    print(f"refresh (Triton bottom-k + moment carry-over, all sparse tensors): {refresh_ms:.2f} ms")
    return dict(kept_entries=kept, bytes_moved=moved, update_ms=update_ms, update_gb_per_s=update_gbs,
                copy_ms=copy_ms, copy_gb_per_s=copy_gbs, bandwidth_ratio=update_gbs / copy_gbs,
                refresh_ms=refresh_ms)


def bench_steps(params, args, timer) -> dict:
    from nanoadam import NanoAdam

    groups = [{"params": [p for p in params if p.sparse_group]},
              {"params": [p for p in params if not p.sparse_group], "sparse": False}]
    kw = dict(lr=1e-5, density=args.density, chunk_size=args.chunk_size, state_dtype=DTYPES[args.state_dtype])

    opt = NanoAdam(groups, mask_interval=args.mask_interval, **kw)
    opt.step()  # the first refresh (and the kernels' compilation)
    plain = []
    while len(plain) < args.repeats:
        t = opt.param_groups[0]["step"] + 1
        ms = timer(opt.step)
        if (t - 1) % args.mask_interval:
            plain.append(ms)
    plain_ms = statistics.median(plain)
    state_bytes = opt.state_bytes()
    del opt

    opt = NanoAdam(groups, mask_interval=1, **kw)
    refresh_ms = timer.median(opt.step, max(3, args.repeats // 4))
    del opt
    amortized_ms = (refresh_ms + (args.mask_interval - 1) * plain_ms) / args.mask_interval

    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    adamw_ms = timer.median(opt.step, args.repeats)
    adamw_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor))
    del opt

    print(f"NanoAdam step: plain {plain_ms:.2f} ms, with refresh {refresh_ms:.2f} ms, amortized "
          f"(1 refresh / {args.mask_interval}) {amortized_ms:.2f} ms")
    print(f"AdamW(fused=True) step: {adamw_ms:.2f} ms; NanoAdam / AdamW: plain {plain_ms / adamw_ms:.2f}x, "
          f"amortized {amortized_ms / adamw_ms:.2f}x; state {state_bytes / 2**30:.2f} GiB vs "
          f"{adamw_state / 2**30:.2f} GiB")
    return dict(nanoadam_plain_ms=plain_ms, nanoadam_refresh_step_ms=refresh_ms, nanoadam_amortized_ms=amortized_ms,
                adamw_fused_ms=adamw_ms, plain_ratio=plain_ms / adamw_ms, amortized_ratio=amortized_ms / adamw_ms,
                nanoadam_state_bytes=state_bytes, adamw_state_bytes=adamw_state)


def run(args, device: torch.device) -> dict:
    import triton

    from nanoadam import triton_kernels as tk

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    shapes = llama_shapes(hidden=args.hidden, layers=args.layers, ffn=args.ffn, vocab=args.vocab,
                          kv_dim=args.kv_dim)
    numel = sum(torch.Size(s).numel() for s, _ in shapes)
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; "
          f"{numel / 1e9:.2f} B params ({args.param_dtype}), density {args.density}, chunk {args.chunk_size}, "
          f"moments {args.state_dtype}")
    check_kernels(device)
    print("check: Triton kernels match the eager reference")
    timer = Timer(device)
    params = make_params(shapes, DTYPES[args.param_dtype], device)
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__, params=numel,
                  config=vars(args), max_triton_chunk=tk.MAX_TRITON_CHUNK)
    result["update"] = bench_update(params, args, timer, device)
    result["step"] = bench_steps(params, args, timer)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--param-dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--state-dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--mask-interval", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--kv-dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    from nanoadam import triton_kernels as tk

    if not tk.triton_available():
        print("benchmarks/gpu.py needs Triton: pip install 'nanoadam[gpu]'", file=sys.stderr)
        return 2
    result = run(args, torch.device("cuda", torch.cuda.current_device()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
