"""Off-policy learning: the three losses on stale batches (behaviour mu != proximal pi_prox != current pi) and over
several updates per batch, each against a NumPy reference written from its paper's formulas (vectorised, float64,
with the analytic gradient with respect to the current log-probs), independent of workers/learner/grpo.py.

    decoupled PPO (AReaL):  J = 1/N sum_{b,t} min(pi_prox / mu, cap) * min(r A, clip(r) A),  r = pi / pi_prox
    GSPO (Qwen):            J = 1/G sum_b w_b * min(s_b A, clip(s_b) A),  s_b = exp(mean_t log(pi / pi_prox)),
                            w_b = min(exp(mean_t log(pi_prox / mu)), cap)
    CISPO (MiniMax-M1):     J = 1/N sum_{b,t} sg(clip(pi / mu)) A log pi

and the loss is -J. With cap = tis_cap = 0 the correction is off: mu is ignored (w = 1; CISPO's weight is
pi / pi_prox)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from workers.learner.grpo import GRPOParams, grpo_token_loss

LOSSES = ["grpo", "gspo", "cispo"]
CLIP_LOW, CLIP_HIGH, CAP = 0.2, 0.28, 2.0


# ----------------------------------------------------------------------------------------------------------
# The NumPy reference: loss and d loss / d log pi
# ----------------------------------------------------------------------------------------------------------


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 1 - CLIP_LOW, 1 + CLIP_HIGH)


def _ppo_term(ratio: np.ndarray, adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min(r A, clip(r) A) and d/dr of it: A where the unclipped branch is taken (inside the band, or where it is
    the smaller one), else 0."""
    unclipped, clipped = ratio * adv, _clip(ratio) * adv
    inside = (ratio >= 1 - CLIP_LOW) & (ratio <= 1 + CLIP_HIGH)
    return np.minimum(unclipped, clipped), np.where(inside | (unclipped < clipped), adv, 0.0)


def reference(kind: str, lp, prox, mu, adv, mask, cap: float = CAP) -> tuple[float, np.ndarray]:
    """(loss, gradient of the loss with respect to lp) with each loss's own aggregation."""
    lp, prox, mu, adv, m = (np.asarray(x, dtype=np.float64) for x in (lp, prox, mu, adv, mask))
    A = adv[:, None]
    if cap == 0:
        mu = prox  # correction off
    if kind == "grpo":
        n = m.sum()
        r = np.exp(lp - prox)
        w = np.minimum(np.exp(prox - mu), cap) if cap else 1.0
        term, dterm_dr = _ppo_term(r, A)
        return -(m * w * term).sum() / n, -m * w * dterm_dr * r / n
    if kind == "gspo":
        n_b = m.sum(axis=1)
        rows = n_b > 0
        G = rows.sum()
        n_b = np.maximum(n_b, 1)
        s = np.exp((m * (lp - prox)).sum(axis=1) / n_b)
        w = np.minimum(np.exp((m * (prox - mu)).sum(axis=1) / n_b), cap) if cap else np.ones_like(s)
        term, dterm_ds = _ppo_term(s, adv)
        loss = -(rows * w * term).sum() / G
        # d s_b / d lp[b, t] = s_b * m[b, t] / n_b
        return loss, -(rows * w * dterm_ds * s / n_b)[:, None] * m / G
    if kind == "cispo":
        n = m.sum()
        weight = _clip(np.exp(lp - mu))  # a constant: stop-gradient
        return -(m * weight * A * lp).sum() / n, -m * weight * A / n
    raise ValueError(kind)


def implementation(kind: str, lp, prox, mu, adv, mask, cap: float = CAP, **kw) -> tuple[float, np.ndarray]:
    p = GRPOParams(loss=kind, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, tis_cap=cap)

    def f(x):
        samp = None if mu is None else mx.array(mu)
        return grpo_token_loss(x, mx.array(prox), None, samp, mx.array(adv), mx.array(mask), p, **kw)[0]

    loss, grad = mx.value_and_grad(f)(mx.array(np.asarray(lp, dtype=np.float32)))
    return loss.item(), np.array(grad)


