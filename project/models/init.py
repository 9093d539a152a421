"""Weight-initialisation schemes, chosen by name (so a YAML file can pick one).

``initialize(model, "kaiming_normal")`` walks ``model.modules()`` and re-initialises every
convolution and linear layer; normalisation layers always get weight 1 and bias 0.
"""

from typing import Literal, get_args

from torch import nn

InitScheme = Literal["default", "xavier_uniform", "kaiming_normal", "normal", "uniform"]
INIT_SCHEMES: tuple[str, ...] = get_args(InitScheme)

#: Used when ``scale`` is not given: the standard deviation for ``normal``, the bound ``a`` of
#: U(-a, a) for ``uniform``.
DEFAULT_SCALE = {"normal": 0.01, "uniform": 0.05}

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def initialize(model: nn.Module, scheme: str = "default", scale: float | None = None) -> nn.Module:
    """Re-initialise ``model`` in place and return it.

    Args:
        model: any module; its convolutions and linear layers are re-initialised.
        scheme: ``default`` (PyTorch's own ``reset_parameters``), ``xavier_uniform``,
            ``kaiming_normal`` (fan_in, relu), ``normal`` (mean 0, std ``scale``) or
            ``uniform`` (U(-scale, scale)). Biases are zeroed for every scheme but ``default``.
        scale: std for ``normal``, bound for ``uniform``; ignored by the other schemes.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"Unknown init scheme {scheme!r}; choose one of {', '.join(INIT_SCHEMES)}.")
    if scale is None:
        scale = DEFAULT_SCALE.get(scheme)
    elif scale <= 0:
        raise ValueError(f"Init scale must be > 0, got {scale}.")
    for module in model.modules():
        if isinstance(module, _NORMS):
            if module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        elif isinstance(module, _WEIGHTED):
            if scheme == "default":
                module.reset_parameters()
                continue
            if scheme == "xavier_uniform":
                nn.init.xavier_uniform_(module.weight)
            elif scheme == "kaiming_normal":
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif scheme == "normal":
                nn.init.normal_(module.weight, mean=0.0, std=scale)
            else:
                nn.init.uniform_(module.weight, -scale, scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
