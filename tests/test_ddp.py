"""Real multi-process training on CPU: 2 processes (gloo) launched by the CLI itself, as a user runs it.

DDP (Lightning re-runs the command per rank), ddp_spawn, and FSDP with sharded checkpoints (on CPU
through tests.probes.CPUFSDPStrategy, since Lightning's FSDP strategy insists on GPUs). Every run
writes into one run directory; tests.probes.RankDump records what each rank saw.
"""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from project.classifier import ImageClassifier
from project.data import CIFAR10DataModule
from project.models import LeNet, ResNet20
from project.run.checkpoints import load_into, plain_state_dict, read_checkpoint
from project.run.cli import main
from tests.conftest import QUIET, REPO, cli_env, make_npz, run_bounded, run_cli, run_dirs

DDP_CPU = ["-c", "experiments/presets/ddp_cpu.yaml"]
SMALL = [*QUIET, "--data.val_size=16", "--data.batch_size=8", "--trainer.max_epochs=1", "--plots.enabled=false"]
PER_RANK_IMAGES = 24  # 64 random images - 16 for validation = 48 training images, half per rank


def ddp_fit(root, npz, config: str, *extra: str, timeout: float = 300):
    out = run_cli(
        [
            "fit",
            "-c",
            config,
            *DDP_CPU,
            f"--data.npz={npz}",
            *SMALL,
            f"--trainer.default_root_dir={root}",
            "--trainer.callbacks+=tests.probes.RankDump",
            *extra,
        ],
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def metrics(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def ranks(run) -> list[dict]:
    return [torch.load(run / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """ResNet-20 with every hook callback (experiments/resnet20_hooks.yaml) under DDP on 2 CPU
    processes for one epoch, then the DDP test of its best checkpoint (test_after_fit)."""
    tmp = tmp_path_factory.mktemp("ddp")
    npz = make_npz(tmp / "d.npz")
    ddp_fit(tmp / "runs", npz, "experiments/resnet20_hooks.yaml")
    (run,) = run_dirs(tmp / "runs", "resnet20_hooks")
    return {"npz": npz, "root": tmp / "runs", "run": run}


def test_one_run_directory_and_one_logger_for_all_ranks(ddp_run):
    run = ddp_run["run"]
    assert run_dirs(ddp_run["root"], "resnet20_hooks") == [run]
    names = sorted(p.name for p in run.iterdir())
    assert names == [
        "buffers.json",
        "checkpoints",
        "config.yaml",
        "hparams.yaml",
        "metrics.csv",
        "net.pt",
        "rank0.pt",
        "rank1.pt",
    ]
    assert [r["world_size"] for r in ranks(run)] == [2, 2], "both ranks wrote into the same directory"
    steps = [r["step"] for r in metrics(run) if "grad/total_norm" in r]
    assert steps == [0], "rank 0's logger alone writes; a second logger would duplicate every row"


@pytest.mark.slow  # the module's DDP run (about 17 s) is paid by whichever of its tests runs first
def test_gradient_statistics_use_the_synchronised_gradients(ddp_run):
    """Each rank trained on a different shard, yet both computed the same per-layer norms: they
    read the gradients after DDP's all-reduce. Local gradients would differ between the ranks."""
    rank0, rank1 = ranks(ddp_run["run"])
    assert rank0["first_labels"] != rank1["first_labels"], (
        "the ranks must see different data for this to prove anything"
    )
    grads0, grads1 = rank0["stats"]["GradientStatistics"], rank1["stats"]["GradientStatistics"]
    assert "grad/stages.0.0.conv1/norm" in grads0 and "grad/stages.2.2/output_norm" in grads0
    assert grads0 == grads1
    assert rank0["weights_sum"] == rank1["weights_sum"]
    logged = next(r for r in metrics(ddp_run["run"]) if "grad/total_norm" in r)
    assert logged["grad/total_norm"] == pytest.approx(grads0["grad/total_norm"])
    assert rank0["stats"]["ActivationStatistics"] == rank1["stats"]["ActivationStatistics"], "averaged over ranks"


@pytest.mark.slow  # the module's DDP run (about 17 s) is paid by whichever of its tests runs first
def test_saved_buffers_are_rank0s_broadcast_values(ddp_run):
    """DDP broadcasts buffers from rank 0 before each forward pass instead of reducing them: the
    checkpoint holds rank 0's statistics, which count rank 0's 24 images, not all 48."""
    run = ddp_run["run"]
    rank0, rank1 = ranks(run)
    state = read_checkpoint(run / "checkpoints/last.ckpt")["state_dict"]
    assert state["net.input_stats.count"].item() == PER_RANK_IMAGES
    for name in (
        "input_stats.count",
        "input_stats.mean",
        "input_stats.var",
        "stem.1.running_mean",
        "stages.2.2.bn2.running_var",
    ):
        assert torch.equal(state[f"net.{name}"], rank0["buffers"][name]), name
        assert torch.equal(rank1["buffers"][name], rank0["buffers"][name]), name
    assert "net.input_stats.std" not in state and "input_stats.std" in rank0["buffers"]
    report = {b["name"]: b for b in json.loads((run / "buffers.json").read_text())["buffers"]}
    assert report["net.input_stats.count"]["values"] == PER_RANK_IMAGES
    assert "broadcast from rank 0" in json.loads((run / "buffers.json").read_text())["synchronisation"]


@pytest.mark.slow  # the module's DDP run (about 17 s) is paid by whichever of its tests runs first
def test_ddp_checkpoint_and_net_pt_give_the_same_predictions_in_one_process(ddp_run):
    run = ddp_run["run"]
    net = ResNet20()
    net.load_state_dict(torch.load(run / "net.pt", weights_only=True))
    model = ImageClassifier.load_from_checkpoint(run / "checkpoints/last.ckpt", weights_only=True)
    assert isinstance(model.net, ResNet20)
    dm = CIFAR10DataModule(npz=ddp_run["npz"], val_size=16)
    dm.setup()
    images = next(iter(dm.test_dataloader()))[0]
    net.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(net(images), model(images))
    assert list(plain_state_dict(read_checkpoint(run / "checkpoints/last.ckpt"))) == list(net.state_dict())


@pytest.mark.slow  # the module's DDP run (about 17 s) is paid by whichever of its tests runs first
def test_training_metrics_cover_every_rank(ddp_run):
    """Training loss and accuracy are per-rank sums until the epoch ends; then they are summed over
    the ranks, so every rank logs the same values, those of all 48 training images."""
    rank0, rank1 = ranks(ddp_run["run"])
    assert rank0["first_labels"] != rank1["first_labels"], "the ranks trained on different images"
    assert set(rank0["train_metrics"]) >= {"train/loss_epoch", "train/loss", "train/acc", "train/acc_top5"}
    assert rank0["train_metrics"] == rank1["train_metrics"]
    for key in ("train/acc", "train/acc_top5"):
        hits = rank0["train_metrics"][key] * 2 * PER_RANK_IMAGES
        assert hits == pytest.approx(round(hits), abs=1e-3), f"{key} is a fraction of the 48 images of both ranks"


def test_ddp_metrics_equal_single_process_metrics_on_the_same_data(ddp_run, tmp_path):
    """test_after_fit ran under DDP (16 test images per rank); the same checkpoint tested in one
    process over all 32 gives the same accuracy and loss."""
    run = ddp_run["run"]
    (ddp,) = [r for r in metrics(run) if "test/acc" in r]
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    single = main(
        [
            "test",
            "-c",
            str(REPO / "experiments/resnet20.yaml"),
            f"--data.npz={ddp_run['npz']}",
            *QUIET,
            "--data.val_size=16",
            f"--trainer.default_root_dir={tmp_path}",
            "--plots.enabled=false",
            f"--ckpt_path={best}",
        ]
    )
    assert single.trainer.world_size == 1
    (one,) = [r for r in metrics(single.run_dir) if "test/acc" in r]
    assert one["test/acc"] == ddp["test/acc"] and one["test/acc_top5"] == ddp["test/acc_top5"]
    assert one["test/loss"] == pytest.approx(ddp["test/loss"], rel=1e-5)


def test_single_process_checkpoint_resumes_under_ddp(tmp_path):
    npz = make_npz(tmp_path / "d.npz")
    common = [
        "-c",
        str(REPO / "experiments/lenet.yaml"),
        f"--data.npz={npz}",
        *SMALL,
        f"--trainer.default_root_dir={tmp_path}",
        "--test_after_fit=false",
    ]
    run = main(["fit", *common]).run_dir
    first = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert first["global_step"] == 6  # 48 images / batch 8 in one process
    out = run_cli(["fit", *common, *DDP_CPU, "--trainer.max_epochs=2", f"--ckpt_path={run / 'checkpoints/last.ckpt'}"])
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Restored all states from the checkpoint" in out.stderr + out.stdout
    assert run_dirs(tmp_path, "lenet") == [run], "the resumed run continues in the checkpoint's directory"
    resumed = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 6 + 3  # then 24 images / batch 8 per rank
    load_into(LeNet(), run / "net.pt")


def test_a_rank_that_reaches_setup_after_rank_zero_saved_the_config_stays_in_step(tmp_path):
    """Rank 1 starts its setup only once rank 0 has written config.yaml (tests.probes.LateRank), as one srun
    task of several may. It once took that file for a resume's, skipped the broadcast that follows the save,
    and from then on the ranks' collectives were out of step: the job hung until SLURM's time limit."""
    npz = make_npz(tmp_path / "d.npz")
    args = ["fit", "-c", "experiments/lenet.yaml", *DDP_CPU, f"--data.npz={npz}", *SMALL, "--test_after_fit=false"]
    try:
        out = run_cli(
            [*args, f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=tests.probes.LateRank"], timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks hung: their collectives were out of step")
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_ddp_spawn_fit(tmp_path):
    """With the test after fit, metrics.csv once kept only the test row (the test's fresh copy of the
    logger deleted the fit's rows) and the run got a second config-<time>.yaml beside config.yaml."""
    npz = make_npz(tmp_path / "d.npz")
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/lenet.yaml",
            "-c",
            "experiments/presets/ddp_spawn.yaml",
            "--trainer.accelerator=cpu",
            f"--data.npz={npz}",
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            "--test_after_fit=true",
        ],
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = run_dirs(tmp_path, "lenet")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3, "2 processes, 3 steps each"
    load_into(LeNet(), run / "net.pt")
    rows = metrics(run)
    assert [r["step"] for r in rows if "train/loss_epoch" in r] == [2] and [
        r["step"] for r in rows if "val/acc" in r
    ] == [2]
    assert len([r for r in rows if "test/acc" in r]) == 1
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]


@pytest.mark.filterwarnings("ignore:.*torch.distributed is disabled")
def test_fsdp_sharded_checkpoint_converts_to_the_plain_net(ddp_run, tmp_path):
    """FSDP on 2 CPU processes (a stand-in for GPUs) with every ResidualBlock its own unit and
    sharded checkpoints: the directory converts to the exported net.pt (buffers included: SyncBuffers
    gives FSDP DDP's rank-0 rule), and the hook callbacks report the same layers as under DDP, with
    norms summed over the gradient shards."""
    npz = make_npz(tmp_path / "d.npz")
    ddp_fit(
        tmp_path,
        npz,
        "experiments/resnet20_hooks.yaml",
        "--trainer.strategy=tests.probes.CPUFSDPStrategy",
        "--trainer.strategy.state_dict_type=sharded",
        "--trainer.strategy.auto_wrap_policy=[project.models.ResidualBlock]",
        "--test_after_fit=false",
    )
    (run,) = run_dirs(tmp_path, "resnet20_hooks")
    last = run / "checkpoints/last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and (last / "__1_0.distcp").is_file()
    exported = torch.load(run / "net.pt", weights_only=True)
    converted = plain_state_dict(read_checkpoint(last))
    assert converted.keys() == exported.keys() and all(torch.equal(converted[k], exported[k]) for k in exported)
    load_into(ResNet20(), exported)
    rank0, rank1 = ranks(run)
    assert all(torch.equal(rank0["buffers"][k], rank1["buffers"][k]) for k in rank0["buffers"])
    assert rank0["buffers"]["input_stats.count"].item() == PER_RANK_IMAGES
    assert "by SyncBuffers" in json.loads((run / "buffers.json").read_text())["synchronisation"]
    assert rank0["stats"]["GradientStatistics"] == rank1["stats"]["GradientStatistics"]
    with pytest.raises(SystemExit) as exit_info:  # the sharded directory's meta.pt is checked on resume too
        main(
            [
                "fit",
                "-c",
                str(REPO / "experiments/resnet20_hooks.yaml"),
                f"--data.npz={npz}",
                *SMALL,
                f"--trainer.default_root_dir={tmp_path}",
                f"--ckpt_path={last}",
                "--model.optimizer.lr=0.5",
            ]
        )
    assert exit_info.value.code == 2
    ddp_grads = ranks(ddp_run["run"])[0]["stats"]["GradientStatistics"]
    assert set(rank0["stats"]["GradientStatistics"]) == set(ddp_grads), "same layer names under FSDP and DDP"
    assert rank0["stats"]["GradientStatistics"]["grad/stages.1.0.conv1/norm"] > 0


PRESETS = sorted((REPO / "experiments/presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_parses_on_top_of_an_experiment(preset, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(REPO / "experiments/resnet20.yaml"), "-c", str(preset), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: project.models.ResNet20" in capsys.readouterr().out


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")
def test_one_gpu_with_hooks_bf16_and_compile(tmp_path):
    npz = make_npz(tmp_path / "d.npz")
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/resnet20_hooks.yaml",
            "-c",
            "experiments/presets/gpu.yaml",
            "-c",
            "experiments/presets/bf16.yaml",
            "-c",
            "experiments/presets/compile.yaml",
            f"--data.npz={npz}",
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
        ],
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = run_dirs(tmp_path, "resnet20_hooks")
    grads = next(r for r in metrics(run) if "grad/total_norm" in r)
    acts = next(r for r in metrics(run) if "act/fc/std" in r)
    assert all(map(math.isfinite, [grads["grad/total_norm"], acts["act/fc/std"]]))
    net = ResNet20()
    net.load_state_dict(torch.load(run / "net.pt", weights_only=True))  # no _orig_mod. in the keys


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["ddp", "fsdp", "fsdp_sharded"])
def test_one_gpu_strategies_round_trip_to_the_plain_net(tmp_path, preset):
    """NCCL DDP and Lightning's own FSDPStrategy (full and sharded checkpoints) on one GPU, a
    process group of one: the fit runs with the hook callbacks, and its last checkpoint (a file,
    or the sharded directory) converts to exactly the exported net.pt, which loads into a plain ResNet20."""
    npz = make_npz(tmp_path / "d.npz")
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/resnet20_hooks.yaml",
            "-c",
            f"experiments/presets/{preset}.yaml",
            "--trainer.devices=1",
            f"--data.npz={npz}",
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            "--test_after_fit=false",
        ],
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = run_dirs(tmp_path, "resnet20_hooks")
    last = run / "checkpoints/last.ckpt"
    assert last.is_dir() == (preset == "fsdp_sharded")
    converted = plain_state_dict(read_checkpoint(last))
    exported = torch.load(run / "net.pt", weights_only=True)
    assert converted.keys() == exported.keys() and all(torch.equal(converted[k].cpu(), exported[k]) for k in exported)
    load_into(ResNet20(), exported)
    logged = metrics(run)
    assert math.isfinite(next(r for r in logged if "grad/total_norm" in r)["grad/total_norm"])
    assert 0 <= next(r for r in logged if "train/acc" in r)["train/acc"] <= 1


@pytest.mark.gpu
@pytest.mark.skipif(gpus() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("preset", ["ddp", "fsdp_sharded"])
def test_multi_gpu_fit_converts_and_agrees_across_ranks(tmp_path, preset):
    npz = make_npz(tmp_path / "d.npz")
    out = run_cli(
        [
            "fit",
            "-c",
            "experiments/resnet20_hooks.yaml",
            "-c",
            f"experiments/presets/{preset}.yaml",
            "--trainer.devices=2",
            f"--data.npz={npz}",
            *SMALL,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=tests.probes.RankDump",
            "--test_after_fit=false",
        ],
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    (run,) = run_dirs(tmp_path, "resnet20_hooks")
    rank0, rank1 = ranks(run)
    assert rank0["stats"]["GradientStatistics"] == pytest.approx(rank1["stats"]["GradientStatistics"])
    converted = plain_state_dict(read_checkpoint(run / "checkpoints/last.ckpt"))
    exported = torch.load(run / "net.pt", weights_only=True)
    assert all(torch.equal(converted[k].cpu(), exported[k]) for k in exported)


def test_a_spawned_worker_leaves_its_gloo_group_before_the_interpreter_shuts_down(tmp_path):
    """A ddp_spawn worker once died with SIGABRT ("terminate called without an active exception") after the
    test that follows fit: its gloo group was left to interpreter finalization. LeaveProcessGroup destroys it
    in an exit handler; an earlier-registered handler, which atexit runs after it, sees the group gone. The
    parent process, no spawned worker, registers nothing."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import atexit, multiprocessing, sys\n"
        "import torch.distributed as dist\n"
        "from project.run.callbacks import LeaveProcessGroup\n\n\n"
        "def worker(store):\n"
        "    atexit.register(lambda: print('worker: initialized at exit:', dist.is_initialized(), flush=True))\n"
        "    dist.init_process_group('gloo', store=dist.FileStore(store, 1), rank=0, world_size=1)\n"
        "    for stage in ('fit', 'test'):\n"
        "        LeaveProcessGroup().setup(None, None, stage)\n\n\n"
        "if __name__ == '__main__':\n"
        "    atexit.register(lambda: print('parent: initialized at exit:', dist.is_initialized(), flush=True))\n"
        "    dist.init_process_group('gloo', store=dist.FileStore(sys.argv[1] + '.parent', 1), rank=0, world_size=1)\n"
        "    LeaveProcessGroup().setup(None, None, 'fit')\n"
        "    child = multiprocessing.get_context('spawn').Process(target=worker, args=(sys.argv[1],))\n"
        "    child.start()\n"
        "    child.join()\n"
        "    sys.exit(child.exitcode)\n"
    )
    out = run_bounded([sys.executable, str(script), str(tmp_path / "store")], timeout=120, cwd=REPO, env=cli_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["worker: initialized at exit: False", "parent: initialized at exit: True"]
