"""`make demo` end to end at toy size: every stage runs and the report holds every table."""
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "scripts/demo.py", "--output-dir", str(out), "--tiny-data",
         "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=4", "train.log_freq=1", "train.num_workers=0"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (out / "report.md").read_text()
    for needle in ("gene_expression: PCC loso", "gene_expression: PCC drop", "linear_probe: bal. acc",
                   "retrieval: mAP@5", "survival: c-index", "mil: AUROC", "| pretrained |", "| random_init |",
                   "Frequency bias", "loss_curve.png", "compare/compare.png"):
        assert needle in report, needle
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["scores"]) == {"pretrained", "random_init"}
    for variant in summary["scores"].values():
        assert {"gene_expression: PCC loso", "linear_probe: bal. acc", "retrieval: top-1",
                "retrieval_mean_tokens: top-1", "survival: c-index", "mil: AUROC"} <= set(variant), variant
        assert len(variant) == 14 and all(math.isfinite(v) for v in variant.values()), variant
    assert (out / "compare" / "compare.json").exists()
    assert (out / "teacher_checkpoint.pth").exists() and (out / "loss_curve.png").stat().st_size > 0
    # the copied checkpoint opens in one call, without naming the architecture
    import mambavision

    model = mambavision.load_pretrained(str(out / "teacher_checkpoint.pth"))
    assert model.n_blocks == 4
