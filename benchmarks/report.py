"""What every benchmark records beside its numbers: the device, the versions, the settings; and the JSON file."""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # `python benchmarks/<script>.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


def device_info(device: torch.device) -> dict:
    info = {
        "type": device.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}"
        )
    else:
        info["name"] = info["cpu"]
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    import lightning
    import torchmetrics
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Wall-clock seconds after all queued work on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()


def images_per_s(batches, device: torch.device) -> float:
    """Images per second while ``batches`` of (images, labels) are drawn and moved to ``device``."""
    start = now(device)
    n = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        n += len(images)
    return n / (now(device) - start)


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(
    name: str, device: torch.device, settings: dict, results: dict, targets: list[dict] | None = None, notes: str = ""
) -> Path:
    """Write ``benchmarks/results/<name>-<device type>.json`` (atomically) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{device.type}.json"
    record = {
        "benchmark": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device_info(device),
        "versions": versions(),
        "settings": settings,
        "results": results,
        "targets": targets or [],
        "notes": notes,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path.relative_to(REPO)}")
    return path


def target(name: str, measured: float | None, op: str, goal: float) -> dict:
    met = None if measured is None else (measured <= goal if op == "<=" else measured >= goal)
    return {
        "name": name,
        "target": f"{op} {goal}",
        "measured": None if measured is None else round(measured, 4),
        "met": met,
    }


def clocks(device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, this process's CPU seconds), after the work queued on ``device`` has finished.

    On a shared CPU the process's CPU time is the steadier measure: time spent waiting for a core
    that another process holds counts in wall-clock time only.
    """
    synchronize(device)
    return time.perf_counter(), time.process_time()
