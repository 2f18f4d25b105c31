"""Backbone throughput (images/s) for the shapes of DINOv2 pretraining, printed as a markdown table.

Train = forward_features + backward under autocast; inference = eval forward under no_grad.
Ratios are against the first model listed, measured in the same run on the same device.

    python benchmarks/bench_backbones.py --device cuda                      # paper sizes, bf16
    python benchmarks/bench_backbones.py --device cpu --tiny --steps 2      # smoke run on a laptop
"""
import argparse
import json
import time

import torch

import mambavision

# (label, image size, batch, train?) as in shared/gpu/README.md's reference table.
CASES = [("256 train", 256, 64, True), ("256 infer", 256, 128, False), ("112 train", 112, 512, True), ("112 infer", 112, 1024, False)]


TINY = dict(embed_dim=64, depth=4, num_heads=2)  # CPU smoke runs


def tiny_overrides(name):
    """A tiny version of a registered backbone: only the overrides of TINY that its card accepts."""
    accepted = mambavision.get_card(name).accepted_overrides
    return {k: v for k, v in TINY.items() if k in accepted}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, x, train, dtype, graphs=False):
    """One benchmark step on x: ``forward_features`` + backward (train) or a no-grad forward, under autocast to
    dtype. ``graphs``: the model replays CUDA graphs (torch.compile's reduce-overhead), so each step tells them
    that the last step's outputs are dead."""
    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if train:
            # as a trainer does: a graph's outputs live until its next replay, so no grad may outlast its step
            model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if train:
                out = model.forward_features(x)
                (out["x_norm_clstoken"].float().mean() + out["x_norm_patchtokens"].float().mean()).backward()
            else:
                with torch.no_grad():
                    model(x)

    return step


def measure(model, size, batch, train, device, dtype, steps, warmup, graphs=False):
    """Images/s of ``make_step``'s step at this size and batch."""
    x = torch.randn(batch, 3, size, size, device=device)
    model.train(train)
    step = make_step(model, x, train, dtype, graphs)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_12,mv_hybrid,vit_24", help="comma-separated registry names; first is the baseline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny models and batches (CPU smoke test)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cases = [(n, s, max(1, b // 64) if args.tiny else b, t) for n, s, b, t in CASES]
    models = args.models.split(",")
    results = {}
    for name in models:
        torch.manual_seed(0)
        model = mambavision.create_model(name, **(tiny_overrides(name) if args.tiny else {})).to(device)
        results[name] = {c[0]: measure(model, c[1], c[2], c[3], device, dtype, args.steps, args.warmup) for c in cases}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nimages/s on {dev_name}, {args.dtype} autocast, torch {torch.__version__}; (x) = ratio to {models[0]}\n")
    print("| model | " + " | ".join(f"{c[0]} (bs {c[2]})" for c in cases) + " |")
    print("|---|" + "---|" * len(cases))
    base = results[models[0]]
    for name in models:
        cells = [f"{results[name][c[0]]:.0f} ({results[name][c[0]] / base[c[0]]:.2f}x)" for c in cases]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "dtype": args.dtype, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