# ----------------------------------------------------------------------------------------------------------
# A stale batch
# ----------------------------------------------------------------------------------------------------------


def stale_batch(seed: int, B: int = 8, T: int = 12) -> dict[str, np.ndarray]:
    """Ragged rows (one empty), two groups of four; pi_prox / mu spans (0.1, 10) (beyond the cap both ways) and
    pi / pi_prox leaves the clip band on both sides, per token and per sequence."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T), dtype=np.float32)
    for b in range(B - 1):
        start = int(rng.integers(0, 4))
        mask[b, start : start + int(rng.integers(2, T - start + 1))] = 1
    prox = -rng.uniform(0.05, 3.0, size=(B, T))
    mu = prox + rng.normal(0.0, 0.9, size=(B, T))
    lp = prox + rng.normal(0.0, 0.3, size=(B, T)) + rng.normal(0.0, 0.35, size=(B, 1))
    rewards = rng.integers(0, 2, size=B).astype(np.float64)
    rewards[[0, 1, 4, 5]] = [1, 0, 1, 0]  # every group has a signal
    adv = np.zeros(B)
    for g in (slice(0, 4), slice(4, 8)):
        adv[g] = (rewards[g] - rewards[g].mean()) / (rewards[g].std() + 1e-6)
    f = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
    return {"lp": f(lp), "prox": f(prox), "mu": f(mu), "adv": f(adv), "mask": mask}


def _args(b: dict) -> tuple:
    return b["lp"], b["prox"], b["mu"], b["adv"], b["mask"]


def test_stale_batch_exercises_every_branch():
    """Guard the data: behaviour weights above the cap and below 1/2, ratios outside the band in both directions
    where they cut the gradient, and sequence ratios outside it too."""
    seen = dict.fromkeys(["w>cap", "w<1/2", "cut_hi", "cut_lo", "seq_out", "cispo_hi", "cispo_lo"], 0)
    for seed in range(3):
        b = stale_batch(seed)
        on = b["mask"] > 0
        A = np.broadcast_to(b["adv"][:, None], on.shape)
        w = np.exp(b["prox"] - b["mu"])
        r = np.exp(b["lp"] - b["prox"])
        is_w = np.exp(b["lp"] - b["mu"])
        seen["w>cap"] += int((on & (w > CAP)).sum())
        seen["w<1/2"] += int((on & (w < 0.5)).sum())
        seen["cut_hi"] += int((on & (A > 0) & (r > 1 + CLIP_HIGH)).sum())
        seen["cut_lo"] += int((on & (A < 0) & (r < 1 - CLIP_LOW)).sum())
        n_b = np.maximum(on.sum(1), 1)
        s = np.exp(np.where(on, b["lp"] - b["prox"], 0).sum(1) / n_b)
        seen["seq_out"] += int(((on.sum(1) > 0) & (b["adv"] != 0) & ((s > 1 + CLIP_HIGH) | (s < 1 - CLIP_LOW))).sum())
        seen["cispo_hi"] += int((on & (is_w > 1 + CLIP_HIGH)).sum())
        seen["cispo_lo"] += int((on & (is_w < 1 - CLIP_LOW)).sum())
    assert all(v > 0 for v in seen.values()), seen


@pytest.mark.parametrize("cap", [CAP, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", LOSSES)
def test_loss_and_gradient_match_the_paper_on_a_stale_batch(kind, seed, cap):
    b = stale_batch(seed)
    want_loss, want_grad = reference(kind, *_args(b), cap=cap)
    loss, grad = implementation(kind, *_args(b), cap=cap)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert np.all(grad[b["mask"] == 0] == 0)
    assert np.abs(want_grad).max() > 1e-3  # a gradient that could be wrong


@pytest.mark.parametrize("kind", LOSSES)
def test_the_analytic_reference_gradient_is_its_losss_gradient(kind):
    """Finite differences of the reference loss (CISPO's weight held at the batch's values: it is a constant) give
    the reference's analytic gradient: the reference checks itself."""
    b = stale_batch(3)
    lp = b["lp"].astype(np.float64)
    _, analytic = reference(kind, *_args(b))
    rest = _args(b)[1:]
    if kind == "cispo":  # sg(clip(pi / mu)) is held at the batch's values: only the log-prob factor moves
        weight, n = _clip(np.exp(lp - b["mu"])), b["mask"].sum()

        def loss(x):
            return -(b["mask"] * weight * b["adv"][:, None] * x).sum() / n
    else:

        def loss(x):
            return reference(kind, x, *rest)[0]

    fd = np.zeros_like(lp)
    h = 1e-6
    for idx in zip(*np.nonzero(b["mask"])):
        up, down = lp.copy(), lp.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(analytic, fd, atol=1e-7, rtol=1e-5)


