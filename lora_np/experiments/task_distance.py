"""Why low rank works, and when it does not: the task-distance study (issue 8), with the paper's analyses of §7
rerun on the models it trains.

The question: does the rank LoRA needs grow with the distance between the fine-tuning task and pretraining?
Hu et al. (2021) report that r = 1–8 on W_q, W_v rivals full fine-tuning (Tables 6 and 18), for bases that
already know most of what the task needs. Our rank sweep (``sweep.py``), Bible -> Python docs, is the other
regime. Here one base model is fine-tuned on three tasks at increasing distance, every method on every task.

The base ("bible+code"): a character GPT pretrained on the King James Bible WITHOUT its last nine books
(``HELD_OUT_BOOKS``, Hebrews to Revelation, about 150k characters) plus the standard library's own ``.py``
sources (``data.load_stdlib_sources``, capped at ``code_chars``), so that it has seen English (of 1611) and Python
code. Its vocabulary is the characters of its pretraining TRAINING text, and every task is made of those
characters only (lines with any other character are dropped, and the tests check it): a task's difficulty is then
never a character the base has no embedding for, the confound of the Bible -> Python-docs sweep (38 unseen
characters).

The tasks, ordered by design and measured by the base's own test loss on them (reported as ``base_test_loss``):
    near    the held-out books: the pretraining kind of text, text never seen
    middle  Python's reference documentation (``pydoc_data``): English prose about code, a style the base saw
            neither of its parts in (modern technical English; code inside prose), both parts familiar
    far     the held-out books in a letter-substitution cipher (a fixed permutation of a-z, the same for A-Z):
            every character, every word boundary and every punctuation mark known, but each letter now stands for
            another. No pretraining prepares for it, and what it needs (remap 26 letters in and out) is a
            high-rank change by construction. It is artificial on purpose: a far task whose characters are all
            known does not exist among the texts on every machine (Bible -> Python docs has unseen characters).

For every task: LoRA on q, v at ``qv_ranks``, LoRA on every linear at ``all_linear_ranks``, and full fine-tuning,
each at every learning rate of its grid (``lora_lrs`` or ``full_lrs``); all runs take the same steps on the same
batches. Each task's text is cut into train / validation / test (the last 10% is test, the 10% before it
validation). The learning rate of each method is chosen on the validation loss alone (``choose_lr``); the test
loss of the chosen run is what is reported. Headline: the share of full fine-tuning's gain that LoRA recovers,
(base − LoRA) / (base − full), on the test split.

On ``side_task`` also: LoRA at full rank (r = min(d_in, d_out) = n_embd) on every linear, with the embeddings,
positions, head and final layer norm trained too, against full fine-tuning (§4.1: LoRA at full rank "roughly
recovers" full fine-tuning), and rsLoRA (α/√r, Kalajdzievski 2023) against LoRA (α/r) at ``rslora_ranks`` and one
learning rate. And for every task, the analyses of ``analysis.py`` on the trained models: subspace similarity of A
between r = 8 and r = 64 and between two seeds of r = 64 (§7.2), amplification for r = 4 and r = 64 (§7.3), the
spectrum of full fine-tuning's ΔW (§4.1's intrinsic rank).

Computes and returns; writes nothing (the command line does: ``python -m lora_np study``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tqdm.auto import tqdm

from .. import analysis, backend
from ..data import (
    CharTokenizer,
    load_bible_verses,
    load_python_docs,
    load_stdlib_sources,
    train_val_split,
    train_val_test_split,
)
from ..lora import EXTRA_MODULES, LoRAConfig, apply_lora, count_parameters, lora_layers
from ..train import TrainConfig, evaluate
from .runs import (
    Corpora,
    ExperimentConfig,
    RunSpec,
    finetune_run,
    machine_info,
    pretrain_base,
    pretrain_val_loss,
    to_json,
)

HELD_OUT_BOOKS = ("Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation")
TASKS = ("near", "middle", "far")
TASK_TEXT = {"near": "held-out Bible books (Hebrews to Revelation)",
             "middle": "Python's reference documentation (pydoc_data): English prose about code",
             "far": "the held-out Bible books in a letter-substitution cipher"}
SAMPLE_PROMPTS = {"near": "And I saw", "middle": "The ", "far": "And I saw"}  # far's is enciphered

# -- the configuration --------------------------------------------------------------------------------------------


def _study_experiment() -> ExperimentConfig:
    # 200 steps (the sweep takes 300): the whole study, 83 runs, must fit an hour on 2 cores; see the README
    return ExperimentConfig(
        finetune=TrainConfig(max_steps=200, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=50),
        ranks=(1, 2, 4, 8, 64), sample_tokens=100, pretrain_corpus="bible+code", finetune_corpus="study")


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the study's numbers. ``experiment`` holds the model, pretraining and
    fine-tuning configs and LoRA's α (its ``lora.alpha``); the rest says which runs to make."""

    experiment: ExperimentConfig = field(default_factory=_study_experiment)
    code_chars: int = 1_500_000  # standard-library code in the pretraining text (the Bible part is ~4.0M)
    qv_ranks: tuple[int, ...] = (1, 2, 4, 8, 64)  # LoRA on q, v
    all_linear_ranks: tuple[int, ...] = (1, 8)  # LoRA on every linear of every block
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # the learning-rate grid of every LoRA method
    full_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # ... and of full fine-tuning (it moves every weight)
    rslora_ranks: tuple[int, ...] = (1, 4, 16, 64)  # rsLoRA against LoRA (item 6), at one learning rate:
    rslora_lr: float = 3e-3
    side_task: str = "middle"  # the task of items 5 (full-rank LoRA) and 6 (rsLoRA)
    cipher_seed: int = 0  # the far task's letter permutation
    phi_size: int = 8  # φ(i, j) for i, j <= phi_size between r = 8 and r = 64 (Fig. 3's zoomed panels)
    seed_phi_size: int = 16  # ... and between two seeds of r = 64 (Fig. 4 shows up to 64; the JSON stays small)

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, ExperimentConfig):
            raise ValueError(f"StudyConfig.experiment must be an ExperimentConfig, got {self.experiment!r}")
        d = self.experiment.model.n_embd
        for name in ("qv_ranks", "all_linear_ranks", "rslora_ranks"):
            ranks = getattr(self, name)
            if not isinstance(ranks, tuple) or not ranks or any(
                    isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d for r in ranks):
                raise ValueError(f"StudyConfig.{name} must be a tuple of integers in [1, n_embd = {d}], got {ranks!r}")
        for name in ("lora_lrs", "full_lrs"):
            lrs = getattr(self, name)
            if not isinstance(lrs, tuple) or len(lrs) < 3 or len(set(lrs)) != len(lrs) or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0)
                    for v in lrs):
                raise ValueError(f"StudyConfig.{name} must be at least 3 distinct numbers > 0, got {lrs!r}")
        if not (isinstance(self.rslora_lr, (int, float)) and math.isfinite(self.rslora_lr) and self.rslora_lr > 0):
            raise ValueError(f"StudyConfig.rslora_lr must be a number > 0, got {self.rslora_lr!r}")
        if self.side_task not in TASKS:
            raise ValueError(f"StudyConfig.side_task must be one of {TASKS}, got {self.side_task!r}")
        need = {4, 8, 64} - set(self.qv_ranks)  # the analyses read r = 4, 8, 64 (Table 7, Fig. 3 and 4)
        if need:
            raise ValueError(f"StudyConfig.qv_ranks must hold 4, 8 and 64 (the §7 analyses use them), lacks {need}")
        for name in ("code_chars", "cipher_seed", "phi_size", "seed_phi_size"):
            v = getattr(self, name)
            low = 0 if name == "cipher_seed" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"StudyConfig.{name} must be an integer >= {low}, got {v!r}")

    @classmethod
    def quick(cls, **changes: Any) -> StudyConfig:
        """Seconds, not minutes, for tests and CI: the quick model (C = 64, one block), 8 fine-tuning steps and a
        small code share. Every run of the full study is made (same code path); the numbers are noise."""
        experiment = ExperimentConfig.quick(
            finetune=TrainConfig(max_steps=8, batch_size=8, warmup_steps=2, eval_every=4, eval_batches=2),
            ranks=(1, 2, 4, 8, 64), sample_tokens=20, pretrain_corpus="bible+code", finetune_corpus="study")
        return cls(**{"experiment": experiment, "code_chars": 200_000, **changes})

    def methods(self) -> list[tuple[str, LoRAConfig | None]]:
        """(method name, LoRA config or None for full fine-tuning) of every run of the per-task grid."""
        alpha = self.experiment.lora.alpha
        return ([(f"lora-qv-r{r}", LoRAConfig(r=r, alpha=alpha, targets="q,v")) for r in self.qv_ranks]
                + [(f"lora-all-r{r}", LoRAConfig(r=r, alpha=alpha, targets="all-linear"))
                   for r in self.all_linear_ranks] + [("full", None)])

    def lrs(self, lora: LoRAConfig | None) -> tuple[float, ...]:
        return self.full_lrs if lora is None else self.lora_lrs

    def full_rank_lora(self) -> LoRAConfig:
        """Item 5: r = min(d_in, d_out) (= n_embd for C x C and C x 4C) on every linear, embeddings, positions,
        head and final layer norm trained too. What stays frozen: each block's layer norms and biases."""
        return LoRAConfig(r=self.experiment.model.n_embd, alpha=self.experiment.lora.alpha, targets="all-linear",
                          modules_to_save=EXTRA_MODULES)


