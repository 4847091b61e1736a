"""LIFT's principal-weight selection, held to a brute-force reference written from its definition."""

import math

import pytest
import torch

from nanoadam import NanoAdam
from nanoadam.selection import principal_scores


def brute_force_kept(w: torch.Tensor, rank: int, density: float, largest: bool = True) -> tuple[set, set]:
    """(entries that must be kept, entries that may be kept): the rank-r SVD approximation in
    float64, every entry scored by its magnitude, the top k over the whole tensor (ties to the
    lower position). Entries within float32 rounding of the k-th score may go either way."""
    w64 = w.detach().double()
    if w64.ndim >= 2:
        matrix = w64.reshape(w64.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        approx = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in range(min(rank, s.numel())))
        scores = approx.abs().reshape(-1).tolist()
    else:
        scores = w64.abs().tolist()
    k = math.ceil(density * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i] if largest else scores[i], i))
    threshold = scores[order[k - 1]]
    tol = 1e-4 * max(abs(threshold), 1e-12)
    sure = {i for i in order[:k] if abs(scores[i] - threshold) > tol}
    possible = sure | {i for i, x in enumerate(scores) if abs(x - threshold) <= tol}
    return sure, possible


def kept_after_one_step(param: torch.Tensor, **kw) -> set:
    p = torch.nn.Parameter(param.clone())
    opt = NanoAdam([p], lr=1e-3, **kw)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    return set(torch.nonzero((p.detach() != before).reshape(-1)).reshape(-1).tolist()), opt, p


@pytest.mark.parametrize("shape", [(24, 40), (6, 3, 3, 3), (50,), (40, 24)])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("fused", [None, False])
def test_selection_is_the_brute_force_top_k_of_the_low_rank_approximation(shape, largest, fused):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape)
    selection = "principal_weights" if largest else "principal_weights_smallest"
    kept, opt, _ = kept_after_one_step(w, density=0.1, principal_rank=3, selection=selection, fused=fused)
    sure, possible = brute_force_kept(w, 3, 0.1, largest)
    assert len(kept) == math.ceil(0.1 * w.numel())
    assert sure <= kept <= possible


def test_selection_is_over_the_whole_tensor_not_per_chunk():
    # A rank-1 matrix whose mass sits on its first rows: its principal weights all lie there, far
    # more than any per-chunk quota would allow in the first chunk.
    u = torch.zeros(64)
    u[:4] = torch.tensor([8.0, 7.0, 6.0, 5.0])
    u[4:] = 0.01
    w = torch.outer(u, torch.linspace(1, 2, 128)) + 1e-4 * torch.randn(64, 128)
    kept, opt, p = kept_after_one_step(w, density=0.05, principal_rank=1, selection="principal_weights",
                                       chunk_size=256)
    rows = {i // 128 for i in kept}
    assert rows <= {0, 1, 2, 3}
    assert len(kept) == math.ceil(0.05 * w.numel())
    state = opt.state[p]
    assert state["index"].dtype == torch.int32 and int(state["mask_chunk_size"]) == w.numel()


def test_ties_go_to_the_lower_position():
    kept, _, _ = kept_after_one_step(torch.ones(30), density=0.2, selection="principal_weights")
    assert kept == set(range(6))


def test_principal_scores_of_a_vector_are_its_magnitudes():
    v = torch.randn(17)
    assert torch.equal(principal_scores(v, 4), v.abs())


def test_kernel_update_matches_the_reference_over_many_steps_with_refreshes():
    torch.manual_seed(0)
    shapes = [(48, 96), (96,), (5000,)]
    runs = []
    for fused in (None, False):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = NanoAdam(params, lr=1e-2, density=0.1, mask_interval=7, selection="principal_weights",
                       principal_rank=4, state_dtype=torch.float32, fused=fused)
        gen = torch.Generator().manual_seed(2)
        for _ in range(40):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_keeps_the_whole_tensor_layout():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(80, 70))
    opt = NanoAdam([p], lr=1e-3, selection="principal_weights", mask_interval=3)
    for _ in range(4):
        p.grad = torch.randn_like(p)
        opt.step()
    saved = opt.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    other = NanoAdam([q], lr=1e-3, selection="principal_weights", mask_interval=3)
    other.load_state_dict(saved)
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    assert torch.equal(p, q)


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="principal_rank"):
        NanoAdam([torch.nn.Parameter(torch.randn(3, 3))], selection="principal_weights", principal_rank=0)
