"""LoRA on a real pretrained transformer: all-MiniLM-L6-v2 learns the genre of a Bible verse.

The task: a verse of the King James Bible -> its genre (law, history, wisdom, prophets, gospels, letters,
apocalypse), with train, validation and test verses from disjoint chapters (``data.bible_genre_splits``) and the
same number of verses of every genre in each split, so chance is 1/7. The model: MiniLM's sentence embedding (mean
pooling, L2 normalisation, as its model card) and a linear classification head on it.

The methods, each from the same pretrained weights, with the same batches in the same order and the same number of
steps, each with its own small learning-rate grid, chosen on the validation split and reported on the test split:

    probe        the head alone (a linear probe: the encoder is frozen)
    lora-qv-r1   LoRA on q and v of every block at r = 1, 4, 16 (the paper's setting), plus the head
    lora-all-r8  LoRA on all six linears of every block at r = 8, plus the head
    full         every weight of the encoder, plus the head

The head is its own module (``GenreClassifier.head``) next to the encoder, not one of the encoder's
``modules_to_save`` (which name GPT modules): LoRA is applied to the encoder only, so the head trains in every
method. The head has its own optimizer and learning rate: a unit-length embedding needs a far larger step than a
pretrained weight tolerates, and our optimizers have one learning rate each (no parameter groups). The probe's grid
is over the head's learning rate; the rate it chooses then trains the head in every other method, whose grid is
over the learning rate of what it trains in the encoder.

Speed (numbers in the README): each batch is cut to its longest verse (padding columns change nothing, the mask
hides them), evaluation goes through the verses sorted by length (same trick, less padding), and the maximum length
(96 word pieces) truncates a handful of verses in 25,000. Experiments compute and return; the command line
(``python -m lora_np minilm``) writes ``results/minilm.json`` and the figure.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from .. import backend, memory
from .. import functional as F
from ..bert import Bert, load_minilm
from ..checkpoint import encode_adapter
from ..data import GENRES, LabelledTexts, bible_genre_splits
from ..engine import Tensor
from ..lora import LoRAConfig, count_parameters, prepare_finetuning
from ..nn import Linear, Module
from ..optim import AdamW, clip_grad_norm, cosine_lr
from .runs import machine_info, to_json


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _lr_grid(v: Any) -> bool:
    return isinstance(v, tuple) and len(v) >= 1 and len(set(v)) == len(v) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)


@dataclass(frozen=True)
class MiniLMConfig:
    """Everything that determines the lab's numbers. Validated when made.

    The full size is chosen so that the whole lab (6 methods x 3 learning rates = 18 training runs, their
    evaluations and one measured step per method) takes about 25 minutes on 2 CPU cores; the README says how that
    was estimated. ``quick()`` is the same code path on a handful of verses, in seconds.
    """

    steps: int = 75  # optimizer steps of every run
    batch_size: int = 16  # verses per step (steps x batch_size = 1,200 verses: one pass, no verse seen twice)
    warmup_steps: int = 8  # linear warmup, then cosine decay to a tenth of the peak
    train_per_class: int = 180  # training verses of each genre (7 x 180 = 1,260 >= steps x batch_size)
    val_per_class: int = 30  # validation verses of each genre: the learning rates are chosen on these
    test_per_class: int = 40  # test verses of each genre (Revelation's test chapters hold 40): reported
    max_length: int = 96  # word pieces per verse, [CLS] and [SEP] included; longer verses are cut
    head_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # the probe's grid; its choice trains every method's head
    lora_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # peak lr of the LoRA factors
    full_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)  # peak lr of every encoder weight in full fine-tuning
    ranks: tuple[int, ...] = (1, 4, 16)  # LoRA on q, v at these ranks
    all_linear_rank: int = 8  # LoRA on q, k, v, o, up, down at this rank
    alpha: float = 16.0  # LoRA's α (scaling α/r), fixed across ranks as the paper (§4.1)
    grad_clip: float = 1.0  # global-norm clipping over everything that trains
    eval_batch_size: int = 64
    seed: int = 0  # the chapter split, the per-genre samples, the batch order and the head's initialisation

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "train_per_class", "val_per_class", "test_per_class",
                     "all_linear_rank", "eval_batch_size"):
            if not _positive_int(getattr(self, name)):
                raise ValueError(f"MiniLMConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or \
                not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"MiniLMConfig.warmup_steps must be an integer in [0, steps={self.steps}], "
                             f"got {self.warmup_steps!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or not 3 <= self.max_length <= 512:
            raise ValueError(f"MiniLMConfig.max_length must be an integer in [3, 512] (MiniLM's positions), "
                             f"got {self.max_length!r}")
        for name in ("head_lrs", "lora_lrs", "full_lrs", "ranks"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, (list, tuple)) else value)
        for name in ("head_lrs", "lora_lrs", "full_lrs"):
            if not _lr_grid(getattr(self, name)):
                raise ValueError(f"MiniLMConfig.{name} must be distinct finite numbers > 0, "
                                 f"got {getattr(self, name)!r}")
        if not self.ranks or len(set(self.ranks)) != len(self.ranks) or not all(
                _positive_int(r) and r <= 384 for r in self.ranks):
            raise ValueError(f"MiniLMConfig.ranks must be distinct integers in [1, 384], got {self.ranks!r}")
        if self.all_linear_rank > 384:
            raise ValueError(f"MiniLMConfig.all_linear_rank must be at most 384, got {self.all_linear_rank}")
        for name in ("alpha", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    value < 0 or (name == "alpha" and value == 0):
                raise ValueError(f"MiniLMConfig.{name} must be a finite number {'> 0' if name == 'alpha' else '>= 0'}"
                                 f", got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"MiniLMConfig.seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def quick(cls, **changes: Any) -> MiniLMConfig:
        """Seconds: a verse or two of each genre per split, one step of four verses, one learning rate per method
        but two for the probe (so that choosing on validation runs too). Same code path as the full run."""
        return cls(**{"steps": 1, "batch_size": 4, "warmup_steps": 0, "train_per_class": 2, "val_per_class": 1,
                      "test_per_class": 1, "eval_batch_size": 8, "head_lrs": (1e-2, 3e-2), "lora_lrs": (1e-3,),
                      "full_lrs": (1e-4,), **changes})


# -- the model -----------------------------------------------------------------------------------------------------


class GenreClassifier(Module):
    """A sentence encoder and a linear head on its pooled embedding: (ids, mask) -> class logits.

    ``forward(batch, labels)`` takes ``batch = (ids, attention_mask)`` and returns ``(logits, loss)``, the
    ``(x, targets) -> (logits, loss)`` shape of our GPT, so that ``memory.measure_step`` measures it as it is.
    """

    def __init__(self, encoder: Bert, n_classes: int, seed: int = 0) -> None:
        self.encoder = encoder
        self.head = Linear(encoder.config.hidden_size, n_classes, gen=backend.rng(seed))  # (C, K), its own module

    def forward(self, batch: tuple[Any, Any], labels: Any = None) -> tuple[Tensor, Tensor | None]:
        ids, mask = batch
        e = self.encoder.sentence_embedding(ids, mask)  # (B, T) -> (B, C), unit rows (the model card's embedding)
        logits = self.head(e)  # (B, C) @ (C, K) -> (B, K)
        return logits, (F.cross_entropy(logits, labels) if labels is not None else None)


@dataclass(frozen=True)
class Method:
    """One way to fine-tune: ``kind`` "probe" (head only), "lora" (``lora`` on the encoder, and the head) or
    "full" (every encoder weight, and the head)."""

    name: str
    kind: str
    lora: LoRAConfig | None = None


def methods(cfg: MiniLMConfig) -> list[Method]:
    """The lab's methods, the probe first (its choice of learning rate trains every other method's head)."""
    qv = [Method(f"lora-qv-r{r}", "lora", LoRAConfig(r=r, alpha=cfg.alpha, targets="q,v", seed=cfg.seed))
          for r in cfg.ranks]
    r = cfg.all_linear_rank
    every = Method(f"lora-all-r{r}", "lora", LoRAConfig(r=r, alpha=cfg.alpha, targets="all-linear", seed=cfg.seed))
    return [Method("probe", "probe"), *qv, every, Method("full", "full")]


def build(base: Bert, method: Method, n_classes: int, seed: int) -> GenreClassifier:
    """A fresh classifier for ``method`` on a copy of ``base`` (never changed): LoRA applied to the encoder only,
    or every encoder weight trainable (full), or none (probe). The head always trains."""
    tokenizer, base.tokenizer = base.tokenizer, None  # the tokenizer is not copied with the weights
    try:
        encoder = copy.deepcopy(base)
    finally:
        base.tokenizer = tokenizer
    if method.kind == "probe":
        for p in encoder.parameters():
            p.requires_grad = False
    else:
        prepare_finetuning(encoder, method.lora)  # LoRA: only A and B; full: every weight
    return GenreClassifier(encoder, n_classes, seed)


class Optimizers:
    """The head's optimizer and the encoder's, stepped together: what ``memory.measure_step`` needs of an
    optimizer (``params``, ``zero_grad``, ``step``, ``state_nbytes``)."""

    def __init__(self, opts: list[AdamW]) -> None:
        self.opts = opts
        self.params = [p for o in opts for p in o.params]

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad()

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def state_nbytes(self) -> int:
        return sum(o.state_nbytes() for o in self.opts)


def make_optimizers(model: GenreClassifier, head_lr: float, encoder_lr: float | None) -> tuple[Optimizers, list[float]]:
    """AdamW for the head and, if the encoder trains, AdamW for its trainable parameters -> (the pair, their peak
    learning rates). No weight decay: short runs from a pretrained model."""
    opts, peaks = [AdamW(model.head.parameters(), lr=head_lr, weight_decay=0.0)], [head_lr]
    encoder_params = model.encoder.trainable_parameters()
    if encoder_params:
        opts.append(AdamW(encoder_params, lr=encoder_lr, weight_decay=0.0))
        peaks.append(encoder_lr)
    return Optimizers(opts), peaks


# -- data ----------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One split, tokenized once: ids and mask (n, max_length), labels (n,)."""

    ids: Any
    mask: Any
    labels: Any

    def batch(self, idx: Any) -> tuple[tuple[Any, Any], Any]:
        """Rows ``idx``, cut to the longest of them: ((ids, mask), labels)."""
        t = int(self.mask[idx].sum(axis=1).max())  # the longest verse of the batch, in word pieces
        return (self.ids[idx, :t], self.mask[idx, :t]), self.labels[idx]

    def __len__(self) -> int:
        return len(self.labels)


