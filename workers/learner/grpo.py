"""GRPO math: advantages, the token loss (three variants), and the data helpers the trainer runs a batch through.

Three policies (decoupled PPO, as in AReaL: Fu et al. 2025, "AReaL: a large-scale asynchronous RL system")
------------------------------------------------------------------------------------------------------------
- behaviour  mu:        the policy the generation worker SAMPLED each token with (its adapter version, temperature
                        and top_p); its log-probs come back with the rollout (``sampler_logprobs``).
- proximal   pi_prox:   the learner's policy when the batch's first optimizer update starts (``proximal_logprobs``,
                        computed once per batch, no gradient). With one update per batch these are the current
                        log-probs under stop_gradient.
- current    pi_theta:  the parameters being differentiated (``logprobs``), recomputed for every update.

The trust region (clip) is taken around pi_prox, which the learner knows exactly; the gap between mu and pi_prox
(stale adapter versions, numeric differences of the generation engine, top_p truncation) is corrected by a
truncated behaviour importance weight w = min(pi_prox / mu, tis_cap), a constant. ``tis_cap`` = 0 switches the
correction off: mu is ignored (w = 1, and CISPO's weight is taken against pi_prox). With pi_prox = mu this is plain
PPO; with a single update per batch ratio = 1 and the clip never acts: it acts from the batch's second update on
(``ppo_epochs`` * ``minibatches`` > 1 in the trainer).

Math
----
For each completion token t of sequence b (mask[b, t] == 1), with group-relative advantage A_b and
clip(x) = clip(x, 1 - clip_low, 1 + clip_high) (DAPO's asymmetric "clip-higher"):

    "grpo":  r = pi / pi_prox,  w = min(pi_prox / mu, tis_cap)
             obj_t = w * min(r * A, clip(r) * A)                          (AReaL's decoupled PPO objective)
    "gspo":  GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean over its tokens,
             s_b = exp(mean_t log(pi / pi_prox)),  w_b = min(exp(mean_t log(pi_prox / mu)), tis_cap)
             obj_b = w_b * min(s_b * A, clip(s_b) * A), so a whole sequence is clipped or not. s_b * w_b is the
             length-normalised sequence ratio pi / mu, split at pi_prox as decoupled PPO splits the token ratio, which
             keeps the behaviour correction at GSPO's unit (the sequence) instead of AReaL's per-token weight under
             a sequence ratio. Implemented as GSPO-token: token t carries the value s_b with the gradient
             s_b * grad(log pi_t), so the mean over the sequence's tokens is obj_b and has GSPO's gradient exactly.
    "cispo": CISPO (MiniMax-M1, 2025): obj_t = stop_grad(clip(pi / mu)) * A * log pi: the importance-sampling
             weight against the BEHAVIOUR policy is clipped and scales the log-prob's gradient instead of cutting it
             off, so every token keeps a gradient. mu is the sampler (tis_cap > 0; tokens whose sampler log-prob
             is unknown use pi_prox), or pi_prox with tis_cap = 0; the clip bounds the weight, so tis_cap's value
             matters only as on / off. MiniMax clips above only: set clip_low = 1 for that. The loss *value*
             includes log-probs (only its gradient means much).

    d      = ref_logprobs - logprobs
    kl     = exp(d) - d - 1  ("k3")  |  0.5 * d**2  ("mse")  |  |d|  ("abs")
    loss_t = -obj_t + kl_coef * kl - entropy_coef * entropy

clip_frac counts tokens whose gradient clipping cut off (grpo, gspo: min() picked the clipped branch strictly) or,
for cispo, whose weight was clipped.

Aggregation ("loss_agg"; "" = the loss's own: "token" for grpo (DAPO) and cispo (its paper), "sequence" for gspo
(its paper's 1/|y| per sequence, then the mean over sequences)):
    "token":    sum_{b,t} mask * loss_t / N_tokens          (every valid token weighs the same)
    "sequence": sum_b [ sum_t mask * loss_t / n_b ] / N_seqs  (every sequence weighs the same)
    "constant": sum_{b,t} mask * loss_t / (max_tokens * N_seqs)  (Dr.GRPO: a constant, length-free normaliser)
where n_b = valid tokens of row b, and N_tokens / N_seqs default to the counts in the given arrays. For
gradient accumulation (and data-parallel shards) pass the counts of the *whole* batch (``num_tokens_total`` /
``num_seqs_total``, see ``loss_normalizer``) so that the partial losses -- and their gradients -- sum to the
full-batch ones. Rows with no valid token contribute nothing and are not counted as sequences.

Advantages (``group_advantages``): A = (r - mean_g) / (std_g + eps) with population std, or r - mean_g
when ``scale_rewards`` is False (Dr.GRPO's other half).

Shift convention
----------------
``sequence_logprobs(model, tokens)`` runs the model on ``tokens[:, :-1]`` and returns arrays of shape
[B, T-1] whose column t is log p(tokens[:, t+1] | tokens[:, :t+1]), i.e. column t scores the token at
position t+1. Every per-token array handed to ``grpo_token_loss`` (masks, proximal/ref/sampler log-probs) must
use this same convention; the trainer's ``prepare_batch`` drops the first column of per-token data to match.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

ATROPOS_PROMPT = -100  # Atropos marks non-trained (prompt) positions with this value in `masks`.

_KL_ESTIMATORS = ("k3", "mse", "abs")
_LOSS_AGGS = ("token", "sequence", "constant")
_LOSSES = ("grpo", "gspo", "cispo")
_PAPER_AGG = {"grpo": "token", "gspo": "sequence", "cispo": "token"}  # loss_agg = "": the loss's own (module doc)


@dataclass(frozen=True)
class GRPOParams:
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO "clip-higher": more room for raising low-probability tokens
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # "k3" | "mse" | "abs"
    entropy_coef: float = 0.0
    loss: str = "grpo"  # "grpo" | "gspo" | "cispo"
    loss_agg: str = ""  # "token" | "sequence" | "constant"; "" = the loss's own (set in __post_init__)
    max_tokens: int = 0  # the constant length of loss_agg = "constant" (the max completion length)
    tis_cap: float = 2.0  # cap of the behaviour weight pi_prox / mu; 0 = no behaviour correction
    scale_rewards: bool = True  # False = Dr.GRPO (no division by group std)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.kl_estimator not in _KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {_KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.loss_agg == "":
            object.__setattr__(self, "loss_agg", _PAPER_AGG[self.loss])
        if self.loss_agg not in _LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {_LOSS_AGGS} (or '' for the loss's own), got {self.loss_agg!r}")
        if self.loss_agg == "constant" and self.max_tokens <= 0:
            raise ValueError('loss_agg = "constant" needs max_tokens > 0')
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
    """The full-batch count to pass as num_tokens_total ("token") or num_seqs_total ("sequence", "constant")."""
    m = np.asarray(mask, dtype=np.float32)
    if loss_agg == "token":
        return float(m.sum())
    if loss_agg in ("sequence", "constant"):
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


def _row_mean(x: mx.array, mask: mx.array) -> mx.array:
    """Per-row mean over valid tokens, shape [B, 1] (empty rows: 0)."""
    return (x * mask).sum(axis=1, keepdims=True) / mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)


def _aggregate(
    loss_tok: mx.array,
    mask: mx.array,
    params: GRPOParams,
    num_tokens_total: float | None,
    num_seqs_total: float | None,
) -> mx.array:
    if params.loss_agg == "token":
        denom = mask.sum() if num_tokens_total is None else mx.array(float(num_tokens_total))
        return loss_tok.sum() / mx.maximum(denom, 1.0)
    n_row = mask.sum(axis=1)
    if num_seqs_total is None:
        n_seqs = (n_row > 0).astype(mx.float32).sum()
    else:
        n_seqs = mx.array(float(num_seqs_total))
    if params.loss_agg == "constant":
        return loss_tok.sum() / (params.max_tokens * mx.maximum(n_seqs, 1.0))
    seq_mean = loss_tok.sum(axis=1) / mx.maximum(n_row, 1.0)  # empty rows: 0 / 1 = 0
    return seq_mean.sum() / mx.maximum(n_seqs, 1.0)


def _policy_objective(
    lp: mx.array,
    prox: mx.array,
    behaviour: mx.array | None,
    adv: mx.array,
    mask: mx.array,
    params: GRPOParams,
) -> tuple[mx.array, mx.array, mx.array]:
    """Per-token objective (to maximise) of the chosen loss before the behaviour weight, the ratio to the proximal
    policy, and where clipping acts. `behaviour`: the behaviour log-probs mu (cleaned, constant), or None."""
    sg = mx.stop_gradient
    f32 = mx.float32
    log_ratio = lp - prox
    if params.loss == "gspo":
        # Value: the sequence's geometric-mean ratio; gradient: that ratio times this token's grad(logprob).
        log_ratio = sg(_row_mean(log_ratio, mask)) + lp - sg(lp)
    ratio = mx.exp(log_ratio)

    if params.loss == "cispo":
        # The IS weight pi / mu against the behaviour policy (pi_prox when the correction is off), clipped, constant.
        is_ratio = sg(mx.exp(lp - (prox if behaviour is None else behaviour)))
        weight = mx.clip(is_ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
        return weight * adv * lp, ratio, (weight != is_ratio).astype(f32)

    clipped = mx.clip(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    unclipped_obj = ratio * adv
    clipped_obj = clipped * adv
    # Clipping is "active" where min() picked the clipped branch strictly, i.e. where the token's gradient is cut
    # off: A > 0 with ratio > 1 + clip_high, or A < 0 with ratio < 1 - clip_low.
    return mx.minimum(unclipped_obj, clipped_obj), ratio, (clipped_obj < unclipped_obj).astype(f32)


def grpo_token_loss(
    logprobs: mx.array,
    proximal_logprobs: mx.array,
    ref_logprobs: mx.array | None,
    sampler_logprobs: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    params: GRPOParams,
    entropy: mx.array | None = None,
    num_tokens_total: float | None = None,
    num_seqs_total: float | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The policy loss (scalar) and metrics. Shapes [B, T] except advantages [B]; see module docstring.

    Only ``logprobs`` (and ``entropy``) carry gradient; the other inputs are treated as constants.
    ``sampler_logprobs`` = None (or ``params.tis_cap`` = 0): no behaviour correction.
    ``num_tokens_total`` / ``num_seqs_total`` override the normaliser for gradient accumulation.
    """
    if params.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    if params.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy is required when entropy_coef > 0")

    f32 = mx.float32
    mask = mask.astype(f32)
    valid = mask > 0
    sg = mx.stop_gradient

    # Replace masked entries with 0 *before* any exp: padding may hold garbage (or +1.0 placeholders), and
    # exp(garbage) = inf would turn into NaN via inf * 0, both in the forward pass and in the gradient.
    def clean(x: mx.array) -> mx.array:
        return mx.where(valid, x.astype(f32), 0.0)

    lp = clean(logprobs)
    prox = sg(clean(proximal_logprobs))
    adv = sg(advantages.astype(f32))[:, None]

    # The behaviour correction (tis_cap = 0: off, mu is not looked at).
    behaviour = None
    if sampler_logprobs is not None and params.tis_cap > 0:
        behaviour = sg(clean(sampler_logprobs))
    obj, ratio, clip_active = _policy_objective(lp, prox, behaviour, adv, mask, params)
    if behaviour is not None and params.loss != "cispo":  # CISPO's weight already is pi / mu
        log_w = prox - behaviour
        if params.loss == "gspo":
            log_w = _row_mean(log_w, mask)
        obj = obj * mx.minimum(mx.exp(log_w), params.tis_cap)

    loss_tok = -obj
    metrics: dict[str, mx.array] = {}

    if ref_logprobs is not None:
        kl = _kl(sg(clean(ref_logprobs)) - lp, params.kl_estimator)
        if params.kl_coef > 0:
            loss_tok = loss_tok + params.kl_coef * kl
        metrics["kl"] = _masked_mean(sg(kl), mask)
    else:
        metrics["kl"] = mx.array(0.0)

    if entropy is not None:
        ent = clean(entropy)
        if params.entropy_coef > 0:
            loss_tok = loss_tok - params.entropy_coef * ent
        metrics["entropy"] = _masked_mean(sg(ent), mask)

    loss_tok = loss_tok * mask
    loss = _aggregate(loss_tok, mask, params, num_tokens_total, num_seqs_total)

    metrics["clip_frac"] = _masked_mean(sg(clip_active), mask)
    metrics["ratio_mean"] = _masked_mean(sg(ratio), mask)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Model -> per-token log-probs
