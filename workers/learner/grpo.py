"""GRPO math: advantages, the token loss, and the data helpers the trainer runs a batch through.

Math
----
For each completion token t of sequence b (mask[b, t] == 1), with group-relative advantage A_b:

    ratio  = exp(logprobs - old_logprobs)                      # current vs rollout policy
    obj    = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)   # DAPO asymmetric clip
    obj   *= w,  w = stop_grad(min(exp(old_logprobs - sampler_logprobs), tis_cap))   # TIS (optional)
    d      = ref_logprobs - logprobs
    kl     = exp(d) - d - 1  ("k3")  |  0.5 * d**2  ("mse")  |  |d|  ("abs")
    loss_t = -obj + kl_coef * kl - entropy_coef * entropy

Aggregation ("loss_agg"):
    "token":    sum_{b,t} mask * loss_t / N_tokens          (every valid token weighs the same)
    "sequence": sum_b [ sum_t mask * loss_t / n_b ] / N_seqs  (every sequence weighs the same)
where n_b = valid tokens of row b, and N_tokens / N_seqs default to the counts in the given arrays. For
gradient accumulation (and data-parallel shards) pass the counts of the *whole* batch (``num_tokens_total`` /
``num_seqs_total``, see ``loss_normalizer``) so that the partial losses -- and their gradients -- sum to the
full-batch ones. Rows with no valid token contribute nothing and are not counted as sequences.

Advantages (``group_advantages``): A = (r - mean_g) / (std_g + eps) with population std, or r - mean_g
when ``scale_rewards`` is False (Dr.GRPO).

Shift convention
----------------
``sequence_logprobs(model, tokens)`` runs the model on ``tokens[:, :-1]`` and returns arrays of shape
[B, T-1] whose column t is log p(tokens[:, t+1] | tokens[:, :t+1]), i.e. column t scores the token at
position t+1. Every per-token array handed to ``grpo_token_loss`` (masks, old/ref/sampler log-probs) must
use this same convention; the trainer's ``prepare_batch`` drops the first column of per-token data to match.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

ATROPOS_PROMPT = -100  # Atropos marks non-trained (prompt) positions with this value in `masks`.

_KL_ESTIMATORS = ("k3", "mse", "abs")
_LOSS_AGGS = ("token", "sequence")


@dataclass(frozen=True)
class GRPOParams:
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO "clip-higher": more room for raising low-probability tokens
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # "k3" | "mse" | "abs"
    entropy_coef: float = 0.0
    loss_agg: str = "token"  # "token" | "sequence"
    tis_cap: float = 2.0  # truncated importance sampling cap; 0 disables
    scale_rewards: bool = True  # False = Dr.GRPO (no division by group std)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kl_estimator not in _KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {_KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss_agg not in _LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {_LOSS_AGGS}, got {self.loss_agg!r}")
        if self.clip_low < 0 or self.clip_high < 0 or self.tis_cap < 0:
            raise ValueError("clip_low, clip_high and tis_cap must be >= 0")


# ----------------------------------------------------------------------------------------------------------
# Advantages and Atropos data helpers (NumPy: this runs on the data path, before anything touches MLX)
# ----------------------------------------------------------------------------------------------------------


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray, scale: bool, eps: float) -> np.ndarray:
    """Group-relative advantages; groups of size 1 get 0 (no baseline to compare against)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids)
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError("rewards and group_ids must be 1-D arrays of the same length")
    adv = np.zeros_like(rewards)
    for g in np.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx]
        # Size-1 and constant-reward groups carry no learning signal. Checked explicitly: mean() of equal
        # floats need not equal them exactly, and that ~1e-17 residual / (0 + eps) is not 0 (NaN at eps=0).
        if r.size < 2 or np.all(r == r[0]):
            continue
        centered = r - r.mean()
        adv[idx] = centered / (r.std() + eps) if scale else centered
    return adv.astype(np.float32)