def balanced(split: LabelledTexts, per_class: int, gen: Any) -> LabelledTexts:
    """At most ``per_class`` verses of every genre, drawn at random (canonical order kept)."""
    np = backend.np
    keep = [gen.permutation(np.flatnonzero(split.labels == g))[:per_class] for g in range(len(GENRES))]
    idx = sorted(np.concatenate(keep).tolist())
    return LabelledTexts([split.texts[i] for i in idx], split.labels[idx], [split.citations[i] for i in idx])


def load_data(cfg: MiniLMConfig, tokenizer: Any) -> tuple[dict[str, Encoded], dict[str, Any]]:
    """The three splits, balanced and tokenized -> ({"train", "val", "test"}: Encoded, facts about the data)."""
    splits = bible_genre_splits(seed=cfg.seed)
    gen = backend.rng(cfg.seed)
    parts = {"train": balanced(splits.train, cfg.train_per_class, gen),
             "val": balanced(splits.val, cfg.val_per_class, gen),
             "test": balanced(splits.test, cfg.test_per_class, gen)}
    np = backend.np
    encoded, info = {}, {"genres": list(GENRES), "max_length": cfg.max_length}
    for name, part in parts.items():
        ids, mask = tokenizer(part.texts)
        encoded[name] = Encoded(ids, mask, part.labels)
        info[name] = {"verses": len(part), "per_genre": np.bincount(part.labels, minlength=len(GENRES)).tolist(),
                      "truncated": tokenizer.truncated(part.texts),
                      "mean_tokens": float(mask.sum(axis=1).mean())}
    return encoded, info


