"""Gated attention MIL (Ilse et al., 2018) with the Patho-Bench recipe, plus a Cox partial-likelihood loss.

Shared by :mod:`eval.mil` (slide classification / survival) and :mod:`eval.survival`
(ABMIL-pooled slide embeddings). Bags are ``(N, D)`` float tensors of patch features; one
bag is one slide. Training is on the device of the bags and deterministic for a seed on CPU.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class GatedABMIL(nn.Module):
    """Gated-attention MIL: ``h = MLP(x)``; ``a = softmax_N(w^T (tanh(V h) * sigmoid(U h)))``; ``z = sum_i a_i h_i``.

    ``forward(bag)`` takes one bag ``(N, D)`` (or ``(1, N, D)``) and returns ``(logits (n_out,),
    attention (n_heads, N))``. ``pool(bag)`` returns the slide embedding ``z`` (n_heads*hidden,).
    """

    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, dropout: float = 0.25, n_heads: int = 1):
        super().__init__()
        self.in_dim, self.n_out, self.hidden, self.n_heads = in_dim, n_out, hidden, n_heads
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.attn_v = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attn_u = nn.Sequential(nn.Linear(hidden, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attn_w = nn.Linear(hidden, n_heads)
        self.head = nn.Linear(hidden * n_heads, n_out)

    def _check(self, bag: torch.Tensor) -> torch.Tensor:
        if bag.dim() == 3 and bag.shape[0] == 1:
            bag = bag[0]
        if bag.dim() != 2 or bag.shape[1] != self.in_dim or bag.shape[0] == 0:
            raise ValueError(f"ABMIL expects one non-empty bag of shape (N, {self.in_dim}), got {tuple(bag.shape)}")
        return bag

    def attend(self, bag: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return ``(z (n_heads*hidden,), attention (n_heads, N))`` for one bag."""
        h = self.embed(self._check(bag))
        scores = self.attn_w(self.attn_v(h) * self.attn_u(h)).T  # (heads, N)
        attn = torch.softmax(scores, dim=1)
        return (attn @ h).reshape(-1), attn

    def pool(self, bag: torch.Tensor) -> torch.Tensor:
        return self.attend(bag)[0]

    def forward(self, bag: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z, attn = self.attend(bag)
        return self.head(z), attn


def cox_ph_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events.

    ``risk`` (B,) log-hazards; ``time`` (B,); ``event`` (B,) 1 = event, 0 = censored. The risk set of
    subject i is every j with ``time_j >= time_i``. Returns 0 (with a graph) if the batch has no event.
    """
    risk, time, event = risk.reshape(-1), time.reshape(-1).to(risk), event.reshape(-1).to(risk)
    at_risk = (time[None, :] >= time[:, None]).to(risk)  # (i, j): j in risk set of i
    masked = risk[None, :].expand_as(at_risk).masked_fill(at_risk == 0, float("-inf"))
    log_denom = torch.logsumexp(masked, dim=1)
    n_events = event.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((risk - log_denom) * event).sum() / n_events


@dataclass
class ABMILConfig:
    """Patho-Bench ABMIL defaults: 1 head, hidden 512, dropout 0.25, AdamW 3e-4 / 1e-5, 20 epochs, cosine."""

    hidden: int = 512
    dropout: float = 0.25
    n_heads: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-5
    epochs: int = 20
    bag_size: int = 2048
    balanced: bool = True
    cox_batch: int = 32  # slides per Cox step: the partial likelihood needs several subjects at once


BagGetter = Callable[[int], torch.Tensor]


def _subsample(bag: torch.Tensor, bag_size: int, gen: torch.Generator) -> torch.Tensor:
    if bag_size <= 0 or bag.shape[0] <= bag_size:
        return bag
    idx = torch.randperm(bag.shape[0], generator=gen)[:bag_size]
    return bag[idx.sort().values.to(bag.device)]


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency weights ``n / (C * n_c)`` (classes absent from ``labels`` get weight 0)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.zeros(n_classes)
    present = counts > 0
    w[present] = len(labels) / (present.sum() * counts[present])
    return w


def train_abmil(
    get_bag: BagGetter,
    indices: Sequence[int],
    in_dim: int,
    task: str,
    labels: Optional[np.ndarray] = None,
    times: Optional[np.ndarray] = None,
    events: Optional[np.ndarray] = None,
    n_classes: int = 2,
    cfg: Optional[ABMILConfig] = None,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> GatedABMIL:
    """Train an ABMIL on the bags ``get_bag(i)`` for ``i in indices``.

    ``task='classification'``: batch of 1 bag, cross-entropy weighted by inverse class frequency
    when ``cfg.balanced``. ``task='survival'``: one scalar risk per bag, Cox loss over groups of
    ``cfg.cox_batch`` bags. ``labels``/``times``/``events`` are indexed by the same ids as ``get_bag``.
    Bags longer than ``cfg.bag_size`` are randomly subsampled at every step.
    """
    cfg = cfg or ABMILConfig()
    if task not in ("classification", "survival"):
        raise ValueError(f"unknown task {task!r}; use 'classification' or 'survival'")
    indices = np.asarray(list(indices))
    if len(indices) == 0:
        raise ValueError("train_abmil got no training bags")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weights and dropout masks
    n_out = n_classes if task == "classification" else 1
    model = GatedABMIL(in_dim, n_out, cfg.hidden, cfg.dropout, cfg.n_heads)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step_size = 1 if task == "classification" else max(1, min(cfg.cox_batch, len(indices)))
    steps_per_epoch = math.ceil(len(indices) / step_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
    if task == "classification":
        y = np.asarray(labels)
        w = class_weights(y[indices], n_classes) if cfg.balanced else np.ones(n_classes)
        weight = torch.as_tensor(w, dtype=torch.float32, device=dev)
    else:
        t_all = torch.as_tensor(np.asarray(times, dtype=np.float64), dtype=torch.float32)
        e_all = torch.as_tensor(np.asarray(events, dtype=np.float64), dtype=torch.float32)
    model.train()
    with flush_denormals():
        _train_epochs(model, opt, sched, indices, cfg, gen, get_bag, dev, task, step_size,
                      (y, weight) if task == "classification" else (t_all, e_all))
    return model.eval()


@contextlib.contextmanager
def flush_denormals():
    """Flush subnormal floats to zero on CPU while training and predicting.

    Training drifts into subnormal values, where x86 arithmetic is ~100x slower: on the demo's 120 slides
    an ABMIL fold took 3-150 s depending on the fold (8 min for 5 folds), 3 s with subnormals flushed, with
    the same AUROCs to the printed digit.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # torch's default; it has no getter to restore another value


def _train_epochs(model, opt, sched, indices, cfg, gen, get_bag, dev, task, step_size, targets) -> None:
    for _ in range(cfg.epochs):
        order = indices[torch.randperm(len(indices), generator=gen).numpy()]
        for start in range(0, len(order), step_size):
            chunk = order[start:start + step_size]
            outs = [model(_subsample(get_bag(int(i)).to(dev, torch.float32), cfg.bag_size, gen))[0] for i in chunk]
            if task == "classification":
                y, weight = targets
                target = torch.as_tensor([int(y[i]) for i in chunk], device=dev)
                loss = F.cross_entropy(torch.stack(outs), target, weight=weight)
            else:
                t_all, e_all = targets
                idx = torch.as_tensor(chunk)
                loss = cox_ph_loss(torch.cat(outs), t_all[idx].to(dev), e_all[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def predict_abmil(model: GatedABMIL, get_bag: BagGetter, indices: Sequence[int]) -> Tuple[np.ndarray, List[np.ndarray], np.ndarray]:
    """Run ``model`` on every whole bag: returns ``(outputs (n, n_out), attention list of (heads, N_i), pooled (n, H))``."""
    model.eval()
    dev = next(model.parameters()).device
    outs, attns, pooled = [], [], []
    with flush_denormals():
        for i in indices:
            z, attn = model.attend(get_bag(int(i)).to(dev, torch.float32))
            outs.append(model.head(z).float().cpu().numpy())
            attns.append(attn.float().cpu().numpy())
            pooled.append(z.float().cpu().numpy())
    return np.stack(outs), attns, np.stack(pooled)
