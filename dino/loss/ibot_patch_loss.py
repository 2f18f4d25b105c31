"""iBOT masked-patch loss.

Masked image modelling with an online tokenizer (iBOT, Zhou et al. 2022, "iBOT: Image BERT
Pre-Training with Online Tokenizer"): the student sees masked patches and matches the
teacher's prototype distribution for those patches, as used by DINOv2 (Oquab et al. 2023).
Teacher targets come from centering (DINO, Caron et al. 2021) or Sinkhorn-Knopp
(SwAV, Caron et al. 2020).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .dino_clstoken_loss import _distributed, _EMACenterMixin, sinkhorn_knopp


def _patch_cross_entropy(t, s, temp):
    """sum_k t * log_softmax(s / temp) over the last dim (the xformers fused kernel is not used)."""
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


class iBOTPatchLoss(_EMACenterMixin, nn.Module):
    """Cross-entropy between teacher and student patch-token prototype distributions.

    Args:
        patch_out_dim: number of patch prototypes K.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum of the teacher centre (``centering`` mode only).
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self._init_center((1, 1, patch_out_dim), center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        """iBOT teacher targets: softmax((t - center) / teacher_temp), after any pending update."""
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        """SwAV-style targets for (n_masked, K) teacher logits of the masked patches.

        ``n_masked_patches_tensor`` is this rank's number of masked patches; it is summed
        over ranks (on a copy: the caller's tensor is left untouched).
        """
        n_total = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device).reshape(-1)[:1].clone()
        if _distributed():
            dist.all_reduce(n_total)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_total, n_iterations)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """Loss over full (B, N, K) token grids; each image's masked patches averaged, then images averaged."""
        loss = _patch_cross_entropy(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        masks = student_masks_flat.float()
        loss = torch.sum(loss * masks, dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked,
        teacher_patch_tokens_masked,
        student_masks_flat,
        n_masked_patches=None,
        masks_weight=None,
    ):
        """Loss over the gathered masked tokens (n, K), n = all masked patches of the batch.

        Each image's masked patches are weighted 1/#masked (``masks_weight``, computed from
        ``student_masks_flat`` if not given), the weighted sum is divided by the number of
        images. ``n_masked_patches`` drops padding rows beyond the real masked tokens.
        """
        loss = _patch_cross_entropy(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        if loss.shape[0] != masks_weight.shape[0]:
            raise ValueError(
                f"iBOTPatchLoss.forward_masked: {loss.shape[0]} masked-token losses but "
                f"{masks_weight.shape[0]} mask weights; pass n_masked_patches to drop padding rows"
            )
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        """Start the (async) centre update; applied at next use.

        (B, N, K) input: mean over each image's tokens, then over images (as DINOv2).
        (n, K) input (gathered masked tokens): mean over the tokens.
        """
        if teacher_patch_tokens.dim() == 3:
            rows = teacher_patch_tokens.float().mean(1)
        else:
            rows = teacher_patch_tokens.reshape(-1, teacher_patch_tokens.shape[-1])
        self._start_center_update(rows)
