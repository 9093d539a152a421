"""LeaveProcessGroup: a ddp_spawn worker destroys its torch.distributed group at exit."""

import atexit
import multiprocessing

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class LeaveProcessGroup(Callback):
    """Lightning destroys an NCCL group at exit but leaves a gloo group to the interpreter's finalization, where
    gloo's threads may still hold tensors and abort the process ("terminate called without an active exception",
    SIGABRT: pytorch/pytorch#179291); seen in a ddp_spawn worker after the test that follows fit. A process that
    ``multiprocessing`` started (a ddp_spawn worker) destroys its group in an exit handler, registered once. DDP
    ranks and torchrun workers exit as Lightning leaves them: their store may live in a process gone by then."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if multiprocessing.parent_process() is not None and dist.is_available() and dist.is_initialized():
            atexit.unregister(destroy_process_group)  # once, however many fits and tests this process runs
            atexit.register(destroy_process_group)
