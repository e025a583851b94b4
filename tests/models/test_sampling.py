"""Sampling (moe/models/sampling.py): top-k and top-p keep what a numpy reference keeps on fixed logits;
top-k=1 is greedy; unfiltered draws follow the softmax; greedy generation equals the argmax of the full
forward pass at each step (dense and sparse); generation stops at max_len; bad values are refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig
from moe.models.sampling import filter_logits, generate, sample_token, SamplingConfig
from moe.models.transformer import build

# Fixed logits with distinct probabilities, no cumulative mass near the tested p's.
LOGITS = np.array(
    [
        [2.0, -1.0, 0.5, 3.1, 0.0, -2.2, 1.3, 0.9],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 4.0],
        [-3.0, 1.7, 1.6, -0.4, 2.5, 0.05, -1.1, 1.0],
    ],
    np.float32,
)


def _kept_by_reference(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
  """bool [B, V]: per row, the top_k most likely, then, renormalised, the most likely until their
  mass reaches top_p (a plain loop)."""
  kept = np.zeros(logits.shape, bool)
  for row, values in enumerate(logits.astype(np.float64)):
    ranked = sorted(range(len(values)), key=lambda i: -values[i])
    if top_k:
      ranked = ranked[:top_k]
    probs = np.exp(values[ranked] - values[ranked].max())
    probs /= probs.sum()
    mass = 0.0
    for i, p in zip(ranked, probs):
      kept[row, i] = True
      mass += p
      if mass >= top_p:
        break
  return kept


@pytest.mark.parametrize(
    "top_k, top_p",
    [(0, 0.05), (0, 0.3), (0, 0.6), (0, 0.9), (0, 0.99), (3, 1.0), (1, 1.0), (5, 0.7), (2, 0.99)],
)
def test_filters_keep_what_the_reference_keeps(top_k, top_p):
  kept = np.isfinite(np.asarray(filter_logits(jnp.asarray(LOGITS), top_k=top_k, top_p=top_p)))
  np.testing.assert_array_equal(kept, _kept_by_reference(LOGITS, top_k, top_p))
  out = np.asarray(filter_logits(jnp.asarray(LOGITS), top_k=top_k, top_p=top_p))
  np.testing.assert_array_equal(out[kept], LOGITS[kept])  # Kept logits are untouched.


def test_top_k_1_is_greedy():
  logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3
  greedy = sample_token(logits, jax.random.key(1), SamplingConfig(temperature=0))
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), axis=-1))
  for seed, temperature in [(2, 0.8), (3, 5.0)]:
    top1 = sample_token(
        logits, jax.random.key(seed), SamplingConfig(temperature=temperature, top_k=1)
    )
    np.testing.assert_array_equal(top1, greedy)


def test_draws_follow_the_tempered_softmax_and_stay_in_the_nucleus():
  n, temperature = 20_000, 1.5
  keys = jax.random.split(jax.random.key(0), n)
  logits = jnp.asarray(LOGITS[:1])
  draw = jax.vmap(lambda k, cfg: sample_token(logits, k, cfg)[0], in_axes=(0, None))
  tokens = np.asarray(
      jax.jit(draw, static_argnums=1)(keys, SamplingConfig(temperature=temperature))
  )
  want = np.exp(LOGITS[0] / temperature) / np.exp(LOGITS[0] / temperature).sum()
  freq = np.bincount(tokens, minlength=LOGITS.shape[1]) / n
  assert np.all(np.abs(freq - want) <= 4 * np.sqrt(want * (1 - want) / n) + 1e-3), (freq, want)
  nucleus = jax.jit(draw, static_argnums=1)(keys[:2000], SamplingConfig(temperature=1.0, top_p=0.6))
  allowed = np.flatnonzero(_kept_by_reference(LOGITS[:1], 0, 0.6)[0])
  assert set(np.asarray(nucleus).tolist()) == set(allowed.tolist())


V, MAX_LEN = 32, 16
MODELS = {
    "dense": dict(moe=None),
    "sparse_dropless": dict(
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_hidden=24,
            dispatch="dropless",
            train_capacity_factor=None,
            eval_capacity_factor=None,
        )
    ),
}


def _model(name: str):
  cfg = ModelConfig(
      vocab_size=V,
      d_model=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      mlp_hidden=24,
      max_len=MAX_LEN,
      sparse_every=2,
      **MODELS[name],
  )
  return build(cfg, seed=4)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_is_the_argmax_of_the_full_forward_pass(name):
  model = _model(name)
  prompt = np.asarray(jax.random.randint(jax.random.key(5), (2, 6), 0, V))
  result = generate(model, prompt, SamplingConfig(temperature=0), max_new_tokens=8)
  assert result.tokens_BL.shape == (2, 8) and not result.stopped_at_max_len
  tokens = np.concatenate([prompt, result.tokens_BL], axis=1)  # 14 tokens
  logits, _ = jax.jit(lambda g, s, t: nnx.merge(g, s)(t), static_argnums=0)(
      *nnx.split(model), tokens[:, :-1]
  )
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1)[:, 5:], result.tokens_BL)


def test_generation_stops_at_max_len_and_a_seed_fixes_the_sample():
  model = _model("dense")
  prompt = np.arange(12, dtype=np.int32)[None, :] % V
  cfg = SamplingConfig(temperature=2.0)
  result = generate(model, prompt, cfg, max_new_tokens=10, seed=7)
  # 16 positions read, the last of them predicting one more token: 16 - 12 + 1 new tokens.
  assert result.tokens_BL.shape == (1, 5) and result.stopped_at_max_len
  again = generate(model, prompt, cfg, max_new_tokens=10, seed=7)
  np.testing.assert_array_equal(again.tokens_BL, result.tokens_BL)
  other = generate(model, prompt, cfg, max_new_tokens=10, seed=8)
  assert not np.array_equal(other.tokens_BL, result.tokens_BL)
  full = generate(model, np.zeros((1, MAX_LEN), np.int32), cfg, max_new_tokens=3)
  assert full.tokens_BL.shape == (1, 1) and full.stopped_at_max_len


def test_bad_values_are_refused_in_one_line():
  for kwargs, field in [
      (dict(temperature=-0.1), "temperature"),
      (dict(top_k=-1), "top_k"),
      (dict(top_k=2.5), "top_k"),
      (dict(top_p=0.0), "top_p"),
      (dict(top_p=1.5), "top_p"),
  ]:
    with pytest.raises(ValueError, match=f"^{field}="):
      SamplingConfig(**kwargs)
  model = _model("dense")
  with pytest.raises(ValueError, match="the prompt has 0 tokens"):
    generate(model, np.zeros((1, 0), np.int32))
  with pytest.raises(ValueError, match=f"the prompt has {MAX_LEN + 1} tokens"):
    generate(model, np.zeros((1, MAX_LEN + 1), np.int32))
  with pytest.raises(ValueError, match="^max_new_tokens=0"):
    generate(model, np.zeros((1, 3), np.int32), max_new_tokens=0)
