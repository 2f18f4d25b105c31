"""Training speed in the log: images/s and model-FLOP utilisation (MFU).

FLOPs per image are counted once per process with ``torch.utils.flop_counter.FlopCounterMode`` on the
step's network passes, run on a meta-device copy of the model with the first real batch (matrix
products, convolutions and attention; elementwise work is not counted, as usual for MFU). On meta
tensors the selective scan takes its PyTorch formulation, whose small products are counted: 0.1% of
the total at the paper's sizes. The peak is
``train.peak_tflops``, or, when that is 0 on CUDA, a bf16 matmul timed once on the device.
MFU = FLOPs/image x images/s per GPU / peak.
"""
import contextlib
import logging
from typing import Callable, Optional, Tuple

import torch

logger = logging.getLogger("dino")


def count_flops(fn: Callable[[], object]) -> Tuple[object, int]:
    """Run ``fn()`` once under the FLOP counter; returns (its result, total FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # Compiled blocks would run fused kernels the counter cannot see: count on the eager path.
    stance = getattr(torch.compiler, "set_stance", None)
    with stance("force_eager") if stance is not None else contextlib.nullcontext(), counter:
        out = fn()
    return out, int(counter.get_total_flops())


def count_step_flops(cfg, images) -> int:
    """Matrix-product FLOPs of one DINOv2 step on the collated batch ``images``, counted on a copy of
    the model on the meta device: no memory, and the real run's numerics, RNG streams and loss centres
    are untouched (so exact resume holds whichever step a process counts on)."""
    from omegaconf import OmegaConf

    from dino.train.ssl_meta_arch import SSLMetaArch

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.compute_precision.compile = False  # the same FLOPs; nothing to compile on meta tensors
    with torch.random.fork_rng(devices=[]):  # building draws init weights: keep the run's CPU stream
        model = SSLMetaArch(cfg).to("meta")
    model.device = torch.device("meta")
    model.train()
    _, flops = count_flops(lambda: model.run_networks(images))
    return flops


def measure_peak_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> Optional[float]:
    """Dense bf16 matmul rate in TFLOP/s on a CUDA device (None elsewhere: no meaningful peak)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    secs = start.elapsed_time(end) / 1e3 / reps
    del a, b
    return 2 * n**3 / secs / 1e12


class Throughput:
    """Turns seconds per iteration into images/s (all GPUs) and MFU (per GPU)."""

    def __init__(self, images_per_step: int, world_size: int, peak_tflops: Optional[float]):
        self.images_per_step = images_per_step  # on this rank
        self.world_size = world_size
        self.peak_tflops = peak_tflops or None
        self.flops_per_image: Optional[float] = None

    def set_step_flops(self, flops: int) -> None:
        self.flops_per_image = flops / self.images_per_step
        logger.info(
            "model FLOPs per image (student fwd+bwd, teacher fwd, heads): %.1f GFLOP%s",
            self.flops_per_image / 1e9,
            f"; MFU against a peak of {self.peak_tflops:.0f} TFLOP/s" if self.peak_tflops else "; no peak, no MFU",
        )

    def values(self, iter_time: float) -> dict:
        if not iter_time or iter_time != iter_time:
            return {}
        per_gpu = self.images_per_step / iter_time
        out = {"images_per_sec": per_gpu * self.world_size}
        if self.flops_per_image is not None:
            out["tflops_per_gpu"] = self.flops_per_image * per_gpu / 1e12
            if self.peak_tflops:
                out["mfu"] = out["tflops_per_gpu"] / self.peak_tflops
        return out
