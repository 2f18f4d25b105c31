"""DINO loss on the [CLS] token.

Self-distillation with no labels (DINO, Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers"), as used by DINOv2 (Oquab et al. 2023, "DINOv2:
Learning Robust Visual Features without Supervision"). The teacher distribution is made
either by centering + sharpening (DINO) or by Sinkhorn-Knopp normalisation (SwAV, Caron
et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments"), which the MV_Hybrid paper uses.

This module also holds the two pieces shared with ``iBOTPatchLoss``: the Sinkhorn-Knopp
normalisation and the lazily all-reduced EMA centre.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mambavision.amp import autocast_off


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations=3):
    """Turn teacher logits (n_local, K) into soft assignments whose rows sum to 1.

    ``n_samples`` is the number of rows over all ranks (a number or a 0-d/1-element
    tensor). Prototype marginals are pushed towards uniform over the global batch; sums
    are all-reduced when torch.distributed is initialised.

    SwAV and DINOv2 rescale the whole (K, n) matrix in place, twice per iteration. Every
    iterate is diag(r) E diag(c) with E = exp(logits): the column and row normalisations
    only set c and r. So E is written once, each iteration is two matrix-vector products
    over it, and Q is formed at the end: about a third of the memory traffic, which
    dominates at iBOT's (masked patches x 65536 prototypes), 10 ms of a DINOv2 step's GPU
    time on an H200 in the rescaling form (trace at 26a83a3).
    """
    # fp32 throughout: under autocast torch.mv would run in bf16
    with autocast_off(teacher_output.device.type):
        logits = teacher_output.float() / teacher_temp
        # Subtracting one global constant leaves the result unchanged (Q is renormalised
        # right away) but keeps exp() finite for any logit scale.
        shift = logits.max() if logits.numel() else logits.new_zeros(())
        if _distributed():
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        E = torch.exp_(logits - shift)  # (n_local, K): samples x prototypes, contiguous
        K = E.shape[1]
        B = torch.as_tensor(n_samples, dtype=E.dtype, device=E.device).reshape(())
        if n_iterations == 0:
            total = E.sum()
            if _distributed():
                dist.all_reduce(total)
            return E.mul_(B / total)
        r = E.new_ones(E.shape[0])
        for _ in range(n_iterations):
            # each prototype gets total mass 1/K (the column sums of diag(r) E, over all ranks) ...
            col = torch.mv(E.t(), r)
            if _distributed():
                dist.all_reduce(col)
            c = (col * K).reciprocal_()
            # ... and each sample total mass 1/B
            r = (torch.mv(E, c) * B).reciprocal_()
        # rows sum to 1: one assignment per sample
        return E.mul_((r * B)[:, None]).mul_(c[None, :])


def _apply_pending_center_update(module, prefix, keep_vars):
    module.apply_center_update()


class _EMACenterMixin:
    """EMA centre whose batch statistic is all-reduced asynchronously.

    ``update_center`` starts the reduction; it is waited on and folded into the ``center``
    buffer at the next ``apply_center_update`` (i.e. the next ``softmax_center_teacher``
    call), so communication overlaps the backward pass. The number of rows is reduced in
    the same message, so ranks may contribute different counts.
    """

    def _init_center(self, shape, center_momentum):
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*shape))
        self.updated = True
        self.reduce_handle = None
        self.async_batch_center = None  # (1, K + 1): row-sum of the batch, then its row count
        # A checkpoint must include an update that is still pending.
        self.register_state_dict_pre_hook(_apply_pending_center_update)

    @torch.no_grad()
    def _start_center_update(self, rows):
        """rows: (n, K) vectors whose mean is this batch's centre."""
        self.updated = False
        count = torch.full((1, 1), float(rows.shape[0]), device=rows.device)
        batch_sum = torch.sum(rows, dim=0, keepdim=True, dtype=torch.float32)
        self.async_batch_center = torch.cat([batch_sum, count], dim=1)
        self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True) if _distributed() else None

    @torch.no_grad()
    def apply_center_update(self):
        """Fold a pending batch centre into ``center`` (no-op if none is pending)."""
        if self.updated:
            return
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None
        batch_sum, count = self.async_batch_center[:, :-1], self.async_batch_center[:, -1:]
        batch_center = (batch_sum / count.clamp(min=1.0)).reshape(self.center.shape)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
        self.async_batch_center = None
        self.updated = True


class DINOLoss(_EMACenterMixin, nn.Module):
    """Cross-entropy between teacher and student [CLS] prototype distributions.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum of the teacher centre (``centering`` mode only).
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self._init_center((1, out_dim), center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        """DINO teacher targets: softmax((t - center) / teacher_temp), after any pending update."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        """SwAV-style teacher targets for (B, K) logits; the batch is global over ranks."""
        world_size = dist.get_world_size() if _distributed() else 1
        return sinkhorn_knopp(teacher_output, teacher_temp, teacher_output.shape[0] * world_size, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """-sum over (student, teacher) pairs of mean_b sum_k t * log_softmax(s / student_temp)."""
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss = total_loss - torch.sum(t * lsm, dim=-1).mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """Start the (async) centre update from (B, K) teacher logits; applied at next use."""
        self._start_center_update(teacher_output.reshape(-1, teacher_output.shape[-1]))
