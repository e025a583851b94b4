"""The decoder: layout, scan plan, causality, dense == sparse with one expert, scan == unrolled,
rotary positions, the length limit, the initial loss and the order of the per-layer aux."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.dense
import configs.switch
from moe.config import config_dict
from moe.config.layer import MoEConfig
from moe.config.model import ModelConfig, sparse_layer_mask
from moe.models.transformer import Attention, build, rotary, scan_plan

V, L = 40, 12


def cfg_(**kw) -> ModelConfig:
  base = dict(
      vocab_size=V,
      d_model=16,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      mlp_hidden=24,
      max_len=L,
      moe=MoEConfig(
          num_experts=4,
          top_k=1,
          expert_hidden=24,
          train_capacity_factor=1.0,
          eval_capacity_factor=1.0,
          min_capacity=1,
      ),
      sparse_every=2,
  )
  base.update(kw)
  return ModelConfig(**base)


def toks(b=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, L), 0, V)


def test_sparse_layer_mask():
  assert sparse_layer_mask(6, sparse_every=2) == (False, True) * 3  # Switch: every other layer.
  assert sparse_layer_mask(4, sparse_every=1, first_dense=1) == (False, True, True, True)
  assert sparse_layer_mask(5, sparse_every=2, first_dense=1) == (False, False, True, False, True)
  assert sparse_layer_mask(4, sparse_layers=(0, 3)) == (True, False, False, True)
  with pytest.raises(ValueError, match="model.sparse_layers"):
    sparse_layer_mask(4, sparse_layers=(4,))
  with pytest.raises(ValueError, match="model.sparse_every"):
    sparse_layer_mask(4, sparse_every=0)


def test_scan_plan():
  assert scan_plan((False, True) * 3) == (0, 2)
  assert scan_plan((False,) * 5) == (0, 1)
  assert scan_plan((False, True, True, True)) == (1, 1)
  assert scan_plan((True, False, False, True)) == (0, 4)
  assert scan_plan((False, False, True, False, True)) == (1, 2)
  assert scan_plan((False, True), scan_layers=False) == (2, 0)
  for mask in [(False, True) * 3, (False, True, True, True), (True, False, True, True, False)]:
    prefix, period = scan_plan(mask)
    rest = mask[prefix:]
    assert rest == rest[:period] * (len(rest) // period)


@pytest.mark.parametrize("kind", ["dense", "switch", "dropless_top2"])
def test_causal(kind):
  """Changing a future token never changes an earlier logit. (Top-k routing with a capacity is not
  causal for k > 1 or batch-prioritised order: a later token's first choice can take the slot of an
  earlier token's second choice. Top-1 in sequence order and dropless routing are.)"""
  if kind == "dense":
    cfg = cfg_(moe=None)
  elif kind == "switch":
    cfg = cfg_()
  else:
    cfg = cfg_(
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_hidden=24,
            dispatch="dropless",
            train_capacity_factor=None,
            eval_capacity_factor=None,
        )
    )
  model = build(cfg)
  x = toks()
  logits, _ = model(x)
  for t in (3, 7, L - 1):
    changed = x.at[:, t].set((x[:, t] + 1) % V)
    new_logits, _ = model(changed)
    np.testing.assert_array_equal(new_logits[:, :t], logits[:, :t])
    assert not np.allclose(new_logits[:, t], logits[:, t])


