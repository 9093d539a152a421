"""Multi-node training without a cluster: two torchrun "nodes" on this machine, gloo over loopback.

Each node is its own ``torchrun --nnodes 2 --nproc-per-node 1 --node-rank {0,1}`` process (static
rendezvous at 127.0.0.1), running our CLI with ``--trainer.num_nodes 2``; Lightning sees
TorchElastic's environment exactly as it would on two machines. What is simulated is only the
network: both "nodes" share one host and talk over the loopback interface.
"""

import os
import socket
import subprocess
import sys

import torch

from tests.conftest import QUIET, REPO, kill_group, run_cli, run_dirs

#: The same training on both sides: no augmentation (it is drawn per process), the device pipeline
#: (its epoch order is one permutation seeded by (seed, epoch) that the ranks split as order[rank::2]),
#: LeNet (no BatchNorm, whose statistics would be per process), 6 steps per epoch, 2 epochs.
COMMON = [
    "fit",
    "-c",
    "experiments/lenet.yaml",
    "--data.pipeline=device",
    "--data.augment=false",
    "--data.val_size=500",
    "--trainer.limit_train_batches=6",
    "--trainer.limit_val_batches=2",
    "--trainer.max_epochs=2",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--test_after_fit=false",
    "--plots.enabled=false",
    *QUIET,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_nodes_match_one_process_with_the_same_global_batch(tmp_path, subset_npz):
    """2 nodes x batch 16 == 1 process x batch 32: at every step rank r's batch is order[r::2][16j:16j+16],
    so the two batches together are exactly order[32j:32j+32], the single process's batch j, and DDP's
    averaged gradient equals the single process's mean gradient."""
    data = f"--data.npz={subset_npz}"
    single = run_cli([*COMMON, data, "--data.batch_size=32", f"--trainer.default_root_dir={tmp_path / 'single'}"])
    assert single.returncode == 0, single.stderr[-3000:]

    port, env = free_port(), {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROJECT_RUN_DIR", None)
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "--rdzv-id=two-nodes",
                "-m",
                "project",
                *COMMON,
                data,
                "--data.batch_size=16",
                "--trainer.num_nodes=2",
                "--trainer.strategy=ddp",
                f"--trainer.default_root_dir={tmp_path / 'multi'}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            kill_group(node)
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1][1]

    # Both nodes wrote into one run directory, named after the rendezvous id.
    assert run_dirs(tmp_path / "multi", "lenet") == [tmp_path / "multi" / "lenet" / "torchrun-two-nodes"]
    (single_dir,) = run_dirs(tmp_path / "single", "lenet")
    expected = torch.load(single_dir / "net.pt", weights_only=True)
    got = torch.load(tmp_path / "multi" / "lenet" / "torchrun-two-nodes" / "net.pt", weights_only=True)
    assert expected.keys() == got.keys()
    for name in expected:
        # The two differ only in float32 rounding order (one mean over 32 images against two means
        # over 16 averaged by all-reduce): about 1e-8 after these 12 steps, so 1e-6 leaves room while
        # any real difference in data, batches or gradients shows up at 1e-3 or more.
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