# -- the texts ----------------------------------------------------------------------------------------------------


@dataclass
class StudyData:
    tokenizer: CharTokenizer  # the characters of the pretraining TRAINING text
    pretrain: tuple[Any, Any]  # (train ids, validation ids)
    tasks: dict[str, tuple[Any, Any, Any]]  # task -> (train, validation, test) ids
    info: dict[str, Any]  # sizes, characters and dropped lines, for the results
    digest: str  # identifies the pretraining text and vocabulary (the base model's cache key)
    texts: dict[str, str]  # task -> its text (after filtering)

    def corpora(self, task: str) -> Corpora:
        """The run machinery's view of one task: the shared base's pretraining split, this task's train and
        validation, and its test split (scored once after training)."""
        train, val, test = self.tasks[task]
        return Corpora(self.tokenizer, self.pretrain, (train, val), unseen=[], digest=self.digest, test=test)


def cipher_table(seed: int) -> dict[str, str]:
    """A letter substitution: a seeded permutation of a-z, applied alike to A-Z; other characters unchanged.
    A derangement (no letter maps to itself), so that every letter of the text changes."""
    lower = "abcdefghijklmnopqrstuvwxyz"
    gen = backend.rng(seed)
    while True:
        perm = [lower[i] for i in gen.permutation(26)]
        if all(a != b for a, b in zip(lower, perm)):
            break
    table = dict(zip(lower, perm))
    return table | {a.upper(): b.upper() for a, b in table.items()}


