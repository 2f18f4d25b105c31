"""Is bf16 safe? Two runs of the real trainer that differ only in precision, and their loss curves.

Runs ``python -m dino.train`` on a paper config once per mode (default: fp32 with TF32, the release's
setting, against the bf16 mode), same seed and data, then writes the two curves as JSON and PNG and
prints a table of the logged losses with their largest differences.

The recipe's schedules are in epochs. ``--iterations N`` runs 100 epochs of N / 100 iterations (the paper
recipe has 200): the warm-ups keep their length in epochs (lr 10, teacher temperature 30), so a short
check passes through the lr warm-up to the peak learning rate and the whole cosine decay, instead of
sampling the first 0.1% of a 98,600-iteration run.

    python benchmarks/precision_check.py --arch mv_hybrid --iterations 300 --batch 32
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {
    "tf32": ["compute_precision.tf32=true", "compute_precision.autocast_dtype=fp32"],
    "bf16": ["compute_precision.tf32=true", "compute_precision.autocast_dtype=bf16"],
    "bf16+compile": ["compute_precision.tf32=true", "compute_precision.autocast_dtype=bf16",
                     "compute_precision.compile=true"],
}
LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_mode(args, mode, out_dir):
    epochs = 100  # of N / 100 iterations each: a round number of short epochs (the paper recipe has 200)
    if args.iterations % epochs:
        raise SystemExit(f"--iterations must be a multiple of {epochs} (the epochs of the shortened run)")
    cmd = [sys.executable, "-m", "dino.train", "--config-file", os.path.join(REPO, "configs", "train", f"{args.arch}.yaml"),
           "--output-dir", out_dir, f"train.dataset_path={args.dataset}", f"train.batch_size_per_gpu={args.batch}",
           f"train.num_workers={args.workers}", f"train.OFFICIAL_EPOCH_LENGTH={args.iterations // epochs}",
           "train.log_freq=1", f"train.seed={args.seed}", f"optim.epochs={epochs}"] + MODES[mode] + args.opts
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return read_metrics(os.path.join(out_dir, "training_metrics.json"))


def compare(curves, modes):
    """Largest absolute and relative difference per loss between the first mode and each other."""
    base = {r["iteration"]: r for r in curves[modes[0]]}
    out = {}
    for mode in modes[1:]:
        for key in LOSSES:
            pairs = [(base[r["iteration"]][key], r[key]) for r in curves[mode] if r["iteration"] in base]
            out[f"{mode} | {key}"] = dict(max_abs=max(abs(a - b) for a, b in pairs),
                                          max_rel=max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs))
    return out


def plot(curves, modes, png, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key in zip(axes, ("total_loss", "ibot_loss", "lr")):
        for mode in modes:
            ax.plot([r["iteration"] for r in curves[mode]], [r[key] for r in curves[mode]], label=mode,
                    lw=1.2, ls="-" if mode == modes[0] else "--")
        ax.set_xlabel("iteration")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mv_hybrid")
    p.add_argument("--modes", default="tf32,bf16", help=f"comma-separated, the first is the baseline; of {list(MODES)}")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(15, (os.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="Synthetic:length=100000:image_size=256")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("opts", nargs="*", help="further config overrides for both runs (key=value)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown or len(modes) < 2:
        p.error(f"--modes needs two or more of {list(MODES)}; got {args.modes!r}")
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "nogit"
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            curves[mode] = run_mode(args, mode, os.path.join(tmp, mode))
    diffs = compare(curves, modes)
    stem = f"precision_{args.arch}_{'_vs_'.join(modes)}_{datetime.date.today():%Y%m%d}_{commit}"
    os.makedirs(args.out, exist_ok=True)
    run = (f"{args.arch} paper config, {args.iterations} iterations (all schedules scaled to them), batch "
           f"{args.batch}, {args.dataset}, seed {args.seed}, commit {commit}")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"run": run, "curves": curves, "max_differences": diffs}, f, indent=1)
    plot(curves, modes, os.path.join(args.out, stem + ".png"), run)
    print(f"\n{run}\n\n| iteration | " + " | ".join(f"total loss, {m}" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    its = [r["iteration"] for r in curves[modes[0]]]
    for it in its[:: max(1, len(its) // 12)] + its[-1:]:
        print(f"| {it} | " + " | ".join(f"{next(r['total_loss'] for r in curves[m] if r['iteration'] == it):.4f}"
                                        if any(r["iteration"] == it for r in curves[m]) else "-" for m in modes) + " |")
    print("\n| mode | loss | max abs diff | max rel diff |\n|---|---|---|---|")
    for k, v in diffs.items():
        mode, key = k.split(" | ")
        print(f"| {mode} | {key} | {v['max_abs']:.4g} | {v['max_rel']:.2e} |")
    print(f"\nsaved {os.path.join(args.out, stem)}.json and .png")


if __name__ == "__main__":
    main()
