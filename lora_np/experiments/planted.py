"""When low rank suffices, with ground truth: the planted-rank experiment.

Every other experiment here asks "how good is LoRA at rank r?" on a task whose needed update nobody knows. Here it
is known. A **teacher** is the base model plus an update ΔW* of rank k that we plant ourselves, in chosen weight
matrices of every block; a **student** starts from the base and is trained to imitate the teacher's next-character
probabilities (distillation, ``F.soft_cross_entropy``). What the student must learn is then exactly ΔW*: rank k, in
known matrices. So the paper's claim can be tested in the form it is meant ("low rank suffices when the needed
update is low rank"), with both halves of the condition under our control:

* rank: LoRA at r = 1, 2, k, 2k, 4k on the planted matrices. Below k the student lacks directions and must stop at
  a floor; from k on it can match the teacher, as well as full fine-tuning does.
* placement: the same teacher imitated by LoRA on other matrices (``wrong``), at r = 4k. Rank cannot buy back a
  missing matrix; other matrices can only stand in for the planted one as far as the network lets them.

Two teachers: one planted in W_q and W_v (the paper's choice of what to adapt), one in the MLP's up projection.

**How ΔW* is planted, in the metric of the data.** In our notation (row vectors, y = x @ W, W (d_in, d_out)) a
layer's input x has second moment Σ = E[xᵀx] (d_in, d_in). An update matters only through x @ ΔW, and the inputs of
a layer fill few directions strongly and most weakly, so a random ΔW would mostly act where no data goes. With
z = x Σ^(-1/2) (whitened inputs, E[zᵀz] = I) we plant

    ΔW* = c · Σ^(-1/2) Ũ S Vᵀ,    so that  x @ ΔW* = c · z Ũ S Vᵀ:

a rank-k map from whitened inputs with singular values c·S (S = ``singular_values``, e.g. 1, 0.8, 0.6, 0.4). Ũ
(d_in, k) is an orthonormal k-frame drawn at random inside the span of Σ's top ``span·k`` eigenvectors (so the
data excites it, and Σ^(-1/2) stays away from Σ's tiny eigenvalues), V (d_out, k) a random orthonormal k-frame. c
is found by bisection so that KL(teacher ‖ base) on held-out windows is ``target_kl`` nats per character: a task
of a known, moderate size.

**What is measured** (on the test windows, never used to choose anything):

* KL(teacher ‖ student) per character, and its share of the base's KL (1 = learned nothing, 0 = the teacher).
* The oracle: KL(teacher ‖ base + ΔW*_r), ΔW*_r the rank-r truncation of ΔW* in the data's metric (the r largest
  planted singular values). It is what the best rank-r update *of the planted matrices alone* achieves by
  construction; a student can beat it, because several adapted matrices (q and v, or a matrix of every block)
  can stand in for each other in part. Zero for r >= k.
* φ between the learned update and ΔW* in every adapted block, input side and output side, in the data's metric
  (the paper's subspace similarity, ``analysis.subspace_similarity``): the share of the learned update's top
  directions that lie in the planted subspace (1: inside it; random: about k/d).
* Forgetting: the student's loss on the base's own held-out text (the Bible) next to the base's and the
  teacher's: imitating the teacher changes it by as much as the teacher does; more is forgetting.

Every method gets the same batches, a learning-rate search on validation KL (``runs.search_lr``: the grid steps
past its edge until the choice is interior), then ``seeds`` seeds at the chosen rate (adapter init and batch order
both change), reported as mean with a 95% t-interval.

Computes and returns; writes nothing (the command line does: ``python -m lora_np planted``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from .. import analysis, backend, checks
from ..data import BatchSampler, iter_eval_batches
from ..functional import _log_softmax, _softmax
from ..lora import (
    LoRAConfig,
    count_parameters,
    finetuning_mode,
    lora_layers,
    prepare_finetuning,
    resolve_targets,
    target_layers,
)
from ..model import GPT
from ..nn import Module
from ..train import TrainConfig, train
from .runs import (
    T975,
    Corpora,
    ExperimentConfig,
    interval,
    load_corpora,
    machine_info,
    pretrain_base,
    pretrain_val_loss,
    search_lr,
    to_json,
)

# The layer norm whose output a plantable matrix reads: its Σ is measured there (input_moments). o and down read
# the attention's and the MLP's inner activations, which no module outputs, so they cannot be planted in.
INPUT_NORM = {"q": "ln1", "k": "ln1", "v": "ln1", "up": "ln2"}


def _planted_experiment() -> ExperimentConfig:
    # The sweep's base model (same config, so the same cached file); 300 distillation steps, validated rarely
    # (the choice of learning rate reads the KL after training, not the curve)
    return replace(ExperimentConfig(), finetune=TrainConfig(max_steps=300, batch_size=16, lr=3e-3, min_lr=3e-4,
                                                            warmup_steps=20, eval_every=100, eval_batches=8))


@dataclass(frozen=True)
class PlantedConfig:
    """Everything that determines the planted-rank experiment's numbers. Validated when made."""

    experiment: ExperimentConfig = field(default_factory=_planted_experiment)  # base model and distillation steps
    k: int = 4  # the rank of the planted update ΔW*
    singular_values: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)  # ΔW*'s in the whitened metric, before c; k of them
    target_kl: float = 0.5  # KL(teacher ‖ base), nats per character, set through c
    placements: tuple[str, ...] = ("q,v", "up")  # where teachers are planted: one teacher per entry
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)  # LoRA on the planted matrices: 1, 2, k, 2k, 4k
    alpha: float = 16.0  # LoRA's α (scale α/r); each method's learning rate is searched, so α only sets units
    lora_lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # starting grids of runs.search_lr
    full_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    seeds: int = 3  # seeds at the chosen learning rate (the first is the search's own run)
    span: int = 2  # Ũ is drawn inside the top span·k eigenvectors of Σ
    sigma_batches: int = 8  # training batches that estimate each layer's input second moment Σ
    plant_seed: int = 0

    def __post_init__(self) -> None:
        checks.instance(self.experiment, "PlantedConfig.experiment", ExperimentConfig)
        d = self.experiment.model.n_embd
        checks.fields(self, checks.positive_int, "k", "seeds", "span", "sigma_batches")
        checks.fields(self, checks.nonnegative_int, "plant_seed")
        if self.seeds > len(T975) + 1:
            raise ValueError(f"PlantedConfig.seeds must be at most {len(T975) + 1}, got {self.seeds}")
        if self.span * self.k > d:
            raise ValueError(f"PlantedConfig: span·k = {self.span * self.k} exceeds n_embd = {d}")
        sv = self.singular_values
        ok = isinstance(sv, tuple) and len(sv) == self.k and all(checks.is_real(v) and math.isfinite(v) and v > 0
                                                                   for v in sv)
        if not ok or list(sv) != sorted(sv, reverse=True):
            checks.refuse("PlantedConfig.singular_values", f"k = {self.k} finite numbers > 0, largest first", sv)
        checks.fields(self, checks.positive_number, "target_kl", "alpha")
        if not isinstance(self.placements, tuple) or len(self.placements) < 2:
            raise ValueError(f"PlantedConfig.placements must name at least two placements (each teacher's "
                             f"'wrong' matrices are the next placement's), got {self.placements!r}")
        norm = tuple(",".join(resolve_targets(p)) for p in self.placements)  # checked names, canonical order
        unplantable = sorted({t for p in norm for t in p.split(",")} - set(INPUT_NORM))
        if unplantable:
            raise ValueError(f"PlantedConfig.placements: cannot plant in {unplantable} (their inputs are no module's "
                             f"output: Σ is not measured); plantable: {list(INPUT_NORM)}")
        if len(set(norm)) != len(norm):
            raise ValueError(f"PlantedConfig.placements repeats a placement: {self.placements!r}")
        object.__setattr__(self, "placements", norm)
        checks.fields(self, checks.ranks, "ranks")
        r = self.ranks
        checks.max_rank(r, d, "PlantedConfig.experiment.model.n_embd")
        if list(r) != sorted(r):
            checks.refuse("PlantedConfig.ranks", "increasing integers", r)
        if self.k not in r or max(r) <= self.k or min(r) >= self.k:
            raise ValueError(f"PlantedConfig.ranks must hold ranks below k, k = {self.k} itself and above, got {r!r}")
        checks.fields(self, checks.rate_grid, "lora_lrs", "full_lrs")

    @classmethod
    def quick(cls, **changes: Any) -> PlantedConfig:
        """Seconds, not minutes, for tests and CI: the quick model (C = 64, one block), 12 steps, k = 2. Every
        part of the full experiment runs (same code path); the numbers are too short to show the staircase."""
        experiment = ExperimentConfig.quick(finetune=TrainConfig(max_steps=12, batch_size=8, warmup_steps=2,
                                                                 eval_every=12, eval_batches=2))
        # target_kl 0.1: a one-block model's KL saturates near 0.35 however large c is (attention and ln_f bound it)
        return cls(**{"experiment": experiment, "k": 2, "singular_values": (1.0, 0.5), "ranks": (1, 2, 4),
                      "target_kl": 0.1, "lora_lrs": (1e-2, 3e-2), "full_lrs": (1e-3, 3e-3), "seeds": 2,
                      "sigma_batches": 2, **changes})

    def methods(self, placement: str) -> list[tuple[str, LoRAConfig | None, tuple[str, ...]]]:
        """(name, LoRA config or None, train_only) of every student of the teacher planted at ``placement``."""
        targets = placement.split(",")
        wrong = self.placements[(self.placements.index(placement) + 1) % len(self.placements)]
        return ([(f"lora-r{r}", LoRAConfig(r=r, alpha=self.alpha, targets=targets), ()) for r in self.ranks]
                + [(f"full-{placement.replace(',', '')}", None, tuple(targets)), ("full", None, ()),
                   (f"wrong-lora-r{max(self.ranks)}-{wrong.replace(',', '')}",
                    LoRAConfig(r=max(self.ranks), alpha=self.alpha, targets=wrong), ())])