def encipher(text: str, seed: int) -> str:
    return text.translate(str.maketrans(cipher_table(seed)))


def _keep_lines(text: str, chars: set[str]) -> tuple[str, int]:
    """``text`` without the lines that hold a character outside ``chars``; and how many lines were dropped."""
    lines = text.split("\n")
    kept = [line for line in lines if set(line) <= chars]
    return "\n".join(kept), len(lines) - len(kept)


def load_study_data(cfg: StudyConfig) -> StudyData:
    """The base's pretraining text (Bible without ``HELD_OUT_BOOKS``, then the code), its vocabulary, and the
    three tasks made of that vocabulary only. The Bible and the code are split into train / validation
    separately, so that both are in both parts."""
    verses = load_bible_verses()
    unknown = set(HELD_OUT_BOOKS) - {v["book"] for v in verses}
    if unknown:
        raise RuntimeError(f"the Bible corpus lacks the held-out books {sorted(unknown)}")
    bible = "\n".join(v["text"] for v in verses if v["book"] not in HELD_OUT_BOOKS)
    held_out = "\n".join(v["text"] for v in verses if v["book"] in HELD_OUT_BOOKS)
    code = load_stdlib_sources(cfg.code_chars)
    parts = {"bible": bible, "code": code}
    # train_val_split keeps the first len - round(0.1·len) tokens for training: the same cut, on the strings
    train_text = "".join(t[:len(t) - int(round(len(t) * 0.1))] for t in parts.values())
    tok = CharTokenizer(train_text)  # every character of the pretraining TRAINING text, and no other
    pre = [train_val_split(tok.encode(t)) for t in parts.values()]
    np = backend.np
    pretrain = (np.concatenate([p[0] for p in pre]), np.concatenate([p[1] for p in pre]))
    known = set(tok.chars)
    texts, info = {}, {"pretrain": {"bible_chars": len(bible), "code_chars": len(code), "vocabulary": tok.chars,
                                    "train_tokens": len(pretrain[0]), "val_tokens": len(pretrain[1])},
                       "held_out_books": list(HELD_OUT_BOOKS), "tasks": {}}
    raw = {"near": held_out, "middle": load_python_docs(), "far": encipher(held_out, cfg.cipher_seed)}
    tasks = {}
    for task in TASKS:
        text, dropped = _keep_lines(raw[task], known)
        texts[task] = text
        tasks[task] = train_val_test_split(tok.encode(text))
        info["tasks"][task] = {"text": TASK_TEXT[task], "chars": len(text), "dropped_lines": dropped,
                               "distinct_chars": len(set(text)),
                               **{f"{s}_tokens": len(ids) for s, ids in zip(("train", "val", "test"), tasks[task])}}
    digest = hashlib.sha256(tok.chars.encode() + b"\0" + bible.encode() + b"\0" + code.encode()).hexdigest()
    return StudyData(tok, pretrain, tasks, info, digest, texts)