def test_dense_equals_sparse_with_one_expert():
  dense_cfg = cfg_(moe=None, sparse_every=1)
  sparse_cfg = cfg_(
      sparse_every=1,
      moe=MoEConfig(
          num_experts=1,
          top_k=1,
          expert_hidden=24,
          train_capacity_factor=None,
          eval_capacity_factor=None,
      ),
  )
  dense, sparse = build(dense_cfg, seed=1), build(sparse_cfg, seed=2)
  # Same embeddings, attention and norms; each expert bank of one gets its layer's dense MLP
  # weights.
  ffn_s = sparse.periods.layers[0].ffn
  ffn_d = dense.periods.layers[0].ffn
  sparse.embed[...] = dense.embed[...]
  for name in ("attention_norm", "ffn_norm"):
    getattr(sparse.periods.layers[0], name).scale[...] = getattr(
        dense.periods.layers[0], name
    ).scale[...]
  for name in ("q", "k", "v", "o"):
    getattr(sparse.periods.layers[0].attention, name)[...] = getattr(
        dense.periods.layers[0].attention, name
    )[...]
  sparse.final_norm.scale[...] = dense.final_norm.scale[...]
  ffn_s.experts.w_in[...] = ffn_d.w_in[...][:, None]
  ffn_s.experts.w_out[...] = ffn_d.w_out[...][:, None]
  x = toks()
  logits_d, aux_d = dense(x)
  logits_s, aux_s = sparse(x, train=True)
  assert aux_d is None and aux_s.losses.balance.shape == (4,)
  np.testing.assert_allclose(logits_s, logits_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_equals_unrolled(remat):
  # Router jitter on: each layer must draw the same noise (fold_in of its index) in both layouts.
  jitter = MoEConfig(
      num_experts=4,
      top_k=1,
      expert_hidden=24,
      train_capacity_factor=1.0,
      eval_capacity_factor=1.0,
      min_capacity=1,
      jitter_eps=0.3,
  )
  scanned = build(cfg_(remat=remat, moe=jitter))
  unrolled = build(cfg_(scan_layers=False, moe=jitter), seed=3)
  assert scanned.repeats == 2 and unrolled.repeats == 0
  unrolled.embed[...] = scanned.embed[...]
  unrolled.final_norm.scale[...] = scanned.final_norm.scale[...]
  for i, block in enumerate(unrolled.prefix):  # Layer i = repetition i // 2, position i % 2.
    stacked = nnx.state(scanned.periods.layers[i % 2], nnx.Param)
    one = jax.tree.map(lambda a: a[i // 2], stacked)
    nnx.update(block, one)
  x = toks()
  key = jax.random.key(4)
  # Jitted: one program per layout rather than hundreds of eager ops (18 s -> a few).
  forward = nnx.jit(lambda m: m(x, train=True, rng=key))
  (logits_s, aux_s), (logits_u, aux_u) = forward(scanned), forward(unrolled)
  np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux_s.losses.z, aux_u.losses.z, rtol=1e-5)
  grad = nnx.jit(nnx.grad(lambda m: m(x, train=True, rng=key)[0].mean()))
  np.testing.assert_allclose(
      grad(scanned).embed[...], grad(unrolled).embed[...], rtol=1e-4, atol=1e-7
  )


def test_grouped_query_attention_equals_repeated_heads():
  gqa = build(cfg_(moe=None, num_kv_heads=2))
  mha = build(cfg_(moe=None, num_kv_heads=4), seed=5)
  state = nnx.state(gqa, nnx.Param)
  repeat = lambda a: jnp.repeat(
      a, 2, axis=2
  )  # [layers, d, kv, head_dim]: kv head j serves 2 heads.
  state["periods"]["layers"][0]["attention"]["k"].set_value(
      repeat(state["periods"]["layers"][0]["attention"]["k"].get_value())
  )
  state["periods"]["layers"][0]["attention"]["v"].set_value(
      repeat(state["periods"]["layers"][0]["attention"]["v"].get_value())
  )
  nnx.update(mha, state)
  x = toks()
  np.testing.assert_allclose(mha(x)[0], gqa(x)[0], rtol=1e-5, atol=1e-5)


def _layer(model, i: int):
  """Block i of `model` on its own: from the unrolled prefix, or sliced out of the stacked
  periods."""
  if i < model.prefix_len:
    return model.prefix[i]
  repetition, position = divmod(i - model.prefix_len, model.period_len)
  graphdef, state = nnx.split(model.periods.layers[position])
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[repetition], state))


def _layer_by_layer(model, tokens_BL, *, train: bool, rng):
  """The decoder as a plain loop over its blocks, each run alone (layer i draws fold_in(rng, i)).

  Returns the logits and the list of the sparse layers' aux, in layer order.
  """
  cfg = model.cfg
  x_BLD = jnp.take(model.embed[...], tokens_BL, axis=0) * math.sqrt(cfg.d_model)
  auxes = []
  for i in range(cfg.num_layers):
    x_BLD, aux = _layer(model, i)(x_BLD, train=train, rng=jax.random.fold_in(rng, i))
    assert (aux is not None) == cfg.sparse_mask[i]
    if aux is not None:
      auxes.append(aux)
  logits = jnp.einsum("bld,vd->blv", model.final_norm(x_BLD), model.embed[...])
  return logits, auxes


