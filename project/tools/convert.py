"""``python -m project convert SOURCE OUT``: any checkpoint this template writes, as the plain network's ``net.pt``."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from project.errors import UserError
from project.run import directory
from project.run.checkpoints import CheckpointError, convert


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m project convert SOURCE OUT``: convert a checkpoint into a plain ``net.pt``."""
    directory.new_command()  # a command of its own: what earlier ones wrote is not its to replace
    parser = argparse.ArgumentParser(
        prog="python -m project convert",
        description="Convert a training checkpoint (file or sharded directory) into the plain network's state_dict.",
    )
    parser.add_argument(
        "source", help="a .ckpt/.pt file, an FSDP sharded checkpoint directory or a DeepSpeed directory"
    )
    parser.add_argument("out", help="where to write the plain state_dict, e.g. net.pt")
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow arbitrary pickled objects (weights_only=False); only for files you trust",
    )
    args = parser.parse_args(argv)
    try:
        state = convert(args.source, args.out, weights_only=not args.unsafe)
    except (CheckpointError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    values = sum(t.numel() for t in state.values())
    print(
        f"Wrote {args.out}: {len(state)} tensors, {values:,} values; load it with torch.load(path, weights_only=True)."
    )
    return Path(args.out)


if __name__ == "__main__":
    main()
