"""benchmarks/bench_gpu.py's step section on CPU: its mode options, and the host-time instrumentation, which
patches torch.Tensor.backward and the model's methods and must put every one of them back."""
import argparse
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_gpu  # noqa: E402


def test_step_modes_parse_and_bad_options_are_named():
    assert bench_gpu.parse_step_mode("bf16") == ("bf16", {})
    assert bench_gpu.parse_step_mode("bf16+compile[scan=triton,adamw=foreach,fsdp=on]") == (
        "bf16+compile", {"scan": "triton", "adamw": "foreach", "fsdp": "on"})
    assert bench_gpu.parse_step_mode("bf16+compile[mode=reduce-overhead]") == ("bf16+compile", {"mode": "reduce-overhead"})
    with pytest.raises(ValueError, match="option adam=fused is not one of"):
        bench_gpu.parse_step_mode("bf16[adam=fused]")
    with pytest.raises(ValueError, match="expected one of"):
        bench_gpu.parse_step_mode("bf17")


def test_backbone_specs_name_their_compile_mode_and_whether_steps_replay_graphs():
    model, scan, graphs = bench_gpu.build_backbone("vit_12[compile=blocks,mode=reduce-overhead]", tiny=True)
    assert scan is None and graphs
    model, scan, graphs = bench_gpu.build_backbone("mv_hybrid[scan=triton,compile=blocks]", tiny=True)
    assert scan == "triton" and not graphs
    with pytest.raises(ValueError, match="needs compile=blocks"):
        bench_gpu.build_backbone("vit_12[mode=reduce-overhead]", tiny=True)
    with pytest.raises(ValueError, match="compile must be"):
        bench_gpu.build_backbone("vit_12[compile=everything]", tiny=True)


def test_tiny_step_row_reports_host_phases_and_restores_what_it_patched(tmp_path):
    from dino import fsdp

    backward, uses_fsdp = torch.Tensor.backward, fsdp.uses_fsdp
    args = argparse.Namespace(step_batch=4, tiny=True, warmup=1, steps=1, trace="")
    with bench_gpu._one_rank_fsdp("off"):
        row = bench_gpu._step_row(args, torch.device("cpu"), None, "vit_12", "fp32", adamw="foreach")
    assert torch.Tensor.backward is backward and fsdp.uses_fsdp is uses_fsdp
    host = row["host_ms"]
    for label in ("teacher fwd", "student fwd", "backward", "clip", "AdamW", "EMA"):
        assert host[label] > 0, label
    parts = sum(v for k, v in host.items() if k not in ("issued (all)", "wall", "scaler + AdamW"))
    assert parts <= host["issued (all)"] <= host["wall"] + 1e-6
    assert row["finite"]


def test_png_loader_dataset_is_a_temporary_folder_of_decodable_tiles():
    from PIL import Image

    with bench_gpu._loader_dataset("PNG:count=3:image_size=32") as path:
        assert path.startswith("Folder:root=")
        root = path.split("=", 1)[1]
        files = sorted(os.listdir(os.path.join(root, "tiles")))
        assert len(files) == 3 and Image.open(os.path.join(root, "tiles", files[0])).size == (32, 32)
    assert not os.path.exists(root)
    with bench_gpu._loader_dataset("Synthetic:length=8") as path:
        assert path == "Synthetic:length=8"



def test_step_row_with_the_photometric_augmentation_on_the_device():
    from dino.configs import build_config
    from dino.data.photometric import N_PARAMS

    cfg = build_config(os.path.join(REPO, "configs", "train", "vit_12.yaml"), bench_gpu._tiny_opts("vit_12"))
    batch = bench_gpu._synthetic_batch(cfg, crops="device")
    n_global = 2 * cfg.train.batch_size_per_gpu
    assert batch["collated_global_crops"].dtype == torch.uint8
    assert batch["collated_global_params"].shape == (n_global, N_PARAMS)
    assert "collated_global_params" not in bench_gpu._synthetic_batch(cfg, crops="uint8")
    args = argparse.Namespace(step_batch=4, tiny=True, warmup=1, steps=1, trace="")
    with bench_gpu._one_rank_fsdp("off"):
        row = bench_gpu._step_row(args, torch.device("cpu"), None, "vit_12", "fp32", crops="device")
    assert row["finite"]
    assert bench_gpu.parse_step_mode("bf16[crops=device]") == ("bf16", {"crops": "device"})
