"""compute_precision.*: TF32 switch, bf16 autocast through the whole DINOv2 step, and the speed log."""
import json
import time

import pytest
import torch
from torch import nn

from dino.configs import build_config
from dino.configs.config import ConfigError
from dino.train import train as train_mod
from dino.utils import precision
from dino.utils.throughput import Throughput, count_flops, count_step_flops
from tests.dino.test_ssl_meta_arch import build, make_batch, tiny_cfg


def test_tf32_switch_sets_both_backends():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        precision.configure_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        precision.configure_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_defaults_are_the_release_settings():
    cfg = build_config()
    assert cfg.compute_precision.tf32 is True and cfg.compute_precision.autocast_dtype == "fp32"
    paper = build_config("configs/train/mv_hybrid.yaml")
    assert paper.compute_precision.tf32 is True and paper.compute_precision.autocast_dtype == "fp32"


@pytest.mark.parametrize("opt,key", [("compute_precision.autocast_dtype=fp8", "autocast_dtype"),
                                     ("compute_precision.tf32=maybe", "tf32"),
                                     ("train.peak_tflops=-1", "peak_tflops"),
                                     ("compute_precision.compile_mode=fastest", "compile_mode")])
def test_bad_precision_values_name_the_key(opt, key):
    with pytest.raises(ConfigError, match=key):
        build_config(opts=[opt])


def test_a_compile_mode_without_compile_is_refused():
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead has no effect without compute_precision.compile"):
        build_config(opts=["compute_precision.compile_mode=reduce-overhead"])


def test_fp16_autocast_is_refused_on_cpu():
    with pytest.raises(ValueError, match="needs CUDA"):
        precision.autocast("fp16", torch.device("cpu"))


def test_bf16_step_runs_the_networks_in_bf16_and_the_losses_in_fp32():
    cfg = tiny_cfg("compute_precision.autocast_dtype=bf16")
    model = build(cfg)
    seen = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    batch = make_batch(cfg)
    losses = model.forward_backward(batch, teacher_temp=0.07)
    assert seen and all(d == torch.bfloat16 for d in seen)  # backbones and heads, student and teacher
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)  # fp32 masters

    # Same weights and batch in fp32: the bf16 losses are close (bf16 has ~3 significant digits; KoLeo's
    # log nearest-neighbour distance over 4 images amplifies that most, measured 2.6% here).
    ref = build(tiny_cfg()).forward_backward(batch, teacher_temp=0.07)
    for k in ref:
        tol = 0.05 if k == "koleo_loss" else 0.015
        assert abs(losses[k].item() - ref[k].item()) < tol * max(1.0, abs(ref[k].item())), k


def test_count_flops_counts_the_matmuls():
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    _, flops = count_flops(lambda: lin(x).sum().backward())
    assert flops == 3 * 2 * 4 * 16 * 8  # forward, grad of input, grad of weight


def test_throughput_arithmetic():
    t = Throughput(images_per_step=64, world_size=2, peak_tflops=100.0)
    assert t.values(float("nan")) == {}
    t.set_step_flops(64 * 2e11)  # 200 GFLOP per image
    v = t.values(0.5)  # 128 images/s per GPU
    assert v["images_per_sec"] == pytest.approx(256.0)
    assert v["tflops_per_gpu"] == pytest.approx(25.6)
    assert v["mfu"] == pytest.approx(0.256)
    assert "mfu" not in Throughput(64, 1, None).values(0.5)  # no peak (CPU): no MFU


