"""KoLeo regulariser.

The Kozachenko-Leonenko differential-entropy estimator used as a loss to spread features
uniformly (Sablayrolles et al. 2019, "Spreading vectors for similarity search"), applied
to the student [CLS] features by DINOv2 (Oquab et al. 2023).
"""

import torch
import torch.nn.functional as F
from torch import nn
from mambavision.amp import autocast_off


class KoLeoLoss(nn.Module):
    """-mean_i log(||x_i - x_nn(i)|| + eps) on L2-normalised rows, computed in fp32."""

    def pairwise_NNs_inner(self, x):
        """Index of each row's nearest other row, for L2-normalised rows (max inner product)."""
        dots = x @ x.t()
        dots.fill_diagonal_(float("-inf"))  # a row is never its own neighbour
        return torch.argmax(dots, dim=1)

    def forward(self, student_output, eps=1e-8):
        """student_output: (B, D) features, B >= 2."""
        if student_output.dim() != 2 or student_output.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs a (B, D) batch with B >= 2 (a nearest neighbour must exist), "
                f"got shape {tuple(student_output.shape)}"
            )
        # Autocast off: a half-precision log of tiny distances is meaningless.
        with autocast_off(student_output.device.type):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            nn_index = self.pairwise_NNs_inner(x)
            distances = F.pairwise_distance(x, x[nn_index], p=2, eps=eps)
            return -torch.log(distances + eps).mean()
