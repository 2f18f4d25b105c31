#!/usr/bin/env bash
# Everything we check on the (offline) GPU box, in one command, so it shares one machine start:
#   1. build the optional CUDA extras (shared/gpu/README.md: bash ../shared/gpu/prepare.sh here first);
#   2. the CUDA-only tests: mamba-ssm / Triton kernels against our PyTorch paths (fwd + bwd, fp32 + bf16);
#   3. kernel and backbone throughput tables (ratios against a baseline measured in the same run);
#   4. short runs of the paper's pretraining config at reduced batch (loss must fall, no NaN).
# Stages can be skipped: STAGES="tests bench train" (default: all). Results go to $OUT.
# The mamba-ssm build alone can take 3-8 min: with STAGES=build a first call only builds, and the
# next call on the still-warm machine skips the build (setup.sh checks /tmp/site).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"tests bench train"}
source .gpu/setup.sh ${GPU_SETUP_FLAGS:-} > "$OUT/gpu_setup.log" 2>&1 || { tail -5 "$OUT/gpu_setup.log"; exit 1; }  # not piped: it must export PYTHONPATH here
export PYTHONUNBUFFERED=1
python -c "import mambavision.ops.selective_scan as s; print('mamba-ssm scan available:', s.mamba_ssm_available())"
if [[ $STAGES == *tests* ]]; then
  python -m pytest -q -rs -s tests/mambavision/test_selective_scan.py tests/mambavision/test_ssd.py \
      tests/mambavision/test_vim_hydra.py -k "cuda or triton or gpu" 2>&1 | tee "$OUT/cuda_tests.log" | tail -60
fi
if [[ $STAGES == *bench* ]]; then
  python benchmarks/bench_selective_scan.py --device cuda --dtype bf16 --skip-reference 2>&1 | tee "$OUT/bench_scan.md" | tail -12
  python benchmarks/bench_backbones.py --models vit_12,mv_hybrid,vit_24 --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_backbones.md" | tail -8
fi
if [[ $STAGES == *train* ]]; then
  for arch in ${ARCHS:-mv_hybrid vit_12}; do
    timeout "${TRAIN_TIMEOUT:-170}" python -m dino.train --config-file "configs/train/$arch.yaml" \
      --output-dir "/tmp/gpu_$arch" --no-resume train.dataset_path=Synthetic:length=100000:image_size=256 \
      train.batch_size_per_gpu="${BATCH:-32}" train.num_workers=14 train.OFFICIAL_EPOCH_LENGTH=25 \
      optim.epochs="${EPOCHS:-8}" optim.warmup_epochs=1 teacher.warmup_teacher_temp_epochs=2 train.log_freq=10 \
      2>&1 | tail -4
    cp "/tmp/gpu_$arch/training_metrics.json" "$OUT/metrics_$arch.json" 2>/dev/null
  done
fi