def clean_inference_logprobs(lp: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero out and exclude entries that are not real log-probabilities.

    Atropos puts 1.0 at prompt positions as a placeholder (the trainer uses it for unknown log-probs too), and
    a real log-prob is never > 0; positions with mask == 0 are not trained anyway. ``lp`` and ``mask`` must
    share the same alignment. Returns (cleaned log-probs, mask with those positions removed), both float32.
    """
    lp = np.asarray(lp, dtype=np.float32)
    mask = np.asarray(mask, dtype=np.float32)
    valid = (mask != 0) & (lp <= 0) & np.isfinite(lp)
    return np.where(valid, lp, 0.0).astype(np.float32), valid.astype(np.float32)


def loss_normalizer(mask: np.ndarray | mx.array, loss_agg: str) -> float:
    """The full-batch normaliser to pass as num_tokens_total ("token") or num_seqs_total ("sequence")."""
    m = np.asarray(mask, dtype=np.float32)
    if loss_agg == "token":
        return float(m.sum())
    if loss_agg == "sequence":
        return float((m.sum(axis=1) > 0).sum())
    raise ValueError(f"loss_agg must be one of {_LOSS_AGGS}, got {loss_agg!r}")


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def _kl(d: mx.array, estimator: str) -> mx.array:
    """Per-token KL estimate from d = ref_logprobs - logprobs (all >= 0, zero iff d == 0)."""
    if estimator == "k3":
        return mx.exp(d) - d - 1.0
    if estimator == "mse":
        return 0.5 * d * d
    return mx.abs(d)


def _masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    # max(.., 1) keeps an all-padding batch at 0 instead of 0/0.
    return (x * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _aggregate(
    loss_tok: mx.array,
    mask: mx.array,
    loss_agg: str,
    num_tokens_total: float | None,
    num_seqs_total: float | None,
) -> mx.array:
    if loss_agg == "token":
        denom = mask.sum() if num_tokens_total is None else mx.array(float(num_tokens_total))
        return loss_tok.sum() / mx.maximum(denom, 1.0)
    n_row = mask.sum(axis=1)
    seq_mean = loss_tok.sum(axis=1) / mx.maximum(n_row, 1.0)  # empty rows: 0 / 1 = 0
    if num_seqs_total is None:
        denom = (n_row > 0).astype(mx.float32).sum()
    else:
        denom = mx.array(float(num_seqs_total))
    return seq_mean.sum() / mx.maximum(denom, 1.0)


def grpo_token_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    ref_logprobs: mx.array | None,
    sampler_logprobs: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    params: GRPOParams,
    entropy: mx.array | None = None,
    num_tokens_total: float | None = None,
    num_seqs_total: float | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """GRPO loss (scalar) and metrics. Shapes [B, T] except advantages [B]; see module docstring.

    Only ``logprobs`` (and ``entropy``) carry gradient; the other inputs are treated as constants.
    ``num_tokens_total`` / ``num_seqs_total`` override the normaliser for gradient accumulation.
    """
    if params.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    if params.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef > 0")

    f32 = mx.float32
    mask = mask.astype(f32)
    valid = mask > 0

    # Replace masked entries with 0 *before* any exp: padding may hold garbage (or +1.0 placeholders), and
    # exp(garbage) = inf would turn into NaN via inf * 0, both in the forward pass and in the gradient.
    def clean(x: mx.array) -> mx.array:
        return mx.where(valid, x.astype(f32), 0.0)

    lp = clean(logprobs)
    old = mx.stop_gradient(clean(old_logprobs))
    adv = mx.stop_gradient(advantages.astype(f32))[:, None]

    ratio = mx.exp(lp - old)
    clipped = mx.clip(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    unclipped_obj = ratio * adv
    clipped_obj = clipped * adv
    obj = mx.minimum(unclipped_obj, clipped_obj)

    if sampler_logprobs is not None and params.tis_cap > 0:
        # Rollouts may come from a stale adapter version (or a different numeric engine): reweight each token
        # by pi_old / pi_sampler, capped so rare tokens cannot blow up the update.
        sampler = clean(sampler_logprobs)
        w = mx.stop_gradient(mx.minimum(mx.exp(old - sampler), params.tis_cap))
        obj = obj * w

    loss_tok = -obj
    metrics: dict[str, mx.array] = {}

    if ref_logprobs is not None:
        kl = _kl(mx.stop_gradient(clean(ref_logprobs)) - lp, params.kl_estimator)
        if params.kl_coef > 0:
            loss_tok = loss_tok + params.kl_coef * kl
        metrics["kl"] = _masked_mean(mx.stop_gradient(kl), mask)
    else:
        metrics["kl"] = mx.array(0.0)

    if entropy is not None:
        ent = clean(entropy)
        if params.entropy_coef > 0:
            loss_tok = loss_tok - params.entropy_coef * ent
        metrics["entropy"] = _masked_mean(mx.stop_gradient(ent), mask)

    loss_tok = loss_tok * mask
    loss = _aggregate(loss_tok, mask, params.loss_agg, num_tokens_total, num_seqs_total)

    # Clipping is "active" where min() picked the clipped branch strictly, i.e. where the token's gradient
    # is cut off: A > 0 with ratio > 1 + clip_high, or A < 0 with ratio < 1 - clip_low.
    clip_active = (clipped_obj < unclipped_obj).astype(f32)
    metrics["clip_frac"] = _masked_mean(mx.stop_gradient(clip_active), mask)
    metrics["ratio_mean"] = _masked_mean(mx.stop_gradient(ratio), mask)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Model -> per-token log-probs
# ----------------------------------------------------------------------------------------------------------


def sequence_logprobs(
    model, tokens: mx.array, entropy: bool = True, entropy_grad: bool = False
) -> tuple[mx.array, mx.array | None]:
    """Per-token log-probs of ``tokens`` under ``model`` and (optionally) the entropies of the same next-token
    distributions, both float32 [B, T-1].

    Shift: the model sees ``tokens[:, :-1]``; column t holds log p(tokens[:, t+1] | tokens[:, :t+1]), so column t
    belongs to token t+1. Padding after a row's real tokens leaves its real columns unchanged (causal attention).

    Written like mlx-lm's cross-entropy (logsumexp minus the target logit) rather than materialising a full
    log-softmax: over a large vocabulary that tensor is the most expensive thing in the step. The entropy is only
    differentiated through when it is part of the loss (``entropy_grad``).
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)  # [B, T-1, V]
    targets = tokens[:, 1:]
    lse = mx.logsumexp(logits, axis=-1)
    lp = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1) - lse
    ent = None
    if entropy:
        lg = logits if entropy_grad else mx.stop_gradient(logits)
        z = lse if entropy_grad else mx.stop_gradient(lse)
        ent = z - (mx.softmax(lg, axis=-1) * lg).sum(axis=-1)
    return lp, ent