def test_the_three_losses_differ_on_a_stale_batch():
    """At the batch's first update (pi = pi_prox: ratio 1, no clip) the gradients are
    grpo: min(pi_prox / mu, cap) A / N per token; cispo: clip(pi / mu) A / N; gspo: the sequence's geometric-mean
    weight A / (n_b G). They differ pairwise, and each is what its formula says."""
    b = stale_batch(4)
    b["lp"] = b["prox"].copy()
    grads = {kind: implementation(kind, *_args(b))[1] for kind in LOSSES}
    on = b["mask"]
    A = b["adv"][:, None]
    w_tok = np.exp(b["prox"].astype(np.float64) - b["mu"])
    np.testing.assert_allclose(grads["grpo"], -on * np.minimum(w_tok, CAP) * A / on.sum(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(grads["cispo"], -on * _clip(w_tok) * A / on.sum(), rtol=1e-5, atol=1e-8)
    n_b = np.maximum(on.sum(1, keepdims=True), 1)
    w_seq = np.minimum(np.exp((on * (b["prox"] - b["mu"])).sum(1, keepdims=True) / n_b), CAP)
    G = (on.sum(1) > 0).sum()
    np.testing.assert_allclose(grads["gspo"], -on * w_seq * A / n_b / G, rtol=1e-5, atol=1e-8)
    for a, c in (("grpo", "gspo"), ("grpo", "cispo"), ("gspo", "cispo")):
        assert np.abs(grads[a] - grads[c]).max() > 1e-3, (a, c)


@pytest.mark.parametrize("kind", LOSSES)
def test_tis_cap_zero_switches_the_correction_off(kind):
    """tis_cap = 0: the behaviour log-probs are not looked at (same loss and gradient as without them, whatever
    they are); with the correction on, the same stale batch gives another gradient."""
    b = stale_batch(5)
    off = implementation(kind, *_args(b), cap=0.0)
    without_mu = implementation(kind, b["lp"], b["prox"], None, b["adv"], b["mask"], cap=CAP)
    other_mu = implementation(kind, b["lp"], b["prox"], b["mu"] - 3.0, b["adv"], b["mask"], cap=0.0)
    assert off[0] == pytest.approx(without_mu[0], abs=1e-7) == other_mu[0]
    np.testing.assert_array_equal(off[1], without_mu[1])
    np.testing.assert_array_equal(off[1], other_mu[1])
    on = implementation(kind, *_args(b), cap=CAP)
    assert np.abs(on[1] - off[1]).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Several updates per batch: pi_prox fixed, pi moves, the clip acts
# ----------------------------------------------------------------------------------------------------------


def run_updates(kind: str, b: dict, grad_fn, epochs: int = 2, minibatches: int = 2, lr: float = 4.0) -> dict:
    """Gradient descent on free per-token log-probs theta (a stand-in policy: pi = exp(theta)) over `epochs` passes
    of `minibatches` runs of whole groups, pi_prox and mu fixed at the batch's values, each update normalised by its
    minibatch (as the trainer does). Returns theta after each update and the fraction of trained tokens whose
    ratio pi / pi_prox left the clip band at each update."""
    theta = b["prox"].astype(np.float64).copy()  # the first update starts at pi = pi_prox
    parts = np.array_split(np.arange(len(theta)), minibatches)  # 4 rows = one group each: whole groups
    thetas, outside = [], []
    for _ in range(epochs):
        for rows in parts:
            sub = {k: v[rows] for k, v in b.items()}
            r = np.exp(theta[rows] - sub["prox"])
            on = sub["mask"] > 0
            outside.append(float(((r < 1 - CLIP_LOW) | (r > 1 + CLIP_HIGH))[on].mean()))
            _, g = grad_fn(kind, theta[rows], sub["prox"], sub["mu"], sub["adv"], sub["mask"])
            theta[rows] -= lr * g
            thetas.append(theta.copy())
    return {"thetas": thetas, "outside": outside}


@pytest.mark.parametrize("kind", LOSSES)
def test_several_minibatches_and_epochs_match_the_reference(kind):
    """Two epochs over two minibatches of a stale batch: every update agrees with the reference, the first update
    of each minibatch sees ratio 1 (pi = pi_prox), the second epoch sees ratios outside the band (the clip acts)."""
    b = stale_batch(6)
    want = run_updates(kind, b, reference)
    got = run_updates(kind, b, implementation)
    for k, (t_want, t_got) in enumerate(zip(want["thetas"], got["thetas"])):
        np.testing.assert_allclose(t_got, t_want, rtol=1e-4, atol=1e-5, err_msg=f"update {k}")
    assert want["outside"][:2] == [0.0, 0.0]  # epoch 1: each minibatch's first update, at pi_prox
    assert min(want["outside"][2:]) > 0.1  # epoch 2: the ratio left the band
    moved = np.abs(want["thetas"][-1] - b["prox"])[b["mask"] > 0]
    assert moved.max() > 0.3


def test_several_updates_separate_the_three_losses():
    """Over two epochs of two minibatches the three losses end at different policies."""
    b = stale_batch(6)
    final = {kind: run_updates(kind, b, reference)["thetas"][-1] for kind in LOSSES}
    on = b["mask"] > 0
    for a, c in (("grpo", "gspo"), ("grpo", "cispo"), ("gspo", "cispo")):
        assert np.abs(final[a] - final[c])[on].max() > 1e-2, (a, c)


# ----------------------------------------------------------------------------------------------------------
# The trainer: pi_prox once per batch, pi recomputed for every update
# ----------------------------------------------------------------------------------------------------------


def _stale_rollouts(vocab: int, policy, seed: int):
    """Four groups of three ragged completions whose sampler log-probs are the policy's plus noise (mu != pi_prox),
    all sampled at the trainer's version 0."""
    from workers.learner.sources.base import Batch, Sample

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(4):
        prompt = rng.integers(3, vocab, int(rng.integers(4, 8))).tolist()
        groups.append(
            [
                Sample.from_completion(
                    prompt,
                    rng.integers(3, vocab, int(rng.integers(3, 9))).tolist(),
                    float(i == g % 3),
                    version=0,
                )
                for i in range(3)
            ]
        )
    batch = Batch(groups)
    from workers.learner.trainer import prepare_batch

    arr = prepare_batch(batch)
    lp = np.array(policy(mx.array(arr["tokens"])))
    for s, row in zip(batch.samples, lp):
        n = len(s.tokens)
        s.logprobs = [1.0, *(row[: n - 1] + rng.normal(0.0, 0.7, n - 1)).clip(max=-1e-3).tolist()]
    return batch


@pytest.mark.parametrize("kind", LOSSES)
def test_trainer_keeps_pi_prox_for_the_batch_and_recomputes_pi_per_update(tiny_model, kind):
    """minibatches = 2, ppo_epochs = 2 on a stale batch: Trainer.step makes the four updates of the decoupled loss
    with pi_prox = the policy before the first update (fixed for all four) and pi = the current parameters at each,
    replayed here update by update; for grpo and gspo, recomputing pi_prox at every update (ratio always 1, no clip)
    ends elsewhere."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from helpers import ALL_PROJECTIONS

    from runner.config import LearnerConfig
    from workers.learner.grpo import sequence_logprobs
    from workers.learner.trainer import Trainer, prepare_batch
    from workers.lora import LoraSpec

    spec = LoraSpec(rank=4, scale=20.0, keys=ALL_PROJECTIONS)
    cfg = LearnerConfig(learning_rate=2e-2, ppo_epochs=2, minibatches=2, seed=4, loss=kind)
    trainer = Trainer.load(tiny_model, cfg, spec)
    policy = lambda x: sequence_logprobs(trainer.model, x, entropy=False)[0]  # noqa: E731
    batch = _stale_rollouts(512, policy, seed=7)

    arr = prepare_batch(batch)
    tokens, mask, adv = mx.array(arr["tokens"]), mx.array(arr["mask"]), mx.array(arr["advantages"])
    parts = [np.arange(0, 6), np.arange(6, 12)]  # two runs of two groups of three

    def replay(proximal_each_update: bool) -> dict[str, mx.array]:
        ref = Trainer.load(tiny_model, cfg, spec)  # the same seed: the same initial adapter
        opt = optim.Adam(learning_rate=cfg.learning_rate, bias_correction=True)
        prox = mx.stop_gradient(sequence_logprobs(ref.model, tokens, entropy=False)[0])
        mu = mx.where(mx.array(arr["sampler_valid"]) > 0, mx.array(arr["sampler"]), prox)
        for _ in range(cfg.ppo_epochs):
            for rows in parts:
                idx = mx.array(rows)
                if proximal_each_update:
                    prox = mx.stop_gradient(sequence_logprobs(ref.model, tokens, entropy=False)[0])

                def loss(model, idx=idx, prox=prox):
                    lp, _ = sequence_logprobs(model, tokens[idx], entropy=False)
                    return grpo_token_loss(lp, prox[idx], None, mu[idx], adv[idx], mask[idx], ref.params)[0]

                _, grads = nn.value_and_grad(ref.model, loss)(ref.model)
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                opt.update(ref.model, grads)
                mx.eval(ref.model.parameters(), opt.state)
        return ref.lora_tensors()

    m = trainer.step(batch)
    got = trainer.lora_tensors()
    assert m["updates"] == 4 and trainer.version == 1
    assert m["clip_frac"] > 0  # the clip acted (from the second update of each minibatch on)

    def max_diff(a, b):
        return max(float(mx.abs(a[k] - b[k]).max()) for k in a)

    assert max_diff(got, replay(proximal_each_update=False)) < 1e-5
    if kind == "cispo":  # its weight is pi / mu: pi_prox plays no part where every sampler log-prob is known
        assert max_diff(got, replay(proximal_each_update=True)) < 1e-5
    else:
        assert max_diff(got, replay(proximal_each_update=True)) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# Staleness: a sample without a version is refused
# ----------------------------------------------------------------------------------------------------------


def test_a_sample_without_a_version_is_refused_by_the_trainer_and_the_fresh_source(tiny_model, tmp_path):
    """Trainer.step refuses a batch with a trained sample of unknown version (it changes nothing), and so does the
    live learner's FreshSource, instead of counting it as fresh; an untrained sample needs no version."""
    from runner.config import LearnerConfig
    from workers.learner.sources.base import Batch, FreshSource, Sample, UnversionedSample
    from workers.learner.sources.replay import ReplaySource
    from workers.learner.trainer import Trainer
    from workers.lora import LoraSpec

    def group(version):
        return [Sample([5, 6, 7, 8], [0, 0, 1, 1], float(i), version=version) for i in range(2)]

    unversioned = Batch([group(0), group(0)])
    unversioned.groups[1][1].version = None
    trainer = Trainer.load(tiny_model, LearnerConfig(max_staleness=1), LoraSpec(rank=4))
    before = {k: np.array(v) for k, v in trainer.lora_tensors().items()}
    with pytest.raises(UnversionedSample, match="group 1, sample 1"):
        trainer.step(unversioned)
    assert (trainer.step_count, trainer.version) == (0, 0)
    assert all(np.array_equal(np.array(v), before[k]) for k, v in trainer.lora_tensors().items())

    untrained = Batch([group(0), [*group(0), Sample([5, 6, 7], [0, 0, 0], 0.5)]])
    assert trainer.step(untrained)["groups"] == 2

    path = tmp_path / "batches.jsonl"
    path.write_text(unversioned.to_json() + "\n")
    waits: list[int] = []
    source = FreshSource(ReplaySource(path), min_version=lambda: 0, wait=lambda v: waits.append(v) or True)
    with pytest.raises(UnversionedSample):
        source.next_batch(1)
    assert waits == [] and source.dropped_batches == 0