# -- the teacher --------------------------------------------------------------------------------------------------


def planted_layers(model: GPT, placement: str) -> dict[str, Any]:
    """name -> the Linear layer of every block that ``placement`` ("q,v", "up") names, in model order."""
    return {name: layer for name, _, _, layer in target_layers(model, placement.split(","))}


class _InputMoment(Module):
    """Wraps a module (a layer norm) and adds up the second moment xᵀx of its outputs, which are the inputs of
    the Linear layers after it; in place only while Σ is measured."""

    def __init__(self, inner: Module) -> None:
        self.inner, self.sum, self.count = inner, 0.0, 0

    def forward(self, x: Any) -> Any:
        y = self.inner(x)
        rows = backend.to_numpy(y.data).reshape(-1, y.shape[-1]).astype(backend.np.float64)  # (N, C)
        self.sum, self.count = self.sum + rows.T @ rows, self.count + len(rows)  # (C, N) @ (N, C) -> (C, C)
        return y


def input_moments(base: GPT, ids: Any, cfg: PlantedConfig) -> dict[str, Any]:
    """Σ = E[xᵀx] (C, C), float64 host, of the inputs of every block's attention (ln1's output: what q, k, v
    read) and MLP (ln2's output: what up reads), over ``sigma_batches`` training batches of the base model."""
    model = copy.deepcopy(base)
    norms = sorted(set(INPUT_NORM.values()))
    for block in model.blocks:
        for ln in norms:
            setattr(block, ln, _InputMoment(getattr(block, ln)))
    sampler = BatchSampler(ids, cfg.experiment.model.block_size, cfg.experiment.finetune.batch_size, seed=12345)
    with model.inference():
        for _ in range(cfg.sigma_batches):
            model(sampler.sample()[0])
    out = {}
    for name, *_ in target_layers(base, list(INPUT_NORM)):  # "blocks.{b}.attn.q", ...
        _, b, _, w = name.split(".")
        ln = getattr(model.blocks[int(b)], INPUT_NORM[w])
        out[name] = ln.sum / ln.count
    return out


