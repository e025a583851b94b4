"""Parameter and FLOP counts against hand counts written out as arithmetic.

The tiny model everywhere: vocab V=11, d=8, 2 layers, 2 heads of Dh=4, dense hidden f=16.
"""

from __future__ import annotations

import dataclasses

import pytest

from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.models import accounting

V, D, LAYERS, H, DH, F = 11, 8, 2, 2, 4, 16


def tiny(**kw) -> ModelConfig:
  base = dict(vocab_size=V, d_model=D, num_layers=LAYERS, num_heads=H, mlp_hidden=F, max_len=64)
  base.update(kw)
  return ModelConfig(**base)


def switch(**kw) -> MoEConfig:
  # Counting does not depend on causality: acknowledge it so every routing is accepted.
  base = dict(
      num_experts=4,
      top_k=1,
      expert_hidden=16,
      dispatch="gather",
      train_capacity_factor=1.25,
      eval_capacity_factor=2.0,
      allow_noncausal_routing=True,
  )
  base.update(kw)
  return MoEConfig(**base)


# Pieces every test shares, spelled out once.
EMBED = 11 * 8  # [V, d]
ATTN_LAYER = 8 * 2 * 4 + 8 * 2 * 4 + 8 * 2 * 4 + 2 * 4 * 8  # q, k, v [d, H, Dh], o [H, Dh, d] = 256
NORMS = 2 * 8 * 2 + 8  # two per layer, one final = 40
GELU_FFN = 8 * 16 + 16 * 8  # w_in, w_out = 256
LOGITS_FWD = 2 * 8 * 11


def scores_fwd(seq_len, heads=2, head_dim=4, layers=2):
  # q.k over the full L (no causal halving) and the weighted sum of L values: 2 FLOPs per MAC each.
  return layers * (2 * seq_len * heads * head_dim + 2 * seq_len * heads * head_dim)


def test_dense():
  cfg = tiny()
  p = accounting.param_counts(cfg)
  assert p.total == 88 + 2 * 256 + 40 + 2 * 256 == 1152
  assert p.active == p.total
  assert p.embedding == 88
  assert p.non_embedding_total == 1152 - 88
  assert (p.router, p.experts, p.shared_expert) == (0, 0, 0)

  f = accounting.flops_per_token(cfg, 10, train=False)
  assert f.attention_proj == 2 * 2 * 256
  assert f.attention_scores == 2 * (2 * 10 * 2 * 4) * 2
  assert f.dense_ffn == 2 * 2 * 256
  assert f.logits == 2 * 8 * 11
  assert f.experts == f.router == f.dispatch == f.shared_expert == f.expert_slots == 0
  fwd = 1024 + 640 + 1024 + 176
  assert f.total == fwd
  assert accounting.flops_per_token(cfg, 10, train=True).total == 3 * fwd


def test_dense_matches_palm_formula():
  # PaLM App. B: training FLOPs per token = 6 N + 12 n_layers H Dh L, with N the matmul parameters
  # (here: attention, FFN and the tied embedding used as the output matrix; norms are not matmuls).
  cfg = tiny()
  n = 2 * 256 + 2 * 256 + 88
  assert accounting.flops_per_token(cfg, 10).total == 6 * n + 12 * 2 * 2 * 4 * 10


def test_switch_top1_gather():
  cfg = tiny(moe=switch(), sparse_every=2)  # Layer 1 sparse, layer 0 dense.
  p = accounting.param_counts(cfg)
  router = 8 * 4
  experts = 4 * (8 * 16 + 16 * 8)
  assert p.router == router and p.experts == experts
  assert p.total == 88 + 2 * 256 + 40 + 256 + router + experts == 1952
  assert p.active == 88 + 2 * 256 + 40 + 256 + router + 1 * (8 * 16 + 16 * 8) == 1184

  # S = 16 tokens per group: train C = ceil(1.25 * 1 * 16 / 4) = 5 slots, E * C / S = 20 / 16 per token.
  f = accounting.flops_per_token(cfg, 16, train=True)
  assert f.expert_slots == 20 / 16
  assert f.experts == 3 * (20 / 16) * 2 * (8 * 16 + 16 * 8)
  assert f.router == 3 * 2 * 8 * 4
  assert f.dense_ffn == 3 * 2 * 256
  assert f.dispatch == 0  # GATHER: gathers and scatters only.
  assert f.total == 3 * (1024 + scores_fwd(16) + 512 + 640 + 64 + 176)
  # Eval: C = ceil(2.0 * 16 / 4) = 8, 32 slots for 16 tokens.
  e = accounting.flops_per_token(cfg, 16, train=False)
  assert e.expert_slots == 2.0
  assert e.experts == 2 * 2 * 256


