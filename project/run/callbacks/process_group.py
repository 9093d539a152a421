"""LeaveProcessGroup: every process of a distributed run destroys its torch.distributed group at exit."""

import atexit

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class LeaveProcessGroup(Callback):
    """Lightning destroys an NCCL group at exit but leaves a gloo group to the interpreter's finalization, where
    gloo's threads may still hold tensors and abort the process ("terminate called without an active exception",
    SIGABRT: pytorch/pytorch#179291). Each process that joined a group (a ddp_spawn worker, a DDP rank) destroys
    it in an exit handler instead, registered once per process."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            atexit.unregister(destroy_process_group)  # once, however many fits and tests this process runs
            atexit.register(destroy_process_group)
