"""Lightning ``Trainer.fit`` with ``ImageClassifier`` against a hand-written PyTorch loop, side by side.

By default both do identical work: the same net and initial weights, the same batches in the same order (one
seeded pipeline), the same loss with label smoothing, SGD with nesterov and the same parameter
groups, the same one-cycle schedule stepped every step, the same precision and memory format, the
same per-step training-accuracy and loss sums, and the same number of steps (``--plain-metrics off``
leaves the sums out of the plain loop, so that it computes only the loss). Each is timed after a warm-up,
in alternating repeats (the median is reported), in one process. On GPU it also reports the model
FLOP/s (counted with torch.utils.flop_counter) against a measured bf16 matmul ceiling, and how
many images/s the data pipeline alone delivers compared with what the training step consumes.

    python benchmarks/throughput.py                          # CPU, LeNet, batch 256 (the CI-sized run)
    python benchmarks/throughput.py --device cuda --model resnet18 --precision bf16-mixed --channels-last
"""

import argparse
import contextlib
import copy
import functools
import gc
import itertools
import tempfile
import warnings

import lightning as L
import report  # also puts the repository on sys.path
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from project.classifier import ImageClassifier
from project.data import CIFAR10_MEAN, CIFAR10_STD
from project.data.cifar import TensorImageDataset, image_transform
from project.data.cifar_files import Split
from project.data.device_loader import DeviceLoader
from project.models import LeNet, ResNet, ResNet18
from project.schedules import WarmupCosine

