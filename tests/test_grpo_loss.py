"""GRPO loss vs an independent, loop-based NumPy reference (float64)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from workers.learner.grpo import (
    ATROPOS_PROMPT,
    GRPOParams,
    clean_inference_logprobs,
    group_advantages,
    grpo_token_loss,
    loss_normalizer,
    sequence_logprobs,
    shared_prefix,
)
from workers.learner.sources.atropos import scored_data_to_group
from workers.learner.sources.base import Batch
from workers.learner.trainer import prepare_batch

TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# Reference implementation: plain Python loops, written from the spec, not from the MLX code.
# ----------------------------------------------------------------------------------------------------------


def ref_group_advantages(rewards, group_ids, scale, eps):
    out = [0.0] * len(rewards)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        vals = [float(rewards[i]) for i in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        for i in members:
            out[i] = (rewards[i] - mean) / (std + eps) if scale else rewards[i] - mean
    return np.array(out)


def ref_token_terms(lp, prox, ref, w, a, ent, p, ratio=None, weight_lp=None, behaviour=None):
    """Loss of one valid token plus its metric contributions (kl, clipped?, ratio).

    ratio: the (policy / proximal) ratio this token uses (GSPO passes its sequence's); w: the behaviour weight or
    None. CISPO's weight pi / mu is against `behaviour` (mu; None: the proximal policy) and a constant: weight_lp is
    the log-prob it is computed from (default lp), so finite differences in lp give the gradient of the surrogate."""
    if ratio is None:
        ratio = math.exp(lp - prox)
    clipped_ratio = min(max(ratio, 1 - p.clip_low), 1 + p.clip_high)
    if p.loss == "cispo":
        wr = math.exp((lp if weight_lp is None else weight_lp) - (prox if behaviour is None else behaviour))
        obj = min(max(wr, 1 - p.clip_low), 1 + p.clip_high) * a * lp
        clipped = not (1 - p.clip_low <= wr <= 1 + p.clip_high)
        w = None  # the IS weight is pi / mu already
    else:
        obj = min(ratio * a, clipped_ratio * a)
        clipped = (a > 0 and ratio > 1 + p.clip_high) or (a < 0 and ratio < 1 - p.clip_low)
    if w is not None:
        obj *= w
    kl = 0.0
    if ref is not None:
        d = ref - lp
        if p.kl_estimator == "k3":
            kl = math.exp(d) - d - 1
        elif p.kl_estimator == "mse":
            kl = 0.5 * d * d
        else:
            kl = abs(d)
    loss = -obj + p.kl_coef * kl
    if ent is not None:
        loss -= p.entropy_coef * ent
    return loss, kl, clipped, ratio


def ref_loss(lp, prox, ref, samp, adv, mask, p, ent=None, num_tokens_total=None, num_seqs_total=None, weight_lp=None):
    B, T = lp.shape
    token_sum, n_tokens, seq_sum, n_seqs = 0.0, 0, 0.0, 0
    kl_sum = clip_count = ratio_sum = ent_sum = 0.0
    for b in range(B):
        ts = [t for t in range(T) if mask[b, t] != 0]
        seq_ratio = seq_w = None
        if p.loss == "gspo" and ts:  # geometric means over the sequence's valid tokens
            seq_ratio = math.exp(sum(lp[b, t] - prox[b, t] for t in ts) / len(ts))
            if samp is not None:
                seq_w = math.exp(sum(prox[b, t] - samp[b, t] for t in ts) / len(ts))
        row_sum, row_n = 0.0, 0
        for t in ts:
            w = None
            if samp is not None and p.tis_cap > 0:
                w = min(seq_w if p.loss == "gspo" else math.exp(prox[b, t] - samp[b, t]), p.tis_cap)
            loss, kl, clipped, ratio = ref_token_terms(
                lp[b, t],
                prox[b, t],
                None if ref is None else ref[b, t],
                w,
                adv[b],
                None if ent is None else ent[b, t],
                p,
                ratio=seq_ratio,
                weight_lp=None if weight_lp is None else weight_lp[b, t],
                behaviour=samp[b, t] if samp is not None and p.tis_cap > 0 else None,
            )
            row_sum += loss
            row_n += 1
            kl_sum += kl
            clip_count += clipped
            ratio_sum += ratio
            ent_sum += 0.0 if ent is None else ent[b, t]
        token_sum += row_sum
        n_tokens += row_n
        if row_n > 0:
            seq_sum += row_sum / row_n
            n_seqs += 1
    if p.loss_agg == "token":
        denom = n_tokens if num_tokens_total is None else num_tokens_total
        loss = token_sum / max(denom, 1)
    elif p.loss_agg == "constant":  # Dr.GRPO: sum over tokens / (max completion length * sequences)
        denom = n_seqs if num_seqs_total is None else num_seqs_total
        loss = token_sum / (p.max_tokens * max(denom, 1))
    else:
        denom = n_seqs if num_seqs_total is None else num_seqs_total
        loss = seq_sum / max(denom, 1)
    n = max(n_tokens, 1)
    metrics = {"kl": kl_sum / n, "clip_frac": clip_count / n, "ratio_mean": ratio_sum / n}
    if ent is not None:
        metrics["entropy"] = ent_sum / n
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Random batches shaped like real Atropos data
# ----------------------------------------------------------------------------------------------------------


def atropos_mask(masks: np.ndarray) -> np.ndarray:
    """Atropos' per-token masks ([B, T], -100 where not trained) as a float loss mask aligned with
    `sequence_logprobs` (column t trains token t+1). Production gets the same from `scored_data_to_group` and
    `prepare_batch` (test_atropos_mask_shift checks they agree)."""
    return (np.asarray(masks)[:, 1:] != ATROPOS_PROMPT).astype(np.float32)


def make_batch(seed: int, B: int = 6, T: int = 14, group_size: int = 3, scale: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    T_tok = T + 1  # token arrays are one longer than the shifted log-prob arrays
    tokens = rng.integers(0, 50, size=(B, T_tok))
    masks = np.full((B, T_tok), -100, dtype=np.int64)
    for b in range(B):
        prompt = int(rng.integers(2, 6))
        completion = int(rng.integers(1, T_tok - prompt + 1))
        masks[b, prompt : prompt + completion] = tokens[b, prompt : prompt + completion]
    masks[B - 1, :] = -100  # one row with no trained token at all (e.g. fully truncated)
    mask = atropos_mask(masks)
    valid = mask > 0

    old = -rng.uniform(0.05, 4.0, size=(B, T))
    lp = old + rng.normal(0.0, 0.5, size=(B, T))  # ratios well outside [0.8, 1.28] in both directions
    ref = old + rng.normal(0.0, 0.4, size=(B, T))
    samp = old + rng.normal(0.0, 1.5, size=(B, T))  # exp(old - samp) regularly above tis_cap
    ent = rng.uniform(0.0, 3.0, size=(B, T))
    # Garbage where mask == 0: Atropos' +1.0 placeholder and values whose exp overflows float32.
    samp = np.where(valid, samp, 1.0)
    old = np.where(valid, old, -100.0)
    lp = np.where(valid, lp, 100.0)
    ref = np.where(valid, ref, 90.0)

    rewards = rng.integers(0, 3, size=B).astype(np.float64)
    # A per-sequence shift, so that GSPO's sequence-level ratios leave the clip band too (drawn last: the arrays
    # above stay what they were).
    lp = np.where(valid, lp + rng.normal(0.0, 0.4, size=(B, 1)), lp)
    group_ids = np.arange(B) // group_size
    adv = group_advantages(rewards, group_ids, scale=scale, eps=1e-6)
    f = lambda x: x.astype(np.float32)  # noqa: E731
    return dict(lp=f(lp), old=f(old), ref=f(ref), samp=f(samp), ent=f(ent), adv=f(adv), mask=mask)


def mlx_loss(batch, p, use_ref=True, use_samp=True, use_ent=True, **kw):
    return grpo_token_loss(
        mx.array(batch["lp"]),
        mx.stop_gradient(mx.array(batch["old"])),
        mx.array(batch["ref"]) if use_ref else None,
        mx.array(batch["samp"]) if use_samp else None,
        mx.array(batch["adv"]),
        mx.array(batch["mask"]),
        p,
        entropy=mx.array(batch["ent"]) if use_ent else None,
        **kw,
    )


def numpy_loss(batch, p, use_ref=True, use_samp=True, use_ent=True, **kw):
    d = lambda k: batch[k].astype(np.float64)  # noqa: E731
    return ref_loss(
        d("lp"),
        d("old"),
        d("ref") if use_ref else None,
        d("samp") if use_samp else None,
        d("adv"),
        batch["mask"],
        p,
        ent=d("ent") if use_ent else None,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------------
# Loss vs reference
# ----------------------------------------------------------------------------------------------------------


LOSSES = ["grpo", "gspo", "cispo"]
LOSS_AGGS = ["token", "sequence", "constant"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kl_estimator", ["k3", "mse", "abs"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("tis", [True, False])
@pytest.mark.parametrize("loss_kind", LOSSES)
def test_loss_matches_reference(seed, kl_estimator, loss_agg, scale, tis, loss_kind):
    batch = make_batch(seed, scale=scale)
    p = GRPOParams(
        kl_coef=0.05 * (seed + 1),
        kl_estimator=kl_estimator,
        entropy_coef=0.01 * seed,  # seed 0 exercises entropy given but coefficient 0
        loss=loss_kind,
        loss_agg=loss_agg,
        max_tokens=20,
        tis_cap=2.0 if tis else 0.0,
        scale_rewards=scale,
    )
    loss, metrics = mlx_loss(batch, p)
    want, want_metrics = numpy_loss(batch, p)
    assert np.isfinite(loss.item())
    assert loss.item() == pytest.approx(want, abs=TOL, rel=TOL)
    assert set(metrics) == set(want_metrics)
    for k, v in want_metrics.items():
        assert metrics[k].item() == pytest.approx(v, abs=TOL, rel=TOL), k


def test_random_batches_exercise_every_branch():
    """Guard the test data itself: clipping in both directions, TIS above the cap, ragged rows, empty row."""
    hi = lo = capped = seq_hi = seq_lo = 0
    for seed in range(3):
        b = make_batch(seed)
        v = b["mask"] > 0
        ratio = np.exp(np.where(v, b["lp"] - b["old"], 0.0))
        adv = np.broadcast_to(b["adv"][:, None], ratio.shape)
        hi += int(np.sum(v & (adv > 0) & (ratio > 1.28)))
        lo += int(np.sum(v & (adv < 0) & (ratio < 0.8)))
        capped += int(np.sum(v & (np.where(v, b["old"] - b["samp"], 0.0) > np.log(2.0))))
        lengths = b["mask"].sum(axis=1)
        assert len(set(lengths.tolist())) > 2 and lengths[-1] == 0
        # GSPO: sequence-level (geometric-mean) ratios outside the band too.
        seq = np.exp((np.where(v, b["lp"] - b["old"], 0.0)).sum(1) / np.maximum(lengths, 1))
        seq_hi += int(np.sum((lengths > 0) & (b["adv"] > 0) & (seq > 1.28)))
        seq_lo += int(np.sum((lengths > 0) & (b["adv"] < 0) & (seq < 0.8)))
    assert hi > 0 and lo > 0 and capped > 0 and seq_hi > 0 and seq_lo > 0


def test_without_ref_and_sampler():
    batch = make_batch(3)
    p = GRPOParams(kl_coef=0.0, tis_cap=2.0)
    loss, metrics = mlx_loss(batch, p, use_ref=False, use_samp=False, use_ent=False)
    want, _ = numpy_loss(batch, p, use_ref=False, use_samp=False, use_ent=False)
    assert loss.item() == pytest.approx(want, abs=TOL)
    assert metrics["kl"].item() == 0.0 and "entropy" not in metrics


def test_on_policy_loss_is_minus_mean_advantage():
    # ratio == 1, no TIS/KL: token loss = -sum_b A_b * n_b / N
    mask = np.array([[1, 1, 1, 0], [0, 1, 0, 0]], dtype=np.float32)
    lp = mx.array(np.full((2, 4), -1.0, dtype=np.float32))
    adv = mx.array([1.0, -2.0])
    loss, metrics = grpo_token_loss(lp, lp, None, None, adv, mx.array(mask), GRPOParams())
    assert loss.item() == pytest.approx(-(3 * 1.0 + 1 * -2.0) / 4)
    assert metrics["clip_frac"].item() == 0.0 and metrics["ratio_mean"].item() == pytest.approx(1.0)
    seq_loss, _ = grpo_token_loss(lp, lp, None, None, adv, mx.array(mask), GRPOParams(loss_agg="sequence"))
    assert seq_loss.item() == pytest.approx(-(1.0 - 2.0) / 2)


def test_all_masked_batch_is_zero_not_nan():
    batch = make_batch(0)
    batch["mask"] = np.zeros_like(batch["mask"])
    for agg in ("token", "sequence"):
        p = GRPOParams(kl_coef=0.1, entropy_coef=0.1, loss_agg=agg)
        loss, metrics = mlx_loss(batch, p)
        assert loss.item() == 0.0
        assert all(np.isfinite(v.item()) for v in metrics.values())
        g = mx.grad(
            lambda x, p=p: grpo_token_loss(
                x,
                mx.array(batch["old"]),
                mx.array(batch["ref"]),
                mx.array(batch["samp"]),
                mx.array(batch["adv"]),
                mx.array(batch["mask"]),
                p,
                entropy=mx.array(batch["ent"]),
            )[0]
        )(mx.array(batch["lp"]))
        assert np.all(np.array(g) == 0.0)


def test_on_policy_gspo_weighs_sequences_not_tokens():
    """Fresh rollouts (mu = pi_prox = pi): GRPO and CISPO both give A * grad(logprob) over the batch's tokens, but
    GSPO averages within each sequence first (its paper's 1/|y|), so a long sequence's tokens weigh less. Where the
    three differ off-policy: tests/test_offpolicy_loss.py."""
    batch = make_batch(6)
    mask = batch["mask"]
    grads = {}
    for kind in LOSSES:
        p = GRPOParams(loss=kind, tis_cap=2.0)
        f = lambda x, p=p: grpo_token_loss(  # noqa: E731
            x, mx.stop_gradient(x), None, x, mx.array(batch["adv"]), mx.array(mask), p
        )[0]
        grads[kind] = np.array(mx.grad(f)(mx.array(batch["lp"])))
    n_b = mask.sum(axis=1, keepdims=True)
    per_token = -batch["adv"][:, None] * mask / mask.sum()
    per_sequence = -batch["adv"][:, None] * mask / np.maximum(n_b, 1) / (n_b > 0).sum()
    np.testing.assert_allclose(grads["grpo"], per_token, atol=1e-7)
    np.testing.assert_allclose(grads["cispo"], per_token, atol=1e-7)
    np.testing.assert_allclose(grads["gspo"], per_sequence, atol=1e-7)
    assert np.abs(grads["gspo"] - grads["grpo"]).max() > 1e-3


def test_constant_normaliser_is_length_free():
    """Dr.GRPO: the loss is the token sum over max_tokens * sequences, whatever the completions' lengths."""
    mask = np.array([[1, 1, 1, 0], [0, 1, 0, 0]], dtype=np.float32)
    lp = mx.array(np.full((2, 4), -1.0, dtype=np.float32))
    adv = mx.array([1.0, -2.0])
    p = GRPOParams(loss_agg="constant", max_tokens=8)
    loss, _ = grpo_token_loss(lp, lp, None, None, adv, mx.array(mask), p)
    assert loss.item() == pytest.approx(-(3 * 1.0 + 1 * -2.0) / (8 * 2))


def test_params_validation():
    with pytest.raises(ValueError):
        GRPOParams(kl_estimator="k2")
    with pytest.raises(ValueError):
        GRPOParams(loss_agg="mean")
    with pytest.raises(ValueError):
        GRPOParams(loss="ppo")
    with pytest.raises(ValueError):
        GRPOParams(loss_agg="constant")  # needs max_tokens
    batch = make_batch(0)
    with pytest.raises(ValueError):
        mlx_loss(batch, GRPOParams(kl_coef=0.1), use_ref=False)
    with pytest.raises(ValueError):
        mlx_loss(batch, GRPOParams(entropy_coef=0.1), use_ent=False)


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


def _fd_grad(f, x: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        g[idx] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("kl_estimator", ["k3", "mse", "abs"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("loss_kind", LOSSES)
def test_grad_matches_finite_differences(kl_estimator, loss_agg, loss_kind):
    batch = make_batch(7, B=3, T=6, group_size=3)
    p = GRPOParams(
        kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.02, loss=loss_kind, loss_agg=loss_agg, max_tokens=9
    )
    lp64 = batch["lp"].astype(np.float64)

    def np_f(x):  # CISPO's weight is a constant: it stays computed from the batch's log-probs
        return numpy_loss({**batch, "lp": x}, p, weight_lp=lp64)[0]

    def mx_f(x):
        return grpo_token_loss(
            x,
            mx.array(batch["old"]),
            mx.array(batch["ref"]),
            mx.array(batch["samp"]),
            mx.array(batch["adv"]),
            mx.array(batch["mask"]),
            p,
            entropy=mx.array(batch["ent"]),
        )[0]

    want = _fd_grad(np_f, lp64)
    got = np.array(mx.grad(mx_f)(mx.array(batch["lp"])))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=1e-4)
    assert np.all(got[batch["mask"] == 0] == 0.0)  # garbage at padded positions gets no gradient
    assert np.any(got != 0.0)


def test_entropy_gradient_is_minus_coef_over_n():
    batch = make_batch(4)
    p = GRPOParams(entropy_coef=0.3)
    n = batch["mask"].sum()

    def f(ent):
        return grpo_token_loss(
            mx.array(batch["lp"]),
            mx.array(batch["old"]),
            None,
            None,
            mx.array(batch["adv"]),
            mx.array(batch["mask"]),
            p,
            entropy=ent,
        )[0]

    g = np.array(mx.grad(f)(mx.array(batch["ent"])))
    np.testing.assert_allclose(g, -0.3 * batch["mask"] / n, atol=1e-7)


def test_value_and_grad_accepts_metrics_aux():
    batch = make_batch(5)
    p = GRPOParams(kl_coef=0.1)

    def f(x):
        return grpo_token_loss(
            x,
            mx.array(batch["old"]),
            mx.array(batch["ref"]),
            mx.array(batch["samp"]),
            mx.array(batch["adv"]),
            mx.array(batch["mask"]),
            p,
        )

    (loss, metrics), g = mx.value_and_grad(f)(mx.array(batch["lp"]))
    assert g.shape == batch["lp"].shape and np.isfinite(loss.item()) and "clip_frac" in metrics


# ----------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("loss_kind", LOSSES)
def test_micro_batches_sum_to_full_batch(loss_agg, seed, loss_kind):
    batch = make_batch(seed)
    p = GRPOParams(kl_coef=0.1, entropy_coef=0.01, loss=loss_kind, loss_agg=loss_agg, max_tokens=20)
    total = loss_normalizer(batch["mask"], loss_agg)
    kw = {"num_tokens_total": total} if loss_agg == "token" else {"num_seqs_total": total}

    def loss_and_grad(rows, **kw):
        sub = {k: v[rows] for k, v in batch.items()}

        def f(x):
            return mlx_loss({**sub, "lp": x}, p, **kw)[0]

        val, g = mx.value_and_grad(f)(mx.array(sub["lp"]))
        return val.item(), np.array(g)

    full_loss, full_grad = loss_and_grad(slice(0, 6))
    l1, g1 = loss_and_grad(slice(0, 2), **kw)
    l2, g2 = loss_and_grad(slice(2, 6), **kw)
    assert l1 + l2 == pytest.approx(full_loss, abs=TOL)
    np.testing.assert_allclose(np.concatenate([g1, g2]), full_grad, atol=1e-6)
    # Without the global normaliser the sum is (in general) wrong: the option matters.
    l1n, _ = loss_and_grad(slice(0, 2))
    l2n, _ = loss_and_grad(slice(2, 6))
    assert abs(l1n + l2n - full_loss) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# Advantages and Atropos helpers
# ----------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 5.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 2])
    # group 0: mean 0.5, pop std 0.5 -> +-1; group 1: mean 2.5, std 0.5 -> -1, +1; group 2: size 1 -> 0
    adv = group_advantages(rewards, groups, scale=True, eps=0.0)
    np.testing.assert_allclose(adv, [1, -1, -1, 1, -1, 1, 0], atol=1e-6)
    drgrpo = group_advantages(rewards, groups, scale=False, eps=1e-6)
    np.testing.assert_allclose(drgrpo, [0.5, -0.5, -0.5, 0.5, -0.5, 0.5, 0], atol=1e-6)
    with_eps = group_advantages(rewards, groups, scale=True, eps=1e-6)
    np.testing.assert_allclose(with_eps[:2], [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)], rtol=1e-6)


def test_group_advantages_identical_rewards_are_zero():
    adv = group_advantages(np.array([0.7, 0.7, 0.7, 1.0]), np.array([3, 3, 3, 9]), scale=True, eps=1e-6)
    assert np.all(np.isfinite(adv)) and np.all(adv == 0.0)
    adv = group_advantages(np.array([0.7, 0.7, 0.7]), np.array([0, 0, 0]), scale=True, eps=0.0)
    assert np.all(np.isfinite(adv)) and np.all(adv == 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_reference(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=20)
    groups = rng.integers(0, 6, size=20)  # unordered, uneven groups
    for scale in (True, False):
        got = group_advantages(rewards, groups, scale=scale, eps=1e-6)
        np.testing.assert_allclose(got, ref_group_advantages(rewards, groups, scale, 1e-6), atol=1e-5)


def test_atropos_mask_shift():
    masks = np.array([[-100, -100, 17, 23, -100], [-100, 5, 6, 7, 8]])
    np.testing.assert_array_equal(atropos_mask(masks), [[0, 1, 1, 0], [1, 1, 1, 1]])
    assert atropos_mask(masks).dtype == np.float32
    # The production path (ScoredData -> samples -> padded arrays) makes the same mask.
    item = {"tokens": [[1, 2, 17, 23, 4], [1, 5, 6, 7, 8]], "masks": masks.tolist(), "scores": [1.0, 0.0]}
    arr = prepare_batch(Batch([scored_data_to_group(item)]))
    np.testing.assert_array_equal(arr["mask"], atropos_mask(masks))
    assert arr["mask"].dtype == np.float32


def test_clean_inference_logprobs():
    lp = np.array([[1.0, 1.0, -0.5, -2.0], [1.0, -0.1, 0.3, -1.0]])
    mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=np.float32)
    clean, m = clean_inference_logprobs(lp, mask)
    np.testing.assert_array_equal(m, [[0, 0, 1, 0], [0, 1, 0, 1]])
    np.testing.assert_allclose(clean, [[0, 0, -0.5, 0], [0, -0.1, 0, -1.0]])
    # prepare_batch cleans the sampler log-probs the same way; unknown ones (None) are never valid.
    item = {
        "tokens": [[3, 4, 5, 6, 7], [3, 4, 5, 6, 7], [3, 4, 5, 6, 7]],
        "masks": [[-100, -100, 5, 6, -100], [-100, 4, 5, 6, 7], [-100, 4, 5, 6, 7]],
        "scores": [1.0, 0.0, 0.5],
        "inference_logprobs": [[1.0, *lp[0]], [1.0, *lp[1]], None],
    }
    arr = prepare_batch(Batch([scored_data_to_group(item)]))
    np.testing.assert_array_equal(arr["sampler_valid"], [*m, [0, 0, 0, 0]])
    np.testing.assert_allclose(arr["sampler"], [*clean, [0, 0, 0, 0]])


# ----------------------------------------------------------------------------------------------------------
# sequence_logprobs on a tiny llama
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(0)
    args = ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=50,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sequence_logprobs_matches_numpy(tiny_model, temperature):
    """Log-probs and entropies of softmax(logits / temperature), the distribution the generation workers sample."""
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, 50, size=(3, 9)))
    lp, ent = sequence_logprobs(tiny_model, tokens, temperature=temperature)
    assert lp.shape == (3, 8) and ent.shape == (3, 8)

    logits = np.array(tiny_model(tokens[:, :-1]).astype(mx.float32))
    log_p = _np_log_softmax(logits.astype(np.float64) / temperature)
    tok = np.array(tokens)
    want_lp = np.zeros((3, 8))
    want_ent = np.zeros((3, 8))
    for b in range(3):
        for t in range(8):
            want_lp[b, t] = log_p[b, t, tok[b, t + 1]]  # column t scores token t+1
            want_ent[b, t] = -np.sum(np.exp(log_p[b, t]) * log_p[b, t])
    np.testing.assert_allclose(np.array(lp), want_lp, atol=TOL)
    np.testing.assert_allclose(np.array(ent), want_ent, atol=TOL)


def test_sequence_logprobs_padding_leaves_real_columns(tiny_model):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50, size=(2, 8))
    padded = tokens.copy()
    padded[1, 5:] = 0
    lp, ent = sequence_logprobs(tiny_model, mx.array(padded))
    lp, ent = np.array(lp), np.array(ent)
    # Causal attention: the unpadded prefix scores the same as the row run alone at its own length.
    alone_lp, alone_ent = sequence_logprobs(tiny_model, mx.array(tokens[1:2, :5]))
    np.testing.assert_allclose(lp[1, :4], np.array(alone_lp)[0], atol=TOL)
    np.testing.assert_allclose(ent[1, :4], np.array(alone_ent)[0], atol=TOL)
    no_ent = sequence_logprobs(tiny_model, mx.array(padded), entropy=False)
    assert no_ent[1] is None and np.array_equal(np.array(no_ent[0]), lp)


