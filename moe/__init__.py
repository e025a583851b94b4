"""Sparse Mixture-of-Experts research in JAX/Flax NNX.

The face of the library: the MoE layer and its configuration (`from moe import MoEConfig,
MoEFeedForward`). The parts live in sub-packages: `moe.layers` (routing, dispatch, experts, the layer),
`moe.kernels` (grouped matmuls), `moe.models` (the decoder, decoding, upcycling, FLOP counts),
`moe.config` (every configuration dataclass), `moe.parallel` (meshes and shardings), `moe.trainer`
(the training loop and everything a run writes) and `moe.data` (corpora, tokenizers, pipelines).

Shape suffixes (nanodo's convention): an array's name ends in its axes, `x_GSD` is [groups, tokens
per group, width]. One letter, one meaning, everywhere in the library:

  B batch (sequences)        L positions of a sequence   P prompt positions   Q cache positions
  V vocabulary               D model width               F hidden width (FFN, expert)
  N query heads              M key/value heads           H head width
  G routing groups           S tokens per group          E experts            K choices per token
  C capacity (slots per expert per group)                U slots of a group, flattened (E * C)
  T tokens, flattened        J claims or rows, flattened I, O a kernel's input and output features
  Z expert shards            X experts local to a shard  R rows received by a shard
  Y sparse layers            W records of a window       1 a kept axis of size one
"""

from moe.config.enums import (
    Activation,
    Balance,
    BalanceScope,
    Dispatch,
    GroupedMatmul,
    Priority,
    RouterKind,
    Score,
    ServingOrder,
)
from moe.config.layer import MoEConfig, capacity
from moe.layers.moe_layer import MoEAux, MoEFeedForward, auxiliary_loss

__all__ = [
    "Activation",
    "Balance",
    "BalanceScope",
    "Dispatch",
    "GroupedMatmul",
    "MoEConfig",
    "Priority",
    "RouterKind",
    "Score",
    "ServingOrder",
    "capacity",
    "MoEAux",
    "MoEFeedForward",
    "auxiliary_loss",
]
