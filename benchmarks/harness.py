"""The small harness every benchmark shares: alternate baseline and ours, time repetitions, report.

A comparison runs `baseline` and `ours` in turns (baseline first on even repetitions, ours first on
odd ones), after one untimed warm-up each, so that a slow spell of a shared machine hits both. Each
repetition gives one paired ratio (baseline seconds / ours seconds); the report gives their min, median
and max, and the 1-minute load average before and after, because the numbers mean little without it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlp_core.atomic import atomic_write_text
from vlp_core.storage import Location


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads, load average, GPU (when present), library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_line(info: dict[str, Any]) -> str:
    load = " ".join(f"{value:.2f}" for value in info["load_average"])
    return (
        f"machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"load average {load}, GPU {info['gpu'] or 'none'}, torch {info['torch']}"
    )


def process_status_kib(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status, in kB (e.g. VmRSS now, VmHWM the peak); None
    where there is no /proc (not Linux)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def load_1min() -> float:
    return round(os.getloadavg()[0], 2)


@dataclass
class Comparison:
    """Seconds per repetition of a baseline and of ours doing the same `work` (in `unit`s)."""

    label: str
    unit: str
    work: float
    baseline_s: list[float]
    ours_s: list[float]
    load_before: float
    load_after: float

    @property
    def ratios(self) -> list[float]:
        """Paired speed-ups: baseline time / our time, one per repetition."""
        return [baseline / ours for baseline, ours in zip(self.baseline_s, self.ours_s)]

    def summary(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            **asdict(self),
            "baseline_rate": self.work / statistics.median(self.baseline_s),
            "ours_rate": self.work / statistics.median(self.ours_s),
            "ratio": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
        }

    def lines(self) -> list[str]:
        s = self.summary()
        ratio = s["ratio"]
        return [
            f"{self.label}: baseline {s['baseline_rate']:.1f} {self.unit} ({_spread(self.baseline_s)}), "
            f"ours {s['ours_rate']:.1f} {self.unit} ({_spread(self.ours_s)})",
            f"{self.label}: ratio ours/baseline speed median {ratio['median']:.2f}x "
            f"(min {ratio['min']:.2f}x, max {ratio['max']:.2f}x, {len(self.ratios)} alternating pairs; "
            f"load {self.load_before:.2f} -> {self.load_after:.2f})",
        ]


def _spread(seconds: list[float]) -> str:
    return f"s/rep min {min(seconds):.3f} median {statistics.median(seconds):.3f} max {max(seconds):.3f}"


def time_once(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def compare(
    label: str,
    unit: str,
    work: float,
    baseline: Callable[[], Any],
    ours: Callable[[], Any],
    repeats: int,
    warmup: bool = True,
) -> Comparison:
    """Time `baseline` and `ours` `repeats` times each, alternating which goes first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        baseline()
        ours()
    load_before = load_1min()
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    for repetition in range(repeats):
        order = [("baseline", baseline), ("ours", ours)]
        for name, function in order if repetition % 2 == 0 else order[::-1]:
            times[name].append(time_once(function)[0])
    return Comparison(label, unit, work, times["baseline"], times["ours"], load_before, load_1min())


@dataclass
class Measurement:
    """A figure without a baseline (e.g. training samples/s): seconds per repetition of `work` units."""

    label: str
    unit: str
    work: float
    seconds: list[float]
    load_before: float
    load_after: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.work / statistics.median(self.seconds)}

    def lines(self) -> list[str]:
        extra = "".join(f", {name} {_format(value)}" for name, value in self.extra.items())
        return [
            f"{self.label}: {self.summary()['rate']:.2f} {self.unit} ({_spread(self.seconds)}{extra}; "
            f"load {self.load_before:.2f} -> {self.load_after:.2f})"
        ]


def measure(
    label: str,
    unit: str,
    work: float,
    function: Callable[[], Any],
    repeats: int,
    warmup: bool = True,
    count_flops: bool = False,
) -> Measurement:
    """Time `function` `repeats` times (after a warm-up). With `count_flops`, the extras give the arithmetic
    it achieved (TFLOP/s, from one more call's FLOPs as torch counts them) and, on a GPU of known peak, MFU."""
    if warmup:
        function()
    load_before = load_1min()
    seconds = [time_once(function)[0] for _ in range(repeats)]
    measurement = Measurement(label, unit, work, seconds, load_before, load_1min())
    if count_flops:
        measurement.extra |= flop_rates(flops_of(function), statistics.median(seconds))
    return measurement


# Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), for MFU = achieved / peak.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def flops_of(function: Callable[[], Any]) -> int:
    """The floating-point operations of one call, as `torch.utils.flop_counter` counts them (matrix products,
    convolutions and attention, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def flop_figures(label: str, function: Callable[[], Any], seconds: float) -> dict[str, Any]:
    """Report figures "`label`: TFLOP/s" (and "`label`: MFU") of `function` taking `seconds` per call."""
    return {f"{label}: {name}": value for name, value in flop_rates(flops_of(function), seconds).items()}


def flop_rates(flops: int, seconds: float) -> dict[str, Any]:
    """{"TFLOP/s": achieved} and, on a GPU whose bf16 peak is in PEAK_BF16_TFLOPS, {"MFU": achieved / peak}."""
    import torch

    achieved = flops / seconds / 1e12
    rates: dict[str, Any] = {"TFLOP/s": round(achieved, 4)}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = next((value for name, value in PEAK_BF16_TFLOPS.items() if name in gpu), None)
    if peak is not None:
        rates["MFU"] = f"{achieved / peak:.1%}"
    return rates


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class Report:
    """What one benchmark prints and saves: the machine, its comparisons and measurements, and figures
    (named numbers such as output statistics), plus notes that say what was measured."""

    benchmark: str
    quick: bool
    machine: dict[str, Any]
    comparisons: list[Comparison] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"== bench {self.benchmark}{' (quick)' if self.quick else ''}", machine_line(self.machine)]
        lines += self.notes
        for item in [*self.comparisons, *self.measurements]:
            lines += item.lines()
        lines += [f"{name}: {_format(value)}" for name, value in self.figures.items()]
        lines.append(f"load average at the end: {load_1min():.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "quick": self.quick,
            "machine": self.machine,
            "notes": self.notes,
            "comparisons": [item.summary() for item in self.comparisons],
            "measurements": [item.summary() for item in self.measurements],
            "figures": self.figures,
        }


def save_reports(reports: list[Report], path: Location) -> None:
    """All reports as one JSON list, written atomically."""
    atomic_write_text(path, json.dumps([report.to_dict() for report in reports], indent=2, default=str) + "\n")