def test_end_to_end_model_gradient(tiny_model):
    """The loss composes with sequence_logprobs and gives finite parameter gradients."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(2)
    tok_masks = np.full((4, 10), -100)
    tokens = rng.integers(0, 50, size=(4, 10))
    tok_masks[:, 4:] = tokens[:, 4:]
    mask = mx.array(atropos_mask(tok_masks))
    old, _ = sequence_logprobs(tiny_model, mx.array(tokens))
    old = mx.stop_gradient(old)
    adv = mx.array(group_advantages(np.array([1.0, 0.0, 0.0, 1.0]), np.zeros(4), True, 1e-6))
    p = GRPOParams(kl_coef=0.05, entropy_coef=0.01)

    def f(model):
        lp, ent = sequence_logprobs(model, mx.array(tokens))
        return grpo_token_loss(lp, old, old, old, adv, mask, p, entropy=ent)

    (loss, metrics), grads = nn.value_and_grad(tiny_model, f)(tiny_model)
    assert np.isfinite(loss.item())
    assert metrics["ratio_mean"].item() == pytest.approx(1.0, abs=1e-5)
    flat = [np.array(g) for _, g in tree_flatten(grads)]
    assert all(np.all(np.isfinite(g)) for g in flat) and any(np.any(g != 0) for g in flat)


def test_shared_prefix_stops_at_the_first_trained_column_and_the_first_difference():
    prompt = [5, 6, 7, 8]
    rows = [prompt + [9, 10, 11], prompt + [9, 12, 0], prompt[:3] + [1, 2, 3, 4], [4, 4, 4, 4, 4, 4, 4]]
    tokens = np.array(rows)
    mask = np.zeros((4, 6), dtype=np.float32)
    mask[:, 3:] = 1  # column 3 scores token 4: the first completion token
    group = np.array([0, 0, 0, 1])
    P, owner = shared_prefix(tokens, mask, group)
    assert owner.tolist() == [0, 0, 0, 3]
    assert P == 3  # row 2 differs at position 3; column 3 is trained anyway
    mask[1, 1] = 1  # a trained column inside the common prefix: only what comes before it is shared
    assert shared_prefix(tokens, mask, group)[0] == 1
    mask[1, 1] = 0
    assert shared_prefix(tokens[:2], mask[:2, :], np.array([0, 1]))[0] == 0  # one row per group: nothing to share
    mask[:3] = 0  # the rows of group 0 train nothing: only row 3 constrains P (with itself as owner)
    assert shared_prefix(tokens, mask, group)[0] == 3


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_shared_prefix_logprobs_and_gradient_equal_whole_rows(tiny_model, temperature):
    """Two groups with prompts of 6 and 7 tokens and ragged, padded completions: running the shared prefix once per
    group gives the log-probs, entropies and gradient of running every row whole, on every trained column."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(4)
    rows, prompt_lens, group = [], [], []
    for g, n in enumerate((6, 7)):
        prompt = rng.integers(1, 50, n).tolist()
        for _ in range(3):
            rows.append(prompt + rng.integers(1, 50, int(rng.integers(2, 6))).tolist())
            prompt_lens.append(n)
            group.append(g)
    W = max(map(len, rows))
    tokens = np.zeros((len(rows), W), dtype=np.int32)
    mask = np.zeros((len(rows), W - 1), dtype=np.float32)
    for i, (r, n) in enumerate(zip(rows, prompt_lens)):
        tokens[i, : len(r)] = r
        mask[i, n - 1 : len(r) - 1] = 1  # column n-1 scores the first completion token
    shared = shared_prefix(tokens, mask, np.array(group))
    assert shared[0] == 5  # the shorter prompt's first 5 input positions; position 5 scores its first completion token

    x = mx.array(tokens)
    whole_lp, whole_ent = sequence_logprobs(tiny_model, x, temperature=temperature)
    lp, ent = sequence_logprobs(tiny_model, x, temperature=temperature, shared=shared)
    assert lp.shape == whole_lp.shape and ent.shape == whole_ent.shape
    on = mask > 0
    np.testing.assert_allclose(np.array(lp)[on], np.array(whole_lp)[on], atol=TOL)
    np.testing.assert_allclose(np.array(ent)[on], np.array(whole_ent)[on], atol=TOL)
    assert not np.array(lp)[:, :5].any() and not np.array(ent)[:, :5].any()

    adv = mx.array(rng.normal(size=len(rows)).astype(np.float32))[:, None]
    m = mx.array(mask)

    def loss(model, shared):
        lp, _ = sequence_logprobs(model, x, temperature=temperature, shared=shared)
        return -(adv * lp * m).sum() / m.sum()

    want = tree_flatten(nn.value_and_grad(tiny_model, loss)(tiny_model, None)[1])
    got = tree_flatten(nn.value_and_grad(tiny_model, loss)(tiny_model, shared)[1])
    for (name, a), (_, b) in zip(want, got):
        np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-6, err_msg=name)
    assert any(np.abs(np.array(a)).max() > 1e-4 for _, a in want)  # a gradient that could differ