def test_top2_einsum():
  cfg = tiny(moe=switch(top_k=2, dispatch="einsum"), sparse_every=1)  # Both layers sparse.
  p = accounting.param_counts(cfg)
  assert p.dense_ffn == 0
  assert p.total == 88 + 2 * 256 + 40 + 2 * (8 * 4 + 4 * 256)
  assert p.active == 88 + 2 * 256 + 40 + 2 * (8 * 4 + 2 * 256)

  # S = 16: C = ceil(1.25 * 2 * 16 / 4) = 10; E * C = 40 slots for 16 tokens.
  f = accounting.flops_per_token(cfg, 16, train=True)
  assert f.expert_slots == 40 / 16
  assert f.experts == 3 * 2 * (40 / 16) * 2 * 256
  # Dispatch [S,E,C]x[S,d] and combine [S,E,C]x[E,C,d]: 2 S E C d each per group, / S per token.
  assert f.dispatch == 3 * 2 * (2 * 16 * 4 * 10 * 8 + 2 * 16 * 4 * 10 * 8) / 16
  assert f.router == 3 * 2 * (2 * 8 * 4)
  assert f.total == pytest.approx(
      3 * (1024 + scores_fwd(16) + 2 * 2.5 * 512 + 2 * 64 + 2 * (4 * 40 * 8) + 176)
  )


def test_group_size_and_min_capacity():
  # Groups of 8 tokens, cf 0.5, k=2: ceil(0.5 * 2 * 8 / 4) = 2, raised to min_capacity 4: 16 slots / 8.
  cfg = tiny(moe=switch(top_k=2, train_capacity_factor=0.5, group_size=8, min_capacity=4))
  assert accounting.flops_per_token(cfg, 32).expert_slots == 4 * 4 / 8
  # Dropless: exactly k evaluations per token, whatever the group.
  cfg = tiny(
      moe=switch(
          top_k=2, dispatch="dropless", train_capacity_factor=None, eval_capacity_factor=None
      )
  )
  f = accounting.flops_per_token(cfg, 32)
  assert f.expert_slots == 2
  assert f.experts == 3 * 2 * 2 * 2 * 256


def test_experts_choose():
  moe = switch(
      router="experts_choose",
      top_k=2,
      train_capacity_factor=1.0,
      eval_capacity_factor=1.0,
      allow_noncausal_routing=True,
  )
  cfg = tiny(moe=moe, sparse_every=2)
  # Each expert takes C = ceil(1.0 * 2 * 16 / 4) = 8 of 16 tokens: 32 evaluations for 16 tokens.
  f = accounting.flops_per_token(cfg, 16, train=False)
  assert f.expert_slots == 2.0
  assert f.experts == 2.0 * 2 * 256
  assert accounting.param_counts(cfg).active == 88 + 512 + 40 + 256 + 32 + 2 * 256


def test_swiglu():
  cfg = tiny(activation="swiglu")
  p = accounting.param_counts(cfg)
  assert p.dense_ffn == 2 * (3 * 8 * 16)
  assert accounting.flops_per_token(cfg, 10, train=False).dense_ffn == 2 * 2 * 3 * 8 * 16
  # SwiGLU experts next to GELU dense layers: each kind keeps its own activation.
  cfg = tiny(moe=switch(activation="swiglu", expert_hidden=12), sparse_every=2)
  p = accounting.param_counts(cfg)
  assert p.dense_ffn == 2 * 8 * 16
  assert p.experts == 4 * 3 * 8 * 12
  assert p.active == 88 + 512 + 40 + 256 + 32 + 3 * 8 * 12


def test_gqa():
  cfg = tiny(num_heads=4, num_kv_heads=1, head_dim=4)
  per_layer = 8 * 4 * 4 + 8 * 1 * 4 + 8 * 1 * 4 + 4 * 4 * 8  # q, k, v, o
  p = accounting.param_counts(cfg)
  assert p.attention == 2 * per_layer == 2 * 320
  f = accounting.flops_per_token(cfg, 10, train=False)
  assert f.attention_proj == 2 * 2 * 320
  # Scores and values run per query head: H = 4, not the 1 kv head.
  assert f.attention_scores == scores_fwd(10, heads=4, head_dim=4)


