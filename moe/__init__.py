"""Sparse Mixture-of-Experts research in JAX/Flax NNX.

The face of the library: the MoE layer and its configuration (`from moe import MoEConfig,
MoEFeedForward`). The parts live in sub-packages: `moe.layers` (routing, dispatch, experts, the layer),
`moe.kernels` (grouped matmuls), `moe.models` (the decoder, decoding, upcycling, FLOP counts),
`moe.config` (every configuration dataclass), `moe.parallel` (meshes and shardings), `moe.trainer`
(the training loop and everything a run writes) and `moe.data` (corpora, tokenizers, pipelines).
"""

from moe.config.model import (
    Activation,
    Dispatch,
    GroupedMatmul,
    MoEConfig,
    Priority,
    RouterKind,
    ServingOrder,
    capacity,
)
from moe.layers.moe_layer import MoEAux, MoEFeedForward

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