def task_config(cfg: StudyConfig, task: str, tok: CharTokenizer) -> ExperimentConfig:
    """The experiment config of one task: the study's, with the task's sample prompt (enciphered for far)."""
    prompt = SAMPLE_PROMPTS[task] if task != "far" else encipher(SAMPLE_PROMPTS[task], cfg.cipher_seed)
    return replace(cfg.experiment, finetune_corpus=task, samples_prompt=prompt)


# -- the learning-rate choice ------------------------------------------------------------------------------------


def choose_lr(rows: list[dict[str, Any]]) -> dict[str, float]:
    """method -> the learning rate of its run with the lowest final VALIDATION loss. Nothing else of a row is
    read (the test loss never is: the tests check it); runs that diverged (no finite validation loss) lose."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows:
        val = row["final_val_loss"]
        val = math.inf if val is None or not math.isfinite(val) or row.get("stopped") else val
        if row["method"] not in best or val < best[row["method"]][0]:
            best[row["method"]] = (val, row["lr"])
    return {method: lr for method, (_, lr) in best.items()}


def recovered_share(base: float, lora: float, full: float) -> float | None:
    """(base − LoRA) / (base − full): 1 = all of full fine-tuning's gain, 0 = none; None if full gained nothing."""
    gain = base - full
    return (base - lora) / gain if gain > 0 else None


# -- the analyses (§7) on the trained models ---------------------------------------------------------------------


def _block(phi: Any, digits: int = 4) -> list[list[float]]:
    return [[round(float(v), digits) for v in row] for row in phi]


def _a(model: Any, name: str) -> Any:
    return backend.to_numpy(lora_layers(model)[name].A.data)


