"""The enumerated choices of the model's configuration (`moe.config`): routers, dispatch paths, grouped
matmuls, activations, slot priorities, serving orders and rematerialisation policies.

`moe.config` validates fields against these (an enum, or its lower-case string value as an
ml_collections config or a command-line override gives it) and re-exports them.
"""

from __future__ import annotations

import enum


class RouterKind(enum.Enum):
  """Who chooses: tokens choose their top-k experts, or experts choose their top-C tokens."""

  TOKENS_CHOOSE = "tokens_choose"  # Switch (k=1), GShard (k=2).
  # Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing".
  EXPERTS_CHOOSE = "experts_choose"


class Dispatch(enum.Enum):
  """How tokens reach their experts. All three compute the same function (tests prove it)."""

  # One-hot [G, S, E, C] dispatch/combine tensors and einsums (GShard, flaxformer).
  EINSUM = "einsum"
  GATHER = "gather"  # Sort claims by expert, gather into [G, E, C, d] buffers, gather back.
  # Every assignment; tokens grouped by expert and a grouped matmul (megablocks).
  DROPLESS = "dropless"


class GroupedMatmul(enum.Enum):
  """Which grouped matmul runs the experts of the DROPLESS dispatch (`moe.grouped_matmul`).

  All compute `jax.lax.ragged_dot` (tests prove it); they differ in speed and availability. See
  `moe.kernels.grouped_matmul.grouped_matmul`.
  """

  AUTO = "auto"  # The fastest available: on GPU tokamax if installed, else pallas; elsewhere xla.
  XLA = "xla"  # jax.lax.ragged_dot: the portable reference (a dense dot over every expert on GPU).
  TOKAMAX = "tokamax"  # tokamax.ragged_dot, a kernel chosen per direction (forward, dx, dw).
  PALLAS = "pallas"  # Our megablocks-style kernels: Triton on GPU, interpret mode on the CPU.


class Activation(enum.Enum):
  GELU = "gelu"  # y = W_out gelu(W_in x)
  SWIGLU = "swiglu"  # y = W_out (silu(W_gate x) * W_up x)   (Shazeer 2020, "GLU Variants")


class Priority(enum.Enum):
  """Which claims win buffer slots within one choice rank (first choices always beat second choices)."""

  INDEX = "index"  # Tokens in sequence order (GShard, flaxformer default).
  # Highest top-1 probability first (Switch, Tutel, flaxformer BPR).
  BATCH_PRIORITIZED = "batch_prioritized"


class ServingOrder(enum.Enum):
  """In which order the claims of a routing group are served buffer slots (see `moe.dispatch`).

  RANK_MAJOR: every first choice before any second choice (GShard, flaxformer): a token keeps its
  first choice whenever it can, but a later token's first choice can take the slot of an earlier
  token's second choice, so with k > 1 and a capacity routing is not causal. TOKEN_MAJOR: all of
  token t's claims (best first) before token t+1's, so a claim can only lose its slot to earlier
  tokens: causal with index priority. Its cost: an earlier token's second choice can take the slot
  that a later token's first choice would have had, so more first choices drop. With k = 1 the
  two orders are the same.
  """

  RANK_MAJOR = "rank_major"
  TOKEN_MAJOR = "token_major"


class Remat(enum.Enum):
  """What a layer keeps for the backward pass (`jax.checkpoint` policies)."""

  NONE = "none"  # Keep every activation: fastest, most memory.
  FULL = "full"  # Recompute the whole layer in the backward pass.
  DOTS = "dots"  # Keep matmul outputs without batch dimensions, recompute the rest.


class Score(enum.Enum):
  """How router logits become the scores that choose experts and weight their outputs."""

  SOFTMAX = "softmax"  # A distribution over experts (Switch, GShard, flaxformer).
  # An independent sigmoid affinity per expert; the k chosen are normalised into gates (DeepSeek-V3).
  SIGMOID = "sigmoid"


class Balance(enum.Enum):
  """What keeps the expert load even (see `moe.layers.balancing`)."""

  LOSS = "loss"  # The Switch balance loss, weighted by `balance_loss_weight` (Fedus et al. 2021).
  # A per-expert selection bias nudged after every step from the load (Wang et al. 2024, DeepSeek-V3).
  BIAS = "bias"
  NONE = "none"  # Nothing: the router is free to concentrate.


class BalanceScope(enum.Enum):
  """Over which tokens the balance loss counts the expert load and the mean probabilities."""

  GROUP = "group"  # Each routing group, then averaged over groups (Switch, GShard, flaxformer).
  GLOBAL = "global"  # The whole global batch at once (Qiu et al. 2025); the same for one group.
