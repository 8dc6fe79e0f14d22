"""LoRA on a real pretrained transformer: all-MiniLM-L6-v2 learns the genre of a Bible verse.

The task: a verse of the King James Bible -> its genre (law, history, wisdom, prophets, gospels, letters,
apocalypse), with train, validation and test verses from disjoint chapters (``genres.bible_genre_splits``, split seed
``cfg.data_seed``). At most ``*_per_class`` verses of each genre per split, drawn at random; Revelation is one
book, so the apocalypse class has fewer (35 validation and 40 test verses in all) and every score is BALANCED: the
mean over genres of the per-genre accuracy (or cross-entropy), so chance is 1/7 whatever the class sizes. The
model: MiniLM's sentence embedding (mean pooling, L2 normalisation, as its model card) and a linear head on it.

The methods, each trained ``steps`` steps on the same training verses, its learning rate chosen on the validation
cross-entropy (``runs.search_lr``: a grid that steps past its edge until the choice is interior), then rerun with
every seed of ``seeds`` at that rate and reported on test:

    probe        logistic regression on the frozen encoder's embeddings, computed once: the head alone, trained
                 full-batch to convergence (its L2 strength chosen on validation), so no method beats it for lack
                 of steps
    lora-qv-r*   LoRA on q and v of every block at each rank of ``ranks`` (the paper's setting), and the head
    lora-all-r8  LoRA on all six linears of every block, and the head
    full         every weight of the encoder, and the head

Every method that trains the encoder starts from the probe's head (LP-FT, Kumar et al. 2022): the model starts
exactly at the probe's predictions (LoRA's B = 0 adds nothing, full fine-tuning has not moved yet), so what a
method adds to the probe is what it learned in the encoder, and a method can fall below the probe only by
overfitting. Head and encoder train together with one AdamW at one learning rate (the head starts at an optimum,
so it needs no larger step of its own).

The seeds change the batch order and LoRA's random A; the data split, the probe and the head it hands on are the
same for every seed. Test accuracy is reported as the mean over seeds with two intervals: the seeds' spread (a 95%
t-interval: how much a rerun moves it) and a bootstrap over test CHAPTERS (resampled within each genre; 95%
percentile interval: how much another draw of chapters would move it; verses of one chapter are not independent,
so a bootstrap over verses would be too narrow). Differences between methods are bootstrapped paired, on the same
resampled chapters.

Speed: verses are cut at ``max_length`` word pieces (99.6% of training verses fit in 80); training batches are
drawn from buckets of similar length (``batch_order``) and each batch is cut to its longest verse, so little is
spent on padding; evaluation goes through the verses sorted by length. Experiments compute and return; the command
line (``python -m lora_np minilm``) writes ``results/minilm.json`` and the figure.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from .. import backend, checks, memory
from .. import functional as F
from ..bert import Bert, load_minilm
from ..checkpoint import encode_adapter
from ..engine import Tensor
from ..lora import LoRAConfig, count_parameters, prepare_finetuning
from ..nn import Linear, Module
from ..optim import AdamW, clip_grad_norm, cosine_lr
from .genres import GENRES, LabelledTexts, bible_genre_splits
from .runs import LR_EXTEND, T975, interval, machine_info, search_lr, to_json

N_GENRES = len(GENRES)
MINILM_WIDTH = 384  # all-MiniLM-L6-v2's hidden size C: every Linear it has is C x C, C x 4C or 4C x C


@dataclass(frozen=True)
class MiniLMConfig:
    """Everything that determines the lab's numbers. Validated when made.

    The full size takes about 45 minutes of one CPU core (``benchmarks/minilm_estimate.py`` estimates it; the
    README has the measured time). ``quick()`` is the same code path on a handful of verses, in seconds.
    """

    steps: int = 200  # optimizer steps of every run (200 x 16 = 3,200 verses: a little over one pass)
    batch_size: int = 16  # verses per step
    warmup_steps: int = 20  # linear warmup, then cosine decay to a tenth of the peak
    bucket_batches: int = 16  # batches drawn from one length-sorted bucket of bucket_batches x batch_size verses
    train_per_class: int = 400  # training verses of each genre at most (apocalypse has 329): 2,729 in all
    val_per_class: int = 60  # validation verses of each genre at most (apocalypse: 35): learning rates chosen here
    test_per_class: int = 150  # test verses of each genre at most (apocalypse: 40, from 2 chapters): reported
    max_length: int = 80  # word pieces per verse, [CLS] and [SEP] included; longer verses are cut
    probe_l2s: tuple[float, ...] = (1e-5, 1e-4, 1e-3)  # the probe's L2 penalties (0.5 l2 |W|^2), searched
    probe_steps: int = 1000  # full-batch AdamW steps of the probe on cached embeddings (converged: see the results)
    probe_lr: float = 0.05  # the probe's peak learning rate (cosine decay to a hundredth)
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # peak lr of the LoRA factors and the head, searched
    full_lrs: tuple[float, ...] = (1e-5, 3e-5, 1e-4)  # peak lr of every encoder weight and the head, searched
    lr_extend: int = LR_EXTEND  # how many rates a search may add past its grid's edge
    ranks: tuple[int, ...] = (1, 4, 16)  # LoRA on q, v at these ranks
    all_linear_rank: int = 8  # LoRA on q, k, v, o, up, down at this rank
    alpha: float = 16.0  # LoRA's α (scaling α/r), fixed across ranks as the paper (§4.1)
    grad_clip: float = 1.0  # global-norm clipping over everything that trains
    eval_batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)  # every method at its chosen rate; the first also runs the grid
    data_seed: int = 0  # the chapter split and the per-genre samples
    bootstrap: int = 2000  # resamples of the test chapters for each interval

    def __post_init__(self) -> None:
        checks.fields(self, checks.positive_int, "steps", "batch_size", "bucket_batches", "train_per_class",
                      "val_per_class", "test_per_class", "probe_steps", "all_linear_rank", "eval_batch_size",
                      "bootstrap")
        checks.fields(self, checks.nonnegative_int, "warmup_steps", "lr_extend", "data_seed")
        checks.integer(self.warmup_steps, "MiniLMConfig.warmup_steps", 0, self.steps, why="(at most steps)")
        checks.integer(self.max_length, "MiniLMConfig.max_length", 3, 512, why="(MiniLM's positions)")
        checks.fields(self, checks.rate_grid, "probe_l2s", "lora_lrs", "full_lrs")
        checks.fields(self, checks.ranks, "ranks")
        checks.max_rank((*self.ranks, self.all_linear_rank), MINILM_WIDTH, "min(d_in, d_out) = MiniLM's hidden size")
        seeds = tuple(self.seeds) if isinstance(self.seeds, (list, tuple)) else self.seeds
        if not (isinstance(seeds, tuple) and 1 <= len(seeds) <= len(T975) + 1 and len(set(seeds)) == len(seeds)
                and all(checks.is_int(s) and s >= 0 for s in seeds)):
            checks.refuse("MiniLMConfig.seeds", f"1 to {len(T975) + 1} distinct non-negative integers", self.seeds)
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        checks.fields(self, checks.positive_number, "alpha", "probe_lr")
        checks.fields(self, checks.nonnegative_number, "grad_clip")

    @classmethod
    def quick(cls, **changes: Any) -> MiniLMConfig:
        """Seconds: a verse or two of each genre per split, two steps of four verses, two rates per grid and two
        seeds, no step past a grid's edge. Same code path as the full run."""
        return cls(**{"steps": 2, "batch_size": 4, "warmup_steps": 0, "bucket_batches": 2, "train_per_class": 2,
                      "val_per_class": 1, "test_per_class": 1, "eval_batch_size": 8, "probe_steps": 20,
                      "probe_l2s": (1e-3, 1e-2), "lora_lrs": (1e-3, 3e-3), "full_lrs": (3e-5, 1e-4),
                      "lr_extend": 0, "ranks": (1, 4), "seeds": (0, 1), "bootstrap": 50, **changes})


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
    """The lab's methods, the probe first (its head starts every other method). LoRA's seed is set per run."""
    qv = [Method(f"lora-qv-r{r}", "lora", LoRAConfig(r=r, alpha=cfg.alpha, targets="q,v")) for r in cfg.ranks]
    r = cfg.all_linear_rank
    every = Method(f"lora-all-r{r}", "lora", LoRAConfig(r=r, alpha=cfg.alpha, targets="all-linear"))
    return [Method("probe", "probe"), *qv, every, Method("full", "full")]