@pytest.mark.parametrize(
    "layout",
    [
        dict(
            num_layers=5, sparse_every=2, first_dense=1
        ),  # Dense prefix, then [dense, sparse] x 2.
        dict(
            num_layers=5, sparse_layers=(0, 2, 3, 4)
        ),  # Sparse prefix [sparse, dense], [sparse] x 3.
        dict(
            num_layers=6, sparse_layers=(1, 2, 4, 5)
        ),  # [dense, sparse, sparse] x 2: 2 per period.
        dict(num_layers=4, sparse_every=2, scan_layers=False),  # All unrolled.
    ],
)
def test_aux_is_stacked_over_sparse_layers_in_order(layout):
  """Row i of every aux leaf is what the i-th sparse layer returns when its block runs alone.

  The routers of successive sparse layers are made ever sharper (x1, x4, x16, x64), so the rows are
  told apart by their router entropy; a permutation of the rows (prefix after scan, repetitions and
  period positions transposed) would fail.
  """
  moe = MoEConfig(
      num_experts=4,
      top_k=1,
      expert_hidden=24,
      train_capacity_factor=1.0,
      eval_capacity_factor=1.0,
      min_capacity=1,
      jitter_eps=0.1,
  )
  cfg = cfg_(moe=moe, **layout)
  model = build(cfg)
  sparse = [i for i, s in enumerate(cfg.sparse_mask) if s]
  assert len(sparse) >= 2 and model.prefix_len + model.period_len * model.repeats == cfg.num_layers
  for k, i in enumerate(sparse):
    if i < model.prefix_len:
      router = model.prefix[i].ffn.router
      router.w[...] = router.w[...] * 4.0**k
    else:
      repetition, position = divmod(i - model.prefix_len, model.period_len)
      router = model.periods.layers[position].ffn.router
      router.w[...] = router.w[...].at[repetition].multiply(4.0**k)
  x, key = toks(), jax.random.key(6)
  logits, aux = model(x, train=True, rng=key)
  ref_logits, ref_auxes = _layer_by_layer(model, x, train=True, rng=key)
  entropy = [float(a.stats.router_entropy) for a in ref_auxes]
  assert all(a > b for a, b in zip(entropy, entropy[1:])), entropy  # The rows are distinguishable.
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  for leaf, *ref_leaves in zip(jax.tree.leaves(aux), *map(jax.tree.leaves, ref_auxes)):
    assert leaf.shape[0] == len(sparse)
    for k, ref in enumerate(ref_leaves):
      np.testing.assert_allclose(
          leaf[k], ref, rtol=1e-5, atol=1e-6, err_msg=f"aux row {k} (layer {sparse[k]})"
      )


def test_untied_embeddings_and_bfloat16():
  model = build(cfg_(tie_embeddings=False, dtype="bfloat16"))
  logits, aux = model(toks())
  assert logits.dtype == jnp.float32 and model.unembed[...].dtype == jnp.float32
  assert model.cfg.moe.dtype == "bfloat16"