def batch_order(cfg: MiniLMConfig, n_train: int) -> list[Any]:
    """The training batches of every run (indices into the training split): one seeded shuffle, then another
    when it runs out, so every method sees the same verses in the same order."""
    gen, order, batches = backend.rng(cfg.seed + 1), backend.np.zeros(0, dtype=int), []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = backend.np.concatenate([order, gen.permutation(n_train)])
        batches.append(order[: cfg.batch_size])
        order = order[cfg.batch_size :]
    return batches


# -- training and evaluation ---------------------------------------------------------------------------------------


def accuracy(model: GenreClassifier, data: Encoded, batch_size: int) -> float:
    """Share of ``data`` classified correctly, without a graph. The verses go through sorted by length, each batch
    cut to its longest: the same predictions as padding all to max_length, with less work."""
    np = backend.np
    order = np.argsort(data.mask.sum(axis=1), kind="stable")
    correct = 0
    with model.inference():
        for i in range(0, len(order), batch_size):
            batch, labels = data.batch(order[i : i + batch_size])
            logits, _ = model(batch)
            pred = backend.to_numpy(logits.data).argmax(axis=1)
            correct += int((pred == labels).sum())
    return correct / len(data)


def train_run(model: GenreClassifier, data: Encoded, batches: list[Any], cfg: MiniLMConfig, head_lr: float,
              encoder_lr: float | None, progress: bool = False) -> dict[str, Any]:
    """Train ``model`` in place on ``batches`` -> its history: the loss of every step, the seconds of every
    step, and ``stopped`` (why training ended early, "" if it did not: a non-finite loss or gradient)."""
    opt, peaks = make_optimizers(model, head_lr, encoder_lr)
    warmup = min(cfg.warmup_steps, cfg.steps)
    losses: list[float] = []
    seconds: list[float] = []
    stopped = ""
    model.train()
    for step, idx in enumerate(tqdm(batches, desc="steps", leave=False, disable=not progress), start=1):
        start = time.perf_counter()
        for o, peak in zip(opt.opts, peaks):
            o.lr = cosine_lr(step, max_lr=peak, max_steps=cfg.steps, warmup_steps=warmup, min_lr=0.1 * peak)
        batch, labels = data.batch(idx)
        opt.zero_grad()
        _, loss = model(batch, labels)
        value = loss.item()
        if not math.isfinite(value):
            stopped = f"non-finite loss at step {step}"
            break
        loss.backward()
        norm = clip_grad_norm(opt.params, cfg.grad_clip) if cfg.grad_clip > 0 else 0.0
        if not math.isfinite(norm):
            stopped = f"non-finite gradient norm at step {step}"
            break
        opt.step()
        seconds.append(time.perf_counter() - start)
        losses.append(value)
    return {"loss": losses, "step_seconds": seconds, "stopped": stopped}


