"""Export the plain network's weights as ``net.pt`` at the end of ``fit``."""

from pathlib import Path

import lightning as L

from project.checkpoints import save_net, strip_prefixes


class ExportNet(L.Callback):
    """Save ``pl_module.net``'s state_dict, without any wrapper prefix, to ``<run dir>/<filename>``.

    The state_dict is gathered through the strategy, so the file is complete under DDP and FSDP;
    only global rank 0 writes it. Load it with ``torch.load(path, weights_only=True)``.
    """

    def __init__(self, filename: str = "net.pt") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()
        # trainer.log_dir broadcasts from rank 0, so every rank must ask for it (asking on rank 0
        # alone deadlocks DDP: rank 0 waits in the broadcast, the others in the barrier below).
        log_dir = trainer.log_dir or trainer.default_root_dir
        if trainer.is_global_zero:
            self.path = save_net(strip_prefixes(state), Path(log_dir) / self.filename)
        trainer.strategy.barrier("ExportNet")