@dataclass
class PlantedUpdate:
    """ΔW* of one layer, kept as its factors: ΔW* = c · L @ diag(S) @ Vᵀ with L = Σ^(-1/2) Ũ (d_in, k)."""

    left: Any  # (d_in, k) Σ^(-1/2) Ũ: whitened-input directions mapped back to input space
    s: Any  # (k,) planted singular values (before c)
    v: Any  # (d_out, k) orthonormal output directions
    sigma_half: Any  # (d_in, d_in) Σ^(1/2), to measure learned updates in the same metric

    def delta(self, c: float, r: int | None = None) -> Any:
        """c·ΔW* truncated to its top ``r`` planted directions (all k for None): (d_in, d_out), float64."""
        r = len(self.s) if r is None else min(r, len(self.s))
        return c * (self.left[:, :r] * self.s[:r]) @ self.v[:, :r].T  # (d_in, r) @ (r, d_out)


def plant(sigma: Any, d_out: int, cfg: PlantedConfig, gen: Any) -> PlantedUpdate:
    """Draw one layer's planted update in the metric of its inputs (see the module docstring)."""
    np = backend.np
    evals, evecs = np.linalg.eigh(sigma)  # ascending
    evals, evecs = evals[::-1], evecs[:, ::-1]  # largest first
    m = cfg.span * cfg.k
    q, _ = np.linalg.qr(gen.standard_normal((m, cfg.k)))  # (m, k) random orthonormal
    u_tilde = evecs[:, :m] @ q  # (d_in, m) @ (m, k): a k-frame inside Σ's top m directions
    inv_half = evecs[:, :m] @ np.diag(evals[:m] ** -0.5) @ evecs[:, :m].T  # Σ^(-1/2) on that span
    v, _ = np.linalg.qr(gen.standard_normal((d_out, cfg.k)))  # (d_out, k)
    sigma_half = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    return PlantedUpdate(inv_half @ u_tilde, np.asarray(cfg.singular_values, dtype=np.float64), v, sigma_half)


