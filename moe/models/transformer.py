"""A decoder-only transformer in which dense and sparse are one architecture.

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits_BLV, aux = model(tokens_BL, train=True, rng=key)

Pre-norm blocks (RMSNorm, causal attention with rotary positions and optional grouped-query
heads, RMSNorm, feed-forward). The feed-forward of layer i is the MoE layer where
`cfg.sparse_mask[i]` is True and a dense MLP elsewhere; `cfg.moe=None` is the dense model. `aux` is
None for a dense model, else a `MoEAux` whose leaves are stacked over the sparse layers in layer
order.

Only `Transformer` (and `make_block`) read the `ModelConfig`; `Attention`, `Block` and `Period` take
just the widths and sub-modules they use.

Depth is handled with a scan: the layer pattern is cut into an unrolled prefix and one repeating
period of layers (`scan_plan`), whose parameters are stacked over a 'layers' axis and applied with
`nnx.scan`, so compile time does not grow with depth.

Generation with a KV cache (`moe.models.decode`) runs the same modules piece by piece: `embed_tokens`,
`Attention.project` (rotary at the cached positions) and `Attention.output` around its own attention
over the cache, `Block.feed_forward`, and `logits`. `__call__` is built from the same pieces, so the
two cannot drift apart.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.enums import Remat
from moe.config.model import ModelConfig
from moe.layers import balancing
from moe.layers.ffn import MLP
from moe.layers.moe_layer import MoEAux, MoEFeedForward
from moe.parallel import axes

_REMAT_POLICIES = {
    Remat.FULL: None,  # jax.checkpoint's default: save nothing.
    Remat.DOTS: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def scan_plan(mask: tuple[bool, ...], scan_layers: bool = True) -> tuple[int, int]:
  """Cuts a layer pattern into an unrolled prefix and a repeating period: (prefix, period).

  Layers [0, prefix) are built one by one; layers [prefix, n) are (n - prefix) // period
  repetitions of mask[prefix:prefix + period]. Chooses the cut with the fewest distinct layers
  (prefix + period), then the shortest prefix. `scan_layers=False` unrolls everything: (n, 0).
  """
  n = len(mask)
  if not scan_layers or n == 0:
    return n, 0
  candidates = []
  for prefix in range(n):
    rest = mask[prefix:]
    # The shortest period of this rest; longer ones of the same rest are never better.
    period = next(
        p
        for p in range(1, len(rest) + 1)
        if len(rest) % p == 0 and rest == rest[:p] * (len(rest) // p)
    )
    candidates.append((prefix + period, prefix, period))
  _, prefix, period = min(candidates)
  return prefix, period


class RMSNorm(nnx.RMSNorm):
  """`nnx.RMSNorm` (Zhang & Sennrich 2019) computed in float32, returned in the input's dtype, its
  scale named by the logical axis `axes.NORM`.

  Its scale starts at ones, which takes no randomness: it gets a throwaway `nnx.Rngs`, so building a
  norm draws nothing from the model's key and the other parameters' initialisation does not depend on
  how many norms come before them.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6):
    super().__init__(
        dim,
        epsilon=eps,
        dtype=jnp.float32,
        scale_metadata={"out_sharding": (axes.NORM,)},
        rngs=nnx.Rngs(0),
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return super().__call__(x).astype(x.dtype)


def rotary(x_BLNH: jax.Array, theta: float, positions_L: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotating pairs (i, i + H/2) of each head.

  Args:
    x_BLNH: queries or keys [batch, length, heads, head_dim].
    theta: rotary base.
    positions_L: the position of each of the L tokens (shared by the batch); None means 0 .. L-1.
      A decode step passes its offset into the sequence (`moe.models.decode`).
  """
  length, head_dim = x_BLNH.shape[1], x_BLNH.shape[-1]
  freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if positions_L is None:
    positions_L = jnp.arange(length, dtype=jnp.float32)
  angle_LH = positions_L.astype(jnp.float32)[:, None] * freq[None, :]
  sin, cos = jnp.sin(angle_LH)[None, :, None, :], jnp.cos(angle_LH)[None, :, None, :]
  x1, x2 = jnp.split(x_BLNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLNH.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with rotary positions; grouped-query when num_kv_heads < num_heads.

  Args:
    d_model: model width d.
    num_heads: query heads N.
    num_kv_heads: key/value heads K; must divide N (each serves N / K query heads).
    head_dim: per-head width H (even: rotary embeddings rotate pairs).
    rope_theta: rotary base (Su et al. 2021).
    dtype: compute dtype; parameters stay float32.
    rngs: parameter initialisation.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      num_kv_heads: int,
      head_dim: int,
      *,
      rope_theta: float = 10_000.0,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    d, h, kv, hd = d_model, num_heads, num_kv_heads, head_dim
    init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
    )
    out_init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    p = lambda i, shape, names: nnx.Param(i(rngs.params(), shape, jnp.float32), out_sharding=names)
    self.q = p(init, (d, h, hd), (axes.EMBED, axes.HEADS, axes.HEAD_DIM))
    self.k = p(init, (d, kv, hd), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
    self.v = p(init, (d, kv, hd), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
    self.o = p(out_init, (h, hd, d), (axes.HEADS, axes.HEAD_DIM, axes.EMBED))
    self.theta = rope_theta
    self.dtype = dtype

  def _weight(self, param: nnx.Param) -> jax.Array:
    return param[...].astype(self.dtype)

  def project(
      self, x_BLD: jax.Array, positions_L: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries [B, L, N, H] and keys [B, L, M, H] rotated to `positions_L` (see `rotary`), and
    values [B, L, M, H]."""
    q_BLNH = rotary(
        jnp.einsum("bld,dnh->blnh", x_BLD, self._weight(self.q)), self.theta, positions_L
    )
    k_BLMH = rotary(
        jnp.einsum("bld,dkh->blkh", x_BLD, self._weight(self.k)), self.theta, positions_L
    )
    v_BLMH = jnp.einsum("bld,dkh->blkh", x_BLD, self._weight(self.v))
    q_BLNH = axes.constrain(q_BLNH, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
    return q_BLNH, k_BLMH, v_BLMH

  def output(self, out_BLNH: jax.Array) -> jax.Array:
    """Attended values [B, L, N, H] -> [B, L, d]."""
    return jnp.einsum("blnh,nhd->bld", out_BLNH, self._weight(self.o))

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    q_BLNH, k_BLMH, v_BLMH = self.project(x_BLD)
    out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLMH, v_BLMH, is_causal=True)
    return self.output(out_BLNH)


class Block(nnx.Module):
  """One pre-norm decoder layer: x += attention(norm(x)); x += ffn(norm(x)).

  Args:
    d_model: model width d (of both RMSNorms).
    attention: the layer's attention.
    ffn: its feed-forward: a dense `MLP`, or a `MoEFeedForward` (then the layer is sparse and
      returns its `MoEAux`).
    norm_eps: RMSNorm epsilon.
  """

  def __init__(
      self, d_model: int, attention: Attention, ffn: MLP | MoEFeedForward, *, norm_eps: float = 1e-6
  ):
    self.sparse = isinstance(ffn, MoEFeedForward)
    self.attention_norm = RMSNorm(d_model, eps=norm_eps)
    self.attention = attention
    self.ffn_norm = RMSNorm(d_model, eps=norm_eps)
    self.ffn = ffn

  def __call__(
      self, x_BLD, *, train: bool, rng, token_mask_BL=None
  ) -> tuple[jax.Array, MoEAux | None]:
    x_BLD = x_BLD + self.attention(self.attention_norm(x_BLD))
    return self.feed_forward(x_BLD, train=train, rng=rng, token_mask_BL=token_mask_BL)

  def feed_forward(
      self, x_BLD, *, train: bool, rng, token_mask_BL=None
  ) -> tuple[jax.Array, MoEAux | None]:
    """The second half of the layer, after the attention's residual: x += ffn(norm(x)).

    `token_mask_BL` (1 real, 0 padding, or None) reaches a MoE feed-forward's routing only.
    """
    x_BLD = axes.constrain(x_BLD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
    aux = None
    if self.sparse:
      y_BLD, aux = self.ffn(self.ffn_norm(x_BLD), train=train, rng=rng, token_mask_BL=token_mask_BL)
    else:
      y_BLD = self.ffn(self.ffn_norm(x_BLD))
    x_BLD = axes.constrain(
        x_BLD + y_BLD.astype(x_BLD.dtype), (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
    )
    return x_BLD, aux


def make_block(cfg: ModelConfig, sparse: bool, *, rngs: nnx.Rngs) -> Block:
  """One layer of `cfg`: its feed-forward is `cfg.moe` when `sparse`, else the dense MLP.

  Draws the attention's parameters before the feed-forward's: the initialisation depends on the
  order of the draws from `rngs`.
  """
  attention = Attention(
      cfg.d_model,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      rope_theta=cfg.rope_theta,
      dtype=cfg.compute_dtype,
      rngs=rngs,
  )
  if sparse:
    ffn = MoEFeedForward(cfg.moe, cfg.d_model, rngs=rngs)
  else:
    ffn = MLP(cfg.d_model, cfg.mlp_hidden, cfg.activation, dtype=cfg.compute_dtype, rngs=rngs)
  return Block(cfg.d_model, attention, ffn, norm_eps=cfg.norm_eps)


class Period(nnx.Module):
  """The repeating unit of layers under the scan (e.g. [dense, sparse] for every-other-layer MoE).

  Args:
    layers: the blocks of one period, in layer order.
  """

  def __init__(self, layers: list[Block]):
    self.layers = nnx.List(layers)

  def __call__(self, x_BLD, first_layer, *, train: bool, rng, token_mask_BL=None):
    auxes = []
    for j, layer in enumerate(self.layers):
      key = None if rng is None else jax.random.fold_in(rng, first_layer + j)
      x_BLD, aux = layer(x_BLD, train=train, rng=key, token_mask_BL=token_mask_BL)
      if aux is not None:
        auxes.append(aux)
    return x_BLD, _stack(auxes)


def _update_bias(ffn: MoEFeedForward, load_E: jax.Array, rate: float) -> None:
  if ffn.router_bias is not None:
    ffn.router_bias[...] = balancing.updated_bias(ffn.router_bias[...], load_E, rate)


def _stack(auxes: list[MoEAux]) -> MoEAux | None:
  if not auxes:
    return None
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *auxes)


class Transformer(nnx.Module):
  """The decoder LM. See the module docstring.

  Args:
    cfg: the model configuration.
    rngs: parameter initialisation.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.d_model
    # Embeddings start at std 1/sqrt(d) and are scaled by sqrt(d) on input, so that a tied output
    # projection starts with unit-variance logits (as T5 and Gemma do).
    self.embed = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.vocab_size, d), jnp.float32) / math.sqrt(d),
        out_sharding=(axes.VOCAB, axes.EMBED),
    )
    if not cfg.tie_embeddings:
      self.unembed = nnx.Param(
          jax.random.normal(rngs.params(), (d, cfg.vocab_size), jnp.float32) / math.sqrt(d),
          out_sharding=(axes.EMBED, axes.VOCAB),
      )
    mask = cfg.sparse_mask
    self.prefix_len, self.period_len = scan_plan(mask, cfg.scan_layers)
    self.prefix = nnx.List([make_block(cfg, mask[i], rngs=rngs) for i in range(self.prefix_len)])
    self.repeats = (cfg.num_layers - self.prefix_len) // self.period_len if self.period_len else 0
    if self.repeats:
      pattern = mask[self.prefix_len : self.prefix_len + self.period_len]

      @nnx.split_rngs(splits=self.repeats)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: axes.LAYERS})
      def make_periods(rngs):
        return Period([make_block(cfg, sparse, rngs=rngs) for sparse in pattern])

      self.periods = make_periods(rngs)
    self.final_norm = RMSNorm(d, eps=cfg.norm_eps)

  def _maybe_remat(self, fn):
    if self.cfg.remat is Remat.NONE:
      return fn
    return nnx.remat(fn, policy=_REMAT_POLICIES[self.cfg.remat], static_argnums=(3,))

  def __call__(
      self,
      tokens_BL: jax.Array,
      *,
      train: bool = False,
      rng: jax.Array | None = None,
      token_mask_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, MoEAux | None]:
    """tokens [batch, length] int32 -> (float32 logits [batch, length, vocab], aux or None).

    `token_mask_BL`: [batch, length], 1 for a real token and 0 for padding (the batch's `weights`),
    or None; the MoE layers route padding-aware with it (`MoEFeedForward`).

    Raises:
      ValueError: length > cfg.max_len (positions beyond it were never trained). A static shape
        check: it fails when traced, before anything is computed.
    """
    cfg = self.cfg
    if tokens_BL.shape[1] > cfg.max_len:
      raise ValueError(
          f"input length {tokens_BL.shape[1]} exceeds model.max_len={cfg.max_len}, "
          "the longest sequence the model accepts; cut the input or raise "
          "model.max_len"
      )
    x_BLD = self.embed_tokens(tokens_BL)

    def run_block(block, x, key, train):
      return block(x, train=train, rng=key, token_mask_BL=token_mask_BL)

    run_block = self._maybe_remat(run_block)
    auxes = []
    for i, block in enumerate(self.prefix):
      key = None if rng is None else jax.random.fold_in(rng, i)
      x_BLD, aux = run_block(block, x_BLD, key, train)
      if aux is not None:
        auxes.append(aux)
    prefix_aux = _stack(auxes)

    scan_aux = None
    if self.repeats:
      first_layers = self.prefix_len + self.period_len * jnp.arange(self.repeats)

      def run_period(period, x, first_layer, train):
        return period(x, first_layer, train=train, rng=rng, token_mask_BL=token_mask_BL)

      run_period = self._maybe_remat(run_period)

      @nnx.scan(
          in_axes=(0, nnx.Carry, 0),
          out_axes=(nnx.Carry, 0),
          transform_metadata={nnx.PARTITION_NAME: axes.LAYERS},
      )
      def scan_periods(period, x, first_layer):
        return run_period(period, x, first_layer, train)

      x_BLD, scan_aux = scan_periods(self.periods, x_BLD, first_layers)
      if scan_aux is not None:  # [repeats, sparse per period, ...] -> [sparse layers, ...]
        scan_aux = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), scan_aux)

    parts = [a for a in (prefix_aux, scan_aux) if a is not None]
    aux = jax.tree.map(lambda *a: jnp.concatenate(a), *parts) if parts else None

    return self.logits(x_BLD), aux

  def update_router_bias(self, load_NE: jax.Array, rate: float) -> None:
    """Moves each sparse layer's selection bias (`MoEConfig.balance='bias'`) by
    `balancing.updated_bias` from that layer's load, in place.

    Args:
      load_NE: the expert load of each sparse layer [n, E], in the layer order of `__call__`'s aux
        (its `stats.expert_load`: the prefix's sparse layers, then the scanned periods'
        repeat-major).
      rate: the update rate u (`MoEConfig.bias_update_rate`).
    """
    index = 0
    for block in self.prefix:
      if block.sparse:
        _update_bias(block.ffn, load_NE[index], rate)
        index += 1
    if not self.repeats:
      return
    sparse_in_period = [j for j, layer in enumerate(self.periods.layers) if layer.sparse]
    for position, j in enumerate(sparse_in_period):
      # Scanned aux is [repeats, sparse per period] flattened: row r * len + position.
      rows = index + position + len(sparse_in_period) * jnp.arange(self.repeats)
      _update_bias(self.periods.layers[j].ffn, load_NE[rows], rate)

  def embed_tokens(self, tokens_BL: jax.Array) -> jax.Array:
    """tokens [B, L] -> the first layer's input [B, L, d] in the compute dtype."""
    x_BLD = jnp.take(self.embed[...], tokens_BL, axis=0) * math.sqrt(self.cfg.d_model)
    return axes.constrain(
        x_BLD.astype(self.cfg.compute_dtype), (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
    )

  def logits(self, x_BLD: jax.Array) -> jax.Array:
    """The last layer's output [B, L, d] -> float32 logits [B, L, vocab] (final norm, unembed)."""
    x_BLD = self.final_norm(x_BLD)
    if self.cfg.tie_embeddings:
      logits = jnp.einsum(
          "bld,vd->blv",
          x_BLD,
          self.embed[...].astype(x_BLD.dtype),
          preferred_element_type=jnp.float32,
      )
    else:
      logits = jnp.einsum(
          "bld,dv->blv",
          x_BLD,
          self.unembed[...].astype(x_BLD.dtype),
          preferred_element_type=jnp.float32,
      )
    return axes.constrain(logits, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Builds the model on the default device without a mesh (parameters keep their logical names)."""
  with nnx.use_eager_sharding(False):
    return Transformer(cfg, rngs=nnx.Rngs(seed))
