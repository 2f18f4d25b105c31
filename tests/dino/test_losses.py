"""DINO, iBOT and KoLeo losses against hand computations (single process and 2-rank gloo)."""


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_sinkhorn(logits, temp, n_iterations):
    """Textbook SwAV Sinkhorn-Knopp in float64 (prototypes x samples)."""
    Q = np.exp(logits / temp).T
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(1, keepdims=True) * K
        Q /= Q.sum(0, keepdims=True) * B
    return (Q * B).T


# ---------------------------------------------------------------- DINOLoss
def test_dino_loss_equals_hand_cross_entropy():
    loss_fn = DINOLoss(out_dim=5, student_temp=0.1)
    students = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    teachers = [torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1) for _ in range(2)]
    expected = 0.0
    for s in students:
        lsm = _np_log_softmax(s.numpy() / 0.1)
        for t in teachers:
            expected -= (t.numpy() * lsm).sum(-1).mean()
    got = loss_fn(students, teachers)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_dino_loss_gradient_reaches_student_only():
    loss_fn = DINOLoss(out_dim=4)
    s = torch.randn(2, 4, requires_grad=True)
    loss_fn([s], [torch.softmax(torch.randn(2, 4), -1)]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_center_is_buffer_and_update_is_lazy_with_momentum():
    loss_fn = DINOLoss(out_dim=4, center_momentum=0.9)
    assert "center" in dict(loss_fn.named_buffers())
    t1, t2 = torch.randn(6, 4), torch.randn(6, 4)

    # zero centre: plain sharpened softmax
    torch.testing.assert_close(loss_fn.softmax_center_teacher(t1, 0.05), torch.softmax(t1 / 0.05, -1))
    loss_fn.update_center(t1)
    assert torch.equal(loss_fn.center, torch.zeros(1, 4)), "update must wait for the next use"
    out = loss_fn.softmax_center_teacher(t2, 0.05)
    c1 = 0.1 * t1.mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, c1)
    torch.testing.assert_close(out, torch.softmax((t2 - c1) / 0.05, -1))

    loss_fn.update_center(t2)
    # a checkpoint taken while an update is pending contains it
    saved = loss_fn.state_dict()["center"]
    c2 = 0.9 * c1 + 0.1 * t2.mean(0, keepdim=True)
    torch.testing.assert_close(saved, c2)
    loss_fn.softmax_center_teacher(t2, 0.05)  # applying again is a no-op
    torch.testing.assert_close(loss_fn.center, c2)


def test_sinkhorn_rows_are_distributions_and_prototypes_balanced():
    loss_fn = DINOLoss(out_dim=16)
    logits = torch.randn(12, 16) * 0.5
    q = loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp=0.1, n_iterations=3)
    torch.testing.assert_close(q.sum(-1), torch.ones(12))
    assert (q >= 0).all()
    np.testing.assert_allclose(q.double().numpy(), _np_sinkhorn(logits.double().numpy(), 0.1, 3), rtol=1e-4, atol=1e-7)

    # More iterations: prototype marginal is uniform (each prototype gets B/K of the mass),
    # far more balanced than the plain softmax.
    q_many = loss_fn.sinkhorn_knopp_teacher(logits, teacher_temp=0.1, n_iterations=200)
    torch.testing.assert_close(q_many.sum(0), torch.full((16,), 12 / 16), rtol=1e-3, atol=1e-3)
    softmax_spread = torch.softmax(logits / 0.1, -1).sum(0).std()
    assert q.sum(0).std() < softmax_spread