def with_update(base: GPT, layers: dict[str, PlantedUpdate], c: float, r: int | None = None) -> GPT:
    """A copy of ``base`` with W ← W + c·ΔW* (truncated to rank ``r``) in every planted layer."""
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    for name, upd in layers.items():
        w = params[f"{name}.weight"]
        w.data[...] += backend.to_device(upd.delta(c, r).astype(backend.np.float32)).astype(w.dtype)
    return model


class TeacherTargets:
    """The teacher's next-character probabilities for a batch, computed once per batch and kept: every student
    sees the same batches (same data seed), so the teacher runs once per batch set, not once per student. Passed
    to ``train`` as its ``targets`` hook, so ``model(x, probs)`` trains on the soft-target cross-entropy."""

    def __init__(self, teacher: GPT) -> None:
        self.teacher, self.cache = teacher, {}

    def __call__(self, x: Any, y: Any = None) -> Any:
        key = backend.to_numpy(x).tobytes()
        if key not in self.cache:
            with self.teacher.inference():
                logits, _ = self.teacher(x)
            self.cache[key] = _softmax(logits.data, -1)  # (B, T, V)
        return self.cache[key]


def kl_to_teacher(model: GPT, teacher: TeacherTargets, ids: Any, cfg: ExperimentConfig) -> float:
    """KL(teacher ‖ model) in nats per character, over the fixed windows of ``ids`` (as ``train.evaluate``)."""
    xp, total, count = backend.xp, 0.0, 0
    with model.inference():
        for x, _ in iter_eval_batches(ids, cfg.model.block_size, cfg.finetune.batch_size, cfg.finetune.eval_batches):
            p = teacher(x)  # (B, T, V)
            logits, _ = model(x)
            kl = (p * (xp.log(xp.clip(p, 1e-30, None)) - _log_softmax(logits.data, -1))).sum(-1)  # (B, T)
            total, count = total + float(kl.sum()), count + kl.size
    return max(total / count, 0.0)  # identical models give 0 up to rounding (about -1e-8), never below


def calibrate(base: GPT, layers: dict[str, PlantedUpdate], ids: Any, cfg: PlantedConfig,
              iters: int = 30) -> tuple[float, float]:
    """c such that KL(teacher_c ‖ base) on ``ids`` is ``target_kl`` (bisection: the KL grows with c) -> (c, KL)."""
    ecfg = cfg.experiment

    def kl(c: float) -> float:
        return kl_to_teacher(base, TeacherTargets(with_update(base, layers, c)), ids, ecfg)

    lo, hi = 0.0, 1.0
    while kl(hi) < cfg.target_kl:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # a KL that saturates: attention and the final layer norm bound what one update can do
            raise RuntimeError(f"planted: no scale c reaches KL {cfg.target_kl} (KL({hi:g}) = {kl(hi):.3g})")
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(mid) < cfg.target_kl else (lo, mid)
        if hi - lo < 1e-4 * hi:
            break
    c = (lo + hi) / 2
    return c, kl(c)