def measure_memory(model: GenreClassifier, data: Encoded, idx: Any, head_lr: float,
                   encoder_lr: float | None) -> dict[str, Any]:
    """One training step measured with tracemalloc (``memory.measure_step``, after one warm-up step), on a copy
    of ``model``: weights, gradients, optimizer state, activations and the peak, in bytes."""
    model = copy.deepcopy(model)
    opt, _ = make_optimizers(model, head_lr, encoder_lr)
    batch, labels = data.batch(idx)
    return memory.measure_step(model, opt, batch, labels).to_dict()


def _step_seconds(history: dict[str, Any]) -> float | None:
    """The median seconds of a training step, the first step left out (it allocates what later steps reuse)."""
    values = history["step_seconds"][1:] or history["step_seconds"]
    return statistics.median(values) if values else None


def run_minilm(cfg: MiniLMConfig, progress: bool = True, measure: bool = True,
               base: Bert | None = None) -> dict[str, Any]:
    """The lab -> its results dict (JSON-ready): the config, the machine, the data, and one row per method with
    its learning-rate grid (validation accuracy of each), the chosen rate, test accuracy, trainable parameters,
    the median step time and (``measure``, NumPy backend only) the measured memory of one step.

    ``base``: the pretrained encoder (default ``load_minilm(cfg.max_length)``); it is never changed."""
    start = time.perf_counter()
    base = base if base is not None else load_minilm(cfg.max_length)
    data, info = load_data(cfg, base.tokenizer)
    batches = batch_order(cfg, len(data["train"]))
    measure = measure and backend.get_backend() == "numpy"  # tracemalloc sees host memory only
    results: dict[str, Any] = {
        "experiment": "minilm", "config": asdict(cfg), "machine": machine_info(), "data": info,
        "base": {"model": "all-MiniLM-L6-v2", "total": count_parameters(base).total, "chance": 1 / len(GENRES)},
        "runs": [],
    }
    head_lr = None
    for method in tqdm(methods(cfg), desc="minilm", disable=not progress):
        grid = cfg.head_lrs if method.kind == "probe" else cfg.lora_lrs if method.kind == "lora" else cfg.full_lrs
        tried, best = [], None
        for lr in grid:
            model = build(base, method, len(GENRES), cfg.seed)
            h_lr, e_lr = (lr, None) if method.kind == "probe" else (head_lr, lr)
            history = train_run(model, data["train"], batches, cfg, h_lr, e_lr, progress)
            val = accuracy(model, data["val"], cfg.eval_batch_size) if not history["stopped"] else None
            tried.append({"lr": lr, "val_accuracy": val, "stopped": history["stopped"],
                          "final_train_loss": history["loss"][-1] if history["loss"] else None,
                          "step_seconds": _step_seconds(history)})
            if val is not None and (best is None or val > best[0]):  # a tie keeps the earlier rate
                best = (val, lr, model, history)
        if best is None:
            raise RuntimeError(f"minilm: every learning rate of {method.name} diverged: {tried}")
        val, lr, model, history = best
        if method.kind == "probe":
            head_lr = lr
        counts = count_parameters(model)
        lora = method.lora
        row: dict[str, Any] = {
            "name": method.name, "mode": method.kind, "rank": lora.r if lora else None,
            "targets": ",".join(lora.targets) if lora else "", "lora": lora.to_dict() if lora else None,
            "lr": lr, "head_lr": head_lr, "grid": tried, "val_accuracy": val,
            "test_accuracy": accuracy(model, data["test"], cfg.eval_batch_size),
            "trainable": counts.trainable, "head": sum(p.size for p in model.head.parameters()),
            "total": counts.total, "step_seconds": _step_seconds(history),
            "history": {"loss": history["loss"]},
        }
        if lora is not None:
            row["adapter_bytes"] = len(encode_adapter(model.encoder))  # A and B with their config: no file here
        if measure:
            row["memory_measured"] = measure_memory(model, data["train"], batches[0], head_lr,
                                                    None if method.kind == "probe" else lr)
        results["runs"].append(row)
    results["seconds"] = time.perf_counter() - start
    return to_json(results)


