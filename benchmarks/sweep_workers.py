"""Sweep throughput: the same trials run by ``python -m project.tools.sweep`` with 1 worker and with K, in trials per hour.

Each setting runs the whole grid (one trial per seed) into its own fresh sweep directory, through the
real CLI, timed from the worker's start to its exit; the ratio is K workers' trials/hour over 1 worker's.

    python benchmarks/sweep_workers.py                          # CPU: 8 LeNet trials on the subset, 1 vs 2 workers
    python benchmarks/sweep_workers.py --gpu                    # one GPU: 8 ResNet-20 trials, 1 vs 4 workers on it
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report  # also puts the repository on sys.path
import torch
import yaml

SUBSET = report.REPO.parent / "shared" / "data" / "cifar10_subset.npz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="ResNet-20 on the GPU instead of LeNet on the CPU")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="the K compared with 1 (default: 2 on CPU, 4 on GPU)")
    p.add_argument("--epochs", type=int, default=None, help="epochs a trial (default: 1 on CPU, 3 on GPU)")
    p.add_argument("--npz", type=Path, default=SUBSET)
    p.add_argument("--note", default="", help="appended to the JSON's notes (e.g. what else ran on the machine)")
    return p.parse_args()


def sweep_config(args: argparse.Namespace) -> dict:
    config, device = ("experiments/resnet20.yaml", "gpu") if args.gpu else ("experiments/lenet.yaml", "cpu")
    return {
        "method": "grid",
        "metric": {"name": "val/acc", "goal": "maximize"},
        "parameters": {"seed_everything": {"values": list(range(1, args.trials + 1))}},
        "program": "project",
        "command": [
            "${env}",
            "${interpreter}",
            "-m",
            "${program}",
            "fit",
            "--config",
            config,
            f"--data.npz={args.npz}",
            "--data.val_size=500",
            f"--trainer.accelerator={device}",
            f"--trainer.max_epochs={args.epochs}",
            "--trainer.enable_progress_bar=false",
            "--test_after_fit=false",
            "--plots.enabled=false",
            "${args}",
        ],
    }


def timed_sweep(sweep_file: Path, directory: Path, workers: int) -> dict:
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "project.tools.sweep",
            str(sweep_file),
            "--dir",
            str(directory),
            "--workers",
            str(workers),
        ],
        cwd=report.REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(report.REPO)},
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the sweep with {workers} worker(s) failed:\n{done.stderr[-3000:]}")
    trials = json.loads((directory / "trials.json").read_text())["trials"]
    assert all(t["state"] == "finished" for t in trials) and len(trials) > 0
    return {
        "seconds": round(seconds, 1),
        "trials": len(trials),
        "trials_per_hour": round(3600 * len(trials) / seconds, 1),
        "val_acc": [t["history"][-1] for t in trials],
    }


def main() -> None:
    args = parse_args()
    args.workers = args.workers or (4 if args.gpu else 2)
    args.epochs = args.epochs or (3 if args.gpu else 1)
    device = torch.device("cuda" if args.gpu else "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sweep_file = Path(tmp) / "sweep.yaml"
        sweep_file.write_text(yaml.safe_dump(sweep_config(args), sort_keys=False))
        for workers in (1, args.workers):
            results[f"workers_{workers}"] = timed_sweep(sweep_file, Path(tmp) / f"workers-{workers}", workers)
            print(f"{workers} worker(s): {results[f'workers_{workers}']}", flush=True)
    ratio = results[f"workers_{args.workers}"]["trials_per_hour"] / results["workers_1"]["trials_per_hour"]
    results["ratio"] = round(ratio, 3)
    notes = (
        "Wall time of the whole sweep (worker start to exit, CLI start-up of every trial included). "
        + (
            "On the CPU the worker splits the cores between its trials (OMP_NUM_THREADS). "
            if not args.gpu
            else "All workers' trials share the one GPU (CUDA_VISIBLE_DEVICES=0). "
        )
        + args.note
    )
    report.write(
        f"sweep-workers-{'resnet20' if args.gpu else 'lenet'}",
        device,
        {
            "trials": args.trials,
            "workers": [1, args.workers],
            "epochs": args.epochs,
            "npz": str(args.npz),
            "sweep": sweep_config(args),
        },
        results,
        [report.target(f"trials/hour, {args.workers} workers over 1", ratio, ">=", 1.7)],
        notes.strip(),
    )


if __name__ == "__main__":
    main()
