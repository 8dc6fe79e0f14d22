"""The training loop: loss falls, history is complete, data order is seeded, a blow-up stops cleanly."""

import math

import numpy as np
import pytest

from lora_np.lora import apply_lora
from lora_np.model import GPT, GPTConfig
from lora_np.train import TrainConfig, evaluate, train


def tiny_gpt(seed=0):
    return GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=16, seed=seed))


def pattern(n=2000, period=5):
    return np.arange(n) % period  # a deterministic cycle 0 1 2 3 4 0 1 ...: easy to learn


def test_train_lowers_loss_and_records_history():
    ids = pattern()
    model = tiny_gpt()
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=1e-2, eval_every=20, eval_batches=2, progress=False)
    h = train(model, (ids[:1600], ids[1600:]), cfg)
    assert h.steps == [20, 40, 60]
    assert len(h.step_loss) == 60 and len(h.val_loss) == len(h.train_loss) == len(h.seconds) == 3
    assert h.val_loss[-1] < 0.5 * math.log(5)  # far below chance
    assert all(t > 0 for t in h.tokens_per_s) and h.stopped == ""


def test_same_seed_same_run_and_evaluate_is_pure():
    ids = np.random.default_rng(0).integers(0, 5, 3000)
    cfg = TrainConfig(max_steps=5, batch_size=4, eval_every=5, eval_batches=2, progress=False)
    h1 = train(tiny_gpt(), (ids[:2500], ids[2500:]), cfg)
    h2 = train(tiny_gpt(), (ids[:2500], ids[2500:]), cfg)
    assert h1.step_loss == h2.step_loss
    m = tiny_gpt()
    before = m.state_dict()
    assert evaluate(m, ids, 8, 4, 2) == evaluate(m, ids, 8, 4, 2)
    assert all(np.array_equal(before[k], v) for k, v in m.state_dict().items())
    assert m.training  # evaluate restores training mode


def test_train_updates_only_trainable_parameters():
    ids = pattern()
    model = apply_lora(tiny_gpt(), "q,v", r=2, alpha=4)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, (ids[:1600], ids[1600:]), TrainConfig(max_steps=3, batch_size=4, eval_every=3, progress=False))
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert np.array_equal(p.data, frozen[n]), n


def test_non_finite_loss_stops_and_restores_last_good_state(capsys):
    ids = pattern()
    model = tiny_gpt()
    cfg = TrainConfig(max_steps=30, batch_size=4, eval_every=5, eval_batches=1, progress=False)
    seen = {}

    def poison(step, m):  # after the evaluation at step 10, break the weights: the next loss is nan
        seen[step] = {n: p.data.copy() for n, p in m.named_parameters()}
        if step == 10:
            m.lm_head.weight.data[...] = np.nan

    h = train(model, (ids[:1600], ids[1600:]), cfg, on_eval=poison)
    assert "non-finite loss" in h.stopped and "step 11" in h.stopped
    assert "training stopped" in capsys.readouterr().out
    good = seen[10]
    good_head = good["lm_head.weight"]
    assert np.isfinite(model.lm_head.weight.data).all()
    # restored to the state taken at the last good evaluation (before on_eval poisoned it)
    assert np.array_equal(model.lm_head.weight.data, good_head)
    assert h.steps[-1] == 10


def test_bad_configs_and_no_trainable_parameters():
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    model = tiny_gpt()
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, (pattern(), pattern(200)), TrainConfig(max_steps=1, progress=False))