MODELS = {
    "lenet": LeNet,
    "resnet18": ResNet18,
    # experiments/resnet_fast.yaml's net
    "resnet_fast": lambda: ResNet(blocks_per_stage=(1, 1, 1, 1), widths=(64, 128, 256, 512)),
}
LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.05, 0.9, 5e-4, 0.1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="lenet", choices=sorted(MODELS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="32-true", choices=["32-true", "16-mixed", "bf16-mixed"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the net in both loops")
    p.add_argument(
        "--data", default="device", choices=["device", "dataloader"], help="the pipeline both loops read from"
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (with --data dataloader)")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing starts")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats of every variant")
    p.add_argument(
        "--callbacks",
        default="both",
        choices=["off", "on", "both"],
        help="Lightning with progress bar, summary, logger and checkpointing off, on (the CLI's defaults), or both",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--scheduler", default="onecycle", choices=["onecycle", "cosine"], help="the per-step schedule of both loops"
    )
    p.add_argument(
        "--plain-metrics",
        default="on",
        choices=["on", "off"],
        help="on: the plain loop updates the same torchmetrics accuracies as Lightning (identical work); "
        "off: it computes only the loss, so Lightning's metric and logging costs count as overhead",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="CPU: also run each Lightning variant with one plain-loop step before each of its iterations, both timed "
        "(the steadiest comparison on a shared machine)",
    )
    p.add_argument("--name", default=None, help="result file name (default: throughput-<model>-<settings>)")
    return p.parse_args()


def make_loader(args, images: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """A fresh loader over the same images with the same seed: every variant sees identical batches."""
    if args.data == "device":
        return DeviceLoader(
            images,
            labels,
            args.batch_size,
            shuffle=True,
            augment=True,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            seed=0,
            device=device,
        )
    dataset = TensorImageDataset(
        Split(images, labels), image_transform(augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    )
    return torch.utils.data.DataLoader(
        dataset,
        args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
        persistent_workers=args.num_workers > 0,
    )


def build_net(args, initial_state: dict) -> torch.nn.Module:
    net = MODELS[args.model]()
    net.load_state_dict(initial_state)
    return net


class Stopwatch:
    """Marks the start of loop iterations ``warmup .. warmup + steps``: ``steps`` whole iterations
    (data, forward, backward, optimiser, and whatever the loop adds).

    On CPU every iteration is marked, so the median iteration time is available too (robust to
    another process taking the core for a moment); on GPU only the two ends are, each after a
    synchronize, because marking every step would stall the queue.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.first, self.last = device, warmup, warmup + steps
        self.marks: list[tuple[float, float]] = []

    def tick(self, step: int) -> None:
        if self.first <= step <= self.last and (self.device.type == "cpu" or step in (self.first, self.last)):
            self.marks.append(report.clocks(self.device))

    def result(self) -> dict:
        (wall0, cpu0), (wall1, cpu1) = self.marks[0], self.marks[-1]
        out = {"wall": wall1 - wall0, "cpu": cpu1 - cpu0}
        if len(self.marks) > 2:
            steps = sorted(b[0] - a[0] for a, b in zip(self.marks, self.marks[1:]))
            out["median_step"] = report.median(steps)
            # The fastest tenth of the steps: what a step costs when no other process interferes.
            out["fast_step"] = report.median(steps[: max(1, len(steps) // 10)])
        return out


class StepTimer(L.Callback):
    def __init__(self, stopwatch: Stopwatch) -> None:
        self.stopwatch = stopwatch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stopwatch.tick(batch_idx)


def classifier(args, net: torch.nn.Module) -> ImageClassifier:
    # The same per-step schedules as PlainLoop's; ImageClassifier fills in total_steps from the trainer's max_steps.
    scheduler = (
        WarmupCosine
        if args.scheduler == "cosine"
        else functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=LR)
    )
    return ImageClassifier(
        net,
        optimizer=functools.partial(
            torch.optim.SGD, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY
        ),
        scheduler=scheduler,
        label_smoothing=LABEL_SMOOTHING,
        channels_last=args.channels_last,
        compile=args.compile,
    )


def run_paired_control(args, initial_state, images, labels, device) -> dict:
    """The pairing's own bias: two identical plain loops, one step of each in turn, timed like a
    paired Lightning run (the first loop standing in for Lightning); an unbiased pairing gives 1."""
    first, second = (PlainLoop(args, initial_state, images, labels, device) for _ in range(2))
    pairs = PairedPlainSteps(second, args.warmup, args.steps)
    for step in range(args.warmup + args.steps + 1):
        pairs.on_train_batch_start(None, None, None, step)
        first.step()
    return pairs.result()


def run_lightning(
    args, initial_state, images, labels, device, callbacks_on: bool, root: str, paired: bool = False
) -> dict:
    total = args.warmup + args.steps + 1
    model = classifier(args, build_net(args, initial_state))
    stopwatch = Stopwatch(device, args.warmup, args.steps)
    timer = (
        PairedPlainSteps(PlainLoop(args, initial_state, images, labels, device), args.warmup, args.steps)
        if paired
        else StepTimer(stopwatch)
    )
    common = dict(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        max_steps=total,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        benchmark=device.type == "cuda",
    )
    if callbacks_on:
        # The trainer exactly as our CLI builds it (progress bar, model summary, CSV logger, checkpoint
        # and export callbacks and whatever else the CLI adds by default), fed our model and loader.
        from project.run.cli import ProjectCLI

        cli_args = [
            "--model.net.class_path=project.models.LeNet",
            f"--trainer.default_root_dir={root}",
            "--name=bench",
            "--test_after_fit=false",
            *[f"--trainer.{k}={v}" for k, v in common.items()],
        ]
        trainer = ProjectCLI(args=cli_args, run=False).trainer
        trainer.callbacks.append(timer)
    else:
        trainer = L.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
            default_root_dir=root,
            **common,
        )
    trainer.fit(model, train_dataloaders=make_loader(args, images, labels, device))
    return timer.result() if paired else stopwatch.result()


class PlainLoop:
    """The hand-written loop a PyTorch user would write for the same training, one step per call."""

    def __init__(self, args, initial_state, images, labels, device) -> None:
        self.args, self.device, total = args, device, args.warmup + args.steps + 1
        net = build_net(args, initial_state).to(device)
        if args.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if args.compile:
            net.compile()
        decay = [p for p in net.parameters() if p.ndim >= 2]
        no_decay = [p for p in net.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR,
            momentum=MOMENTUM,
            nesterov=True,
        )
        if args.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        else:
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=LR, total_steps=total)
        self.sums = None  # [loss x batch size, top-1 hits, top-5 hits], as ImageClassifier keeps them in training
        mixed = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(args.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=mixed)) if mixed else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if args.precision == "16-mixed" else None
        self.net = net.train()
        self.batches = iter(make_loader(args, images, labels, device))

    def step(self) -> None:
        args, device = self.args, self.device
        x, y = next(self.batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)
            if args.plain_metrics == "on":
                hits = logits.detach().topk(5, dim=-1).indices == y[:, None]
                batch = torch.stack(
                    [loss.detach().float() * len(y), hits[:, 0].sum().float(), hits.any(dim=-1).sum().float()]
                )
                self.sums = batch if self.sums is None else self.sums.add_(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()


def run_plain(args, initial_state, images, labels, device) -> dict:
    stopwatch = Stopwatch(device, args.warmup, args.steps)
    loop = PlainLoop(args, initial_state, images, labels, device)
    for step in range(args.warmup + args.steps + 1):
        stopwatch.tick(step)
        loop.step()
    return stopwatch.result()


class PairedPlainSteps(L.Callback):
    """Paired measurement (CPU): before every Lightning iteration, one plain-loop step, both timed.

    Lightning's iteration k is the time from the end of the plain step run at its start to the start
    of the next one (training step, optimiser, hooks, logging, fetching the next batch); the plain
    step beside it runs a moment earlier, so on a shared machine both see the same interference,
    which alternating whole runs cannot give.
    """

    def __init__(self, plain: PlainLoop, warmup: int, steps: int) -> None:
        self.plain, self.first, self.last = plain, warmup, warmup + steps
        self.lightning: list[tuple[float, float]] = []  # (wall, cpu) of Lightning's iterations
        self.plain_steps: list[tuple[float, float]] = []
        self.resumed: tuple[float, float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        before = report.clocks(self.plain.device)
        if self.resumed is not None and self.first < batch_idx <= self.last:
            self.lightning.append((before[0] - self.resumed[0], before[1] - self.resumed[1]))
        self.plain.step()
        after = report.clocks(self.plain.device)
        if self.first <= batch_idx < self.last:
            self.plain_steps.append((after[0] - before[0], after[1] - before[1]))
        self.resumed = after

    def result(self) -> dict:
        lightning_wall, lightning_cpu = (sum(t) for t in zip(*self.lightning))
        plain_wall, plain_cpu = (sum(t) for t in zip(*self.plain_steps))
        return {
            "steps": len(self.lightning),
            "lightning_seconds_per_step": lightning_wall / len(self.lightning),
            "plain_seconds_per_step": plain_wall / len(self.plain_steps),
            "time_ratio": lightning_wall / plain_wall,
            "process_cpu_time_ratio": lightning_cpu / plain_cpu,
            "median_step_ratio": report.median([a[0] / b[0] for a, b in zip(self.lightning, self.plain_steps)]),
        }


def train_flops_per_image(args, initial_state, device) -> int:
    """Forward + backward FLOPs of one training step, per image (convolutions and matmuls)."""
    net = build_net(args, initial_state).to(device).train()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops() // args.batch_size


def matmul_ceiling(device: torch.device) -> tuple[float, str]:
    """Measured FLOP/s of a large square matmul: bf16 on GPU, float32 on CPU (for context only)."""
    dtype, n, reps = (torch.bfloat16, 8192, 50) if device.type == "cuda" else (torch.float32, 2048, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    start = report.now(device)
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (report.now(device) - start), str(dtype).replace("torch.", "")


def pipeline_images_per_s(args, images, labels, device, batches: int) -> float:
    loader = make_loader(args, images, labels, device)
    iterator = iter(loader)
    next(iterator)  # warm-up
    return report.images_per_s(itertools.islice(iterator, batches), device)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*could not find the monitored key.*")
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    torch.manual_seed(0)
    total = args.warmup + args.steps + 1  # the last batch is fetched (closing the timed window), not timed
    images = torch.randint(0, 256, (total * args.batch_size, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (total * args.batch_size,))
    initial_state = copy.deepcopy(MODELS[args.model]().state_dict())

    variants = {"plain": None}
    if args.callbacks in ("off", "both"):
        variants["lightning_callbacks_off"] = False
    if args.callbacks in ("on", "both"):
        variants["lightning_callbacks_on"] = True
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    paired = (
        ["plain_control", *(name for name in variants if name != "plain")]
        if args.paired and device.type == "cpu"
        else []
    )
    paired_runs: dict[str, list[dict]] = {name: [] for name in paired}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            # Alternate the order so slow drifts of a shared machine hit every variant alike.
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                gc.collect()  # so garbage from the previous variant is not collected inside this one's timing
                if name == "plain":
                    run = run_plain(args, initial_state, images, labels, device)
                else:
                    run = run_lightning(args, initial_state, images, labels, device, variants[name], root)
                runs[name].append(run)
                print(
                    f"repeat {repeat}: {name:<24} {args.steps * args.batch_size / run['wall']:10.0f} images/s  "
                    f"(wall {run['wall']:.3f} s, process CPU {run['cpu']:.3f} s)",
                    flush=True,
                )
            for name in paired if repeat % 2 == 0 else paired[::-1]:
                gc.collect()
                if name == "plain_control":
                    run = run_paired_control(args, initial_state, images, labels, device)
                else:
                    run = run_lightning(args, initial_state, images, labels, device, variants[name], root, paired=True)
                paired_runs[name].append(run)
                print(
                    f"repeat {repeat}: paired {name}: time ratio {run['time_ratio']:.4f}, "
                    f"process CPU time ratio {run['process_cpu_time_ratio']:.4f}",
                    flush=True,
                )

    results: dict = {}
    for name in variants:
        walls = [r["wall"] for r in runs[name]]
        per_repeat = [args.steps * args.batch_size / t for t in walls]
        results[name] = {
            "images_per_s_median": round(report.median(per_repeat), 1),
            "images_per_s_per_repeat": [round(v, 1) for v in per_repeat],
            "seconds_per_step": report.median(walls) / args.steps,
            "process_cpu_seconds_per_step": report.median([r["cpu"] for r in runs[name]]) / args.steps,
        }
        if device.type == "cpu":
            results[name]["median_step_seconds"] = report.median([r["median_step"] for r in runs[name]])
            results[name]["fast_step_seconds"] = report.median([r["fast_step"] for r in runs[name]])
    plain = results["plain"]["images_per_s_median"]
    for name in variants:
        if name == "plain":
            continue
        # Each repeat ran the variants back to back, so their ratios share the machine's load at that moment.
        ratios = {
            "time_ratio_over_plain": [r["wall"] / p["wall"] for r, p in zip(runs[name], runs["plain"])],
            "process_cpu_time_ratio_over_plain": [r["cpu"] / p["cpu"] for r, p in zip(runs[name], runs["plain"])],
        }
        if device.type == "cpu":
            ratios["median_step_time_ratio_over_plain"] = [
                r["median_step"] / p["median_step"] for r, p in zip(runs[name], runs["plain"])
            ]
            ratios["fast_step_time_ratio_over_plain"] = [
                r["fast_step"] / p["fast_step"] for r, p in zip(runs[name], runs["plain"])
            ]
        for key, values in ratios.items():
            results[name][key] = round(report.median(values), 4)
            results[name][key + "_per_repeat"] = [round(v, 4) for v in values]
        results[name]["throughput_fraction_of_plain"] = round(results[name]["images_per_s_median"] / plain, 4)

    for name in paired:
        result = {
            key: report.median([r[key] for r in paired_runs[name]])
            for key in ("lightning_seconds_per_step", "plain_seconds_per_step")
        }
        for key in ("time_ratio", "process_cpu_time_ratio", "median_step_ratio"):
            values = [r[key] for r in paired_runs[name]]
            result[f"{key}_over_plain"] = round(report.median(values), 4)
            result[f"{key}_over_plain_per_repeat"] = [round(v, 4) for v in values]
        results[f"paired_{name}"] = result

    flops = train_flops_per_image(args, initial_state, device)
    ceiling, ceiling_dtype = matmul_ceiling(device)
    lightning = results["lightning_callbacks_off" if "lightning_callbacks_off" in results else "lightning_callbacks_on"]
    data_rate = pipeline_images_per_s(args, images, labels, device, batches=min(20, total - 1))
    results["model"] = {
        "train_flops_per_image": flops,
        "lightning_model_flops_per_s": flops * lightning["images_per_s_median"],
        "plain_model_flops_per_s": flops * plain,
        "matmul_ceiling_flops_per_s": ceiling,
        "matmul_ceiling_dtype": ceiling_dtype,
        "lightning_fraction_of_ceiling": round(flops * lightning["images_per_s_median"] / ceiling, 4),
    }
    results["data_pipeline"] = {
        "images_per_s": round(data_rate, 1),
        "times_the_training_step_consumes": round(data_rate / plain, 2),
    }

    targets = []
    for name, label in (
        ("lightning_callbacks_off", "callbacks off"),
        ("lightning_callbacks_on", "default callbacks on (reported only)"),
    ):
        if name not in results:
            continue
        r = results[name]
        if name in paired and args.plain_metrics == "off":
            what = (
                "`python -m project fit`'s trainer" if name == "lightning_callbacks_on" else "Lightning, callbacks off,"
            )
            p = results[f"paired_{name}"]
            targets.append(
                report.target(
                    f"CPU per-step period of {what} over a loss-only plain loop, paired steps: time",
                    p["time_ratio_over_plain"],
                    "<=",
                    1.02,
                )
            )
            targets.append(
                report.target(
                    f"CPU per-step period of {what} over a loss-only plain loop, paired steps: process CPU time",
                    p["process_cpu_time_ratio_over_plain"],
                    "<=",
                    1.02,
                )
            )
        if device.type == "cpu" and args.plain_metrics == "off":
            # The plain loop computes only the loss: everything ImageClassifier and the trainer add
            # per step (metrics, logging, callbacks) counts as overhead here.
            what = (
                "`python -m project fit`'s trainer" if name == "lightning_callbacks_on" else "Lightning, callbacks off,"
            )
            targets.append(
                report.target(
                    f"CPU per-step period of {what} over a loss-only plain loop: fastest tenth of the steps",
                    r["fast_step_time_ratio_over_plain"],
                    "<=",
                    1.02,
                )
            )
            targets.append(
                report.target(
                    f"CPU per-step period of {what} over a loss-only plain loop: median step",
                    r["median_step_time_ratio_over_plain"],
                    "<=",
                    1.02,
                )
            )
            targets.append(
                report.target(
                    f"CPU per-step period of {what} over a loss-only plain loop: process CPU time",
                    r["process_cpu_time_ratio_over_plain"],
                    "<=",
                    1.02,
                )
            )
            targets.append(
                report.target(
                    f"CPU per-step period of {what} over a loss-only plain loop: window time",
                    r["time_ratio_over_plain"],
                    "<=",
                    1.02,
                )
            )
        elif device.type == "cpu":
            targets.append(
                report.target(
                    f"CPU Lightning/plain time ratio, {label}: window time", r["time_ratio_over_plain"], "<=", 1.05
                )
            )
            targets.append(
                report.target(
                    f"CPU Lightning/plain time ratio, {label}: process CPU time",
                    r["process_cpu_time_ratio_over_plain"],
                    "<=",
                    1.05,
                )
            )
            targets.append(
                report.target(
                    f"CPU Lightning/plain time ratio, {label}: median step",
                    r["median_step_time_ratio_over_plain"],
                    "<=",
                    1.05,
                )
            )
        else:
            targets.append(
                report.target(
                    f"GPU Lightning throughput as a fraction of plain, {label}",
                    1 / r["time_ratio_over_plain"],
                    ">=",
                    0.95,
                )
            )
    if device.type == "cuda":
        targets.append(
            report.target(
                "model FLOP/s as a fraction of the bf16 matmul ceiling",
                results["model"]["lightning_fraction_of_ceiling"],
                ">=",
                0.30,
            )
        )
        targets.append(
            report.target(
                "data pipeline images/s over training images/s",
                results["data_pipeline"]["times_the_training_step_consumes"],
                ">=",
                10,
            )
        )

    tag = (
        f"{args.model}-{args.precision}"
        + ("-cl" if args.channels_last else "")
        + ("-compile" if args.compile else "")
        + f"-{args.data}"
    )
    if args.plain_metrics == "off":
        tag += f"-loss-only-{args.scheduler}"
    settings = {
        **vars(args),
        "images": len(images),
        "lr": LR,
        "momentum": MOMENTUM,
        "nesterov": True,
        "weight_decay": WEIGHT_DECAY,
        "label_smoothing": LABEL_SMOOTHING,
        "optimizer": "sgd",
    }
    notes = (
        f"{args.repeats} alternating repeats; each times iterations {args.warmup}..{args.warmup + args.steps - 1} of a fresh "
        "run (warm-up excluded). A ratio is taken per repeat (variants run back to back), then the median over repeats. "
        "window time: wall clock over the timed iterations; process CPU time: this process's CPU seconds over them; "
        "median step: the median iteration time (CPU only), which ignores iterations another process interrupted "
        "but also periodic work such as logging every n steps; fastest tenth: the median of the fastest 10% of a "
        "repeat's iterations, the steadiest measure on a shared CPU (other processes only ever slow a step down), which like "
        "the median step leaves out work done only every n steps."
        + (
            " paired_*: Lightning runs with one plain-loop step executed (and timed) before each of its iterations, "
            "so both loops share the machine's load step by step; time ratio = Lightning's summed iteration times over "
            "the plain steps' summed times across the timed window (periodic work included), then the median over repeats. "
            "paired_plain_control: the same pairing of two identical plain loops, which measures the pairing's own bias."
            if paired
            else ""
        )
    )
    report.write(args.name or f"throughput-{tag}", device, settings, results, targets, notes)
    for t in targets:
        print(f"{t['name']}: {t['measured']} (target {t['target']}: {'met' if t['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
