#!/usr/bin/env bash
# Everything we check on the (offline) GPU box, in one command, so it shares one machine start:
#   1. build the optional CUDA extras (shared/gpu/README.md: bash ../shared/gpu/prepare.sh here first);
#   2. the CUDA-only tests: mamba-ssm / Triton kernels against our PyTorch paths (fwd + bwd, fp32 + bf16);
#   3. kernel and backbone throughput tables (ratios against a baseline measured in the same run);
#   4. short runs of the paper's pretraining config at reduced batch (loss must fall, no NaN).
#   5. (STAGES=fsdp, on a multi-GPU box) torchrun on every GPU (NCCL + FSDP2), then resume on one GPU.
# Stages can be skipped: STAGES="tests bench train" (default; add fsdp on several GPUs). Results go to $OUT.
# The builds take 3-8 min: with STAGES=build a first call only builds, and the next call on the
# still-warm machine skips them (both check /tmp/site).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"tests bench train"}
# Build mamba-ssm and causal-conv1d side by side (setup.sh builds them one after the other), each into
# its own target, then merge into /tmp/site; setup.sh then finds both .so files and only installs the wheels.
build() {  # build <source dir prefix> <FORCE_BUILD variable> <MAX_JOBS> <.so glob>
  ls /tmp/site/$4 >/dev/null 2>&1 && return 0
  local d; d=$(ls -d .gpu/src/$1-* 2>/dev/null | head -1); [ -n "$d" ] || return 0
  (cd "$d" && env "$2=TRUE" MAX_JOBS=$3 python3 -m pip install -q --no-deps --no-build-isolation \
      --target "/tmp/build_$1" . > "$OUT/build_$1.log" 2>&1) && mkdir -p /tmp/site && cp -r "/tmp/build_$1/." /tmp/site/
}
if [[ ${GPU_SETUP_FLAGS:-} != *--no-mamba* ]]; then
  t0=$(date +%s)
  build mamba_ssm MAMBA_FORCE_BUILD 11 "selective_scan_cuda*.so" & pid_m=$!
  pid_c=
  [[ ${GPU_SETUP_FLAGS:-} == *--no-conv* ]] || { build causal_conv1d CAUSAL_CONV1D_FORCE_BUILD 5 "causal_conv1d_cuda*.so" & pid_c=$!; }
  wait $pid_m || { echo "mamba-ssm build failed:"; tail -20 "$OUT/build_mamba_ssm.log"; }
  [ -z "$pid_c" ] || wait $pid_c || { echo "causal-conv1d build failed:"; tail -20 "$OUT/build_causal_conv1d.log"; }
  echo "parallel builds: $(( $(date +%s) - t0 )) s" | tee "$OUT/build_time.txt"
fi
source .gpu/setup.sh ${GPU_SETUP_FLAGS:-} > "$OUT/gpu_setup.log" 2>&1 || { tail -5 "$OUT/gpu_setup.log"; exit 1; }  # not piped: it must export PYTHONPATH here
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PYTHONPATH  # benchmarks/*.py import the package from the checkout
python -c "import mambavision.ops.selective_scan as s; print('mamba-ssm scan available:', s.mamba_ssm_available())"
if [[ $STAGES == *tests* ]]; then
  timeout "${TESTS_TIMEOUT:-300}" python -m pytest -q -rs -s tests/mambavision/test_selective_scan.py \
      tests/mambavision/test_selective_scan_triton.py tests/mambavision/test_ssd.py tests/mambavision/test_causal_conv1d.py \
      tests/mambavision/test_mixers_cuda.py \
      > "$OUT/cuda_tests.log" 2>&1; grep -E "rel|vs-torch|passed|failed|SKIP" "$OUT/cuda_tests.log" | tail -40
  # Whole files, not a -k filter: a CUDA test whose name lacks the keyword would silently drop out.
  # -rs lists every skip with its reason, so a kernel that failed to build shows up.
fi
if [[ $STAGES == *bench* ]]; then
  python benchmarks/bench_selective_scan.py --device cuda --dtype bf16 --skip-reference 2>&1 | tee "$OUT/bench_scan.md" | tail -12
  timeout "${BENCH_TIMEOUT:-240}" python benchmarks/bench_backbones.py --models "${BENCH_MODELS:-vit_12,mv_hybrid,vit_24,vim_einfft,hydra_einfft,hydra_hybrid}" \
      --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_backbones.md" | tail -10
  # mv_hybrid on each selective-scan backend, for the kernel's share of the speed.
  for scan in triton torch; do
    MAMBAVISION_SCAN_BACKEND=$scan timeout 120 python benchmarks/bench_backbones.py --models vit_12,mv_hybrid \
        --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_backbones_${scan}_scan.md" | tail -5
  done
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
if [[ $STAGES == *fsdp* ]]; then
  ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
  for arch in ${FSDP_ARCHS:-vit_12}; do
    args=(--config-file "configs/train/$arch.yaml" --output-dir "/tmp/fsdp_$arch" train.dataset_path=Synthetic:length=100000:image_size=256
          train.batch_size_per_gpu="${BATCH:-32}" train.num_workers=6 train.OFFICIAL_EPOCH_LENGTH=25 optim.warmup_epochs=1
          teacher.warmup_teacher_temp_epochs=2 train.log_freq=10)
    timeout "${TRAIN_TIMEOUT:-170}" python -m torch.distributed.run --standalone --nproc_per_node="$ngpu" -m dino.train \
      --no-resume "${args[@]}" optim.epochs="${EPOCHS:-4}" 2>&1 | grep -E "FSDP|shard|Training \[|saved|Error|error" | tail -8
    # The checkpoint saved on $ngpu processes resumes on one for one more epoch.
    timeout "${TRAIN_TIMEOUT:-170}" python -m dino.train "${args[@]}" optim.epochs=$(( ${EPOCHS:-4} + 1 )) 2>&1 \
      | grep -E "resum|Training \[|saved|Error|error" | tail -5
    cp "/tmp/fsdp_$arch/training_metrics.json" "$OUT/metrics_fsdp_$arch.json" 2>/dev/null
  done
fi
