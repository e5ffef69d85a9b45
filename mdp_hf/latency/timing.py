"""The timing protocol shared by table building and end-to-end measurement.

One protocol everywhere, so that predicted (table) and measured (model) numbers are comparable:

- a fixed CPU thread count (``torch.set_num_threads``; 1 is the stable choice on small shared machines),
- ``torch.inference_mode()``, inputs created once on the target device and dtype,
- warm-up calls, then ``repeats`` timed calls; on CUDA every call is bracketed by CUDA events after a
  ``torch.cuda.synchronize()``, on CPU by ``time.perf_counter``,
- several configurations are timed *interleaved* (round r times every configuration once), so slow
  drift of the machine (other jobs, frequency changes) spreads evenly instead of biasing some of them,
- the statistic is the **median** of the repeats (``min`` is available; the median is what we report
  because it is robust to the occasional preempted run without rewarding lucky outliers).
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TimingSettings:
    """Everything that changes a latency: stored with every table and compared when one is loaded."""

    device: str = "cpu"
    batch_size: int = 1
    image_size: int | None = None  # None: the model config's image size
    dtype: str = "float32"
    threads: int | None = 1  # CPU threads (torch.set_num_threads); None leaves torch's default
    attn_implementation: str = "sdpa"
    warmup: int = 3
    repeats: int = 15
    statistic: str = "median"  # or "min"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.statistic not in ("median", "min"):
            raise ValueError(f"statistic must be 'median' or 'min', got {self.statistic!r}")
        if self.repeats < 1 or self.warmup < 0 or self.batch_size < 1:
            raise ValueError("repeats and batch_size must be >= 1 and warmup >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Measurement:
    """Result of timing one configuration: the chosen statistic in ms plus the raw samples."""

    ms: float
    median_ms: float
    min_ms: float
    samples_ms: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples_ms: list[float], statistic: str = "median") -> Measurement:
        """The measurement of ``samples_ms`` (ms) under ``statistic`` ("median" or "min")."""
        median, low = statistics.median(samples_ms), min(samples_ms)
        return cls(ms=low if statistic == "min" else median, median_ms=median, min_ms=low, samples_ms=list(samples_ms))

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (a quick noise indicator)."""
        if len(self.samples_ms) < 4:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return (q[2] - q[0]) / max(self.median_ms, 1e-12)


def device_name(device: str) -> str:
    """Human-readable accelerator / CPU model name stored in table metadata."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.machine() or "cpu"


@contextlib.contextmanager
def thread_count(threads: int | None):
    """Temporarily fix torch's intra-op thread count (None: leave it)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: Sequence[Callable[[], object]],
    device: str = "cpu",
    warmup: int = 3,
    repeats: int = 15,
    statistic: str = "median",
) -> list[Measurement]:
    """Time each zero-argument callable with the protocol; round r calls every callable once.

    The callables run under ``torch.inference_mode()``; the caller fixes threads (see ``thread_count``).
    """
    dev = torch.device(device)
    samples: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for call in calls:
            for _ in range(warmup):
                call()
        _synchronize(dev)
        for _ in range(repeats):
            for i, call in enumerate(calls):
                if dev.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize(dev)
                    start.record()
                    call()
                    end.record()
                    end.synchronize()
                    samples[i].append(float(start.elapsed_time(end)))
                else:
                    t0 = time.perf_counter()
                    call()
                    samples[i].append((time.perf_counter() - t0) * 1e3)
    return [Measurement.from_samples(s, statistic) for s in samples]


def _model_input(model, settings: TimingSettings) -> torch.Tensor:
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", 3)
    size = settings.image_size or getattr(config, "image_size", None) or 224
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return torch.randn(settings.batch_size, channels, *size, device=settings.device, dtype=settings.torch_dtype)


def measure_latencies(
    models: Sequence[torch.nn.Module],
    settings: TimingSettings | None = None,
    inputs: torch.Tensor | None = None,
    **overrides,
) -> list[Measurement]:
    """Time several models (dense, gated or sliced) interleaved, with the protocol of ``settings``.

    Each model is moved to the settings' device and dtype and put in eval mode; ``inputs`` defaults to
    random pixels of shape (batch, channels, image, image) taken from the first model's config.
    """
    settings = TimingSettings(**{**(settings.to_dict() if settings else {}), **overrides})
    prepared = [m.to(device=settings.device, dtype=settings.torch_dtype).eval() for m in models]
    pixels = inputs if inputs is not None else _model_input(prepared[0], settings)
    pixels = pixels.to(device=settings.device, dtype=settings.torch_dtype)
    calls = [(lambda m=m: m(pixels)) for m in prepared]
    with thread_count(settings.threads if torch.device(settings.device).type == "cpu" else None):
        return time_interleaved(calls, settings.device, settings.warmup, settings.repeats, settings.statistic)


def measure_latency(
    model: torch.nn.Module, settings: TimingSettings | None = None, inputs: torch.Tensor | None = None, **overrides
) -> Measurement:
    """Latency of one forward pass of ``model`` in ms (``.ms``: median of repeats by default).

    Works for dense, gated (hooks installed) and sliced models alike; keyword overrides are
    ``TimingSettings`` fields, e.g. ``measure_latency(model, batch_size=8, threads=1, repeats=30)``.
    """
    return measure_latencies([model], settings, inputs, **overrides)[0]


__all__ = [
    "DTYPES",
    "Measurement",
    "TimingSettings",
    "device_name",
    "measure_latencies",
    "measure_latency",
    "thread_count",
    "time_interleaved",
]
