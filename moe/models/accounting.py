"""Parameter and FLOP accounting in closed form from a `ModelConfig`, for MFU and for matched baselines.

Conventions (one place, so every number in a plot means the same thing):

* A FLOP is one multiply or one add: a matmul [m, n] x [n, p] costs 2 m n p (Kaplan et al. 2020; PaLM,
  Chowdhery et al. 2022, App. B). Only matmuls and einsum contractions are counted; norms, softmaxes,
  activations, rotary embeddings, gathers, scatters and the loss are not (each is O(d) per token against
  the O(d^2) of the matmuls).
* Attention scores and values count the full L x L matrix, forward 2 * 2 * L * H * Dh per token per
  layer, which is what PaLM's 6N + 12 * n_layers * H * Dh * L (training, per token) counts. The XLA path
  of `jax.nn.dot_product_attention` (CPU, and GPU without cuDNN) computes the whole score matrix and
  then masks it, so this is what runs there; a causal flash kernel that skips masked blocks does about
  half, and its MFU is understated by at most that half of the attention term.
* Training = 3 x forward: the backward pass costs two matmuls per forward matmul (input and weight
  gradients). Rematerialisation is not counted (model FLOPs, not hardware FLOPs, as PaLM's MFU).
* Two counts of the experts. `model_flops_per_token` counts model FLOPs as PaLM does for MFU (Chowdhery
  et al. 2022, App. B): each token's k routed experts (experts choose: the E * C / S slots per token,
  all filled), the router, no capacity slack and no dispatch einsums, so a model's MFU does not depend
  on how its layer is implemented. `flops_per_token` counts what is computed, the hardware work:
* Experts count what is computed. Capacity-based dispatch (EINSUM or GATHER, tokens or experts choose)
  runs the expert FFNs on every one of the E * C buffer slots of a routing group of S tokens, full or not:
  E * C / S expert evaluations per token (about cf * k, see `moe.config.layer.capacity`; train or eval capacity
  factor following `train`). DROPLESS computes exactly k evaluations per token (the grouped matmul's
  algorithmic cost). `FlopCounts.expert_slots` says which.
* EINSUM dispatch adds its two one-hot einsums, [S, E, C] x [S, d] (dispatch) and [S, E, C] x [E, C, d]
  (combine), 2 * S * E * C * d each per group: 4 * E * C * d per token. Building the one-hot tensors (no
  d factor) is not counted.
* The input embedding is a gather (0 FLOPs); the output logits are one [d, V] matmul, tied or not.
"""

from __future__ import annotations

import dataclasses

from moe.config.enums import Activation, Dispatch, RouterKind
from moe.config.model import ModelConfig

# Dense bf16 peak FLOP/s per device, by `device_kind` substring (first match wins: "v5 lite" before
# "v5", "H100 PCIe" before "H100"). H200 has the H100 SXM's compute. float32 models run their matmuls
# at half these rates (TF32 on NVIDIA, bf16 passes on TPU), see `peak_flops_per_device`.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
  """The table's peak FLOP/s for an accelerator (`jax.Device.device_kind`) and compute dtype
  ('float32': half the bf16 rate), or None when the device is not in the table (e.g. a CPU)."""
  peak = next((peak for name, peak in PEAK_FLOPS if name.lower() in device_kind.lower()), None)
  if peak is not None and dtype == "float32":
    peak /= 2
  return peak


