"""Data-pipeline throughput alone: the device-resident pipeline against the DataLoader, in images/s.

Both produce the same training batches (random crop with 4-pixel padding, horizontal flip,
normalisation) of uint8 CIFAR-shaped images, delivered on the target device; nothing is trained.

    python benchmarks/data_pipeline.py                       # CPU
    python benchmarks/data_pipeline.py --device cuda --images 50000
"""

import argparse

import report  # also puts the repository on sys.path
import torch

from project.data import CIFAR10_MEAN, CIFAR10_STD
from project.data.cifar import TensorImageDataset, image_transform
from project.data.cifar_files import Split
from project.data.device_loader import DeviceLoader


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=10_000, help="dataset size (one epoch is timed)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p.parse_args()


def epoch_images_per_s(loader, device: torch.device, epoch: int) -> float:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    return report.images_per_s(loader, device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,))

    loaders = {
        "device": DeviceLoader(
            images,
            labels,
            args.batch_size,
            shuffle=True,
            augment=True,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            device=device,
        )
    }
    for workers in args.workers:
        dataset = TensorImageDataset(
            Split(images, labels), image_transform(augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
        )
        loaders[f"dataloader_{workers}_workers"] = torch.utils.data.DataLoader(
            dataset,
            args.batch_size,
            shuffle=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    results = {}
    for name, loader in loaders.items():
        epoch_images_per_s(loader, device, epoch=0)  # warm-up (worker start-up, CUDA kernels)
        rates = [epoch_images_per_s(loader, device, epoch=1 + r) for r in range(args.repeats)]
        results[name] = {
            "images_per_s_median": round(report.median(rates), 1),
            "images_per_s_per_repeat": [round(r, 1) for r in rates],
        }
        print(f"{name:<24} {results[name]['images_per_s_median']:12.0f} images/s", flush=True)
    best_loader = max(v["images_per_s_median"] for k, v in results.items() if k != "device")
    results["device_over_best_dataloader"] = round(results["device"]["images_per_s_median"] / best_loader, 2)
    print(f"device pipeline / best DataLoader: {results['device_over_best_dataloader']}x")
    report.write(
        "data-pipeline",
        device,
        vars(args),
        results,
        notes="One epoch per repeat after a warm-up epoch; batches end on the device (DataLoader: pinned, non_blocking copies on CUDA).",
    )


if __name__ == "__main__":
    main()