def test_untied_embeddings():
  cfg = tiny(tie_embeddings=False)
  p = accounting.param_counts(cfg)
  assert p.embedding == 88 + 8 * 11
  assert p.total == 1152 + 88
  # The output matmul costs the same whether or not it is tied.
  assert accounting.flops_per_token(cfg, 10).logits == 3 * 2 * 8 * 11


def test_shared_expert():
  cfg = tiny(moe=switch(shared_expert_hidden=8), sparse_every=2)
  p = accounting.param_counts(cfg)
  assert p.shared_expert == 8 * 8 + 8 * 8
  assert p.total == 1952 + 128
  assert p.active == 1184 + 128
  f = accounting.flops_per_token(cfg, 16, train=False)
  assert f.shared_expert == 2 * 128


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("dense", tiny()),
        ("switch", tiny(moe=switch(), sparse_every=2)),
        ("top2_einsum_swiglu", tiny(moe=switch(top_k=2, dispatch="einsum", activation="swiglu"))),
        (
            "gqa_untied_shared",
            tiny(
                num_heads=4,
                num_kv_heads=2,
                tie_embeddings=False,
                moe=switch(shared_expert_hidden=8),
                sparse_every=2,
            ),
        ),
        ("scan_off", tiny(moe=switch(), sparse_every=2, scan_layers=False, num_layers=4)),
    ],
)
def test_total_matches_built_model(name, cfg):
  import jax
  from flax import nnx
  from moe.models import transformer as model_lib

  with nnx.use_eager_sharding(False):
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert sum(x.size for x in leaves) == accounting.param_counts(cfg).total, name


def test_model_flops_top2_by_hand():
  # PaLM model FLOPs: each token's k = 2 experts, the router, no capacity slack and no dispatch.
  # Both layers sparse, S = 16: per token forward, attention projections 2 * 256 per layer, scores,
  # router 2 * d * E, two experts of 2 * 256, logits 2 * d * V.
  cfg = tiny(moe=switch(top_k=2, dispatch="einsum"), sparse_every=1)
  fwd = 2 * (2 * 256) + scores_fwd(16) + 2 * (2 * 8 * 4) + 2 * (2 * 2 * 256) + 2 * 8 * 11
  model = accounting.model_flops_per_token(cfg, 16, train=True)
  assert model.total == 3 * fwd
  assert model.dispatch == 0 and model.expert_slots == 2
  # Hardware FLOPs of the same model count 2.5 slots per token and the one-hot einsums.
  assert accounting.flops_per_token(cfg, 16).total > model.total
  # PaLM's 6 N + 12 n_layers H Dh L with N the matmul weights a token uses.
  n = 2 * 256 + 2 * (8 * 4) + 2 * 2 * 256 + 8 * 11
  assert model.total == 6 * n + 12 * 2 * 2 * 4 * 16


@pytest.mark.parametrize("top_k", [1, 2])
def test_model_flops_do_not_depend_on_the_dispatch_path(top_k):
  def model_flops(dispatch, cf):
    moe = switch(top_k=top_k, dispatch=dispatch, train_capacity_factor=cf, eval_capacity_factor=cf)
    return accounting.model_flops_per_token(tiny(moe=moe, sparse_every=2), 16).total

  einsum = model_flops("einsum", 1.25)
  assert einsum == model_flops("gather", 1.25) == model_flops("gather", 2.0)
  assert einsum == model_flops("dropless", None)
  # ...which the hardware count does: EINSUM computes the one-hot einsums, cf 2.0 more slots.
  hardware = lambda d, cf: accounting.flops_per_token(
      tiny(
          moe=switch(top_k=top_k, dispatch=d, train_capacity_factor=cf, eval_capacity_factor=cf),
          sparse_every=2,
      ),
      16,
  ).total
  assert hardware("einsum", 1.25) > hardware("gather", 1.25) > hardware("dropless", None)


def test_model_flops_experts_choose_count_every_slot():
  # EC-CF2: C = 8 of 16 tokens per expert, 4 experts: 2 slots per token, all filled.
  moe = switch(
      router="experts_choose", top_k=2, train_capacity_factor=1.0, eval_capacity_factor=1.0
  )
  cfg = tiny(moe=moe, sparse_every=2)
  assert accounting.model_flops_per_token(cfg, 16).experts == 3 * 2.0 * 2 * 256


