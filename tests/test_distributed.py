"""NanoAdam under DDP and FSDP2 (CPU, gloo, 2 processes), and checkpoints through DCP."""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nanoadam import NanoAdam

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform != "linux", reason="needs torch.distributed")

WORLD = 2
STEPS = 6
# eps well above the gradients float rounding can perturb: DDP sums in another order than one process
KW = dict(lr=1e-2, density=0.25, mask_interval=2, chunk_size=16, weight_decay=0.01, eps=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 32))


def param_groups(model):
    from nanoadam import param_groups as groups

    return groups(model, head_names=())  # every Linear sparse: both are checked against the reference


def global_batch(step: int):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 32, generator=gen)


def local_batch(step: int, rank: int):
    x, y = global_batch(step)
    half = x.shape[0] // WORLD
    return x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]


def train_reference(steps):
    """One process, the whole global batch each step."""
    model = make_model()
    opt = NanoAdam(param_groups(model), **KW)
    for step in range(steps):
        x, y = global_batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def setup(rank, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def ddp_worker(rank, port):
    setup(rank, port)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = NanoAdam(param_groups(model), **KW)
        for step in range(STEPS):
            x, y = local_batch(step, rank)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        # every rank holds the same weights and optimizer state, bit for bit
        for p in model.parameters():
            gathered = [torch.empty_like(p) for _ in range(WORLD)]
            dist.all_gather(gathered, p.detach())
            assert torch.equal(gathered[0], gathered[1])
            for key, value in opt.state[p].items():
                raw = value.reshape(-1).view(torch.uint8)  # gloo gathers no bf16/int16: compare the bytes
                copies = [torch.empty_like(raw) for _ in range(WORLD)]
                dist.all_gather(copies, raw)
                assert torch.equal(copies[0], copies[1]), key
        # step in backward would update from unreduced gradients: refused, saying what to do
        with pytest.raises(RuntimeError, match="DDP all-reduces"):
            NanoAdam(param_groups(model), **KW).step_in_backward()
        # and equal to one process training on the global batches (up to float summation order)
        reference, ref_opt = train_reference(STEPS)
        for (name, p), q in zip(model.module.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
            if "index" in opt.state[p]:
                assert torch.equal(opt.state[p]["index"], ref_opt.state[q]["index"]), name
        dist.barrier()  # no rank tears gloo down while another still has work in flight
    finally:
        dist.destroy_process_group()


def fsdp_worker(rank, port, checkpoint_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    setup(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))

        def sharded():
            model = make_model()
            fully_shard(model, mesh=mesh)
            return model, NanoAdam(param_groups(model), **KW)

        def train(model, opt, start, stop):
            for step in range(start, stop):
                x, y = local_batch(step, rank)
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()

        model, opt = sharded()
        assert all(isinstance(p, DTensor) for p in model.parameters())
        with pytest.raises(RuntimeError, match="FSDP2"):
            opt.step_in_backward()
        train(model, opt, 0, STEPS // 2)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
        train(model, opt, STEPS // 2, STEPS)

        # Every shard is a multiple of chunk_size: sharded training equals unsharded training.
        reference, ref_opt = train_reference(STEPS)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
        sparse_state = opt.state[model[0].weight]
        assert isinstance(sparse_state["index"], DTensor) and sparse_state["index"].dtype == torch.int16
        assert sparse_state["exp_avg"].dtype == torch.bfloat16

        # Resume from the DCP checkpoint: bit-exact continuation.
        model2, opt2 = sharded()
        model_sd, optim_sd = get_state_dict(model2, opt2)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=checkpoint_dir)
        set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert opt2.param_groups[0]["step"] == STEPS // 2
        train(model2, opt2, STEPS // 2, STEPS)
        for (name, p), q in zip(model.named_parameters(), model2.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), name
            for key, value in opt.state[p].items():
                other = opt2.state[q][key]
                assert torch.equal(value.to_local() if isinstance(value, DTensor) else value,
                                   other.to_local() if isinstance(other, DTensor) else other), (name, key)
        # No rank tears gloo down while another still has work in flight: a rank that did once
        # aborted in gloo's teardown ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_and_match_single_process():
    torch.multiprocessing.spawn(ddp_worker, args=(free_port(),), nprocs=WORLD)


def test_fsdp2_matches_unsharded_and_resumes_from_dcp(tmp_path):
    torch.multiprocessing.spawn(fsdp_worker, args=(free_port(), str(tmp_path / "ckpt")), nprocs=WORLD)
