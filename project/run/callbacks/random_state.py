"""RandomState: the random number generators' states travel in every checkpoint, so a resumed fit
draws the same shuffles and augmentations as one that was never interrupted."""

import random

import lightning as L
import numpy as np
import torch


# Not Lightning's _collect_rng_states: private, and torch.load(weights_only=True) refuses its numpy state.
def capture_random_state() -> dict:
    """torch, CUDA (when in use), numpy and Python generator states, as tensors and plain numbers.

    Only types that ``torch.load(..., weights_only=True)`` accepts, so checkpoints stay safe to load.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RandomState(L.Callback):
    """Save the generators' states in every checkpoint and restore them when a fit resumes.

    Lightning's checkpoints hold weights, optimiser, schedulers and loop counters, but not the
    random generators, so after ``fit --ckpt_path ...`` the data order and augmentations differ
    from the uninterrupted run's. With this callback (on by default in the CLI) a run resumed
    from an end-of-epoch checkpoint ends with exactly the same weights on CPU with a fixed seed.

    The states are restored as soon as Lightning loads the checkpoint, which is before it
    creates the training data iterator (whose creation draws the shuffling seed). The sanity
    check's validation batches would draw from the generators in between, so this callback
    also makes the sanity check leave them as it found them, in every run, resumed or not.
    Under DDP the checkpoint holds rank 0's states and every rank restores them (a run seeded
    with ``seed_everything`` starts with the same state on every rank anyway); shuffling is
    deterministic per epoch there (``DistributedSampler`` seeds with the epoch).

    Args:
        restore: restore the saved states when resuming (``false`` keeps the fresh seed's states).
    """

    def __init__(self, restore: bool = True) -> None:
        self.restore = restore
        self._before_sanity_check: dict | None = None

    def state_dict(self) -> dict:
        return capture_random_state()

    def load_state_dict(self, state_dict: dict) -> None:
        if self.restore and state_dict:
            restore_random_state(state_dict)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before_sanity_check = capture_random_state()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_sanity_check is not None:
            restore_random_state(self._before_sanity_check)
            self._before_sanity_check = None
