"""DINOv2 SSL training: :class:`SSLMetaArch`, :func:`do_train`, and ``python -m dino.train``."""
from .ssl_meta_arch import SSLMetaArch
from .train import NonFiniteLossError, do_train, get_args_parser, main, preemption_requested, request_preemption

__all__ = [
    "SSLMetaArch",
    "NonFiniteLossError",
    "do_train",
    "get_args_parser",
    "main",
    "preemption_requested",
    "request_preemption",
]
