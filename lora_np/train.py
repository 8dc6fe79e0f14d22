"""The training loop: AdamW on the trainable parameters, cosine schedule, periodic validation.

``train`` knows nothing about GPT or LoRA: it needs a model whose ``model(x, y)`` returns ``(logits, loss)`` and
whose ``trainable_parameters()`` are what to update. Full fine-tuning and LoRA differ only in which parameters
have ``requires_grad`` set, so one loop serves both and their numbers are comparable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import checks
from .data import BatchSampler, iter_eval_batches
from .nn import Module
from .optim import AdamW, clip_grad_norm, cosine_lr

if TYPE_CHECKING:  # only for the annotation: training alone never imports MPI
    from .distributed import DataParallel


@dataclass
class TrainConfig:
    max_steps: int = 500  # optimizer steps
    batch_size: int = 16  # sequences per step
    block_size: int | None = None  # tokens per sequence; None: the model's config.block_size
    lr: float = 3e-3  # peak learning rate (LoRA tolerates larger ones than full fine-tuning)
    min_lr: float = 3e-4  # cosine floor
    warmup_steps: int = 20  # linear warmup (Adam's early steps are noisy)
    weight_decay: float = 0.0  # AdamW's decoupled decay
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    eval_every: int = 50  # validate every N steps (and at the last step)
    eval_batches: int = 8  # validation batches, the same windows every time
    seed: int = 0  # data order: equal seeds give equal batches, so runs compare fairly

    def __post_init__(self) -> None:
        checks.fields(self, checks.positive_int, "max_steps", "batch_size", "eval_every", "eval_batches")
        checks.fields(self, checks.nonnegative_int, "warmup_steps", "seed")
        self.block_size = checks.optional(checks.positive_int, self.block_size, "TrainConfig.block_size")
        checks.fields(self, checks.nonnegative_number, "lr", "min_lr", "weight_decay", "grad_clip")
        if self.lr <= 0 or self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")


@dataclass
class History:
    steps: list[int] = field(default_factory=list)  # evaluation steps
    train_loss: list[float] = field(default_factory=list)  # mean training loss since the previous evaluation
    val_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time since the start of training
    tokens_per_s: list[float] = field(default_factory=list)  # training throughput since the previous evaluation
    step_loss: list[float] = field(default_factory=list)  # every step's training loss
    stopped: str = ""  # why training ended early ("" when it ran to max_steps)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan


Targets = Callable[[Any, Any], Any]  # (inputs, next-token ids) -> what model(x, ·) is trained to predict


def evaluate(model: Module, ids: Any, block_size: int, batch_size: int, max_batches: int,
             targets: Targets | None = None) -> float:
    """Mean loss over fixed validation windows, in eval mode and without a graph: the next-token loss, or with
    ``targets`` the loss against ``targets(x, y)`` (as ``train``)."""
    total, count = 0.0, 0
    with model.inference():
        for x, y in iter_eval_batches(ids, block_size, batch_size, max_batches):
            _, loss = model(x, y if targets is None else targets(x, y))
            total, count = total + loss.item() * len(x), count + len(x)
    return total / count


def train(model: Module, data: tuple[Any, Any], config: TrainConfig, progress: bool = True,
          on_eval: Callable[[int, Module], None] | None = None, targets: Targets | None = None,
          data_parallel: DataParallel | None = None) -> History:
    """Train ``model`` on ``data = (train_ids, val_ids)`` and return the loss history; ``progress`` shows a tqdm
    bar (how a run is watched, not what it computes, so it is not part of the config).

    A non-finite loss or gradient stops training with a message in ``history.stopped``, and the trainable
    parameters are restored to the last evaluated good state. ``on_eval(step, model)`` is called after each
    evaluation with finite losses (use it to write a checkpoint: the last one written is the last good one).

    ``targets(x, y)``, if given, replaces the next-token ids ``y`` of every batch (training and validation) by what
    the model should predict instead: distillation passes a teacher's probabilities (``model(x, probs)`` is then
    the soft-target cross-entropy). The batches, the schedule and everything else stay the same.

    ``data_parallel`` (``distributed.from_environment()`` under ``mpiexec``): this process is one rank of several.
    Every rank draws the same global batch and trains on its rows of it; the trainable parameters' gradients (and
    the loss) are averaged over the ranks before clipping, so every rank takes the same step and the history is
    the one-process run's, to float32 rounding. Rank 0 alone evaluates (the others receive its loss), shows the
    bar and calls ``on_eval``. The weights are checked to agree across ranks at the start and at the end.
    """
    train_ids, val_ids = data
    T = config.block_size or model.config.block_size
    params = model.trainable_parameters()
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    dp = data_parallel
    if dp is not None:
        dp.rows(config.batch_size)  # at least one row for every rank
        dp.check_same_weights(model, "at the start of training")
    root = dp is None or dp.is_root
    opt = AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = BatchSampler(train_ids, T, config.batch_size, config.seed)
    history = History()
    warmup = min(config.warmup_steps, config.max_steps)  # a run shorter than the warmup just warms up
    good = [p.data.copy() for p in params]  # the last good state, restored if the loss blows up
    model.train()
    start = last_t = time.perf_counter()
    since_eval: list[float] = []
    bar = tqdm(range(1, config.max_steps + 1), disable=not (progress and root), desc="train", leave=False)
    for step in bar:
        x, y = sampler.sample()  # the global batch: the same on every rank (the same seed)
        if dp is not None:
            x, y = dp.shard(x, y)  # this rank's rows of it
        opt.lr = cosine_lr(step, max_lr=config.lr, max_steps=config.max_steps, warmup_steps=warmup,
                           min_lr=config.min_lr)
        opt.zero_grad()
        _, loss = model(x, y if targets is None else targets(x, y))
        loss.backward()  # before the loss is checked: every rank must reach the all-reduce, whatever its loss
        loss_value = loss.item()
        if dp is not None:  # every rank now holds the global batch's gradients and loss (a non-finite one too)
            loss_value = dp.average_gradients(params, loss_value, share=len(x) / config.batch_size)
        if not math.isfinite(loss_value):
            return _stop(history, params, good, f"non-finite loss {loss_value} at step {step}", bar, root)
        norm = clip_grad_norm(params, config.grad_clip) if config.grad_clip > 0 else 0.0
        if not math.isfinite(norm):
            return _stop(history, params, good, f"non-finite gradient norm at step {step}", bar, root)
        opt.step()
        since_eval.append(loss_value)
        history.step_loss.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % config.eval_every == 0 or step == config.max_steps:
            now = time.perf_counter()
            val = evaluate(model, val_ids, T, config.batch_size, config.eval_batches, targets) if root else math.nan
            if dp is not None:
                val = dp.broadcast_value(val)  # rank 0's: every rank must stop together if it is not finite
            history.steps.append(step)
            history.train_loss.append(sum(since_eval) / len(since_eval))
            history.val_loss.append(val)
            history.seconds.append(now - start)
            history.tokens_per_s.append(len(since_eval) * config.batch_size * T / (now - last_t))
            since_eval = []
            if not math.isfinite(val):
                return _stop(history, params, good, f"non-finite validation loss at step {step}", bar, root)
            good = [p.data.copy() for p in params]
            if on_eval is not None and root:
                on_eval(step, model)
            last_t = time.perf_counter()  # evaluation time does not count against throughput
    bar.close()
    if dp is not None:
        dp.check_same_weights(model, "after training")
    return history


def _stop(history: History, params: list, good: list, why: str, bar: Any, say: bool = True) -> History:
    bar.close()
    for p, g in zip(params, good):
        p.data[...] = g
        p.grad = None
    history.stopped = f"{why}; restored the last good parameters"
    if say:  # with several ranks, rank 0 alone
        print(f"training stopped: {history.stopped}")
    return history


__all__ = ["History", "TrainConfig", "evaluate", "train"]
