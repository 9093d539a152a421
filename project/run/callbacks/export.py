"""Export the plain network's weights as ``net.pt`` at the end of ``fit``."""

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from project.run import directory, model_contract
from project.run.checkpoints import save_net, strip_prefixes


def full_state_dict(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The LightningModule's complete state_dict on global rank 0 (a collective under FSDP).

    Under FSDP with ``state_dict_type="sharded"`` the strategy's own state_dict holds shards
    (ShardedTensor), fine for checkpoints but not for a plain file, so the full one is gathered.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # torch's public API: gathers the full tensors (to the CPU, on rank 0 only).
        return get_model_state_dict(strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return strategy.lightning_module_state_dict()


class ExportNet(L.Callback):
    """Save ``pl_module.net``'s state_dict, without any wrapper prefix, to ``<run dir>/<filename>``
    (a path inside the run directory; one leading out of it is refused).

    The state_dict is gathered through the strategy, so the file is complete under DDP and FSDP;
    only global rank 0 writes it. Load it with ``torch.load(path, weights_only=True)``.
    """

    def __init__(self, filename: str = "net.pt") -> None:
        self.filename = filename
        self.path: Path | None = None
        directory.path_in_run(filename, "export.filename")  # inside the run, or refused before anything runs

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if model_contract.plain_net(pl_module) is None:
            return model_contract.skip("net.pt", pl_module, "has no plain nn.Module under `net`")
        state = full_state_dict(trainer)
        # Without a run, trainer.log_dir broadcasts from rank 0, so every rank must ask for it (asking
        # on rank 0 alone deadlocks DDP: rank 0 waits in the broadcast, the others in the barrier below).
        path = directory.run_directory(trainer) / self.filename
        if trainer.is_global_zero:
            self.path = save_net(strip_prefixes(state), path)
        trainer.strategy.barrier("ExportNet")
