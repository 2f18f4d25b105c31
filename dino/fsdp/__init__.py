"""Sharding of the student and teacher sub-networks.

In every multi-process run (NCCL on GPUs, gloo on CPUs) each sub-network (backbone, dino_head,
ibot_head) is wrapped as **one** FSDP2 unit with ``fully_shard`` (the paper wraps the whole backbone
as one FSDP unit), so the sharded code path (DTensor EMA, gathered checkpoints) is the one the CPU
tests run:

* ``FULL_SHARD``    -> ``reshard_after_forward=True``;
* ``SHARD_GRAD_OP`` -> ``reshard_after_forward=False``;
* ``NO_SHARD``      -> a replicate x shard mesh of shape (world, 1): parameters are replicated and
  gradients all-reduced, i.e. DDP semantics with the FSDP2 code path.

``mixed_precision.param_dtype`` / ``reduce_dtype`` become a ``MixedPrecisionPolicy`` and
``buffer_dtype`` casts the module's buffers; on CPU all three are fp32 (no fast half precision
there). Sharded parameters are DTensors; their local shards are what the optimiser and the
teacher EMA touch.

A single process (one GPU, or a CPU) is not wrapped: a one-rank FSDP2 unit shards nothing, yet copies
every parameter in and out at each forward and again for the backward, and every optimiser, clipping
and EMA op pays DTensor dispatch. On an H200 that bound the DINOv2 step by the host: 193 against 270
images/s unwrapped, with the same kernels (docs/performance.md). With no gradient reduction there,
``reduce_dtype`` has nothing to act on; ``buffer_dtype`` still casts the buffers. Only a half-precision
``param_dtype``, a policy that FSDP2 implements, still wraps that sub-network on one GPU.
"""
import logging
from typing import Iterable

import torch
from torch import nn

from dino import distributed

logger = logging.getLogger("dino")

try:  # torch >= 2.6
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5
    try:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # a build without distributed support
        fully_shard = None
        MixedPrecisionPolicy = None

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def uses_fsdp() -> bool:
    """FSDP2 in every multi-process run (one-GPU runs have a one-rank group but stay plain; see above)."""
    return distributed.is_enabled() and distributed.get_global_size() > 1


def _mesh(strategy: str, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    world = distributed.get_global_size()
    if strategy == "NO_SHARD":
        return init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))


def wrap_module(module: nn.Module, module_cfg, device: torch.device) -> nn.Module:
    """Wrap one sub-network as a single FSDP2 unit per ``module_cfg``; identity in a single process.

    ``module_cfg`` is ``compute_precision.<student|teacher>.<module>``.
    """
    mp = module_cfg.mixed_precision
    # CPUs have no fast half precision (and gloo no fp16 reduce-scatter): compute in fp32 there.
    dtype = (lambda name: DTYPES[name]) if device.type == "cuda" else (lambda name: torch.float32)
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            buf.data = buf.data.to(dtype(mp.buffer_dtype))
    if not uses_fsdp() and dtype(mp.param_dtype) == torch.float32:
        return module
    if not distributed.is_enabled():
        raise RuntimeError(f"param_dtype={mp.param_dtype} is an FSDP2 policy and needs a process group: "
                           "start the run with dino.distributed.enable() (the trainer does)")
    if fully_shard is None:
        raise RuntimeError("this torch build has no FSDP2 (fully_shard); install torch>=2.4 with distributed support")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        raise NotImplementedError("BatchNorm is not supported under sharding (the backbone contract forbids it)")
    policy = MixedPrecisionPolicy(param_dtype=dtype(mp.param_dtype), reduce_dtype=dtype(mp.reduce_dtype))
    strategy = module_cfg.sharding_strategy
    fully_shard(
        module,
        mesh=_mesh(strategy, device),
        reshard_after_forward=strategy == "FULL_SHARD",
        mp_policy=policy,
    )
    return module


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (the tensor itself when it is not a DTensor)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def clip_grad_norm_(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip one sub-network's gradients; with DTensor gradients the norm is over the full tensor."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if DTensor is not None and isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm


def reshard(modules: Iterable[nn.Module]) -> None:
    """Free unsharded parameters kept after forward (``SHARD_GRAD_OP``): the teacher EMA and the
    optimiser must act on the sharded parameters. No-op for unwrapped modules."""
    for m in modules:
        if callable(getattr(m, "reshard", None)) and fully_shard is not None:
            m.reshard()


def make_grad_scaler():
    """fp16 loss scaler; the sharded variant all-reduces the inf/NaN check over ranks (and takes plain
    tensors too, as a one-GPU run has)."""
    if distributed.is_enabled():
        try:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler()
        except ImportError:
            pass
    return torch.amp.GradScaler("cuda")