def test_peak_flops_table():
  assert accounting.peak_flops_per_device("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert accounting.peak_flops_per_device("NVIDIA H100 PCIe", "bfloat16") == 756e12
  assert accounting.peak_flops_per_device("NVIDIA H200", "float32") == 989e12 / 2
  assert accounting.peak_flops_per_device("TPU v5 lite", "bfloat16") == 197e12
  assert accounting.peak_flops_per_device("cpu", "bfloat16") is None


def test_seq_len_validated():
  with pytest.raises(ValueError, match="seq_len"):
    accounting.flops_per_token(tiny(), 0)
  assert dataclasses.is_dataclass(accounting.param_counts(tiny()))


def top2_swiglu(dispatch, cf):
  # 4 layers, every second sparse (layers 1 and 3): top-2 of 4 SwiGLU experts of width 12; GELU dense.
  moe = switch(
      top_k=2,
      activation="swiglu",
      expert_hidden=12,
      dispatch=dispatch,
      train_capacity_factor=cf,
      eval_capacity_factor=cf,
  )
  return tiny(num_layers=4, sparse_every=2, moe=moe)


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
@pytest.mark.parametrize("cf", [1.0, 2.0])
def test_model_flops_top2_swiglu_sparse_every_2_by_hand(dispatch, cf):
  # PaLM App. B: 6 N + 12 n_layers H Dh L, N = the matmul weights one token goes through.
  n = (
      8 * 11  # tied output matrix [d, V]
      + 4 * (8 * 2 * 4 * 3 + 2 * 4 * 8)  # q, k, v [d, H, Dh] and o [H, Dh, d] in each of 4 layers
      + 2 * (8 * 16 * 2)  # layers 0 and 2: GELU FFN, w_in and w_out
      + 2
      * (8 * 4 + 2 * (3 * 8 * 12))  # layers 1 and 3: router [d, E], 2 SwiGLU experts [d, f_e] x 3
  )
  assert n == 2840
  attention = 12 * 4 * 2 * 4 * 16  # L = 16
  model = accounting.model_flops_per_token(top2_swiglu(dispatch, cf), 16, train=True)
  assert model.total == 6 * n + attention == 23184
  assert model.dispatch == 0 and model.expert_slots == 2


def test_capacity_slack_and_dispatch_are_hardware_flops_only():
  # S = 16, E = 4, k = 2. cf 1.0: C = ceil(1.0 * 2 * 16 / 4) = 8, E * C / S = 2 slots per token (no
  # slack); cf 2.0: C = 16, 4 slots. A SwiGLU expert evaluation: 2 * 3 * 8 * 12 = 576 forward FLOPs.
  model = lambda d, cf: accounting.model_flops_per_token(top2_swiglu(d, cf), 16).total
  hardware = lambda d, cf: accounting.flops_per_token(top2_swiglu(d, cf), 16).total
  assert (
      model("gather", 1.0) == model("gather", 2.0) == model("einsum", 1.0) == model("einsum", 2.0)
  )
  assert hardware("gather", 1.0) == model("gather", 1.0)
  slack = 3 * 2 * (4 - 2) * 576  # train x 2 sparse layers x 2 extra slots per token
  assert hardware("gather", 2.0) - model("gather", 2.0) == slack
  # EINSUM's one-hot dispatch and combine, 2 * S * E * C * d each per group of S: 4 * E * C * d / token.
  onehot = lambda c: 3 * 2 * 4 * 4 * c * 8
  assert hardware("einsum", 1.0) - model("einsum", 1.0) == onehot(8)
  assert hardware("einsum", 2.0) - model("einsum", 2.0) == slack + onehot(16)


def test_model_flops_of_the_top2_config_by_hand():
  # configs/top2.py at smoke size, counted from its dimensions with PaLM's formula.
  import configs.top2
  from moe.config import config_dict

  cd = configs.top2.get_config("size=smoke")
  cfg, seq_len = config_dict.model_from_config_dict(cd.model), cd.train.seq_len
  moe = cfg.moe
  assert moe.top_k == 2 and cfg.sparse_every == 2 and cfg.tie_embeddings
  matrices = {"gelu": 2, "swiglu": 3}
  d, layers, sparse = cfg.d_model, cfg.num_layers, cfg.num_layers // 2  # layers 1, 3, ... sparse
  attention_weights = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  dense_ffn = matrices[cfg.activation.value] * d * cfg.mlp_hidden
  expert = matrices[moe.activation.value] * d * moe.expert_hidden
  n = (
      d * cfg.vocab_size
      + layers * attention_weights
      + (layers - sparse) * dense_ffn
      + sparse * (d * moe.num_experts + 2 * expert)
  )
  palm = 6 * n + 12 * layers * cfg.num_heads * cfg.head_dim * seq_len
  assert accounting.model_flops_per_token(cfg, seq_len).total == palm