# -- the table ------------------------------------------------------------------------------------------------------

LABELS = {"probe": "linear probe (head only)", "full": "full fine-tuning"}


def label(row: dict[str, Any]) -> str:
    if row["mode"] != "lora":
        return LABELS[row["mode"]]
    targets = "q, v" if row["targets"] == "q,v" else "all linears" if row["targets"] == "q,k,v,o,up,down" else \
        row["targets"].replace(",", ", ")
    return f"LoRA r={row['rank']} on {targets}"


def markdown_table(results: dict[str, Any]) -> str:
    """The README's table of the lab, from its results (the command line prints it after a run)."""
    lines = ["| method | trainable | % of model | lr (chosen) | val acc | test acc | s/step | peak MiB | adapter |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        peak = r.get("memory_measured", {}).get("peak")
        adapter = f"{r['adapter_bytes'] / 1024:.1f} KiB" if r.get("adapter_bytes") else "—"
        lines.append(f"| {label(r)} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% | {r['lr']:g} | "
                     f"{100 * r['val_accuracy']:.1f}% | {100 * r['test_accuracy']:.1f}% | "
                     f"{r['step_seconds']:.3f} | {'' if peak is None else f'{peak / 2**20:.1f}'} | {adapter} |")
    return "\n".join(lines)


__all__ = ["GenreClassifier", "Method", "MiniLMConfig", "Optimizers", "accuracy", "batch_order", "build", "label",
           "load_data", "markdown_table", "methods", "run_minilm", "train_run"]
