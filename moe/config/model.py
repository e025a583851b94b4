"""Configuration of the decoder (`ModelConfig`) and which of its layers are sparse
(`sparse_layer_mask`); each sparse layer's feed-forward is a `moe.config.layer.MoEConfig`.

A frozen dataclass. Bad values raise `ValueError` naming the field and the allowed values in
`__post_init__`, so a typo fails before anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses

from moe.config.enums import Activation, Remat
from moe.config.layer import DTYPES, MoEConfig, as_dtype_name
from moe.config.validation import as_enum, check_number


def sparse_layer_mask(
    num_layers: int,
    *,
    sparse_every: int = 1,
    first_dense: int = 0,
    sparse_layers: tuple[int, ...] | None = None,
) -> tuple[bool, ...]:
  """Which layers hold a MoE feed-forward block (True) instead of a dense one.

  An explicit `sparse_layers` list wins. Otherwise the first `first_dense` layers are dense and, after
  them, every `sparse_every`-th layer is sparse, counting so that the last of each run of
  `sparse_every` layers is the sparse one (Switch Transformer: `sparse_every=2` makes layers 1, 3, 5, ...
  sparse; DeepSeekMoE: `first_dense=1, sparse_every=1`).
  """
  if sparse_layers is not None:
    bad = [i for i in sparse_layers if not 0 <= i < num_layers]
    if bad:
      raise ValueError(
          f"model.sparse_layers={tuple(sparse_layers)} has layers outside "
          f"[0, model.num_layers={num_layers}): {bad}"
      )
    chosen = set(sparse_layers)
    return tuple(i in chosen for i in range(num_layers))
  if sparse_every < 1:
    raise ValueError(f"model.sparse_every={sparse_every} must be >= 1")
  if not 0 <= first_dense <= num_layers:
    raise ValueError(
        f"model.first_dense={first_dense} must be in [0, model.num_layers={num_layers}]"
    )
  return tuple(
      i >= first_dense and (i - first_dense) % sparse_every == sparse_every - 1
      for i in range(num_layers)
  )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """A decoder-only transformer. Dense and sparse are one architecture: `moe=None` (or no layer selected
  by the layout) is the dense model; otherwise the selected layers use `moe` for their feed-forward.

  Attributes:
    vocab_size, d_model, num_layers, num_heads: the usual.
    num_kv_heads: key/value heads (grouped-query attention when < num_heads; must divide num_heads).
      None means num_heads (multi-head attention).
    head_dim: per-head width; None means d_model // num_heads.
    mlp_hidden: hidden width of the dense feed-forward blocks.
    activation: feed-forward nonlinearity of the dense blocks (experts use `moe.activation`).
    max_len: the longest sequence the model accepts (a longer input is refused; `train.seq_len` must
      not exceed it): positions beyond it were never trained.
    rope_theta: rotary base (Su et al. 2021).
    tie_embeddings: the output projection is the transposed token embedding.
    moe: the sparse feed-forward configuration, or None for a dense model. Causality: routing is
      per token, but capacity couples the tokens of a group; routing that is not causal
      (`MoEConfig.routing_is_causal`: experts choose, top-k > 1 with a capacity, batch-prioritised
      order) is refused unless acknowledged (`MoEConfig.allow_noncausal_routing`).
    sparse_every / first_dense / sparse_layers: the layout, see `sparse_layer_mask`.
    scan_layers: stack the repeating block of layers and apply it with `jax.lax.scan`, so compile time
      stays flat with depth.
    remat: rematerialisation policy of each layer (`Remat`).
    dtype: activation dtype ('bfloat16' or 'float32'); parameters stay float32.
    norm_eps: RMSNorm epsilon.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_hidden: int
  activation: Activation | str = Activation.GELU
  max_len: int = 1024
  rope_theta: float = 10_000.0
  tie_embeddings: bool = True
  moe: MoEConfig | None = None
  sparse_every: int = 1
  first_dense: int = 0
  sparse_layers: tuple[int, ...] | None = None
  scan_layers: bool = True
  remat: Remat | str = Remat.NONE
  dtype: str = "float32"
  norm_eps: float = 1e-6

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_("activation", as_enum(Activation, self.activation, "model.activation"))
    set_("remat", as_enum(Remat, self.remat, "model.remat"))
    set_("dtype", as_dtype_name(self.dtype, "model.dtype"))
    if self.sparse_layers is not None:
      set_("sparse_layers", tuple(int(i) for i in self.sparse_layers))
    if self.num_kv_heads is None:
      set_("num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.num_heads < 1 or self.d_model % self.num_heads:
        raise ValueError(
            f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model} "
            "(or set model.head_dim)"
        )
      set_("head_dim", self.d_model // self.num_heads)
    for name in (
        "vocab_size",
        "d_model",
        "num_layers",
        "num_heads",
        "mlp_hidden",
        "max_len",
        "head_dim",
        "num_kv_heads",
    ):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"model.{name}={value!r} must be an integer >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_kv_heads={self.num_kv_heads} must divide " f"model.num_heads={self.num_heads}"
      )
    check_number("model.rope_theta", self.rope_theta, low=1, low_open=True)
    check_number("model.norm_eps", self.norm_eps, low=0, low_open=True)
    if self.head_dim % 2:
      raise ValueError(
          f"model.head_dim={self.head_dim} must be even (rotary embeddings rotate pairs)"
      )
    sparse_layer_mask(
        self.num_layers,
        sparse_every=self.sparse_every,
        first_dense=self.first_dense,
        sparse_layers=self.sparse_layers,
    )  # Raises on a bad layout.
    if self.moe is not None:
      if not self.moe.routing_is_causal and not self.moe.allow_noncausal_routing:
        m = self.moe
        raise ValueError(
            f"model.moe routing (router={m.router.value!r}, top_k={m.top_k}, "
            f"priority={m.priority.value!r}, dispatch={m.dispatch.value!r}) lets a token's routing "
            "depend on later tokens of its group, which leaks the future in a decoder "
            "(MoEConfig.routing_is_causal). Set model.moe.allow_noncausal_routing=True to acknowledge "
            "it, or use a causal routing: priority='index' with top_k=1 or serving_order='token_major', or "
            "dispatch='dropless'"
        )
      if self.moe.dtype != self.dtype:
        set_("moe", dataclasses.replace(self.moe, dtype=self.dtype))

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def sparse_mask(self) -> tuple[bool, ...]:
    """Per layer: True where the feed-forward block is a MoE layer (all False for a dense model)."""
    if self.moe is None:
      return (False,) * self.num_layers
    return sparse_layer_mask(
        self.num_layers,
        sparse_every=self.sparse_every,
        first_dense=self.first_dense,
        sparse_layers=self.sparse_layers,
    )

  @property
  def num_sparse_layers(self) -> int:
    return sum(self.sparse_mask)