def test_experts_choose_needs_acknowledgement():
  ec = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, router="experts_choose")
  with pytest.raises(ValueError, match="allow_noncausal_routing"):
    cfg_(moe=ec)
  cfg_(moe=dataclasses.replace(ec, allow_noncausal_routing=True))


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"num_heads": 3}, "model.num_heads"),
        ({"num_kv_heads": 3}, "model.num_kv_heads"),
        ({"remat": "sometimes"}, "model.remat"),
        ({"dtype": "int8"}, "model.dtype"),
        ({"activation": "tanh"}, "model.activation"),
        ({"first_dense": 9}, "model.first_dense"),
    ],
)
def test_model_config_errors(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    cfg_(**kw)


def test_longer_input_than_max_len_is_refused():
  model = build(cfg_(moe=None))
  model(toks())  # Length L = max_len is accepted.
  long = jax.random.randint(jax.random.key(0), (2, L + 1), 0, V)
  message = rf"input length {L + 1} exceeds model\.max_len={L}"
  with pytest.raises(ValueError, match=message):
    model(long)
  with pytest.raises(ValueError, match=message):  # A shape check: it fires while tracing.
    nnx.jit(lambda m, x: m(x))(model, long)


# Rotary position embedding (Su et al. 2021, "RoFormer", Sec. 3.4): the model rotates pair
# (i, i + H/2) of each head, the half-split layout of GPT-NeoX and LLaMA (the paper pairs
# (2i, 2i + 1)).


def _rotary_reference(x_BLNH: np.ndarray, theta: float) -> np.ndarray:
  """Pair (i, i + H/2) as the complex number x_i + j x_(i + H/2), times exp(j m theta^(-2i/H)) at
  position m (RoFormer Eq. 34 in complex form), in float64, one position and pair at a time."""
  x = np.asarray(x_BLNH, np.float64)
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for m in range(x.shape[1]):
    for i in range(half):
      z = (x[:, m, :, i] + 1j * x[:, m, :, i + half]) * np.exp(
          1j * m * theta ** (-2.0 * i / (2 * half))
      )
      out[:, m, :, i], out[:, m, :, i + half] = z.real, z.imag
  return out


@pytest.mark.parametrize("theta", [10_000.0, 100.0])
def test_rotary_equals_complex_rotation(theta):
  x = jax.random.normal(jax.random.key(0), (2, 16, 3, 8))
  np.testing.assert_allclose(rotary(x, theta), _rotary_reference(x, theta), rtol=1e-5, atol=1e-5)
  assert rotary(x.astype(jnp.bfloat16), theta).dtype == jnp.bfloat16


def test_rotary_scores_depend_only_on_relative_position():
  """<rotary(q) at m, rotary(k) at n> is a function of m - n: shifting both positions by s keeps
  every score (the score matrix is Toeplitz), while different offsets give different scores."""
  length, head_dim = 16, 8
  q_H, k_H = jax.random.normal(jax.random.key(1), (2, head_dim))
  at_every_position = lambda v_H: jnp.broadcast_to(v_H, (1, length, 1, head_dim))
  q_LH = np.asarray(rotary(at_every_position(q_H), 10_000.0)[0, :, 0], np.float64)
  k_LH = np.asarray(rotary(at_every_position(k_H), 10_000.0)[0, :, 0], np.float64)
  scores = q_LH @ k_LH.T  # scores[m, n] = <R_m q, R_n k>.
  for s in range(1, length):
    np.testing.assert_allclose(scores[s:, s:], scores[:-s, :-s], rtol=1e-5, atol=1e-5)
  offsets = scores[0, :]  # m - n = 0, -1, ..., -(length - 1).
  assert np.min(np.abs(offsets[1:] - offsets[0])) > 1e-3


def test_rotary_preserves_norms():
  x = 3.0 * jax.random.normal(jax.random.key(2), (2, 16, 3, 8))
  np.testing.assert_allclose(
      jnp.linalg.norm(rotary(x, 10_000.0), axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
  )


def _attention_reference(x_BLD, q, k, v, o, theta: float) -> np.ndarray:
  """Causal attention one batch row, head and query position at a time, in float64: query t of
  head n attends to keys s <= t of kv head n // (N / K) with softmax(<q_t, k_s> / sqrt(H)), both
  rotated by `_rotary_reference`."""
  x, q, k, v, o = (np.asarray(a, np.float64) for a in (x_BLD, q, k, v, o))
  batch, length, _ = x.shape
  num_heads, num_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
  q_BLNH = _rotary_reference(np.einsum("bld,dnh->blnh", x, q), theta)
  k_BLKH = _rotary_reference(np.einsum("bld,dkh->blkh", x, k), theta)
  v_BLKH = np.einsum("bld,dkh->blkh", x, v)
  out_BLNH = np.zeros((batch, length, num_heads, head_dim))
  for b in range(batch):
    for n in range(num_heads):
      j = n // (num_heads // num_kv)
      for t in range(length):
        scores = k_BLKH[b, : t + 1, j] @ q_BLNH[b, t, n] / math.sqrt(head_dim)
        p = np.exp(scores - scores.max())
        out_BLNH[b, t, n] = (p / p.sum()) @ v_BLKH[b, : t + 1, j]
  return np.einsum("blnh,nhd->bld", out_BLNH, o)


def test_attention_equals_reference():
  """Standalone Attention (head_dim 6 != d / N = 4; 2 query heads per kv head; theta 100) against
  the loop above: rotary positions on queries and keys, causal mask, scale, grouping."""
  with nnx.use_eager_sharding(False):  # No mesh: keep the logical names only (as `build`).
    attention = Attention(16, 4, 2, 6, rope_theta=100.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 16))
  params = (attention.q[...], attention.k[...], attention.v[...], attention.o[...])
  want = _attention_reference(x, *params, theta=100.0)
  np.testing.assert_allclose(attention(x), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", ["dense", "switch"])
def test_initial_loss_on_random_tokens(config):
  """Golden initial loss, derived rather than recorded.

  Logits are z_v = h . e_v, h = final_norm(x) (unit rms, scale 1: |h|^2 = d), e_v a row of the tied
  embedding, drawn N(0, I/d). A row independent of h gives z_v | h ~ N(0, |h|^2 / d) = N(0, 1):
  sigma^2 = 1, derived. (Other context tokens reach h only through random value and output
  projections, not along their own rows, so they count as independent.) The input token's own row
  is in h: x = sqrt(d) e_tok + R, R the residual branches, so its logit is
  (sqrt(d) |e_tok|^2 + e_tok . R) / rms(x) ~ sqrt(d) / rms(x). That one we measure, since rms(x)
  depends on the branches at init; each of the 2 * num_layers branches adds at most unit rms
  (fan-in scaled weights on RMS-normalised inputs; attention averages values, GELU shrinks, gates
  are <= 1), so rms(x) <= 1 + 2 * num_layers bounds it from below.

  For a uniform random target t, E[CE] = E[logsumexp(z)] - E[z_t]. With Gaussian logits,
  E[sum_v exp(z_v)] = (V - 1) e^(sigma^2 / 2) + e^(z_tok) and E[z_t] = z_tok / V, so
      E[CE] ~ mean over positions of ln((V - 1) e^(1/2) + e^(z_tok)) - z_tok / V.
  (The naive ln V + 1/2 falls 0.5-0.8 nats short: the self logit is ~5.5 at d = 64.)

  Tolerances. Loss: 4 standard errors of the mean over the random targets (each CE varies by about
  Var(z_t) = 1), plus 0.02 for the approximations: Jensen's gap, -(e - 1) / (2 V) = -0.003, and the
  finite table, whose mean of exp(|e_v|^2 / 2) is e^(1/2) (1 + 1/(4d)) (+0.004) up to
  O(1/sqrt(V d)). Variance: the logits share one table, whose mean |e_v|^2 is 1 +- sqrt(2 / (V d))
  = 0.011; 0.1 leaves room for h being far from isotropic.
  """
  config_file = {"dense": configs.dense, "switch": configs.switch}[config]
  cfg = config_dict.experiment_from_config_dict(config_file.get_config("size=smoke")).model
  assert (cfg.moe is not None) == (config == "switch") and cfg.tie_embeddings
  v, d = cfg.vocab_size, cfg.d_model
  model = build(cfg, seed=3)
  tokens = jax.random.randint(jax.random.key(10), (16, cfg.max_len), 0, v)
  targets = np.asarray(jax.random.randint(jax.random.key(11), tokens.shape, 0, v))
  z = np.asarray(model(tokens)[0], np.float64)  # [B, L, V]
  is_self = np.arange(v) == np.asarray(tokens)[..., None]
  z_self = z[is_self].reshape(tokens.shape)
  sigma2 = np.mean(z[~is_self] ** 2)
  assert (
      abs(sigma2 - 1.0) < 0.1
  ), f"logit variance {sigma2:.3f}, derived 1 (std 1/sqrt(d) embeddings)"
  norms = np.linalg.norm(np.asarray(model.embed[...], np.float64), axis=-1)[np.asarray(tokens)]
  assert (z_self <= math.sqrt(d) * norms + 1e-4).all()  # Cauchy-Schwarz with |h| <= sqrt(d).
  assert z_self.mean() > math.sqrt(d) / (1 + 2 * cfg.num_layers), z_self.mean()
  lse = np.log(np.sum(np.exp(z), axis=-1))
  ce = lse - np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
  expected = np.mean(np.log((v - 1) * math.exp(0.5) + np.exp(z_self)) - z_self / v)
  tolerance = 4 * ce.std() / math.sqrt(ce.size) + 0.02
  assert abs(ce.mean() - expected) < tolerance, (
      f"initial loss {ce.mean():.4f}, expected {expected:.4f} +- {tolerance:.3f} "
      f"(ln V + 1/2 = {math.log(v) + 0.5:.4f}); if the initialisation changed on purpose, redo "
      "the derivation above"
  )
