"""What a recipe costs and reaches, run through the real CLI (its config, presets, callbacks and data module).

Two measurements:

- ``epoch``: seconds per training epoch on ``--images`` random images of CIFAR shape (50,000 is
  a full CIFAR-10 epoch); the first epoch includes warm-up (cuDNN autotuning, compilation).
- ``subset``: train on the 5,170 real training images of ../shared/data/cifar10_subset.npz, then
  test on its 508 real test images; reports the accuracy and the wall time.

    python benchmarks/recipe.py epoch  -c experiments/resnet18.yaml -c experiments/presets/gpu_speed.yaml
    python benchmarks/recipe.py epoch  -c experiments/resnet_fast.yaml
    python benchmarks/recipe.py subset -c experiments/resnet_fast.yaml --epochs 16 --batch-size 128 --lr 0.2

Anything after ``--`` goes to the CLI unchanged, e.g. ``-- --trainer.precision=32-true``.
"""

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import report

SUBSET = report.REPO.parent / "shared" / "data" / "cifar10_subset.npz"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("task", choices=["epoch", "subset"])
    p.add_argument("-c", "--config", action="append", required=True, help="config files, as for python -m project")
    p.add_argument("--images", type=int, default=50_000, help="epoch: random training images")
    p.add_argument("--epochs", type=int, default=None, help="epoch: default 2; subset: default the config's max_epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override data.batch_size")
    p.add_argument("--lr", type=float, default=None, help="override model.optimizer.lr")
    p.add_argument("--npz", default=str(SUBSET), help="subset: the real-image npz")
    p.add_argument("--name", default=None, help="result file name")
    p.add_argument("cli_args", nargs="*", help="after --: more CLI arguments")
    return p.parse_args()


class EpochTimer(L.Callback):
    """Wall-clock seconds of every training epoch (synchronised on GPU)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = report.now(trainer.strategy.root_device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(report.now(trainer.strategy.root_device) - self.start)


def random_npz(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, n).astype(np.uint8),
        x_test=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 16).astype(np.uint8),
    )
    return path


def build_cli(args, npz: Path, root: str, epochs: int | None):
    from project.run.cli import ProjectCLI

    cli_args = [x for c in args.config for x in ("-c", c)]
    cli_args += [
        f"--data.npz={npz}",
        "--data.val_size=0",
        "--test_after_fit=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={root}",
        f"--name=bench-{args.task}",
    ]
    if epochs is not None:
        cli_args.append(f"--trainer.max_epochs={epochs}")
    if args.batch_size is not None:
        cli_args.append(f"--data.batch_size={args.batch_size}")
    if args.lr is not None:
        cli_args.append(f"--model.optimizer.lr={args.lr}")
    return ProjectCLI(args=cli_args + args.cli_args, run=False)


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", ".*could not find the monitored key.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    stem = Path(args.config[0]).stem + "".join(f"+{Path(c).stem}" for c in args.config[1:])
    with tempfile.TemporaryDirectory() as root:
        if args.task == "epoch":
            npz = random_npz(Path(root) / "random.npz", args.images)
            cli = build_cli(args, npz, root, args.epochs or 2)
        else:
            cli = build_cli(args, Path(args.npz), root, args.epochs)
        trainer, model, dm = cli.trainer, cli.model, cli.datamodule
        timer = EpochTimer()
        trainer.callbacks.append(timer)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        fit_seconds = time.perf_counter() - start
        device = trainer.strategy.root_device
        optimizer = trainer.optimizers[0]  # its defaults hold the configured lr (the groups' lr follow the schedule)
        settings = {
            "task": args.task,
            "configs": args.config,
            "cli_args": args.cli_args,
            "max_epochs": trainer.max_epochs,
            "batch_size": dm.batch_size,
            "optimizer": type(optimizer).__name__,
            "lr": optimizer.defaults.get("lr"),
            "precision": str(trainer.precision),
            "channels_last": bool(model.hparams.get("channels_last")),
            "compile": bool(model.hparams.get("compile")),
            "tta_flip": bool(model.hparams.get("tta_flip")),
            "pipeline": dm.resolved_pipeline(),
            "net": type(model.net).__name__,
            "parameters": sum(p.numel() for p in model.net.parameters()),
            "training_images": len(dm.train_split),
        }
        results = {"epoch_seconds": [round(s, 3) for s in timer.seconds], "fit_seconds": round(fit_seconds, 2)}
        targets = []
        if args.task == "epoch":
            steady = min(timer.seconds[1:] or timer.seconds)
            results.update(seconds_per_epoch=round(steady, 3), images_per_s=round(len(dm.train_split) / steady, 1))
            print(
                f"{stem}: {steady:.2f} s per epoch of {len(dm.train_split)} images after warm-up (epochs: {results['epoch_seconds']})"
            )
        else:
            start = time.perf_counter()
            (test,) = trainer.test(model, datamodule=dm, verbose=False)
            results.update(
                test_seconds=round(time.perf_counter() - start, 2), test=test, test_images=len(dm.test_split)
            )
            targets.append(report.target("test accuracy on the 508 real test images", test["test/acc"], ">=", 0.70))
            print(
                f"{stem}: test/acc {test['test/acc']:.4f} after {fit_seconds:.1f} s of training ({trainer.max_epochs} epochs)"
            )
    report.write(args.name or f"{args.task}-{stem}", device, settings, results, targets)


if __name__ == "__main__":
    main()