def test_sinkhorn_divides_contiguous_tensors_and_matches_the_transposed_form():
    """Regression (H200 trace, 5cfd683): iterating on the transposed view, as SwAV writes it, made each in-place
    broadcast divide a strided kernel, 0.5 ms a call at (128, 65536): 12 ms of GPU time per DINOv2 step. The
    iteration now runs on the contiguous (samples, prototypes) layout, with the same sums and divisions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dino.loss.dino_clstoken_loss import sinkhorn_knopp

    logits = torch.randn(12, 64)
    strided = []

    class InPlace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.div_, torch.ops.aten.mul_) and not args[0].is_contiguous():
                strided.append(str(func))
            return func(*args, **(kwargs or {}))

    with InPlace():
        q = sinkhorn_knopp(logits, 0.1, 12, n_iterations=3)
    assert not strided and q.is_contiguous()
    # SwAV's transposed iteration, spelled out
    Q = torch.exp(logits / 0.1 - (logits / 0.1).max()).t()
    Q /= Q.sum()
    for _ in range(3):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= 64
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= 12
    torch.testing.assert_close(q, (Q * 12).t())  # the same operations in another order of memory


def test_sinkhorn_forms_the_assignment_matrix_from_scaling_vectors():
    """Regression (H200 trace, 26a83a3): rescaling the (n, K) matrix in place, twice per iteration, took 25 ops
    over it (10 ms of a DINOv2 step at iBOT's masked patches x 65536 prototypes). With scaling vectors it is
    written once, read twice per iteration and rescaled at the end; the matrix-vector products run in fp32
    with autocast off."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dino.loss.dino_clstoken_loss import sinkhorn_knopp

    n, K = 12, 64
    logits = torch.randn(n, K)
    passes, autocast_in_mv = [], []
    metadata_only = {torch.ops.aten.t, torch.ops.aten.new_ones, torch.ops.aten.view, torch.ops.aten.unsqueeze,
                     torch.ops.aten.expand, torch.ops.aten.slice}

    class Passes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            full = [a for a in list(args) + [out] if isinstance(a, torch.Tensor) and a.numel() == n * K]
            if full and func.overloadpacket not in metadata_only:
                passes.append(str(func))
            if func.overloadpacket == torch.ops.aten.mv:
                autocast_in_mv.append(torch.is_autocast_enabled("cpu"))
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), Passes():
        q = sinkhorn_knopp(logits, 0.1, n, n_iterations=3)
    assert len(passes) <= 12, passes  # the rescaling form: 25, most of them reading and writing it
    assert autocast_in_mv and not any(autocast_in_mv)
    assert q.dtype == torch.float32
    np.testing.assert_allclose(q.double().numpy(), _np_sinkhorn(logits.double().numpy(), 0.1, 3), rtol=1e-5, atol=1e-8)
    # no iterations: the normalised exponentials, rows summing to n / total mass
    q0 = sinkhorn_knopp(logits, 0.1, n, n_iterations=0)
    e = torch.exp(logits.double() / 0.1)
    torch.testing.assert_close(q0.double(), e / e.sum() * n, rtol=1e-5, atol=1e-9)


def test_sinkhorn_invariant_to_logit_shift_and_finite_for_large_logits():
    loss_fn = DINOLoss(out_dim=8)
    logits = torch.randn(5, 8)
    q = loss_fn.sinkhorn_knopp_teacher(logits, 0.04)
    # exp(30 / 0.04) overflows fp32: the global shift keeps the result identical and finite
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(logits + 30.0, 0.04), q)
    assert loss_fn.sinkhorn_knopp_teacher(logits.half(), 0.04).dtype == torch.float32