# ----------------------------------------------------------------------------------------------------------


def shared_prefix(tokens: np.ndarray, mask: np.ndarray, group: np.ndarray) -> tuple[int, np.ndarray]:
    """How many leading model-input positions the rows of each group can share: (P, owner).

    ``tokens`` [B, W], ``mask`` [B, W-1] (the shift convention below), ``group`` [B] group ids. ``owner[i]`` is the
    first row of row i's run of equal group ids; every row with a trained column has the same first P tokens as its
    owner and no trained column before P, so the first P input positions can be run once per owner (a group's
    completions share its prompt: most of the batch's tokens). P = 0: nothing to share.
    """
    B, W = tokens.shape
    starts = np.r_[True, group[1:] != group[:-1]]
    owner = np.nonzero(starts)[0][np.cumsum(starts) - 1]
    n_in = W - 1
    trained = mask != 0
    rows = trained.any(axis=1)  # rows with nothing to train constrain nothing: their values are masked out
    if n_in < 2 or starts.all() or not rows.any():
        return 0, owner
    first_trained = trained.argmax(axis=1)
    same = np.cumprod(tokens[:, :n_in] == tokens[owner, :n_in], axis=1).sum(axis=1)
    P = int(np.minimum(first_trained, same)[rows].min())
    return min(P, n_in - 1), owner  # at least one input position per row after the prefix