def analyse_task(base: Any, models: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    """Items 2–4 of issue 8 on one task's trained models (``models``: "lora-qv-r4", "lora-qv-r8", "lora-qv-r64",
    "lora-qv-r64-seed1", "full", at their chosen learning rates). Small, JSON-ready numbers only."""
    np, gen = backend.np, backend.rng(cfg.cipher_seed + 1)
    n_layer, d = cfg.experiment.model.n_layer, cfg.experiment.model.n_embd
    last = {w: f"blocks.{n_layer - 1}.attn.{w}" for w in ("q", "v")}  # the paper shows one layer; we the last
    out: dict[str, Any] = {"layer": n_layer - 1, "d": d, "phi": {}, "a_moved": {}, "amplification": {},
                           "spectrum": {}}
    for w, name in last.items():
        a8, a64, a64s = (_a(models[m], name) for m in ("lora-qv-r8", "lora-qv-r64", "lora-qv-r64-seed1"))
        n, m = min(cfg.phi_size, 8), min(cfg.seed_phi_size, 64)
        out["phi"][w] = {
            "r8_vs_r64": _block(analysis.subspace_similarity(a8, a64, n, n)),
            "r64_seeds": _block(analysis.subspace_similarity(a64, a64s, m, m)),
            "random_8_vs_64": _block(analysis.subspace_similarity(gen.standard_normal((d, 8)),
                                                                  gen.standard_normal((d, 64)), n, n)),
            "random_64_vs_64": _block(analysis.subspace_similarity(gen.standard_normal((d, 64)),
                                                                   gen.standard_normal((d, 64)), m, m)),
        }
        for run, lora in (("lora-qv-r8", LoRAConfig(r=8, alpha=cfg.experiment.lora.alpha, targets="q,v")),
                          ("lora-qv-r64", LoRAConfig(r=64, alpha=cfg.experiment.lora.alpha, targets="q,v"))):
            a0 = _a(apply_lora(copy.deepcopy(base), lora), name)  # A as initialised: the same seed, a fresh copy
            out["a_moved"][f"{run} {w}"] = float(np.linalg.norm(_a(models[run], name) - a0) / np.linalg.norm(a0))
    for run, r in (("lora-qv-r4", 4), ("lora-qv-r64", 64)):  # Table 7: W_q of one layer, k = r
        layer = lora_layers(models[run])[last["q"]]
        dw = layer.delta_weight()  # in the model's dtype: its numerical rank is judged at that rounding
        k = min(r, analysis.numerical_rank(dw))
        out["amplification"][f"r{r}"] = (analysis.amplification(dw, layer.weight.data, k).to_dict() | {"r": r}
                                         if k else None)
    base_p, full_p = dict(base.named_parameters()), dict(models["full"].named_parameters())
    for block in range(n_layer):
        for w in ("q", "v"):
            name = f"blocks.{block}.attn.{w}"
            dw_full = backend.to_numpy(full_p[f"{name}.weight"].data) - backend.to_numpy(base_p[f"{name}.weight"].data)
            out["spectrum"][name] = {
                "full": [round(float(s), 5) for s in analysis.singular_spectrum(dw_full)],
                "effective_rank": {"full": analysis.effective_rank(dw_full),
                                   **{f"lora-r{r}": analysis.effective_rank(
                                       lora_layers(models[f"lora-qv-r{r}"])[name].delta_weight()) for r in (8, 64)},
                                   "random": analysis.effective_rank(gen.standard_normal(dw_full.shape))}}
    return out


# -- the study ----------------------------------------------------------------------------------------------------


def _slim(row: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A run's row for the study's results: every step's loss dropped from the history (83 runs x 200 steps would
    dominate the JSON; the evaluated points stay)."""
    row = {**row, "history": {k: v for k, v in row["history"].items() if k != "step_loss"}}
    return row | extra


def run_study(cfg: StudyConfig, progress: bool = True, data: StudyData | None = None) -> dict[str, Any]:
    """The whole study -> one results dict (JSON-ready). ``data`` (``load_study_data(cfg)``) can be passed when
    the caller already loaded it (the command line does, to check it before any work)."""
    start = time.perf_counter()
    data = data or load_study_data(cfg)
    ecfg = cfg.experiment
    base, base_info = pretrain_base(ecfg, data.corpora("near"), progress)
    T, bs, nb = ecfg.model.block_size, ecfg.finetune.batch_size, ecfg.finetune.eval_batches
    results: dict[str, Any] = {"experiment": "study", "config": asdict(cfg), "machine": machine_info(),
                               "data": data.info, "vocab_size": data.tokenizer.vocab_size,
                               "base": {**base_info, "total": count_parameters(base).total,
                                        "pretrain_val_loss": pretrain_val_loss(base, data.corpora("near"), ecfg)},
                               "tasks": {}, "runs": []}
    methods = cfg.methods()
    total = len(TASKS) * sum(len(cfg.lrs(lora)) for _, lora in methods) + len(TASKS) + len(cfg.lora_lrs) + len(
        cfg.rslora_ranks) + 1
    bar = tqdm(total=total, desc="study", disable=not progress)

    def run(task: str, spec: RunSpec, method: str, part: str, tcfg: ExperimentConfig) -> tuple[Any, dict]:
        model, row = finetune_run(base, spec, tcfg, data.corpora(task), progress=False, measure_memory=False)
        row = _slim(row, task=task, method=method, part=part)
        results["runs"].append(row)
        bar.update()
        return model, row

    for task in TASKS:
        tcfg = task_config(cfg, task, data.tokenizer)
        train, val, test = data.tasks[task]
        rows, models = [], {}
        for method, lora in methods:
            for lr in cfg.lrs(lora):
                model, row = run(task, RunSpec(f"{task}/{method}/lr{lr:g}", lora, lr), method, "grid", tcfg)
                rows.append(row)
                models[method, lr] = model
        chosen = choose_lr(rows)
        for row in rows:
            row["chosen"] = row["lr"] == chosen[row["method"]]
        best = {r["method"]: r for r in rows if r["chosen"]}
        base_test = evaluate(base, test, T, bs, nb)
        full_test = best["full"]["test_loss"]
        # Fig. 4's second seed: r = 64 with another adapter seed AND another batch order, at r = 64's chosen lr
        lora64 = dict(methods)["lora-qv-r64"]
        seed_cfg = replace(tcfg, finetune=replace(tcfg.finetune, seed=1))
        seed_model, _ = run(task, RunSpec(f"{task}/lora-qv-r64-seed1", replace(lora64, seed=1),
                                          chosen["lora-qv-r64"]), "lora-qv-r64-seed1", "seed", seed_cfg)
        picked = {m: models[m, chosen[m]] for m in ("lora-qv-r4", "lora-qv-r8", "lora-qv-r64", "full")}
        results["tasks"][task] = {
            "text": TASK_TEXT[task], "base_val_loss": evaluate(base, val, T, bs, nb), "base_test_loss": base_test,
            "chosen_lr": chosen, "test_loss": {m: r["test_loss"] for m, r in best.items()},
            "val_loss": {m: r["final_val_loss"] for m, r in best.items()},
            "trainable": {m: r["trainable"] for m, r in best.items()},
            "recovered": {m: recovered_share(base_test, r["test_loss"], full_test) for m, r in best.items()
                          if m != "full"},
            "analysis": analyse_task(base, picked | {"lora-qv-r64-seed1": seed_model}, cfg),
        }
        del models, picked, seed_model
    side = cfg.side_task
    tcfg = task_config(cfg, side, data.tokenizer)
    side_rows = [r for r in results["runs"] if r["task"] == side and r["part"] == "grid"]
    # Item 5: LoRA at full rank on every linear + embeddings, its own lr grid chosen on validation
    full_rank = cfg.full_rank_lora()
    fr_rows = [run(side, RunSpec(f"{side}/lora-full-rank/lr{lr:g}", full_rank, lr), "lora-full-rank", "full-rank",
                   tcfg)[1] for lr in cfg.lora_lrs]
    fr_lr = choose_lr(fr_rows)["lora-full-rank"]
    for row in fr_rows:
        row["chosen"] = row["lr"] == fr_lr
    fr = next(r for r in fr_rows if r["chosen"])
    full = next(r for r in side_rows if r["method"] == "full" and r["chosen"])
    side_base = results["tasks"][side]["base_test_loss"]
    results["full_rank"] = {"task": side, "lora": full_rank.to_dict(), "lr": fr_lr, "test_loss": fr["test_loss"],
                            "trainable": fr["trainable"], "full_test_loss": full["test_loss"],
                            "full_trainable": full["trainable"], "full_lr": full["lr"], "base_test_loss": side_base,
                            "recovered": recovered_share(side_base, fr["test_loss"], full["test_loss"])}
    # Item 6: rsLoRA against LoRA on q, v at one lr; a LoRA run of the grid at that lr is reused, not repeated
    rs: dict[str, dict[str, float]] = {"lora": {}, "rslora": {}}
    for r in cfg.rslora_ranks:
        for kind in ("lora", "rslora"):
            lora = LoRAConfig(r=r, alpha=ecfg.lora.alpha, targets="q,v", rslora=kind == "rslora")
            row = next((x for x in side_rows if x["lora"] == lora.to_dict() and x["lr"] == cfg.rslora_lr), None)
            if row is None:
                _, row = run(side, RunSpec(f"{side}/{kind}-qv-r{r}/lr{cfg.rslora_lr:g}", lora, cfg.rslora_lr),
                             f"{kind}-qv-r{r}", "rslora", tcfg)
            rs[kind][str(r)] = row["test_loss"]
    results["rslora"] = {"task": side, "lr": cfg.rslora_lr, "alpha": ecfg.lora.alpha, "test_loss": rs,
                         "base_test_loss": side_base, "full_test_loss": full["test_loss"]}
    bar.close()
    results["seconds"] = time.perf_counter() - start
    return to_json(results)


# -- tables for the command line and the README -------------------------------------------------------------------


def _f(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown_table(results: dict[str, Any]) -> str:
    """The headline: per task, the base's test loss, each method's test loss at its chosen lr and the share of
    full fine-tuning's gain it recovers."""
    tasks = results["tasks"]
    methods = list(next(iter(tasks.values()))["test_loss"])
    head = "| method | " + " | ".join(f"{t}: test loss | {t}: recovered" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(tasks))]
    lines.append("| base (no fine-tuning) | " + " | ".join(f"{v['base_test_loss']:.3f} | 0" for v in tasks.values())
                 + " |")
    for m in methods:
        cells = [f"{v['test_loss'][m]:.3f} (lr {v['chosen_lr'][m]:g}) | "
                 + ("1" if m == "full" else _f(v["recovered"][m], ".2f")) for v in tasks.values()]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The paper's claims next to ours: (claim, what the paper reports, how to read ours from the results)