def test_training_metrics_carry_images_per_sec_and_mfu(tmp_path):
    args = ["--config-file", "configs/demo/tiny.yaml", "--output-dir", str(tmp_path),
            "compute_precision.autocast_dtype=bf16", "train.peak_tflops=1.0"]
    train_mod.main(args)
    rows = [json.loads(line) for line in open(tmp_path / "training_metrics.json")]
    later = [r for r in rows if "images_per_sec" in r]
    assert later and all(r["images_per_sec"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_gpu"]) for r in later)
    assert len({r["tflops_per_gpu"] / r["images_per_sec"] for r in later}) == 1 or all(
        abs(r["tflops_per_gpu"] / r["images_per_sec"] - later[0]["tflops_per_gpu"] / later[0]["images_per_sec"]) < 1e-12
        for r in later)  # one FLOP count per image, from the first step


def test_training_metrics_carry_the_time_spent_waiting_for_data(tmp_path, monkeypatch):
    """A loader that takes 60 ms a batch: the log and training_metrics.json say the step waited that long."""
    delay = 0.06
    build_loader = train_mod.build_data_loader

    class SlowLoader:
        def __init__(self, loader):
            self.loader, self.dataset = loader, loader.dataset

        def __iter__(self):
            for batch in self.loader:
                time.sleep(delay)
                yield batch

    monkeypatch.setattr(train_mod, "build_data_loader", lambda *a: SlowLoader(build_loader(*a)))
    train_mod.main(["--config-file", "configs/demo/tiny.yaml", "--output-dir", str(tmp_path),
                    "train.OFFICIAL_EPOCH_LENGTH=6"])  # 12 iterations: enough for the waiting warning
    rows = [json.loads(line) for line in open(tmp_path / "training_metrics.json")]
    timed = [r for r in rows if "iter_time" in r]
    assert timed and all(delay <= r["data_time"] <= r["iter_time"] for r in timed)
    log = (tmp_path / "log.txt").read_text()
    assert " data 0.0" in log and log.count("the step waits for the data loader") == 1


def test_waiting_for_data_is_warned_once_and_only_past_the_threshold(tmp_path, monkeypatch):
    import logging

    from dino.utils import logging as dlog

    clock = [0.0]
    monkeypatch.setattr(dlog.time, "perf_counter", lambda: clock[0])
    warnings_seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings_seen.append(record.getMessage())
    logging.getLogger("dino").addHandler(handler)
    try:
        for data_s, warned in ((0.01, False), (0.05, True)):  # of 0.1 s iterations: 10% (fine), 50% (waits)
            warnings_seen.clear()
            writer = dlog.MetricsWriter(str(tmp_path / str(data_s)), tensorboard=False)
            for it in range(2 * dlog.WAITING_MIN_ITERATIONS):
                writer.waited_for_data(data_s)
                clock[0] += 0.1
                writer.tick()
                writer.write(it, 100, {"total_loss": 1.0})
            assert sum("the step waits for the data loader 50%" in m for m in warnings_seen) == int(warned), data_s
            assert len(warnings_seen) == int(warned)
    finally:
        logging.getLogger("dino").removeHandler(handler)


def test_step_flops_are_counted_on_a_meta_copy_without_touching_the_run():
    cfg = tiny_cfg()
    model = build(cfg)
    batch = make_batch(cfg)
    _, real = count_flops(lambda: model.forward_backward(batch, teacher_temp=0.07))
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta = count_step_flops(cfg, batch)
    assert torch.equal(state, torch.get_rng_state())  # the run's RNG stream is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Same network passes; the meta copy counts the PyTorch scan's small products (large at this tiny size).
    assert real <= meta < 1.1 * real


def test_compile_mode_reaches_every_block_and_cuda_graph_steps_are_marked(monkeypatch):
    """compute_precision.compile_mode is torch.compile's mode for each block; under reduce-overhead (CUDA graphs)
    each step first tells the graphs that the last step's outputs are dead."""
    from mambavision.models.backbone import Backbone

    compiled, marks = [], []
    monkeypatch.setattr(Backbone, "compile_blocks", lambda self, **kw: compiled.append(kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cfg = tiny_cfg("compute_precision.compile=true", "compute_precision.compile_mode=reduce-overhead")
    model = build(cfg)
    assert compiled == [{"mode": "reduce-overhead"}] * 2  # student and teacher
    batch = make_batch(cfg)
    model.forward_backward(batch, teacher_temp=0.07)
    model.forward_backward(batch, teacher_temp=0.07)
    assert len(marks) == 2
    plain = build(tiny_cfg("compute_precision.compile=true"))
    plain.forward_backward(make_batch(plain.cfg), teacher_temp=0.07)
    assert compiled[-1] == {"mode": "default"} and len(marks) == 2


def test_cuda_graph_mode_under_several_ranks_warns(monkeypatch, caplog):
    from mambavision.models.backbone import Backbone

    from dino import distributed, fsdp

    monkeypatch.setattr(Backbone, "compile_blocks", lambda self, **kw: None)
    monkeypatch.setattr(distributed, "get_global_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: None)
    monkeypatch.setattr(fsdp, "wrap_module", lambda module, cfg, device: module)
    with caplog.at_level("WARNING", logger="dino"):
        build(tiny_cfg("compute_precision.compile=true", "compute_precision.compile_mode=reduce-overhead"))
    assert "measured on one GPU only" in caplog.text and "4 ranks" in caplog.text