# -- the students -------------------------------------------------------------------------------------------------


def learned_update(student: GPT, base: GPT, name: str) -> Any:
    """The student's ΔW of layer ``name`` (d_in, d_out), host float64: s·A·B for LoRA, W − W_base otherwise."""
    layer = lora_layers(student).get(name)
    if layer is not None:
        return backend.to_numpy(layer.delta_weight()).astype(backend.np.float64)
    w = dict(student.named_parameters())[f"{name}.weight"].data
    w0 = dict(base.named_parameters())[f"{name}.weight"].data
    return backend.to_numpy(w - w0).astype(backend.np.float64)


def phi_to_planted(learned: Any, upd: PlantedUpdate, k: int) -> dict[str, float]:
    """φ between a learned update and ΔW* in the data's metric (Σ^(1/2)·ΔW: how the update acts on whitened
    inputs): input side and output side, φ(i, k) with i = min(k, the learned update's numerical rank): the share
    of its top-i directions that lie in the planted k-dimensional subspace. None sides for a zero update."""
    mine = upd.sigma_half @ learned  # (d_in, d_out)
    star = upd.sigma_half @ upd.delta(1.0)  # (d_in, d_out), rank k
    i = min(k, analysis.numerical_rank(mine))
    if i == 0:
        return {"input": None, "output": None, "i": 0}
    return {"input": float(analysis.subspace_similarity(mine, star, i, k)[i - 1, k - 1]),
            "output": float(analysis.subspace_similarity(mine.T, star.T, i, k)[i - 1, k - 1]), "i": int(i)}


@dataclass
class Task:
    """One teacher and what its students share: the base, the planted layers, the splits of the text."""

    placement: str
    base: GPT
    teacher: TeacherTargets
    layers: dict[str, PlantedUpdate]
    splits: tuple[Any, Any, Any]  # (train, validation, test) ids of the distillation text
    corpora: Corpora
    cfg: PlantedConfig


def distil(task: Task, method: str, lora: LoRAConfig | None, only: tuple[str, ...], lr: float,
           seed: int) -> dict[str, Any]:
    """One student: a copy of the base set up for ``lora`` (or full fine-tuning of ``only``, or of everything),
    distilled from the teacher at peak rate ``lr`` with data and adapter seed ``seed`` -> its row: KL to the
    teacher on validation (for the choice of lr) and test (reported), forgetting, and φ to ΔW* per layer."""
    cfg, ecfg = task.cfg, task.cfg.experiment
    train_ids, val_ids, test_ids = task.splits
    model = prepare_finetuning(copy.deepcopy(task.base), None if lora is None else replace(lora, seed=seed), only)
    tcfg = replace(ecfg.finetune, lr=lr, min_lr=min(ecfg.finetune.min_lr, lr), seed=seed)
    history = train(model, (train_ids, val_ids), tcfg, progress=False, targets=task.teacher)
    adapters = lora_layers(model)
    adapted = [name for name in task.layers  # the planted layers this student changes (none: the wrong matrices)
               if (lora is not None and name in adapters)
               or (lora is None and (not only or name.rsplit(".", 1)[1] in only))]
    return {"placement": task.placement, "method": method, "lr": lr, "seed": seed,
            "mode": finetuning_mode(lora, only),
            "rank": lora.r if lora else None, "targets": ",".join(lora.targets if lora else only or ("all",)),
            "trainable": count_parameters(model).trainable, "stopped": history.stopped,
            "kl_val": kl_to_teacher(model, task.teacher, val_ids, ecfg),
            "kl_test": kl_to_teacher(model, task.teacher, test_ids, ecfg),
            "pretrain_val_loss": pretrain_val_loss(model, task.corpora, ecfg),
            "phi": {name: phi_to_planted(learned_update(model, task.base, name), task.layers[name], cfg.k)
                    for name in adapted},
            "history": {k: v for k, v in history.to_dict().items() if k != "step_loss"}}