def ffn_matrices(activation: Activation) -> int:
  """Weight matrices of one FFN: 2 for GELU (in, out), 3 for SwiGLU (gate, up, down)."""
  return 3 if activation is Activation.SWIGLU else 2


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of a decoder (see `param_counts`).

  Attributes:
    total: every parameter.
    active: parameters touched by one token: all non-expert parameters (embeddings, attention, norms,
      dense FFNs, routers, shared experts) plus k experts' worth of routed expert weights per sparse layer.
      For experts choose, k is the configured `top_k`, the average number of experts per token at
      capacity factor 1 (a given token may use more or none).
    embedding: the token embedding [V, d], plus the output matrix [d, V] when untied (Kaplan et al.
      2020 quote non-embedding counts: `total - embedding`).
    attention, norms, dense_ffn, router, experts, shared_expert: the parts of `total` (experts: all E
      routed experts of every sparse layer).
  """

  total: int
  active: int
  embedding: int
  attention: int
  norms: int
  dense_ffn: int
  router: int
  experts: int
  shared_expert: int

  @property
  def non_embedding_total(self) -> int:
    return self.total - self.embedding

  @property
  def non_embedding_active(self) -> int:
    return self.active - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
  """Closed-form parameter counts of `moe.models.transformer.Transformer(cfg)`.

  Args:
    cfg: the model configuration.

  Returns:
    `ParamCounts`. Per layer: two RMSNorm scales [d], attention q [d, H, Dh], k and v [d, Hkv, Dh],
    o [H, Dh, d] (no biases), and a dense FFN (2 or 3 [d, f] matrices) or a MoE block (router [d, E],
    E experts of 2 or 3 [d, f_e] matrices, an optional shared FFN). Plus the embedding [V, d], a final
    norm [d] and, when untied, an output matrix [d, V].
  """
  d, n_layers = cfg.d_model, cfg.num_layers
  n_sparse = cfg.num_sparse_layers
  n_dense = n_layers - n_sparse
  embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  attention = n_layers * (
      2 * d * cfg.num_heads * cfg.head_dim + 2 * d * cfg.num_kv_heads * cfg.head_dim
  )
  norms = n_layers * 2 * d + d
  dense_ffn = n_dense * ffn_matrices(cfg.activation) * d * cfg.mlp_hidden
  router = experts = shared = active_experts = 0
  if n_sparse:
    moe = cfg.moe
    per_expert = ffn_matrices(moe.activation) * d * moe.expert_hidden
    router = n_sparse * d * moe.num_experts
    experts = n_sparse * moe.num_experts * per_expert
    active_experts = n_sparse * moe.top_k * per_expert
    shared = n_sparse * ffn_matrices(moe.activation) * d * moe.shared_expert_hidden
  dense_part = embedding + attention + norms + dense_ffn + router + shared
  return ParamCounts(
      total=dense_part + experts,
      active=dense_part + active_experts,
      embedding=embedding,
      attention=attention,
      norms=norms,
      dense_ffn=dense_ffn,
      router=router,
      experts=experts,
      shared_expert=shared,
  )


@dataclasses.dataclass(frozen=True)
class FlopCounts:
  """FLOPs per token, summed over layers (see the module docstring for the conventions).

  Attributes:
    attention_proj: q, k, v and o projections.
    attention_scores: q.k scores and the weighted sum of values over the full L x L matrix.
    dense_ffn: the dense feed-forward blocks.
    experts: routed expert FFNs as computed (`expert_slots` evaluations per token per sparse layer).
    router: the [d, E] router matmuls.
    dispatch: EINSUM dispatch and combine einsums (0 for GATHER and DROPLESS).
    shared_expert: the always-on shared FFNs of the sparse layers.
    logits: the output projection [d, V].
    total: the sum of the above.
    expert_slots: expert evaluations per token in one sparse layer: E * C / S with capacity, k when
      dropless, 0 for a dense model. Useful (routed) expert FLOPs are `experts * k / expert_slots`.
    train: whether these are training FLOPs (3 x forward, train capacity factor) or forward only (eval
      capacity factor).
  """

  attention_proj: float
  attention_scores: float
  dense_ffn: float
  experts: float
  router: float
  dispatch: float
  shared_expert: float
  logits: float
  total: float
  expert_slots: float
  train: bool


def routing_group_size(cfg: ModelConfig, seq_len: int) -> int:
  """S, tokens per routing group: `moe.group_size`, or one sequence when it is None."""
  if cfg.moe is None or cfg.moe.group_size is None:
    return seq_len
  return cfg.moe.group_size


def expert_slots_per_token(cfg: ModelConfig, seq_len: int, *, train: bool = True) -> float:
  """Expert FFN evaluations per token in one sparse layer (0 for a dense model).

  Args:
    cfg: the model configuration.
    seq_len: tokens per sequence (the routing group when `moe.group_size` is None).
    train: use the train capacity factor (else the eval one).
  """
  if cfg.num_sparse_layers == 0:
    return 0.0
  moe = cfg.moe
  if moe.dispatch is Dispatch.DROPLESS:
    return float(moe.top_k)
  s = routing_group_size(cfg, seq_len)
  return moe.num_experts * moe.capacity(s, train) / s


def model_flops_per_token(cfg: ModelConfig, seq_len: int, *, train: bool = True) -> FlopCounts:
  """Model FLOPs per token (PaLM's MFU numerator): `flops_per_token` with `expert_slots` = k (tokens
  choose) or E * C / S (experts choose: every slot holds a token) and no dispatch einsums. Equal for
  every dispatch path and capacity factor of tokens-choose routing."""
  return _flop_counts(cfg, seq_len, train=train, model=True)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, train: bool = True) -> FlopCounts:
  """FLOPs per token as computed (hardware FLOPs, without rematerialisation), see the module doc."""
  return _flop_counts(cfg, seq_len, train=train, model=False)


def _flop_counts(cfg: ModelConfig, seq_len: int, *, train: bool, model: bool) -> FlopCounts:
  """FLOPs per token of a forward (train=False) or forward + backward (train=True) pass.

  Args:
    cfg: the model configuration.
    seq_len: L, tokens per sequence (attention length, and routing group size S unless
      `moe.group_size` is set).
    train: training: 3 x the forward FLOPs, with the train capacity factor. Otherwise the forward pass
      with the eval capacity factor.

  Returns:
    `FlopCounts`, per token. Multiply `total` by tokens per second and divide by peak FLOP/s for MFU.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  d, n_layers = cfg.d_model, cfg.num_layers
  n_sparse = cfg.num_sparse_layers
  n_dense = n_layers - n_sparse
  h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  # Forward, per token: 2 FLOPs per weight of every matmul a token goes through.
  fwd = dict(
      attention_proj=n_layers * 2 * (2 * d * h * dh + 2 * d * hkv * dh),
      attention_scores=n_layers * 2 * 2 * seq_len * h * dh,  # PaLM App. B: full L, not L / 2.
      dense_ffn=n_dense * 2 * ffn_matrices(cfg.activation) * d * cfg.mlp_hidden,
      experts=0.0,
      router=0.0,
      dispatch=0.0,
      shared_expert=0.0,
      logits=2 * d * cfg.vocab_size,
  )
  slots = expert_slots_per_token(cfg, seq_len, train=train)
  if model and n_sparse and cfg.moe.router is RouterKind.TOKENS_CHOOSE:
    slots = float(cfg.moe.top_k)  # The experts each token uses: no capacity slack.
  if n_sparse:
    moe = cfg.moe
    per_eval = 2 * ffn_matrices(moe.activation) * d * moe.expert_hidden
    fwd["experts"] = n_sparse * slots * per_eval
    fwd["router"] = n_sparse * 2 * d * moe.num_experts
    if moe.dispatch is Dispatch.EINSUM and not model:
      # Two one-hot einsums of 2 * S * E * C * d each per group of S tokens: 2 * 2 * E * C * d per
      # token. Every token row meets every slot, so this grows with the group size S (GShard Sec. 3.2).
      s = routing_group_size(cfg, seq_len)
      fwd["dispatch"] = n_sparse * 2 * 2 * moe.num_experts * moe.capacity(s, train) * d
    fwd["shared_expert"] = (
        n_sparse * 2 * ffn_matrices(moe.activation) * d * moe.shared_expert_hidden
    )
  scale = 3 if train else 1  # Backward = 2 x forward (Kaplan et al. 2020, Sec. 2.1).
  counts = {k: float(scale * v) for k, v in fwd.items()}
  return FlopCounts(**counts, total=sum(counts.values()), expert_slots=float(slots), train=train)


def summary(cfg: ModelConfig, seq_len: int) -> str:
  """One line for logs: total / active / non-embedding parameters and training GFLOPs per token."""
  p = param_counts(cfg)
  f = flops_per_token(cfg, seq_len, train=True)
  return (
      f"params total {p.total / 1e6:.2f}M, active {p.active / 1e6:.2f}M, non-embedding total "
      f"{p.non_embedding_total / 1e6:.2f}M; train {f.total / 1e9:.4f} GFLOPs/token at L={seq_len}"
  )
