"""Configuration of the MoE feed-forward layer (`MoEConfig`) and its expert capacity (`capacity`).

A frozen dataclass. Bad values raise `ValueError` naming the field and the allowed values in
`__post_init__`, so a typo fails before anything is traced or compiled. Enum fields accept the enum
or its lower-case string value (what an ml_collections config or a command-line override gives).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

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
from moe.config.validation import as_enum, check_number

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def as_dtype_name(value: Any, field: str) -> str:
  name = value if isinstance(value, str) else jnp.dtype(value).name
  if name not in DTYPES:
    raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, DTYPES))}")
  return name


def is_dropless(capacity_factor: float | None) -> bool:
  """A capacity factor of None means no token is ever dropped (any number must be > 0)."""
  return capacity_factor is None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
  """Every knob of the MoE feed-forward layer.

  Attributes:
    num_experts: E, the number of routed experts.
    top_k: k, experts per token (tokens choose); for experts choose, the average number of experts per
      token at capacity factor 1 (capacity C = cf * k * S / E, see `capacity`).
    expert_hidden: f, the hidden width of each expert.
    router: who chooses (`RouterKind`).
    dispatch: how tokens reach experts (`Dispatch`).
    grouped_matmul: the grouped matmul of the DROPLESS dispatch (`GroupedMatmul`); other dispatches
      ignore it. A kernel that is not available on the backend is refused when the layer is built.
    train_capacity_factor / eval_capacity_factor: cf > 0 in C = ceil(cf * k * S / E); None means
      dropless: C = S for EINSUM/GATHER (no token can drop), and required for DROPLESS.
    min_capacity: lower bound on C (before clamping C to S).
    group_size: S, tokens per routing group. None: each sequence is a group. Groups are cut from the
      data (the flattened [batch * length] token axis), never from device shards, so which tokens drop
      does not depend on the mesh.
    priority: which claims win within a choice rank (`Priority`).
    serving_order: rank-major (first choices before second choices) or token-major (all of a token's
      claims before the next token's: causal with index priority); see `ServingOrder`.
    renormalize_gates: divide the k gate values of a token by their sum (before capacity, as Tutel and
      praxis do). Default False, as flaxformer and the Switch Transformer: with k=1 renormalising sets
      every gate to 1.0 and cuts the router off from the task loss, and with k>1 keeping the raw
      probabilities lets the router learn how much to trust its choices.
    jitter_eps: multiplicative router-input noise U[1 - eps, 1 + eps] in training (Switch Transformer,
      Sec. 2.4); 0 disables it. Never applied at evaluation.
    score: softmax or sigmoid router scores (`Score`; `moe.layers.balancing`). With sigmoid, a
      token's k gates are its chosen affinities normalised to sum to 1, and the balance losses and
      statistics read the affinities normalised over the experts; the z-loss is the same
      logsumexp(logits)^2 for both (it keeps the logits small; a sigmoid saturates like a softmax).
    balance: what keeps the load even (`Balance`): the balance loss (weighted by
      `balance_loss_weight`), a selection bias updated after every step (auxiliary-loss-free), or
      nothing. The balance loss is computed and logged in every case; only `loss` adds it.
    bias_update_rate: u of the bias update b_e += u * sign(mean load - load_e) (DeepSeek-V3: 0.001).
    balance_scope: the balance loss per routing group or pooled over the global batch
      (`BalanceScope`).
    sequence_balance_weight: weight of DeepSeek-V3's complementary sequence-wise balance loss (the
      Switch loss per sequence, averaged; DeepSeek-V3 used a very small weight); 0 for none.
    balance_loss_weight / z_loss_weight: weights of the auxiliary losses (ST-MoE uses 1e-2 and 1e-3).
    activation: expert nonlinearity (`Activation`).
    shared_expert_hidden: hidden width of an always-on dense FFN beside the routed experts (DeepSeekMoE,
      MaxText); 0 for none.
    dtype: activation/compute dtype ('float32' or 'bfloat16'). Parameters are float32 and router logits
      are always computed in float32.
    allow_noncausal_routing: acknowledges routing that lets a token's output depend on later tokens of
      its group (see `routing_is_causal`); a decoder refuses such routing unless this is True.
  """

  num_experts: int
  top_k: int = 1
  expert_hidden: int = 0
  router: RouterKind | str = RouterKind.TOKENS_CHOOSE
  dispatch: Dispatch | str = Dispatch.GATHER
  grouped_matmul: GroupedMatmul | str = GroupedMatmul.AUTO
  train_capacity_factor: float | None = 1.25
  eval_capacity_factor: float | None = 2.0
  min_capacity: int = 4
  group_size: int | None = None
  priority: Priority | str = Priority.INDEX
  serving_order: ServingOrder | str = ServingOrder.RANK_MAJOR
  renormalize_gates: bool = False
  jitter_eps: float = 0.0
  score: Score | str = Score.SOFTMAX
  balance: Balance | str = Balance.LOSS
  bias_update_rate: float = 1e-3
  balance_scope: BalanceScope | str = BalanceScope.GROUP
  sequence_balance_weight: float = 0.0
  balance_loss_weight: float = 1e-2
  z_loss_weight: float = 1e-3
  activation: Activation | str = Activation.GELU
  shared_expert_hidden: int = 0
  dtype: str = "float32"
  allow_noncausal_routing: bool = False

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(
        self, name, value
    )  # frozen: normalise once, here.
    set_("router", as_enum(RouterKind, self.router, "moe.router"))
    set_("dispatch", as_enum(Dispatch, self.dispatch, "moe.dispatch"))
    set_("grouped_matmul", as_enum(GroupedMatmul, self.grouped_matmul, "moe.grouped_matmul"))
    set_("priority", as_enum(Priority, self.priority, "moe.priority"))
    set_("serving_order", as_enum(ServingOrder, self.serving_order, "moe.serving_order"))
    set_("activation", as_enum(Activation, self.activation, "moe.activation"))
    set_("score", as_enum(Score, self.score, "moe.score"))
    set_("balance", as_enum(Balance, self.balance, "moe.balance"))
    set_("balance_scope", as_enum(BalanceScope, self.balance_scope, "moe.balance_scope"))
    set_("dtype", as_dtype_name(self.dtype, "moe.dtype"))
    if not (isinstance(self.num_experts, int) and self.num_experts >= 1):
      raise ValueError(f"moe.num_experts={self.num_experts!r} must be an integer >= 1")
    if not (isinstance(self.top_k, int) and 1 <= self.top_k <= self.num_experts):
      raise ValueError(
          f"moe.top_k={self.top_k!r} must be an integer in [1, moe.num_experts={self.num_experts}]"
      )
    if not (isinstance(self.expert_hidden, int) and self.expert_hidden >= 1):
      raise ValueError(f"moe.expert_hidden={self.expert_hidden!r} must be an integer >= 1")
    if not (isinstance(self.min_capacity, int) and self.min_capacity >= 0):
      raise ValueError(f"moe.min_capacity={self.min_capacity!r} must be an integer >= 0")
    if self.group_size is not None and not (
        isinstance(self.group_size, int) and self.group_size >= 1
    ):
      raise ValueError(
          f"moe.group_size={self.group_size!r} must be None (per sequence) or an integer >= 1"
      )
    check_number("moe.shared_expert_hidden", self.shared_expert_hidden, low=0, integer=True)
    check_number("moe.jitter_eps", self.jitter_eps, low=0, high=1, high_open=True)
    for name in (
        "balance_loss_weight",
        "z_loss_weight",
        "sequence_balance_weight",
        "bias_update_rate",
    ):
      check_number(f"moe.{name}", getattr(self, name), low=0)
    self._check_recipes()
    for name in ("train_capacity_factor", "eval_capacity_factor"):
      if getattr(self, name) is not None:  # None: dropless. A number <= 0 is a typo, not dropless.
        check_number(
            f"moe.{name}", getattr(self, name), low=0, low_open=True, hint=", or None (dropless)"
        )
    if self.dispatch is Dispatch.DROPLESS:
      if self.router is RouterKind.EXPERTS_CHOOSE:
        raise ValueError(
            "moe.dispatch='dropless' is not allowed with moe.router='experts_choose': experts choose a "
            "fixed number of tokens each; use moe.dispatch in ('einsum', 'gather')"
        )
      for name in ("train_capacity_factor", "eval_capacity_factor"):
        if not is_dropless(getattr(self, name)):
          raise ValueError(
              f"moe.{name}={getattr(self, name)!r} must be None with moe.dispatch='dropless' (it computes "
              "every assignment); use 'einsum' or 'gather' for a capacity"
          )
    if self.router is RouterKind.EXPERTS_CHOOSE:
      for name in ("train_capacity_factor", "eval_capacity_factor"):
        if is_dropless(getattr(self, name)):
          raise ValueError(
              f"moe.{name}={getattr(self, name)!r}: experts choose needs a capacity factor > 0 (each "
              "expert takes C = ceil(cf * k * S / E) tokens)"
          )

  def _check_recipes(self) -> None:
    """The recipes a router cannot take. Sigmoid scores need k >= 2 (DeepSeek-V3 Sec. 2.1.2
    normalises the gates over the chosen experts). With experts choose, the experts rank the tokens
    by a softmax over experts (Zhou et al. 2022, Eq. 1), and every expert is full by construction:
    there is no load to balance.
    """
    if self.router is not RouterKind.EXPERTS_CHOOSE:
      if self.score is Score.SIGMOID and self.top_k == 1:
        raise ValueError(
            "moe.score='sigmoid' needs moe.top_k >= 2: its gates are the chosen affinities normalised "
            "to sum to 1, so with one expert per token every gate is 1.0 and the router gets no "
            "gradient from the task loss (DeepSeek-V3 routes to 8); use moe.top_k >= 2 or "
            "moe.score='softmax'"
        )
      return
    why = {
        "score": "experts rank tokens by a softmax over experts",
        "balance": "every expert is full by construction",
    }
    for name, allowed in (("score", Score.SOFTMAX), ("balance", Balance.LOSS)):
      value = getattr(self, name)
      if value is not allowed:
        raise ValueError(
            f"moe.{name}={value.value!r} is not allowed with moe.router='experts_choose' "
            f"({why[name]}); use moe.{name}={allowed.value!r} or moe.router='tokens_choose'"
        )
    if self.sequence_balance_weight:
      raise ValueError(
          f"moe.sequence_balance_weight={self.sequence_balance_weight} must be 0 with "
          "moe.router='experts_choose' (every expert is full by construction)"
      )

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def routing_is_causal(self) -> bool:
    """Whether a token's routing (expert, slot, drop) depends only on itself and earlier tokens.

    Causal: dropless routing (no capacity: nothing competes), and claims served in sequence order
    ('index' priority) with top-1 or token-major serving (`ServingOrder`), where a claim can only
    lose its slot to earlier tokens. Not causal: experts choose (an expert ranks all tokens of the
    group), top-k for k > 1 with a capacity in rank-major order (a later token's first choice is
    served before an earlier token's second choice and can take its slot, as in GShard and
    flaxformer), and batch-prioritised order (tokens ranked by router probability, so a later token
    can take an earlier one's slot).

    The recipes of `moe.layers.balancing` change none of this: sigmoid scores are per token, the
    selection bias is fixed during a forward pass (a function of earlier steps' batches, like a
    parameter), and the global-batch and per-sequence balance losses couple a batch's tokens through
    the gradient only, as the per-group loss always has.
    """
    if self.router is RouterKind.EXPERTS_CHOOSE:
      return False
    if all(is_dropless(self.capacity_factor(train)) for train in (True, False)):
      return True  # C = S: every claim fits.
    token_by_token = self.top_k == 1 or self.serving_order is ServingOrder.TOKEN_MAJOR
    return token_by_token and self.priority is Priority.INDEX

  def capacity_factor(self, train: bool) -> float | None:
    return self.train_capacity_factor if train else self.eval_capacity_factor

  def check_tokens(self, batch: int, length: int) -> None:
    """Raises if the routing groups do not tile a [batch, length] block of tokens."""
    if self.group_size is not None and (batch * length) % self.group_size:
      raise ValueError(
          f"moe.group_size={self.group_size} must divide the tokens per batch "
          f"(batch {batch} x length {length} = {batch * length}); use a divisor or None (per sequence)"
      )

  def group_shape(self, batch: int, length: int) -> tuple[int, int]:
    """(G, S): number of routing groups and tokens per group for a [batch, length] block."""
    self.check_tokens(batch, length)
    s = length if self.group_size is None else self.group_size
    return batch * length // s, s

  def capacity(self, group_size: int, train: bool) -> int:
    """Buffer slots per expert per group. See `capacity` (module function) for the formula."""
    return capacity(
        group_size, self.num_experts, self.top_k, self.capacity_factor(train), self.min_capacity
    )


def capacity(
    group_size: int,
    num_experts: int,
    top_k: int,
    capacity_factor: float | None,
    min_capacity: int = 4,
) -> int:
  """Expert capacity C: how many tokens one expert processes per routing group.

    C = min(S, max(ceil(cf * k * S / E), min_capacity)),      C = S when cf is None (dropless)

  with S tokens per group, E experts and k choices per token. At cf = 1 the buffers hold exactly the
  k * S assignments when routing is balanced. C never exceeds S: a token claims an expert at most once.

  Porting notes (see ../shared/MOE_REFERENCE.md):
    * flaxformer: C = max(round(cf * S / E), 4), with no factor k (its top-2 configs raise cf instead,
      e.g. 1.25 -> 2.5 here is the same C at k=2) and Python's round-half-to-even. Its number of groups
      follows the device count; ours follows the data.
    * MaxText (dropping path): C = int(max(ceil(S * k / E) * cf, cf)) with S one sequence: the ceil comes
      before the cf, so C can differ from ours by up to cf - 1 slots.
    * DeepSpeed: C = max(ceil(S / E * cf), min_capacity), no k (top-2 doubles cf).
  """
  if is_dropless(capacity_factor):
    return group_size
  # Round first: 1.2 * 5 is 6.000000000000001 in floating point, which must not become 7 slots.
  c = max(math.ceil(round(capacity_factor * top_k * group_size / num_experts, 9)), min_capacity)
  return int(min(c, group_size))