def distillation_splits(corpora: Corpora, cfg: PlantedConfig) -> tuple[Any, Any, Any]:
    """(train, validation, test) ids of the distillation text: the experiment's fine-tuning corpus as
    ``load_corpora`` cuts it (``data.train_val_test_split``: the last 10% test, the 10% before it validation); a
    ValueError naming the corpus if a part cannot hold one window."""
    splits = (*corpora.finetune, corpora.test)
    need = cfg.experiment.model.block_size + 1
    if corpora.test is None or min(len(part) for part in splits) < need:
        raise ValueError(f"distillation corpus {cfg.experiment.finetune_corpus!r} is too short: its train, "
                         f"validation and test parts need {need} characters each")
    return splits


def run_planted(cfg: PlantedConfig, progress: bool = True, corpora: Corpora | None = None) -> dict[str, Any]:
    """The whole experiment -> one results dict (JSON-ready). See the module docstring."""
    start = time.perf_counter()
    ecfg = cfg.experiment
    corpora = corpora or load_corpora(ecfg)
    base, base_info = pretrain_base(ecfg, corpora, progress)
    train_ids, val_ids, test_ids = distillation_splits(corpora, cfg)
    gen = backend.rng(cfg.plant_seed)
    sigma = input_moments(base, train_ids, cfg)
    results: dict[str, Any] = {
        "experiment": "planted", "config": asdict(cfg), "machine": machine_info(),
        "vocab_size": corpora.tokenizer.vocab_size,
        "base": {**base_info, "total": count_parameters(base).total,
                 "pretrain_val_loss": pretrain_val_loss(base, corpora, ecfg)},
        "placements": {}, "runs": []}
    n_runs = sum(len(cfg.full_lrs if lora is None else cfg.lora_lrs) + cfg.seeds - 1  # the grid may grow past it
                 for p in cfg.placements for _, lora, _ in cfg.methods(p))
    bar = tqdm(total=n_runs, desc="planted", disable=not progress)
    for placement in cfg.placements:
        linears = planted_layers(base, placement)
        layers = {name: plant(sigma[name], lin.d_out, cfg, gen) for name, lin in linears.items()}
        c, kl_val = calibrate(base, layers, val_ids, cfg)
        teacher_model = with_update(base, layers, c)
        teacher = TeacherTargets(teacher_model)
        base_kl = kl_to_teacher(base, teacher, test_ids, ecfg)
        oracle = {str(r): kl_to_teacher(with_update(base, layers, c, r), teacher, test_ids, ecfg) for r in cfg.ranks}
        planted_rank = {name: analysis.numerical_rank(upd.delta(c)) for name, upd in layers.items()}
        norm = backend.np.linalg.norm  # ‖ΔW*‖_F / ‖W‖_F per layer: how large the planted change is next to W
        rel_norm = {name: float(norm(upd.delta(c)) / norm(backend.to_numpy(linears[name].weight.data)))
                    for name, upd in layers.items()}
        summary: dict[str, Any] = {
            "targets": placement.split(","), "c": c, "teacher_kl_val": kl_val, "base_kl": base_kl,
            "teacher_pretrain_val_loss": pretrain_val_loss(teacher_model, corpora, ecfg),
            "planted_rank": planted_rank, "planted_norm_ratio": rel_norm, "oracle": oracle, "methods": {}}

        task = Task(placement, base, teacher, layers, (train_ids, val_ids, test_ids), corpora, cfg)
        for method, lora, only in cfg.methods(placement):
            def run(lr: float, seed: int = 0, task=task, method=method, lora=lora, only=only) -> dict[str, Any]:
                row = distil(task, method, lora, only, lr, seed)
                results["runs"].append(row)
                bar.update()
                return row

            grid = cfg.full_lrs if lora is None else cfg.lora_lrs
            search = search_lr(run, grid, key="kl_val")
            seeds = [next(r for r in search["rows"] if r["chosen"])] + [run(search["lr"], s)
                                                                          for s in range(1, cfg.seeds)]
            for row in seeds:
                row["chosen"] = True
            kls = [r["kl_test"] for r in seeds]
            forgotten = [r["pretrain_val_loss"] - results["base"]["pretrain_val_loss"] for r in seeds]
            phi = seeds[0].get("phi", {})
            summary["methods"][method] = {
                "rank": lora.r if lora else None, "targets": seeds[0]["targets"], "trainable": seeds[0]["trainable"],
                "lr": search["lr"], "interior": search["interior"], "grid": search["grid"],
                "kl": interval(kls), "kl_share": interval([v / base_kl for v in kls]),
                "forgotten": interval(forgotten),
                "phi": {side: statistics.fmean(v[side] for v in phi.values() if v[side] is not None)
                        if any(v[side] is not None for v in phi.values()) else None for side in ("input", "output")},
                "phi_per_layer": phi}
        results["placements"][placement] = summary
        del task, teacher, teacher_model  # the teacher's cached probabilities: a few hundred MB at full size
    bar.close()
    results["seconds"] = time.perf_counter() - start
    return to_json(results)


