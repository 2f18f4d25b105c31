"""Selective-scan speed and memory on MV_Hybrid's shapes, printed as a markdown table.

Compares, in one run on one device, the sequential per-step reference (`selective_scan_ref`,
the baseline), the chunked pure-PyTorch scan, and on CUDA the project's Triton kernel and mamba-ssm's
kernel when they import. Without the reference, the first row of each case is the baseline.
Shapes: batch 8, d = 384 (half of d_inner for embed_dim 384), d_state 16, and L = 257
(256-px crops, 16x16 patches + CLS) or L = 50 (112-px crops, 7x7 + CLS).

Peak memory is the growth of the peak RSS of a fresh process doing one fwd+bwd on CPU
process) or of torch.cuda.max_memory_allocated on GPU, above what the inputs already take.

    python benchmarks/bench_selective_scan.py                       # CPU, fp32
    python benchmarks/bench_selective_scan.py --device cuda --dtype bf16
"""
import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch

from mambavision.ops.selective_scan import (
    DEFAULT_CHUNK_SIZE,
    mamba_ssm_available,
    selective_scan_fn,
    selective_scan_ref,
    triton_scan_available,
)

BATCH, DIM, DSTATE = 8, 384, 16
LENGTHS = {"256 px (L=257)": 257, "112 px (L=50)": 50}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(length, device, dtype, seed=0, batch=BATCH, dim=DIM, dstate=DSTATE):
    """Inputs as MV_Hybrid passes them: variable B and C, fp32 A / D / delta_bias, softplus on."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt).requires_grad_()

    return dict(
        u=rnd(batch, dim, length),
        delta=rnd(batch, dim, length, scale=0.5),
        A=(-torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1)).to(device).requires_grad_(),
        B=rnd(batch, dstate, length),
        C=rnd(batch, dstate, length),
        D=rnd(dim, dt=torch.float32),
        delta_bias=rnd(dim, scale=0.1, dt=torch.float32),
    )


def scan_call(impl, chunk_size):
    if impl == "reference loop":
        return lambda **a: selective_scan_ref(**a, delta_softplus=True)
    backend = {"mamba-ssm CUDA": "cuda", "Triton (ours)": "triton"}.get(impl, "torch")
    return lambda **a: selective_scan_fn(**a, delta_softplus=True, backend=backend, chunk_size=chunk_size)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(impl, length, device, dtype, repeats, chunk_size, threads):
    """Median fwd and fwd+bwd seconds, and on CUDA the peak extra memory (bytes), of one implementation."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    args = make_inputs(length, device, dtype)
    call = scan_call(impl, chunk_size)
    grad_out = torch.randn(BATCH, DIM, length, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    leaves = list(args.values())

    def fwd():
        with torch.no_grad():
            call(**args)

    def fwd_bwd():
        torch.autograd.grad(call(**args), leaves, grad_out)

    # Load kernels and thread pools on a tiny problem first, so the memory baseline excludes them.
    tiny = make_inputs(2, device, dtype)
    torch.autograd.grad(call(**tiny), list(tiny.values()), torch.ones(BATCH, DIM, 2, device=device, dtype=dtype))
    del tiny
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if repeats == 0:  # memory only: one pass
        t_fwd = t_fwd_bwd = float("nan")
        fwd_bwd()
    else:
        t_fwd = _median_time(fwd, device, repeats)
        t_fwd_bwd = _median_time(fwd_bwd, device, repeats)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return t_fwd, t_fwd_bwd, peak


def _child(queue, *args):
    queue.put(measure(*args))


def _in_fresh_process(*args, env=None):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        proc = ctx.Process(target=_child, args=(queue,) + args)
        proc.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    result = queue.get()
    proc.join()
    return result


def measure_cpu(impl, length, device, dtype, repeats, chunk_size, threads):
    """CPU: times in one fresh process, peak RSS growth of a single fwd+bwd in another.

    The memory run fixes glibc's mmap threshold so that freed buffers leave the process and peak
    RSS tracks live memory; that setting makes every large allocation fault in fresh pages, so
    it is kept out of the timed run.
    """
    t_fwd, t_fwd_bwd, _ = _in_fresh_process(impl, length, device, dtype, repeats, chunk_size, threads)
    mem_env = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    _, _, peak = _in_fresh_process(impl, length, device, dtype, 0, chunk_size, threads, env=mem_env)
    return t_fwd, t_fwd_bwd, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="chunk length of the torch scan")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--skip-reference", action="store_true", help="leave out the slow per-step loop")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    impls = [] if args.skip_reference else ["reference loop"]
    impls.append("torch chunked")
    if device.type == "cuda" and triton_scan_available():
        impls.append("Triton (ours)")
    if device.type == "cuda" and mamba_ssm_available():
        impls.append("mamba-ssm CUDA")
    run = measure if device.type == "cuda" else measure_cpu
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for case, length in LENGTHS.items():
        base = None
        for impl in impls:
            t_fwd, t_fb, peak = run(impl, length, args.device, dtype, args.repeats, args.chunk_size, args.threads)
            base = base or t_fb
            ratio = f"{base / t_fb:.1f}x"
            rows.append(f"| {case} | {impl} | {t_fwd * 1e3:.1f} | {t_fb * 1e3:.1f} | {peak / 2**20:.0f} | {ratio} |")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"\nselective scan, B={BATCH} D={DIM} N={DSTATE}, {args.dtype} inputs, on {dev_name}, torch {torch.__version__}, "
        f"chunk {args.chunk_size}, median of {args.repeats}; speed-up = fwd+bwd time of {impls[0]} / this one\n"
    )
    print("| case | implementation | fwd ms | fwd+bwd ms | peak extra MiB | speed-up (fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
