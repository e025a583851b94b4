"""`moe.config`: which routings are causal, and the decoder's one policy for the others."""

from __future__ import annotations

import pytest

from moe.config import ModelConfig, MoEConfig

# (router, top_k, priority, dispatch, train cf, eval cf) -> causal. Written out from the argument in
# MoEConfig.routing_is_causal: only competition for a capacity can couple tokens, and only claims
# served in sequence order, one per token, keep that coupling pointing backwards.
CASES = [
    (("tokens_choose", 1, "index", "gather", 1.25, 2.0), True),
    (("tokens_choose", 1, "index", "einsum", 0.5, 0.5), True),
    (("tokens_choose", 1, "batch_prioritized", "gather", 1.25, 2.0), False),
    (("tokens_choose", 2, "index", "gather", 1.25, 2.0), False),
    (("tokens_choose", 2, "index", "einsum", 1.25, None), False),  # Eval capacity still binds.
    (("tokens_choose", 2, "index", "einsum", None, None), True),  # C = S: nothing competes.
    (("tokens_choose", 2, "batch_prioritized", "gather", None, None), True),
    (("tokens_choose", 2, "index", "dropless", None, None), True),
    (("tokens_choose", 4, "batch_prioritized", "dropless", None, None), True),
    (("experts_choose", 2, "index", "gather", 1.0, 1.0), False),
]


def moe(router, top_k, priority, dispatch, train_cf, eval_cf, **kw) -> MoEConfig:
  return MoEConfig(num_experts=4, expert_hidden=8, router=router, top_k=top_k, priority=priority,
                   dispatch=dispatch, train_capacity_factor=train_cf, eval_capacity_factor=eval_cf,
                   **kw)


def decoder(moe_cfg: MoEConfig) -> ModelConfig:
  return ModelConfig(vocab_size=16, d_model=8, num_layers=2, num_heads=2, mlp_hidden=8, moe=moe_cfg)


@pytest.mark.parametrize("case,causal", CASES)
def test_routing_is_causal(case, causal):
  assert moe(*case).routing_is_causal is causal


@pytest.mark.parametrize("case,causal", CASES)
def test_decoder_refuses_noncausal_routing_unless_acknowledged(case, causal):
  if causal:
    decoder(moe(*case))
  else:
    with pytest.raises(ValueError, match=r"model.moe routing .* model.moe.allow_noncausal_routing=True"):
      decoder(moe(*case))
  assert decoder(moe(*case, allow_noncausal_routing=True)).moe.allow_noncausal_routing
