"""Sparse Mixture-of-Experts research in JAX/Flax NNX.

The layer: `moe.MoEConfig`, `moe.MoEFeedForward`; routing pieces and losses in `moe.routing`, dispatch
implementations in `moe.dispatch`, expert FFNs in `moe.ffn`.
"""

from moe.config import (
    Activation,
    Dispatch,
    GroupedMatmul,
    MoEConfig,
    Priority,
    RouterKind,
    ServingOrder,
    capacity,
)
from moe.layer import MoEAux, MoEFeedForward

__all__ = [
    "Activation",
    "Dispatch",
    "GroupedMatmul",
    "MoEConfig",
    "Priority",
    "RouterKind",
    "ServingOrder",
    "capacity",
    "MoEAux",
    "MoEFeedForward",
]