PAPER_CLAIMS = (
    ("Table 6/18: r = 1–8 on q, v rivals full fine-tuning",
     "GPT-3 on WikiSQL / MultiNLI: r = 1 reaches 73.4 / 91.3, r = 8 73.8 / 91.6 (Table 6), "
     "full fine-tuning 73.8 / 89.5 (Table 4)"),
    ("§4.1: LoRA at full rank on every weight roughly recovers full fine-tuning",
     "'training LoRA ... roughly recovers the expressiveness of full fine-tuning' as r grows to the weights' rank"),
    ("Fig. 3: the top direction of A at r = 8 is shared with r = 64",
     "φ(1, 1) > 0.5 between A_r8 and A_r64 (ΔW_v, GPT-3 layer 48); lower for the other directions"),
    ("Fig. 4: two seeds of r = 64 share a few top directions",
     "φ of two seeds well above the random baseline for the top few i, j; near chance beyond"),
    ("Table 7: ΔW amplifies directions W does not emphasise",
     "r = 4: ‖UᵀWV‖_F 0.32 (ΔW) vs 21.67 (W) vs 0.02 (random), factor 21.5; r = 64: 1.90 / 37.71 / 0.33, factor 1.9"),
    ("rsLoRA: α/√r keeps high ranks learning at one learning rate",
     "Kalajdzievski 2023: with α/r, loss stops improving beyond small r; with α/√r, larger r keeps improving"),
)