# ---------------------------------------------------------------- iBOTPatchLoss
def _masked_batch(K=6):
    masks = torch.tensor(
        [[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool
    )  # 3, 0 and 1 masked patches
    s_full = torch.randn(3, 5, K, dtype=torch.float64)
    t_full = torch.softmax(torch.randn(3, 5, K, dtype=torch.float64), -1)
    return masks, s_full, t_full


def test_ibot_forward_masked_matches_manual_weighting():
    loss_fn = iBOTPatchLoss(patch_out_dim=6, student_temp=0.1)
    masks, s_full, t_full = _masked_batch()
    s, t = s_full[masks], t_full[masks]
    ce = (t.numpy() * _np_log_softmax(s.numpy() / 0.1)).sum(-1)  # one per masked token
    weights = np.array([1 / 3, 1 / 3, 1 / 3, 1.0])  # image 0 has 3 masked, image 2 has 1
    expected = -(ce * weights).sum() / 3  # divided by the number of images, including the unmasked one
    got = loss_fn.forward_masked(s, t, masks)
    assert got.item() == pytest.approx(expected, rel=1e-6)  # weights are computed in fp32

    # the full-grid forward gives the same number
    assert loss_fn(s_full, t_full, masks).item() == pytest.approx(expected, rel=1e-6)

    # padded rows beyond n_masked_patches are ignored; explicit masks_weight is used as given
    pad = torch.randn(2, 6, dtype=torch.float64)
    got_padded = loss_fn.forward_masked(
        torch.cat([s, pad]), torch.cat([t, torch.softmax(pad, -1)]), masks,
        n_masked_patches=4, masks_weight=torch.tensor(weights),
    )
    assert got_padded.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="n_masked_patches"):
        loss_fn.forward_masked(torch.cat([s, pad]), torch.cat([t, torch.softmax(pad, -1)]), masks)


def test_ibot_centering_and_update_center_shapes():
    loss_fn = iBOTPatchLoss(patch_out_dim=4, center_momentum=0.9)
    assert loss_fn.center.shape == (1, 1, 4)
    grid = torch.randn(2, 3, 4)
    loss_fn.update_center(grid)  # (B, N, K): per-image token mean, then image mean
    out = loss_fn.softmax_center_teacher(grid, 0.07)
    c1 = 0.1 * grid.mean(1).mean(0).view(1, 1, 4)
    torch.testing.assert_close(loss_fn.center, c1)
    torch.testing.assert_close(out, torch.softmax((grid - c1) / 0.07, -1))

    tokens = torch.randn(7, 4)  # (n_masked, K): mean over tokens
    loss_fn.update_center(tokens)
    loss_fn.apply_center_update()
    torch.testing.assert_close(loss_fn.center, 0.9 * c1 + 0.1 * tokens.mean(0).view(1, 1, 4))


def test_ibot_sinkhorn_uses_masked_count_and_leaves_it_untouched():
    loss_fn = iBOTPatchLoss(patch_out_dim=8)
    logits = torch.randn(9, 8)
    n = torch.tensor([9])
    q = loss_fn.sinkhorn_knopp_teacher(logits, 0.07, n_masked_patches_tensor=n, n_iterations=3)
    assert n.item() == 9
    torch.testing.assert_close(q.sum(-1), torch.ones(9))
    np.testing.assert_allclose(q.double().numpy(), _np_sinkhorn(logits.double().numpy(), 0.07, 3), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- KoLeoLoss
def test_koleo_equals_brute_force_nearest_neighbour():
    x = torch.randn(10, 8)
    xn = x / x.norm(dim=-1, keepdim=True)
    d = torch.cdist(xn.double(), xn.double())
    d.fill_diagonal_(float("inf"))
    expected = -torch.log(d.min(1).values + 1e-8).mean()
    got = KoLeoLoss()(x)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    # bf16 input is computed in fp32
    assert KoLeoLoss()(x.bfloat16()).dtype == torch.float32


def test_koleo_lower_for_spread_points_than_clustered():
    spread = torch.randn(32, 16)
    clustered = torch.randn(1, 16) + 0.05 * torch.randn(32, 16)
    koleo = KoLeoLoss()
    assert koleo(spread) < koleo(clustered)


def test_koleo_rejects_single_sample():
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 4))


# ---------------------------------------------------------------- distributed (gloo)
def _gloo_worker(rank, world_size, init_file, logits, tokens, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        mine = logits.chunk(world_size)[rank]
        dino_loss = DINOLoss(out_dim=logits.shape[1])
        q = dino_loss.sinkhorn_knopp_teacher(mine, 0.1, n_iterations=3)
        dino_loss.update_center(mine)
        dino_loss.apply_center_update()

        # uneven masked-token counts per rank: 2 on rank 0, 5 on rank 1
        my_tokens = tokens[:2] if rank == 0 else tokens[2:]
        ibot = iBOTPatchLoss(patch_out_dim=tokens.shape[1])
        q_ibot = ibot.sinkhorn_knopp_teacher(my_tokens, 0.1, torch.tensor([len(my_tokens)]), n_iterations=3)
        ibot.update_center(my_tokens)
        ibot.apply_center_update()
        results[rank] = (q, dino_loss.center.clone(), q_ibot, ibot.center.clone())
    finally:
        dist.destroy_process_group()


def test_gloo_two_ranks_match_single_process(tmp_path):
    logits = torch.randn(8, 6)
    tokens = torch.randn(7, 6)
    with mp.Manager() as manager:
        results = manager.dict()
        # fork, not spawn: children need no fresh torch import (seconds instead of tens)
        args = (2, str(tmp_path / "init"), logits, tokens, results)
        mp.start_processes(_gloo_worker, args=args, nprocs=2, join=True, start_method="fork")
        results = dict(results)

    ref = DINOLoss(out_dim=6)
    q_ref = ref.sinkhorn_knopp_teacher(logits, 0.1, n_iterations=3)
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), q_ref)
    for rank in range(2):
        torch.testing.assert_close(results[rank][1], 0.1 * logits.mean(0, keepdim=True))

    ibot_ref = iBOTPatchLoss(patch_out_dim=6)
    q_ibot_ref = ibot_ref.sinkhorn_knopp_teacher(tokens, 0.1, torch.tensor([7]), n_iterations=3)
    torch.testing.assert_close(torch.cat([results[0][2], results[1][2]]), q_ibot_ref)
    for rank in range(2):
        # the centre is the mean over all 7 tokens, though ranks hold 2 and 5
        torch.testing.assert_close(results[rank][3], 0.1 * tokens.mean(0).view(1, 1, 6))
