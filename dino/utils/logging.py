"""Training logs: console/file logger, smoothed meters with an ETA line, JSON lines, tensorboardX.

``<output_dir>/training_metrics.json`` holds one JSON object per logged iteration (JSON lines).
On resume, lines for iterations that were run after the restored checkpoint are dropped, so the
file reads as if the run had never stopped.
"""
import datetime
import json
import logging
import os
import sys
import time
from collections import defaultdict, deque
from typing import Dict, Optional

from dino.atomic import atomic_write

logger = logging.getLogger("dino")


def setup_logging(output_dir: Optional[str] = None, rank: int = 0, name: str = "dino", level=logging.INFO) -> logging.Logger:
    """Console on rank 0 (warnings elsewhere) and ``log.txt`` (``log.txt.rank<r>`` for r > 0)."""
    log = logging.getLogger(name)
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, "_dino_handler", False):
            log.removeHandler(h)
            h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    console._dino_handler = True
    log.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, "log.txt" if rank == 0 else f"log.txt.rank{rank}")
        fh = logging.FileHandler(path)
        fh.setFormatter(fmt)
        fh._dino_handler = True
        log.addHandler(fh)
    return log


class SmoothedValue:
    """A window median/average plus the global average of a scalar series."""

    def __init__(self, window_size: int = 20):
        self.window = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        vals = sorted(self.window)
        return vals[len(vals) // 2] if vals else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        return f"{self.median:.4g} ({self.global_avg:.4g})"


WAITING_FRACTION = 0.2  # warn once when waiting for data takes more of an iteration than this
WAITING_MIN_ITERATIONS = 10


class MetricsWriter:
    """JSON lines + tensorboardX + a progress line, written by the main process only."""

    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = True, window_size: int = 20):
        self.output_dir = output_dir
        self.enabled = enabled
        self.path = os.path.join(output_dir, "training_metrics.json")
        self.meters: Dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self._tb = None
        self._last_time: Optional[float] = None
        self._iter_time = SmoothedValue(window_size)
        self._data_time = SmoothedValue(window_size)
        self._warned_waiting = False
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(os.path.join(output_dir, "tb"))
                except ImportError:
                    logger.warning("tensorboardX is not installed: no tensorboard logs")

    def truncate_from(self, iteration: int) -> None:
        """Drop lines with ``iteration >= iteration`` (run after the checkpoint we resume from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if rec.get("iteration", -1) < iteration:
                    kept.append(line)
        with atomic_write(self.path, fsync=True) as tmp, open(tmp, "w") as f:
            f.write("".join(k + "\n" for k in kept))

    @property
    def iter_time(self) -> float:
        """Median seconds per iteration over the window (nan before two ticks)."""
        return self._iter_time.median if self._iter_time.count else float("nan")

    def tick(self) -> float:
        """Mark the end of an iteration; returns its wall time (s)."""
        now = time.perf_counter()
        dt = now - self._last_time if self._last_time is not None else float("nan")
        self._last_time = now
        if dt == dt:
            self._iter_time.update(dt)
        return dt

    @property
    def data_time(self) -> float:
        """Median seconds per iteration spent waiting for the data loader (nan before the first batch)."""
        return self._data_time.median if self._data_time.count else float("nan")

    def waited_for_data(self, seconds: float) -> None:
        """Record how long this iteration's ``next(loader)`` blocked. The step syncs the host once per
        iteration, so a loader that keeps up leaves its batches ready and this stays near zero."""
        self._data_time.update(seconds)

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.meters[k].update(float(v))

    def write(self, iteration: int, max_iter: int, values: Dict[str, float]) -> None:
        """Append one JSON line, add tensorboard scalars, and log a progress line."""
        if not self.enabled:
            return
        record = {"iteration": iteration, **values}
        if self._iter_time.count:  # seconds per iteration (median over the window), for throughput
            record["iter_time"] = self._iter_time.median
        if self._data_time.count:  # of which waiting for the loader (DINOv2's "data" time)
            record["data_time"] = self._data_time.median
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, iteration)
        eta = ""
        if self._iter_time.count:
            secs = self._iter_time.global_avg * (max_iter - iteration - 1)
            eta = f"eta {datetime.timedelta(seconds=int(secs))}  it {self._iter_time.median:.3f}s  "
        if self._data_time.count:
            eta += f"data {self._data_time.median:.3f}s  "
        shown = "  ".join(f"{k} {self.meters[k]}" for k in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr") if k in self.meters)
        if "images_per_sec" in values:
            shown += f"  img/s {values['images_per_sec']:.1f}"
        if "mfu" in values:
            shown += f"  mfu {100 * values['mfu']:.1f}%"
        logger.info("Training [%d/%d]  %s%s", iteration, max_iter, eta, shown)
        self._warn_if_waiting()

    def _warn_if_waiting(self) -> None:
        if self._warned_waiting or self._data_time.count < WAITING_MIN_ITERATIONS or not self._iter_time.count:
            return
        data, it = self._data_time.median, self._iter_time.median
        if data > WAITING_FRACTION * it:
            self._warned_waiting = True
            logger.warning("the step waits for the data loader %.0f%% of each iteration (data %.3fs of %.3fs): "
                           "raise train.num_workers, give the job more CPUs, or set augmentations.on_device=true",
                           100 * data / it, data, it)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
