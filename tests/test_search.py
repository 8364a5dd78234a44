"""The mask search on tiny models: objective, stopping, resume, sweeps and the selection rule."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bigram_circuits.data import tokenize_documents
from bigram_circuits.errors import GradientOverflow, SearchError
from bigram_circuits.models import frozen_parameters, model_id
from bigram_circuits.ngrams import BigramStats
from bigram_circuits.search import (
    CHECKPOINT_FILE,
    GRADIENT_BACKOFF,
    NonFiniteLoss,
    SearchConfig,
    SearchState,
    Target,
    bigram_correlation,
    choose_subnetwork,
    flush_denormals,
    search,
    search_step,
    stability_check,
    steps_per_check_point,
    sweep,
)
from bigram_circuits.subnetwork import Subnetwork

# The keys of checkpoint.pt; old run directories resume only while they stay the same.
CHECKPOINT_KEYS = {
    "attempt",
    "step",
    "history",
    "attempts",
    "mask_state",
    "optimizer",
    "generator",
    "grad_scale",
    "config",
    "granularities",
    "target",
    "model_id",
    "elapsed_s",
    "cpu_s",
}


@pytest.fixture(scope="module")
def corpus(tiny_neox, tiny_text):
    _, tokenizer = tiny_neox
    dataset = tokenize_documents(tiny_text, tokenizer, show_progress=False)
    windows = dataset.windows(seq_len=24)
    train, held_out = windows[:-16], windows[-16:]
    stats = BigramStats.from_tokens(train, len(tokenizer), seq_len=24, show_progress=False)
    return train, held_out, stats


def _quick(**overrides) -> SearchConfig:
    options = {"batch_size": 8, "seq_len": 24, "max_steps": 40, "stability_check": False, "lam": 1.0}
    return SearchConfig(**{**options, **overrides})


def test_search_reduces_target_loss_and_density(tiny_neox, corpus):
    bridge, _ = tiny_neox
    train, held_out, stats = corpus
    result = search(
        bridge,
        train,
        Target.bigram(stats),
        ("neuron", "head"),
        _quick(max_steps=60),
        eval_windows=held_out,
        show_progress=False,
    )
    history = result.history
    assert history["target_loss"].iloc[-5:].mean() < history["target_loss"].iloc[:5].mean()
    assert history["soft_density"].iloc[-1] < history["soft_density"].iloc[0]
    assert history["temperature"].iloc[-1] == pytest.approx(result.config.temperature_growth ** len(history))
    m = result.metrics
    assert m["metrics_on"] == "eval" and -1 <= m["bigram_r"] <= 1
    assert 0 <= m["density"] <= 1 and m["n_params"] == result.subnetwork.n_params()
    # Metrics come from the binary subnetwork that is returned, not from the soft mask.
    assert m["bigram_r"] == pytest.approx(bigram_correlation(bridge, stats, held_out, result.subnetwork))
    assert not any(p.grad is not None for p in bridge.parameters())
    assert all(p.requires_grad for p in bridge.parameters())


def test_binary_metric_is_the_subnetworks_loss(tiny_gpt2, corpus):
    bridge, _ = tiny_gpt2
    train, held_out, stats = corpus
    target = Target.bigram(stats)
    result = search(bridge, train, target, "neuron", _quick(max_steps=10), eval_windows=held_out, show_progress=False)
    tokens = torch.as_tensor(held_out, dtype=torch.long)  # 2 equal batches of 8
    with torch.no_grad(), result.subnetwork.applied(bridge):
        expected = float(target(bridge(tokens), tokens))
    assert result.metrics["target_loss"] == pytest.approx(expected, rel=1e-5)


def test_resume_gives_the_uninterrupted_result(tiny_neox, corpus, tmp_path):
    bridge, _ = tiny_neox
    train, _, stats = corpus
    config = _quick(max_steps=20, checkpoint_every=10, parameterization="hard_concrete", seed=3)
    target = Target.bigram(stats)
    straight = search(bridge, train, target, ("neuron", "head"), config, tmp_path / "straight", show_progress=False)

    def interrupt(step, row):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search(
            bridge,
            train,
            target,
            ("neuron", "head"),
            config,
            tmp_path / "resumed",
            show_progress=False,
            callback=interrupt,
        )
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    resumed = search(bridge, train, target, ("neuron", "head"), config, tmp_path / "resumed", show_progress=False)
    for key in straight.subnetwork.masks:
        assert torch.equal(straight.mask_set.logit(key), resumed.mask_set.logit(key))
        assert torch.equal(straight.subnetwork.masks[key], resumed.subnetwork.masks[key])
    pd.testing.assert_frame_equal(straight.history, resumed.history)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()

    calls = []
    again = search(
        bridge,
        train,
        target,
        ("neuron", "head"),
        config,
        tmp_path / "resumed",
        show_progress=False,
        callback=lambda step, row: calls.append(step),
    )
    assert calls == [] and again.metrics["steps"] == resumed.metrics["steps"]
    with pytest.raises(SearchError, match="other settings"):
        search(bridge, train, target, ("neuron", "head"), _quick(lam=5.0), tmp_path / "resumed", show_progress=False)
    assert Subnetwork.load(tmp_path / "resumed").metadata["config"]["seed"] == 3


def test_nan_loss_raises_and_keeps_the_checkpoint(tiny_neox, corpus, tmp_path):
    bridge, _ = tiny_neox
    train, _, _ = corpus

    def exploding(logits, tokens):
        return logits.float().mean() * (math.nan if exploding.calls >= 12 else 1.0)

    def count(step, row):
        exploding.calls = step

    exploding.calls = 0
    with pytest.raises(SearchError, match="nan at step 13"):
        search(
            bridge,
            train,
            Target.custom(exploding),
            "head",
            _quick(checkpoint_every=5),
            tmp_path,
            show_progress=False,
            callback=count,
        )
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 12  # the last good step, not only the last periodic checkpoint (10)
    assert all(p.requires_grad for p in bridge.parameters())


def test_other_targets_and_exact_size(tiny_gpt2, corpus):
    bridge, tokenizer = tiny_gpt2
    train, _, _ = corpus
    full = search(
        bridge,
        train,
        Target.full_model(len(tokenizer)),
        ("neuron", "head"),
        _quick(max_steps=8, lam=0.0),
        show_progress=False,
    )
    assert full.history["target_loss"].notna().all() and full.metrics["metrics_on"] == "train"
    top = search(
        bridge,
        train,
        Target.next_token(len(tokenizer)),
        "weight",
        _quick(max_steps=3, keep_top_k=100),
        show_progress=False,
    )
    assert top.subnetwork.n_kept == 100


def test_stopping_rule_stops_a_decided_mask(tiny_neox, corpus):
    bridge, _ = tiny_neox
    train, _, stats = corpus
    # A huge penalty drives every entry below 0.1 quickly: nothing undecided -> stop (the target
    # loss rises as the masks go off, which the settling test counts as settled).
    config = _quick(lam=1000.0, max_steps=400, settle_window=3)
    result = search(bridge, train, Target.bigram(stats), ("neuron", "head"), config, show_progress=False)
    assert result.metrics["stop_reason"] == "converged" and result.metrics["steps"] < 400
    assert result.subnetwork.n_kept == 0
    assert result.history["settled"].iloc[-1]


def test_masks_decided_before_the_loss_settled_are_not_converged(tiny_neox, corpus):
    """Masks started at sigmoid(3) = 0.95 are 'decided' by the first steps of a growing
    temperature, before anything was learned: the run stops with its own reason."""
    bridge, _ = tiny_neox
    train, _, stats = corpus
    config = _quick(lam=1.0, max_steps=60, init=3.0, settle_window=10)
    result = search(bridge, train, Target.bigram(stats), "weight", config, show_progress=False)
    assert result.metrics["stop_reason"] == "hardened_unsettled" and not result.metrics["converged"]
    assert result.metrics["steps"] < 20 and not result.history["settled"].any()


def test_after_settle_holds_the_temperature_until_the_loss_settles(tiny_neox, corpus):
    bridge, _ = tiny_neox
    train, _, stats = corpus
    config = _quick(lam=1.0, max_steps=40, temperature_rule="after_settle", settle_window=5, temperature_growth=1.1)
    result = search(bridge, train, Target.bigram(stats), ("neuron", "head"), config, show_progress=False)
    history = result.history
    before = history[~history["settled"]]
    assert len(before) >= 9 and (before["temperature"] == 1.0).all()  # T stays while the loss moves (2 windows - 1)
    if history["settled"].sum() > 1:  # then it grows by the factor every step after the one that settled
        after = history[history["settled"]]["temperature"].to_numpy()
        assert after[0] == 1.0 and after[1] == pytest.approx(1.1) and (after[1:] > after[:-1]).all()


def test_loss_settled_window_test():
    from bigram_circuits.search import loss_settled

    assert not loss_settled([5.0] * 9, window=5, tolerance=0.01)  # too short
    assert loss_settled([5.0] * 10, window=5, tolerance=0.01)  # flat
    assert loss_settled([5.0] * 5 + [6.0] * 5, window=5, tolerance=0.01)  # rising
    assert not loss_settled([5.0] * 5 + [4.0] * 5, window=5, tolerance=0.01)  # still falling by 20%


def test_named_schedules_and_recompute_setting(tiny_neox):
    from bigram_circuits.search import SCHEDULES, SearchState, _run_identity

    assert SearchConfig.named("paper") == SearchConfig.paper()
    warm = SearchConfig.named("warm_settle", lam=3.0)
    assert warm.init == 2.0 and warm.temperature_rule == "after_settle" and warm.lam == 3.0
    assert set(SCHEDULES) >= {"default", "fast", "paper", "settle", "warm_settle", "slow"}
    assert SearchConfig.named("default") == SearchConfig()  # the defaults: slow's temperature
    assert SearchConfig().temperature_growth == SearchConfig.named("slow").temperature_growth == 1.01
    fast = SearchConfig.named("fast")  # the defaults before the schedule comparison
    assert (fast.temperature_growth, fast.max_steps) == (1.02, 2000)
    with pytest.raises(SearchError, match="unknown schedule"):
        SearchConfig.named("nope")
    with pytest.raises(SearchError, match="recompute_masked_weights"):
        SearchConfig(recompute_masked_weights="sometimes")
    bridge, _ = tiny_neox
    for setting, expected in (("always", True), ("never", False), ("auto", False)):  # a tiny model fits
        config = SearchConfig(recompute_masked_weights=setting)
        state = SearchState.fresh(bridge, config, _run_identity(config, ("weight",), Target.next_token(), "m"))
        assert state.mask_set.recompute is expected
        assert state.optimizer.param_groups[0]["fused"]  # one fused AdamW kernel on CPU


def test_stability_check():
    flat = [3.0] * 300
    assert stability_check(flat)[0]
    late_spike = flat[:-50] + [5.0] + flat[-49:]
    assert not stability_check(late_spike)[0]
    recovered = flat[:100] + [5.0] + flat[101:]
    assert stability_check(recovered)[0]
    never_recovers = flat[:100] + [5.0] + [3.5] * 199
    assert not stability_check(never_recovers)[0]


def test_flush_denormals_zeroes_subnormals_inside_the_block_only():
    tiny = torch.tensor([1e-40])  # subnormal in float32
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    with flush_denormals():
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() > 0.0  # IEEE again after the block


def test_stability_check_reads_points_of_the_papers_tokens():
    """At 4 x 32 tokens a step's loss has batch noise (sd ~0.14 nats) that the paper's +0.25
    threshold calls a spike; means over 32 steps (the paper's 32 x 128 tokens) do not, while a
    real late rise still fails."""
    assert steps_per_check_point(32, 128) == 1 and steps_per_check_point(4, 32) == 32
    rng = np.random.default_rng(0)
    noisy = list(5.5 + 0.14 * rng.standard_normal(2000))
    assert not stability_check(noisy)[0]  # per step: noise reads as spikes
    stable, reason = stability_check(noisy, steps_per_point=32)
    assert stable and "points of 32 steps" in reason
    rise = noisy[:-320] + [x + 1.0 for x in noisy[-320:]]
    stable, reason = stability_check(rise, steps_per_point=32)
    assert not stable and "step " in reason


def test_choose_subnetwork_picks_sparsest_within_tolerance():
    table = pd.DataFrame(
        {
            "lambda": [0.0, 1.0, 10.0, 100.0],
            "n_params": [1000, 500, 100, 10],
            "bigram_r": [0.96, 0.95, 0.93, 0.80],
        }
    )
    assert choose_subnetwork(table)["lambda"] == 10.0
    assert choose_subnetwork(table, tolerance=0.015)["lambda"] == 1.0
    assert choose_subnetwork(table, tolerance=0.005)["lambda"] == 0.0


def test_sweep_table_and_csv(tiny_neox, corpus, tmp_path):
    bridge, _ = tiny_neox
    train, held_out, stats = corpus
    table = sweep(
        bridge,
        train,
        Target.bigram(stats),
        [0.0, 10.0],
        "neuron",
        _quick(max_steps=15),
        tmp_path,
        eval_windows=held_out,
        show_progress=False,
    )
    assert list(table["lambda"]) == [0.0, 10.0]
    assert table["chosen"].sum() == 1
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "lambda_10" / "masks.safetensors").exists()
    assert np.isfinite(table["bigram_r"]).all()
    assert table.loc[1, "n_params"] <= table.loc[0, "n_params"]


def test_bad_config_is_refused():
    with pytest.raises(SearchError):
        SearchConfig(lam=-1.0)
    with pytest.raises(SearchError):
        SearchConfig(undecided_low=0.9, undecided_high=0.1)


# --------------------------------------------------------------------------- state and step


def _fresh_state(bridge, config: SearchConfig, grans=("neuron", "head")) -> SearchState:
    run = {"config": config.to_dict(), "granularities": list(grans), "target": "bigram", "model_id": model_id(bridge)}
    return SearchState.fresh(bridge, config, run)


def _logits(state: SearchState) -> dict[str, torch.Tensor]:
    return {key: state.mask_set.logit(key).detach().clone() for key in state.mask_set.keys}


def test_search_step_changes_the_logits_and_returns_a_finite_loss(tiny_neox, corpus):
    bridge, _ = tiny_neox
    train, _, stats = corpus
    config = _quick()
    with frozen_parameters(bridge):
        state = _fresh_state(bridge, config)
        before = _logits(state)
        losses = search_step(state, bridge, torch.as_tensor(train[:8], dtype=torch.long), Target.bigram(stats), config)
    assert math.isfinite(losses.loss) and math.isfinite(losses.target_loss)
    assert losses.loss == pytest.approx(losses.target_loss + config.lam * losses.penalty, rel=1e-5)
    assert state.step == 1 and state.mask_set.temperature == pytest.approx(config.temperature_growth)
    assert any(not torch.equal(before[key], logit) for key, logit in _logits(state).items())
    assert not any(p.grad is not None for p in bridge.parameters())
    assert state.history == []  # the step records nothing; the driver keeps the history


def test_search_step_refuses_a_non_finite_loss_before_stepping(tiny_neox, corpus):
    bridge, _ = tiny_neox
    train, _, _stats = corpus
    config = _quick()
    with frozen_parameters(bridge):
        state = _fresh_state(bridge, config, grans=("head",))
        before = _logits(state)
        with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 1 \(lambda 1\)"):
            search_step(
                state,
                bridge,
                torch.as_tensor(train[:8], dtype=torch.long),
                Target.custom(lambda logits, tokens: logits.float().mean() * math.nan),
                config,
            )
    _assert_untouched(state, before, config)


class _OverflowAtScale(torch.autograd.Function):
    """Identity forward; the backward overflows float32 while the incoming gradient is at least
    ``limit`` (a loss whose gradients overflow unless the loss is scaled down)."""

    @staticmethod
    def forward(ctx, x, limit):
        ctx.limit = limit
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.where(grad.abs().max() * grad.numel() >= ctx.limit, math.inf, 1.0), None


def _assert_untouched(state, before: dict, config) -> None:
    """A refused step leaves the search where it was: step, temperature and every mask logit."""
    assert state.step == 0 and state.mask_set.temperature == config.temperature_init
    assert all(torch.equal(before[key], logit) for key, logit in _logits(state).items())


def _overflowing_target(limit: float) -> Target:
    return Target.custom(lambda logits, tokens: _OverflowAtScale.apply(logits.float(), limit).mean())


def test_search_step_redoes_an_overflowing_step_at_a_smaller_loss_scale(tiny_neox, corpus, tmp_path):
    bridge, _ = tiny_neox
    train, _, _stats = corpus
    config = _quick()
    tokens = torch.as_tensor(train[:8], dtype=torch.long)
    with frozen_parameters(bridge):
        state = _fresh_state(bridge, config, grans=("head",))
        before = _logits(state)
        losses = search_step(state, bridge, tokens, _overflowing_target(limit=0.5), config)
        assert math.isfinite(losses.loss) and state.step == 1
        assert state.grad_scale == GRADIENT_BACKOFF  # one redo, and the scale is kept
        assert any(not torch.equal(before[key], logit) for key, logit in _logits(state).items())
        assert all(torch.isfinite(logit).all() for logit in _logits(state).values())
        search_step(state, bridge, tokens, _overflowing_target(limit=0.5), config)
        assert state.grad_scale == GRADIENT_BACKOFF  # no second backoff at the kept scale
        state.save(tmp_path / "checkpoint.pt")
        again = _fresh_state(bridge, config, grans=("head",))
        again.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
        assert again.grad_scale == GRADIENT_BACKOFF  # resumed at the same scale


def test_search_step_raises_when_every_loss_scale_overflows(tiny_neox, corpus):
    bridge, _ = tiny_neox
    train, _, _stats = corpus
    config = _quick()
    with frozen_parameters(bridge):
        state = _fresh_state(bridge, config, grans=("head",))
        before = _logits(state)
        with pytest.raises(GradientOverflow, match=r"overflowed float32 at step 1 \(lambda 1\)"):
            search_step(state, bridge, torch.as_tensor(train[:8], dtype=torch.long), _overflowing_target(0.0), config)
    assert isinstance(GradientOverflow(1, 1.0, 1.0), NonFiniteLoss)  # the driver's checkpoint-and-stop path
    _assert_untouched(state, before, config)


def test_state_save_load_round_trip_continues_identically(tiny_neox, corpus, tmp_path):
    bridge, _ = tiny_neox
    train, _, stats = corpus
    config = _quick(parameterization="hard_concrete", seed=4)  # noise: the generator state must survive too
    target = Target.bigram(stats)
    batches = [torch.as_tensor(train[i * 8 : (i + 1) * 8], dtype=torch.long) for i in range(5)]
    with frozen_parameters(bridge):
        state = _fresh_state(bridge, config)
        for batch in batches[:3]:
            losses = search_step(state, bridge, batch, target, config)
            state.history.append({"step": state.step, "loss": losses.loss})
        state.save(tmp_path / CHECKPOINT_FILE)
        saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
        assert set(saved) == CHECKPOINT_KEYS and saved["step"] == 3 and saved["target"] == "bigram"
        loaded = SearchState.load(
            tmp_path / CHECKPOINT_FILE, bridge, config, ("neuron", "head"), target, model_id(bridge)
        )
        assert loaded.step == state.step and loaded.history == state.history and loaded.attempt == 0
        assert loaded.mask_set.temperature == state.mask_set.temperature
        assert torch.equal(loaded.generator_state(), state.generator_state())
        assert all(torch.equal(_logits(state)[key], logit) for key, logit in _logits(loaded).items())
        assert loaded.clock.wall() >= saved["elapsed_s"]
        # Continued on the same batches, the loaded state and the original stay equal bit for bit.
        for batch in batches[3:]:
            assert search_step(state, bridge, batch, target, config) == search_step(
                loaded, bridge, batch, target, config
            )
        assert all(torch.equal(_logits(state)[key], logit) for key, logit in _logits(loaded).items())
        with pytest.raises(SearchError, match="belongs to another run"):
            SearchState.load(
                tmp_path / CHECKPOINT_FILE, bridge, _quick(lam=2.0), ("neuron", "head"), target, model_id(bridge)
            )


def test_frozen_parameters_restores_the_previous_flags():
    module = torch.nn.Linear(2, 2)
    module.bias.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen_parameters(module) as frozen:
        assert frozen == [module.weight] and not any(p.requires_grad for p in module.parameters())
        raise RuntimeError
    assert module.weight.requires_grad and not module.bias.requires_grad