def _token_logprobs(
    logits: mx.array, targets: mx.array, entropy: bool, entropy_grad: bool, temperature: float
) -> tuple[mx.array, mx.array | None]:
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits * (1.0 / temperature)
    lse = mx.logsumexp(logits, axis=-1)
    lp = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1) - lse
    ent = None
    if entropy:
        lg = logits if entropy_grad else mx.stop_gradient(logits)
        z = lse if entropy_grad else mx.stop_gradient(lse)
        ent = z - (mx.softmax(lg, axis=-1) * lg).sum(axis=-1)
    return lp, ent


def _prefix_cache(model, tokens: mx.array, P: int, owner: np.ndarray) -> list | None:
    """KV caches holding the first P positions of every row, computed once per owner; None if the model's cache is
    not a plain KVCache (sliding windows, state-space layers: run the whole rows instead)."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache  # here: importing mlx_lm takes seconds

    cache = make_prompt_cache(model)
    if any(type(c) is not KVCache for c in cache):
        return None
    heads, row_head = np.unique(owner, return_inverse=True)
    model(tokens[mx.array(heads), :P], cache=cache)
    take = mx.array(row_head.reshape(-1))
    for c in cache:
        keys, values, _ = c.state
        c.state = (keys[take, :, :P], values[take, :, :P], P)
    return cache


def sequence_logprobs(
    model,
    tokens: mx.array,
    entropy: bool = True,
    entropy_grad: bool = False,
    temperature: float = 1.0,
    shared: tuple[int, np.ndarray] | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Per-token log-probs of ``tokens`` under ``model`` and (optionally) the entropies of the same next-token
    distributions, both float32 [B, T-1].

    ``temperature``: the policy is softmax(logits / temperature), the distribution the generation workers sample
    from (they report log-probs of that same distribution), so that importance ratios compare like with like.

    Shift: the model sees ``tokens[:, :-1]``; column t holds log p(tokens[:, t+1] | tokens[:, :t+1]), so column t
    belongs to token t+1. Padding after a row's real tokens leaves its real columns unchanged (causal attention).

    ``shared`` = (P, owner) from ``shared_prefix``: the first P positions run once per owner row and the other rows
    attend to copies of its keys and values (the same numbers: causal attention), so a group's prompt costs one
    row instead of group-size rows; columns before P are 0 (not computed: they must be untrained).

    Written like mlx-lm's cross-entropy (logsumexp minus the target logit) rather than materialising a full
    log-softmax: over a large vocabulary that tensor is the most expensive thing in the step. The entropy is only
    differentiated through when it is part of the loss (``entropy_grad``).
    """
    P = shared[0] if shared is not None else 0
    cache = _prefix_cache(model, tokens, P, shared[1]) if P > 0 else None
    if cache is None:
        return _token_logprobs(model(tokens[:, :-1]), tokens[:, 1:], entropy, entropy_grad, temperature)
    lp, ent = _token_logprobs(
        model(tokens[:, P:-1], cache=cache), tokens[:, P + 1 :], entropy, entropy_grad, temperature
    )
    pad = mx.zeros((tokens.shape[0], P), dtype=mx.float32)
    return mx.concatenate([pad, lp], axis=1), None if ent is None else mx.concatenate([pad, ent], axis=1)