# -- reading the results ------------------------------------------------------------------------------------------


def verdict(results: dict[str, Any]) -> list[str]:
    """The experiment's claims, each a sentence computed from ``results``: the staircase (r < k at a floor,
    r >= k matching full fine-tuning) and the placement floor, with the numbers they rest on."""
    k, lines = results["config"]["k"], []
    for placement, s in results["placements"].items():
        m = s["methods"]
        lora = {v["rank"]: v for name, v in m.items() if name.startswith("lora-r")}
        full_name = next(n for n in m if n.startswith("full-"))
        best_full = min(m[full_name]["kl"]["mean"], m["full"]["kl"]["mean"])
        below = [r for r in lora if r < k]
        above = [r for r in lora if r >= k]
        floor = min(lora[r]["kl"]["mean"] for r in below)
        worst_above = max(lora[r]["kl"]["mean"] for r in above)
        wrong = next(v for n, v in m.items() if n.startswith("wrong-"))
        def shares(ranks: list[int], fmt: str, lora: dict[int, Any] = lora) -> str:
            return ", ".join(f"r={r} {100 * lora[r]['kl_share']['mean']:{fmt}}%" for r in ranks)

        lines.append(
            f"{placement} teacher (k = {k}, base KL {s['base_kl']:.3f}): LoRA r < k stops at "
            f"{shares(below, '.1f')} of the base's KL; r >= k reaches {shares(above, '.2f')}; "
            f"full fine-tuning of {full_name[5:]} {100 * m[full_name]['kl_share']['mean']:.2f}%, of everything "
            f"{100 * m['full']['kl_share']['mean']:.2f}%; LoRA on the wrong matrices ({wrong['targets']}, "
            f"r = {wrong['rank']}) {100 * wrong['kl_share']['mean']:.1f}%. "
            + ("r >= k matches full fine-tuning" if worst_above <= max(best_full, 0.01 * s["base_kl"])
               and floor > 2 * worst_above else "the staircase does not show")
            + f" (worst r >= k: {worst_above:.4f} nats vs best full {best_full:.4f}; best r < k: {floor:.4f}).")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """One row per (teacher, student): trainable numbers, chosen lr (* = at the grid's edge), KL to the teacher
    on test (mean ± 95% interval over seeds), its share of the base's KL, the oracle at that rank, φ to ΔW*
    and the forgetting."""
    def ci(d: dict[str, Any], scale: float = 1.0, fmt: str = ".4f") -> str:
        half = f" ± {scale * d['ci95']:{fmt.lstrip('+')}}" if d.get("ci95") is not None else ""
        return f"{scale * d['mean']:{fmt}}{half}"

    def f(v: Any, fmt: str = ".2f") -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| teacher | student | trainable | lr | KL to teacher (nats/char) | share of base's KL | oracle "
             "(rank-r ΔW*) | φ in / out | forgotten (nats) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for placement, s in results["placements"].items():
        lines.append(f"| {placement} | base (no training) | 0 | | {s['base_kl']:.4f} | 100% | | | 0 |")
        for name, m in s["methods"].items():
            oracle = s["oracle"].get(str(m["rank"])) if name.startswith("lora-r") else None
            lines.append(f"| {placement} | {name} | {m['trainable']:,} | {m['lr']:g}{'' if m['interior'] else '*'} "
                         f"| {ci(m['kl'])} | {ci(m['kl_share'], 100, '.2f')}% | {f(oracle, '.4f')} | "
                         f"{f(m['phi']['input'])} / {f(m['phi']['output'])} | {ci(m['forgotten'], fmt='+.3f')} |")
    return "\n".join(lines)
