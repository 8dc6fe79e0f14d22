"""The training loop: loss falls, history is complete, data order is seeded, a blow-up stops cleanly."""

import dataclasses
import math

import numpy as np
import pytest
from helpers import assert_untouched, snapshot, tiny_gpt

from lora_np.lora import LoRAConfig, apply_lora
from lora_np.train import TrainConfig, evaluate, train


def five_token_gpt(seed=0):
    return tiny_gpt(seed, vocab_size=5, n_layer=1, n_embd=16)


def pattern(n=2000, period=5):
    return np.arange(n) % period  # a deterministic cycle 0 1 2 3 4 0 1 ...: easy to learn


def test_train_lowers_loss_and_records_history():
    ids = pattern()
    model = five_token_gpt()
    cfg = TrainConfig(max_steps=60, batch_size=8, lr=1e-2, eval_every=20, eval_batches=2)
    h = train(model, (ids[:1600], ids[1600:]), cfg, progress=False)
    assert h.steps == [20, 40, 60]
    assert len(h.step_loss) == 60 and len(h.val_loss) == len(h.train_loss) == len(h.seconds) == 3
    assert h.val_loss[-1] < 0.5 * math.log(5)  # far below chance
    assert all(t > 0 for t in h.tokens_per_s) and h.stopped == ""


def test_same_seed_same_run_and_evaluate_is_pure():
    ids = np.random.default_rng(0).integers(0, 5, 3000)
    cfg = TrainConfig(max_steps=5, batch_size=4, eval_every=5, eval_batches=2)
    h1 = train(five_token_gpt(), (ids[:2500], ids[2500:]), cfg, progress=False)
    h2 = train(five_token_gpt(), (ids[:2500], ids[2500:]), cfg, progress=False)
    assert h1.step_loss == h2.step_loss
    m = five_token_gpt()
    before = m.state_dict()
    assert evaluate(m, ids, 8, 4, 2) == evaluate(m, ids, 8, 4, 2)
    assert all(np.array_equal(before[k], v) for k, v in m.state_dict().items())
    assert m.training  # evaluate restores training mode


def test_train_updates_only_trainable_parameters():
    ids = pattern()
    model = apply_lora(five_token_gpt(), LoRAConfig(targets="q,v", r=2, alpha=4))
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, (ids[:1600], ids[1600:]), TrainConfig(max_steps=3, batch_size=4, eval_every=3), progress=False)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert np.array_equal(p.data, frozen[n]), n


def test_non_finite_loss_stops_and_restores_last_good_state(capsys):
    ids = pattern()
    model = five_token_gpt()
    cfg = TrainConfig(max_steps=30, batch_size=4, eval_every=5, eval_batches=1)
    seen = {}

    def poison(step, m):  # after the evaluation at step 10, break the weights: the next loss is nan
        seen[step] = {n: p.data.copy() for n, p in m.named_parameters()}
        if step == 10:
            m.lm_head.weight.data[...] = np.nan

    h = train(model, (ids[:1600], ids[1600:]), cfg, on_eval=poison, progress=False)
    assert "non-finite loss" in h.stopped and "step 11" in h.stopped
    assert "training stopped" in capsys.readouterr().out
    good = seen[10]
    good_head = good["lm_head.weight"]
    assert np.isfinite(model.lm_head.weight.data).all()
    # restored to the state taken at the last good evaluation (before on_eval poisoned it)
    assert np.array_equal(model.lm_head.weight.data, good_head)
    assert h.steps[-1] == 10


# Bad values of every TrainConfig field: ints that are not bools, finite non-negative floats, lr > 0, min_lr <= lr.
CONFIG_ERRORS = [
    ("max_steps", 0), ("max_steps", -1), ("max_steps", 2.0), ("max_steps", True), ("max_steps", "10"),
    ("batch_size", 0), ("batch_size", False), ("eval_every", 0), ("eval_every", 1.5), ("eval_batches", 0),
    ("warmup_steps", -1), ("warmup_steps", True), ("seed", -1), ("seed", None), ("seed", True),
    ("block_size", 0), ("block_size", True), ("block_size", 8.0),
    ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf), ("lr", True), ("lr", "3e-3"),
    ("min_lr", -1e-4), ("min_lr", math.nan), ("min_lr", 1.0),
    ("weight_decay", -0.1), ("weight_decay", math.inf), ("grad_clip", math.nan), ("grad_clip", -1.0),
    ("grad_clip", False),
]


@pytest.mark.parametrize("field, value", CONFIG_ERRORS, ids=[f"{f}={v!r}" for f, v in CONFIG_ERRORS])
def test_train_config_refuses_every_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig(\.{field} |: .*{field})"):
        TrainConfig(**{field: value})


def test_progress_is_an_argument_of_train_not_of_the_config(capsys):
    assert "progress" not in {f.name for f in dataclasses.fields(TrainConfig)}  # not part of what a run computes
    with pytest.raises(TypeError):
        TrainConfig(progress=False)
    ids = pattern()
    cfg = TrainConfig(max_steps=2, batch_size=2, eval_every=2, eval_batches=1)
    quiet = train(five_token_gpt(), (ids[:1600], ids[1600:]), cfg, progress=False)
    assert capsys.readouterr().err == ""
    loud = train(five_token_gpt(), (ids[:1600], ids[1600:]), cfg, progress=True)
    assert "train" in capsys.readouterr().err  # the tqdm bar
    assert quiet.step_loss == loud.step_loss


def test_no_trainable_parameters_is_an_error_that_changes_nothing():
    model = five_token_gpt()
    for p in model.parameters():
        p.requires_grad = False
    before = snapshot(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, (pattern(), pattern(200)), TrainConfig(max_steps=1), progress=False)
    assert_untouched(before, model)