def measured_claims(results: dict[str, Any]) -> list[str]:
    """The 'what we measured here' column of the README's table, one line per entry of PAPER_CLAIMS, from the
    study's results (nothing typed by hand)."""
    tasks, side = results["tasks"], results["full_rank"]["task"]

    def rec(task: str, m: str) -> str:
        return _f(tasks[task]["recovered"].get(m), ".2f")

    qv = [m for m in next(iter(tasks.values()))["recovered"] if m.startswith("lora-qv-")]
    table6 = "; ".join(f"{t}: " + ", ".join(f"{m[8:]} {rec(t, m)}" for m in qv) for t in tasks)
    fr = results["full_rank"]
    sec41 = (f"{side}: full-rank LoRA + embeddings {fr['test_loss']:.3f} vs full {fr['full_test_loss']:.3f} "
             f"(base {fr['base_test_loss']:.3f}; recovered {_f(fr['recovered'], '.2f')})")
    phi = "; ".join(f"{t}: W_q {v['analysis']['phi']['q']['r8_vs_r64'][0][0]:.2f}, "
                    f"W_v {v['analysis']['phi']['v']['r8_vs_r64'][0][0]:.2f}" for t, v in tasks.items())
    d = next(iter(tasks.values()))["analysis"]["d"]
    seeds = "; ".join(f"{t}: W_q {v['analysis']['phi']['q']['r64_seeds'][0][0]:.2f}, "
                      f"W_v {v['analysis']['phi']['v']['r64_seeds'][0][0]:.2f}" for t, v in tasks.items())

    def amp(v: dict[str, Any]) -> str:
        parts = []
        for key, a in v["analysis"]["amplification"].items():
            parts.append(f"{key} –" if a is None else f"{key} {a['w_on_delta_w']:.2f}/{a['w_on_w']:.2f}/"
                         f"{a['w_on_random']:.2f}, factor {a['factor']:.1f}")
        return ", ".join(parts)

    table7 = "; ".join(f"{t}: {amp(v)}" for t, v in tasks.items())
    rs = results["rslora"]
    rsl = ", ".join(f"r={r}: {rs['test_loss']['lora'][r]:.3f} vs {rs['test_loss']['rslora'][r]:.3f}"
                    for r in rs["test_loss"]["lora"])
    return [f"recovered share of full fine-tuning's gain, q, v, by rank: {table6}", sec41,
            f"φ(1, 1), r = 8 vs 64: {phi} (two random subspaces: 1/{d} = {1 / d:.3f} in expectation)",
            f"φ(1, 1), two seeds of r = 64: {seeds} (random: {1 / d:.3f})",
            f"W_q of the last block, ‖UᵀWV‖_F ΔW/W/random: {table7}",
            f"{rs['task']}, lr {rs['lr']:g}, test loss α/r vs α/√r: {rsl}"]


def paper_table(results: dict[str, Any]) -> str:
    """The README's 'what the paper reports / what we measured here' table, measured column filled from
    ``results`` (a reading per row is the lead's to write after the full run)."""
    lines = ["| claim | the paper | measured here |", "|---|---|---|"]
    for (claim, paper), ours in zip(PAPER_CLAIMS, measured_claims(results)):
        lines.append(f"| {claim} | {paper} | {ours} |")
    return "\n".join(lines)