def build(base: Bert, method: Method, n_classes: int, seed: int, head: Linear | None = None) -> GenreClassifier:
    """A fresh classifier for ``method`` on a copy of ``base`` (never changed): LoRA (seeded with ``seed``) applied
    to the encoder only, or every encoder weight trainable (full), or none (probe). The head always trains; it
    starts as a copy of ``head`` when one is given (the probe's), else at random."""
    tokenizer, base.tokenizer = base.tokenizer, None  # the tokenizer is not copied with the weights
    try:
        encoder = copy.deepcopy(base)
    finally:
        base.tokenizer = tokenizer
    if method.kind == "probe":
        for p in encoder.parameters():
            p.requires_grad = False
    else:
        prepare_finetuning(encoder, replace(method.lora, seed=seed) if method.lora else None)
    model = GenreClassifier(encoder, n_classes, seed)
    if head is not None:
        model.head.weight.data = head.weight.data.copy()
        model.head.bias.data = head.bias.data.copy()
    return model


# -- data ----------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One split, tokenized once: ids and mask (n, max_length), labels (n,), and each verse's chapter
    ("Genesis 1"), the unit the bootstrap resamples."""

    ids: Any
    mask: Any
    labels: Any
    chapters: list[str] | None = None

    def batch(self, idx: Any) -> tuple[tuple[Any, Any], Any]:
        """Rows ``idx``, cut to the longest of them: ((ids, mask), labels)."""
        t = int(self.mask[idx].sum(axis=1).max())  # the longest verse of the batch, in word pieces
        return (self.ids[idx, :t], self.mask[idx, :t]), self.labels[idx]

    def lengths(self) -> Any:
        return self.mask.sum(axis=1)

    def __len__(self) -> int:
        return len(self.labels)


def capped(split: LabelledTexts, per_class: int, gen: Any) -> LabelledTexts:
    """At most ``per_class`` verses of every genre, drawn at random (canonical order kept)."""
    np = backend.np
    keep = [gen.permutation(np.flatnonzero(split.labels == g))[:per_class] for g in range(N_GENRES)]
    idx = sorted(np.concatenate(keep).tolist())
    return LabelledTexts([split.texts[i] for i in idx], split.labels[idx], [split.citations[i] for i in idx])


def load_data(cfg: MiniLMConfig, tokenizer: Any) -> tuple[dict[str, Encoded], dict[str, Any]]:
    """The three splits, capped per genre and tokenized -> ({"train", "val", "test"}: Encoded, facts about the
    data: verses and chapters per genre, how many were cut at max_length, the mean length)."""
    splits = bible_genre_splits(seed=cfg.data_seed)
    gen = backend.rng(cfg.data_seed)
    parts = {"train": capped(splits.train, cfg.train_per_class, gen),
             "val": capped(splits.val, cfg.val_per_class, gen),
             "test": capped(splits.test, cfg.test_per_class, gen)}
    np = backend.np
    encoded, info = {}, {"genres": list(GENRES), "max_length": cfg.max_length}
    for name, part in parts.items():
        ids, mask = tokenizer(part.texts)
        chapters = [c.rsplit(":", 1)[0] for c in part.citations]
        encoded[name] = Encoded(ids, mask, part.labels, chapters)
        info[name] = {"verses": len(part), "per_genre": np.bincount(part.labels, minlength=N_GENRES).tolist(),
                      "chapters_per_genre": [len({c for c, y in zip(chapters, part.labels) if y == g})
                                             for g in range(N_GENRES)],
                      "truncated": tokenizer.truncated(part.texts),
                      "mean_tokens": float(mask.sum(axis=1).mean())}
    return encoded, info


def batch_order(cfg: MiniLMConfig, lengths: Any, seed: int) -> list[Any]:
    """The training batches of a run (indices into the training split), ``cfg.steps`` of them, seeded by ``seed``.

    Each pass shuffles the verses, cuts them into buckets of ``bucket_batches`` batches, sorts each bucket by length
    and cuts it into batches (so a batch holds verses of similar length and is cut to its longest with little
    padding), then shuffles the batches; a batch shorter than ``batch_size`` (the last of a pass) is dropped. Every
    verse is seen once per pass (but those dropped), in an order that depends on ``seed`` only."""
    np = backend.np
    gen, n, batches = backend.rng(seed + 1), len(lengths), []
    size = cfg.batch_size * cfg.bucket_batches
    if n < cfg.batch_size:
        raise ValueError(f"batch_order: {n} training verses cannot fill a batch of {cfg.batch_size}")
    while len(batches) < cfg.steps:
        perm = gen.permutation(n)
        one_pass = []
        for i in range(0, n, size):
            bucket = perm[i : i + size]
            bucket = bucket[np.argsort(lengths[bucket], kind="stable")]
            one_pass += [bucket[j : j + cfg.batch_size] for j in range(0, len(bucket), cfg.batch_size)]
        one_pass = [b for b in one_pass if len(b) == cfg.batch_size]
        batches += [one_pass[k] for k in gen.permutation(len(one_pass))]
    return batches[: cfg.steps]


# -- scores ----------------------------------------------------------------------------------------------------------


def balanced(per_verse: Any, labels: Any) -> float:
    """The mean over genres of the mean of ``per_verse`` (correct 0/1, or a loss) within each genre present."""
    np = backend.np
    return float(np.mean([per_verse[labels == g].mean() for g in range(N_GENRES) if (labels == g).any()]))


def predict(model: GenreClassifier, data: Encoded, batch_size: int) -> tuple[Any, Any]:
    """Without a graph -> (predicted genre (n,), cross-entropy of the true genre (n,)), host arrays. The verses go
    through sorted by length, each batch cut to its longest: the same numbers as padding all to max_length."""
    np = backend.np
    order = np.argsort(data.lengths(), kind="stable")
    pred, loss = np.zeros(len(data), dtype=np.int64), np.zeros(len(data))
    with model.inference():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch, labels = data.batch(idx)
            logits, _ = model(batch)
            pred[idx], loss[idx] = _classify(backend.to_numpy(logits.data), labels)
    return pred, loss


def _classify(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Host logits (n, K) -> (the predicted class (n,), the cross-entropy of the true class (n,)), in float64."""
    np = backend.np
    z = logits.astype(np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return z.argmax(axis=1), -logp[np.arange(len(labels)), labels]


def _scores(pred: Any, loss: Any, labels: Any) -> dict[str, Any]:
    return {"accuracy": balanced(pred == labels, labels), "loss": balanced(loss, labels), "predictions": pred.tolist()}


def scores(model: GenreClassifier, data: Encoded, batch_size: int) -> dict[str, Any]:
    """Balanced accuracy and cross-entropy of ``model`` on ``data``, and its predictions."""
    return _scores(*predict(model, data, batch_size), data.labels)


def accuracy(model: GenreClassifier, data: Encoded, batch_size: int) -> float:
    """Balanced accuracy of ``model`` on ``data`` (the mean of the genres' accuracies)."""
    return scores(model, data, batch_size)["accuracy"]


def chapter_bootstrap(correct: dict[str, Any], labels: Any, chapters: list[str], n: int, seed: int = 0,
                      pairs: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """95% percentile intervals of the balanced accuracy of each method in ``correct`` (name -> (n_verses,) share
    of seeds that got each verse right), resampling chapters with replacement within each genre, ``n`` times.
    ``pairs``: (a, b) -> the interval of accuracy(a) - accuracy(b) on the same resamples.

    Returns {"methods": {name: [lo, hi]}, "differences": {"a - b": [lo, hi]}}."""
    np = backend.np
    names = list(correct)
    chapter_ids = {c: i for i, c in enumerate(dict.fromkeys(chapters))}
    cid = np.array([chapter_ids[c] for c in chapters])
    count = np.bincount(cid, minlength=len(chapter_ids))  # verses per chapter
    hits = np.stack([np.bincount(cid, weights=np.asarray(correct[m], dtype=float), minlength=len(chapter_ids))
                     for m in names])  # (methods, chapters): right answers per chapter
    genre_of_chapter = np.zeros(len(chapter_ids), dtype=int)
    genre_of_chapter[cid] = labels
    gen = backend.rng(seed)
    acc = np.zeros((n, len(names)))
    genres = [np.flatnonzero(genre_of_chapter == g) for g in range(N_GENRES)]
    genres = [g for g in genres if len(g)]
    for g in genres:
        draw = g[gen.integers(0, len(g), size=(n, len(g)))]  # (n, chapters of g)
        acc += hits[:, draw].sum(axis=2).T / count[draw].sum(axis=1)[:, None]
    acc /= len(genres)

    def pct(v: Any) -> list[float]:
        return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]

    return {"methods": {m: pct(acc[:, i]) for i, m in enumerate(names)},
            "differences": {f"{a} - {b}": pct(acc[:, names.index(a)] - acc[:, names.index(b)]) for a, b in pairs}}


# -- the probe: logistic regression on cached embeddings -----------------------------------------------------------


def embeddings(encoder: Bert, data: Encoded, batch_size: int) -> Any:
    """The frozen encoder's sentence embeddings of ``data`` (n, C), computed once, in the split's order."""
    np = backend.np
    order = np.argsort(data.lengths(), kind="stable")
    out = np.zeros((len(data), encoder.config.hidden_size), dtype=np.float32)
    with encoder.inference():
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            (ids, mask), _ = data.batch(idx)
            out[idx] = backend.to_numpy(encoder.sentence_embedding(ids, mask).data)
    return out


def fit_probe(features: Any, labels: Any, l2: float, cfg: MiniLMConfig) -> tuple[Linear, dict[str, Any]]:
    """Logistic regression: a zero-initialised head trained full-batch with AdamW on the mean cross-entropy plus
    0.5 * l2 * |W|^2 (not on the bias), ``cfg.probe_steps`` steps, cosine decay to a hundredth of ``probe_lr``.
    A convex problem from a fixed start: no seed. Returns (the head, its history: the final loss, and how much
    the loss moved over the last tenth of the steps, the evidence that it converged)."""
    head = Linear(features.shape[1], N_GENRES, gen=backend.rng(0))  # (C, K)
    head.weight.data[...] = 0.0
    head.bias.data[...] = 0.0
    opt = AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=0.0)
    x = Tensor(backend.xp.asarray(features))
    y = backend.xp.asarray(labels)
    losses = []
    for step in range(1, cfg.probe_steps + 1):
        opt.lr = cosine_lr(step, max_lr=cfg.probe_lr, max_steps=cfg.probe_steps, warmup_steps=0,
                           min_lr=0.01 * cfg.probe_lr)
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + (head.weight * head.weight).sum() * (0.5 * l2)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = losses[-max(1, cfg.probe_steps // 10) :]
    return head, {"final_loss": losses[-1], "last_tenth_change": tail[0] - tail[-1]}


# -- training ------------------------------------------------------------------------------------------------------


def train_run(model: GenreClassifier, data: Encoded, batches: list[Any], cfg: MiniLMConfig, lr: float,
              progress: bool = False) -> dict[str, Any]:
    """Train ``model`` in place on ``batches`` with one AdamW over everything that trains (no weight decay: short
    runs from a pretrained model) -> its history: the loss and the seconds of every step, and ``stopped`` (why
    training ended early, "" if it did not: a non-finite loss or gradient)."""
    opt = AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    warmup = min(cfg.warmup_steps, cfg.steps)
    losses: list[float] = []
    seconds: list[float] = []
    stopped = ""
    model.train()
    for step, idx in enumerate(tqdm(batches, desc="steps", leave=False, disable=not progress), start=1):
        start = time.perf_counter()
        opt.lr = cosine_lr(step, max_lr=lr, max_steps=len(batches), warmup_steps=warmup, min_lr=0.1 * lr)
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


def measure_memory(model: GenreClassifier, data: Encoded, idx: Any, lr: float) -> dict[str, Any]:
    """One training step measured by the backend's allocator (``memory.measure_step``, after one warm-up step:
    tracemalloc on NumPy, CuPy's memory pool on CuPy), on a copy of ``model``: weights, gradients, optimizer state,
    activations and the peak, in bytes, and the allocator's name."""
    model = copy.deepcopy(model)
    opt = AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    (ids, mask), labels = data.batch(idx)
    batch = (backend.to_device(ids), backend.to_device(mask))  # on the device before the step: it exists before it
    return memory.measure_step(model, opt, batch, backend.to_device(labels)).to_dict()


def _step_seconds(history: dict[str, Any]) -> float | None:
    """The median seconds of a training step, the first step left out (it allocates what later steps reuse)."""
    values = history["step_seconds"][1:] or history["step_seconds"]
    return statistics.median(values) if values else None


def run_method(base: Bert, method: Method, head: Linear, data: dict[str, Encoded], cfg: MiniLMConfig,
               progress: bool = False, measure: bool = True) -> dict[str, Any]:
    """One method that trains the encoder: its learning rate searched on the validation cross-entropy with the
    first seed, then every other seed at that rate, every seed scored on validation and test -> its results row.
    Every run starts from ``base`` and the probe's ``head``."""
    lengths = data["train"].lengths()
    kept: dict[float, tuple[GenreClassifier, dict[str, Any]]] = {}

    def run(lr: float, seed: int) -> tuple[GenreClassifier, dict[str, Any], dict[str, Any]]:
        model = build(base, method, N_GENRES, seed, head=head)
        history = train_run(model, data["train"], batch_order(cfg, lengths, seed), cfg, lr, progress)
        val = scores(model, data["val"], cfg.eval_batch_size) if not history["stopped"] else {}
        row = {"lr": lr, "seed": seed, "val_loss": val.get("loss"), "val_accuracy": val.get("accuracy"),
               "stopped": history["stopped"], "final_train_loss": history["loss"][-1] if history["loss"] else None,
               "step_seconds": _step_seconds(history)}
        return model, history, row

    def first_seed(lr: float) -> dict[str, Any]:
        model, history, row = run(lr, cfg.seeds[0])
        kept[lr] = (model, history)
        return row

    grid = cfg.lora_lrs if method.kind == "lora" else cfg.full_lrs
    search = search_lr(first_seed, grid, key="val_loss", extend=cfg.lr_extend)
    if all(r["val_loss"] is None for r in search["rows"]):
        raise RuntimeError(f"minilm: every learning rate of {method.name} diverged: {search['rows']}")
    lr = search["lr"]
    model, history = kept[lr]
    first = dict(next(r for r in search["rows"] if r["chosen"]))  # a copy: the grid rows carry no test numbers
    seeds, seed_models = [first], [model]
    for seed in cfg.seeds[1:]:
        m, _, row = run(lr, seed)
        seeds.append(row)
        seed_models.append(m)
    for row, m in zip(seeds, seed_models):
        t = scores(m, data["test"], cfg.eval_batch_size)
        row.update(test_loss=t["loss"], test_accuracy=t["accuracy"], test_predictions=t["predictions"])
    counts = count_parameters(model)
    lora = method.lora
    accs = [s["test_accuracy"] for s in seeds]
    out: dict[str, Any] = {
        "name": method.name, "mode": method.kind, "rank": lora.r if lora else None,
        "targets": ",".join(lora.targets) if lora else "", "lora": lora.to_dict() if lora else None,
        "lr": lr, "interior": search["interior"], "grid": search["rows"],
        "val_loss": statistics.fmean(s["val_loss"] for s in seeds),
        "val_accuracy": statistics.fmean(s["val_accuracy"] for s in seeds),
        "seeds": seeds, "test_accuracy": statistics.fmean(accs),
        "test_loss": statistics.fmean(s["test_loss"] for s in seeds), "seed_interval": interval(accs),
        "trainable": counts.trainable, "head": sum(p.size for p in model.head.parameters()),
        "total": counts.total, "step_seconds": _step_seconds(history), "history": {"loss": history["loss"]},
    }
    if lora is not None:
        out["adapter_bytes"] = len(encode_adapter(model.encoder))  # A and B with their config: no file here
    if measure:
        out["memory_measured"] = measure_memory(model, data["train"], batch_order(cfg, lengths, 0)[0], lr)
    return out


def run_minilm(cfg: MiniLMConfig, progress: bool = True, measure: bool = True,
               base: Bert | None = None) -> dict[str, Any]:
    """The lab -> its results dict (JSON-ready): the config, the machine, the data, and one row per method with
    its search (validation loss and accuracy of every rate tried), the chosen rate, every seed's validation and
    test scores and test predictions, the mean test accuracy with its seed interval and chapter-bootstrap interval,
    trainable parameters, the median step time and (``measure``) the measured memory of one step (host memory
    on NumPy, device memory on CuPy); then the paired bootstrap of each method against the probe and against full
    fine-tuning.

    ``base``: the pretrained encoder (default ``load_minilm(cfg.max_length)``); it is never changed."""
    start = time.perf_counter()
    base = base if base is not None else load_minilm(cfg.max_length)
    data, info = load_data(cfg, base.tokenizer)
    results: dict[str, Any] = {
        "experiment": "minilm", "config": asdict(cfg), "machine": machine_info(), "data": info,
        "base": {"model": "all-MiniLM-L6-v2", "total": count_parameters(base).total, "chance": 1 / N_GENRES},
        "test_labels": data["test"].labels.tolist(), "test_chapters": data["test"].chapters, "runs": [],
    }
    all_methods = methods(cfg)
    bar = tqdm(total=len(all_methods), desc="minilm", disable=not progress)

    # The probe: embeddings once, then logistic regression per L2 strength, chosen on validation cross-entropy.
    t0 = time.perf_counter()
    feats = {name: embeddings(base, split, cfg.eval_batch_size) for name, split in data.items()}
    embed_seconds = time.perf_counter() - t0
    probes: dict[float, Linear] = {}

    def probe(l2: float) -> dict[str, Any]:
        head, fit = fit_probe(feats["train"], data["train"].labels, l2, cfg)
        probes[l2] = head
        val = _head_scores(head, feats["val"], data["val"].labels)
        return {"l2": l2, "val_loss": val["loss"], "val_accuracy": val["accuracy"], **fit}

    search = search_lr(probe, cfg.probe_l2s, key="val_loss", extend=cfg.lr_extend)
    head = probes[search["lr"]]
    test = _head_scores(head, feats["test"], data["test"].labels)
    counts = sum(p.size for p in head.parameters())
    chosen = next(r for r in search["rows"] if r["chosen"])
    results["runs"].append({
        "name": "probe", "mode": "probe", "rank": None, "targets": "", "lora": None,
        "lr": cfg.probe_lr, "l2": search["lr"], "interior": search["interior"], "grid": search["rows"],
        "val_loss": chosen["val_loss"], "val_accuracy": chosen["val_accuracy"],
        "seeds": [{"seed": None, "val_loss": chosen["val_loss"], "val_accuracy": chosen["val_accuracy"],
                   "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                   "test_predictions": test["predictions"]}],
        "test_accuracy": test["accuracy"], "test_loss": test["loss"], "seed_interval": interval([test["accuracy"]]),
        "trainable": counts, "head": counts, "total": results["base"]["total"] + counts,
        "embed_seconds": embed_seconds, "step_seconds": None,
    })
    bar.update()

    for method in all_methods[1:]:
        results["runs"].append(run_method(base, method, head, data, cfg, progress, measure))
        bar.update()
    bar.close()

    labels = data["test"].labels
    correct = {r["name"]: backend.np.mean([backend.np.asarray(s["test_predictions"]) == labels for s in r["seeds"]],
                                          axis=0) for r in results["runs"]}
    names = list(correct)
    pairs = [(m, "probe") for m in names if m != "probe"] + [(m, "full") for m in names if m not in ("probe", "full")]
    boot = chapter_bootstrap(correct, labels, data["test"].chapters, cfg.bootstrap, seed=cfg.data_seed, pairs=pairs)
    for r in results["runs"]:
        r["test_interval"] = boot["methods"][r["name"]]
    results["differences"] = boot["differences"]
    results["seconds"] = time.perf_counter() - start
    return to_json(results)


def _head_scores(head: Linear, features: Any, labels: Any) -> dict[str, Any]:
    """The probe's balanced accuracy and cross-entropy on cached embeddings, and its predictions."""
    np = backend.np
    z = (features.astype(np.float64) @ backend.to_numpy(head.weight.data).astype(np.float64)
         + backend.to_numpy(head.bias.data).astype(np.float64))  # (n, C) @ (C, K) -> (n, K)
    return _scores(*_classify(z, labels), labels)


# -- the table ------------------------------------------------------------------------------------------------------

LABELS = {"probe": "linear probe (head only)", "full": "full fine-tuning"}


def label(row: dict[str, Any]) -> str:
    if row["mode"] != "lora":
        return LABELS[row["mode"]]
    targets = "q, v" if row["targets"] == "q,v" else "all linears" if row["targets"] == "q,k,v,o,up,down" else \
        row["targets"].replace(",", ", ")
    return f"LoRA r={row['rank']} on {targets}"


def markdown_table(results: dict[str, Any]) -> str:
    """The README's table of the lab, from its results (the command line prints it after a run): test accuracy as
    the mean over seeds ± the half-width of its 95% t-interval, and the chapter bootstrap's 95% interval."""
    lines = ["| method | trainable | % of model | lr (chosen) | seeds | val CE | test acc (± seeds) | "
             "test acc 95% (chapters) | test CE | s/step | peak MiB | adapter |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        peak = r.get("memory_measured", {}).get("peak")
        adapter = f"{r['adapter_bytes'] / 1024:.1f} KiB" if r.get("adapter_bytes") else "—"
        ci = r["seed_interval"]["ci95"]
        acc = f"{100 * r['test_accuracy']:.1f}%" + ("" if ci is None else f" ± {100 * ci:.1f}")
        lo, hi = r["test_interval"]
        lr = f"l2 {r['l2']:g}" if r["mode"] == "probe" else f"{r['lr']:g}" + ("" if r["interior"] else " (edge)")
        step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.3f}"
        lines.append(f"| {label(r)} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f}% | {lr} | "
                     f"{len(r['seeds'])} | {r['val_loss']:.3f} | {acc} | {100 * lo:.1f}–{100 * hi:.1f}% | "
                     f"{r['test_loss']:.3f} | {step} | {'' if peak is None else f'{peak / 2**20:.1f}'} | {adapter} |")
    return "\n".join(lines)


def differences_table(results: dict[str, Any]) -> str:
    """Each method against the probe and against full fine-tuning: the difference of mean test accuracy and its
    paired chapter-bootstrap 95% interval (an interval that excludes 0 is a difference this test set resolves)."""
    acc = {r["name"]: r["test_accuracy"] for r in results["runs"]}
    labels = {r["name"]: label(r) for r in results["runs"]}
    lines = ["| comparison | difference (points) | 95% interval (chapters) |", "|---|---:|---:|"]
    for key, (lo, hi) in results["differences"].items():
        a, b = key.split(" - ")
        lines.append(f"| {labels[a]} − {labels[b]} | {100 * (acc[a] - acc[b]):+.1f} | "
                     f"{100 * lo:+.1f} to {100 * hi:+.1f} |")
    return "\n".join(lines)


__all__ = ["Encoded", "GenreClassifier", "Method", "MiniLMConfig", "accuracy", "balanced", "batch_order", "build",
           "chapter_bootstrap", "differences_table", "embeddings", "fit_probe", "label", "load_data",
           "markdown_table", "methods", "predict", "run_method", "run_minilm", "scores", "train_run"]
