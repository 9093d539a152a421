"""The CLI's parser: LightningCLI's, with the data plug-in checks (data_contract), ``num_classes`` for any net that
takes it, one sentence for a logger's missing save_dir, and YAML that says where the run writes."""

import os
import re
import sys
from pathlib import Path

from project.run import directory, model_contract
from project.run.data_contract import DataPluginParser


class ProjectParser(DataPluginParser):
    """The CLI's parser, whose YAML (``--print_config``, a run's ``config.yaml``) starts by saying where
    the run writes: the paths in it are the user's, and the run fills in its own directory when it starts.
    It builds any net that takes ``num_classes`` with the data module's (see ``instantiate``)."""

    def instantiate(self, namespace, *args, **kwargs):
        # jsonargparse applies the data -> model.net.init_args.num_classes link only where that key is in
        # the config, and it is only where the net's signature spells it out: a function that passes **kwargs
        # on (torchvision.models.mobilenet_v3_small, timm.models.resnet18) would keep its 1000 classes. A
        # placeholder, in a copy (config.yaml keeps what the user gave), lets the link fill it in.
        for prefix in ("", f"{namespace.get('subcommand')}."):
            net = namespace.get(f"{prefix}{model_contract.NET_KEY}")
            if (
                net is not None
                and hasattr(net, "class_path")
                and (net.get("init_args") or {}).get("num_classes") is None
            ):
                if model_contract.takes_num_classes(net.class_path):
                    namespace = namespace.clone()
                    namespace[f"{prefix}{model_contract.NET_KEY}.init_args.num_classes"] = None
        return super().instantiate(namespace, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse refuses a logger whose required save_dir is missing without saying so (its report on
        # the Union lists no cause): the cause, in one sentence.
        missing = re.search(r"class_path='([\w.]+Logger)', init_args=Namespace\(save_dir=None", message)
        if missing and self.exit_on_error and not os.environ.get("JSONARGPARSE_DEBUG"):
            sys.stderr.write(
                f"error: trainer.logger {missing[1]} needs a save_dir: give init_args: {{save_dir: .}} (a path relative "
                "to the run directory), or name it on the command line alone (--trainer.logger+=TensorBoardLogger).\n"
            )
            sys.exit(2)
        super().error(message, ex)

    def dump(self, cfg=None, *args, **kwargs) -> str:
        text = super().dump(cfg, *args, **kwargs)
        trainer = cfg.get("trainer") if cfg is not None and hasattr(cfg, "get") else None
        if trainer is None or kwargs.get("format", "parser_mode") not in ("parser_mode", "yaml"):
            return text
        where = cfg.get("run_dir") or (
            f"a new directory {Path(trainer.get('default_root_dir') or 'runs') / directory.experiment_name(cfg)}/<date>-<time>-<hex>/ "
            "(with fit --ckpt_path last: the newest run there)"
        )
        return (
            f"# This run writes every file into {where};\n# it fills that directory into the loggers' save_dir and "
            "the checkpoints' dirpath when it starts (README: Run directories).\n" + text
        )
