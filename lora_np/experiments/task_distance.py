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

For every task: LoRA on q, v at ``qv_ranks``, LoRA on every linear at ``all_linear_ranks``, and full fine-tuning;
all runs take the same steps on the same batches. Each task's text is cut into train / validation / test (the last
10% is test, the 10% before it validation). The learning rate of each method is searched on the validation loss
alone (``runs.search_lr``): every rate of its grid (``lora_lrs`` or ``full_lrs``), then, while the best sits at an
edge of what was tried, one more rate past that edge (at most ``lr_extend`` times), so that a method is not held
back by where its grid happened to stop. Each method's chosen rate, whether it is interior (a tried rate on both
sides) and the rates tried are in the results; the test loss of the chosen run is what is reported.

Headline, two numbers side by side on the test split: the share of full fine-tuning's gain that LoRA recovers,
(base − LoRA) / (base − full), and the absolute gap LoRA − full in nats per character. The share alone misleads
where the base is worse than a uniform guess (loss > ln V): part of "full's gain" is then only undoing confident
wrong guesses (getting back to ln V), which inflates the share while the gap can stay large; ``base_minus_uniform``
says per task where that is so. Next to what each run learned (base − test loss) is what it forgot: the rise of
its loss on the base's own held-out pretraining text.

On ``side_task`` also: LoRA at full rank (r = min(d_in, d_out) = n_embd) on every linear, with the embeddings,
positions, head and final layer norm trained too, against full fine-tuning (§4.1: LoRA at full rank "roughly
recovers" full fine-tuning), its rate searched the same way; and rsLoRA (α/√r, Kalajdzievski 2023) against LoRA
(α/r) at ``rslora_ranks``, each at its own searched rate (a fair comparison of the two) and both at one rate,
``rslora_lr`` (rsLoRA's actual claim: high ranks keep learning without retuning the rate). And for every task, the
analyses of ``analysis.py`` on the trained models: subspace similarity of A between r = 8 and r = 64 and between
two seeds of r = 64 (§7.2, with a verdict per matrix against chance), amplification for r = 4 and r = 64 (§7.3,
next to ‖ΔW‖/‖W‖), the spectrum of full fine-tuning's ΔW (§4.1's intrinsic rank).

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

from .. import analysis, backend, checks
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
    LR_EXTEND,
    Corpora,
    ExperimentConfig,
    RunSpec,
    finetune_run,
    machine_info,
    pretrain_base,
    pretrain_val_loss,
    search_lr,
    to_json,
)
from .summary import recovered_share

HELD_OUT_BOOKS = ("Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation")
TASKS = ("near", "middle", "far")
TASK_TEXT = {"near": "held-out Bible books (Hebrews to Revelation)",
             "middle": "Python's reference documentation (pydoc_data): English prose about code",
             "far": "the held-out Bible books in a letter-substitution cipher"}
SAMPLE_PROMPTS = {"near": "And I saw", "middle": "The ", "far": "And I saw"}  # far's is enciphered

# -- the configuration --------------------------------------------------------------------------------------------


def _study_experiment() -> ExperimentConfig:
    # 200 steps (the sweep takes 300): the study must fit about an hour on 2 cores (83 runs took 51 min with fixed
    # grids; with the searches it makes 90 to 148, ``StudyConfig.run_count``); see the README
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
    lr_extend: int = LR_EXTEND  # how many rates a search may add past its grid's edge (runs.search_lr)
    rslora_ranks: tuple[int, ...] = (1, 4, 16, 64)  # rsLoRA against LoRA (item 6), each at its own rate and ...
    rslora_lr: float = 3e-3  # ... both at this one (rsLoRA's claim is about one rate for every rank)
    side_task: str = "middle"  # the task of items 5 (full-rank LoRA) and 6 (rsLoRA)
    cipher_seed: int = 0  # the far task's letter permutation
    phi_size: int = 8  # φ(i, j) for i, j <= phi_size between r = 8 and r = 64 (Fig. 3's zoomed panels)
    seed_phi_size: int = 16  # ... and between two seeds of r = 64 (Fig. 4 shows up to 64; the JSON stays small)

    def __post_init__(self) -> None:
        checks.instance(self.experiment, "StudyConfig.experiment", ExperimentConfig)
        checks.fields(self, checks.ranks, "qv_ranks", "all_linear_ranks", "rslora_ranks")
        checks.max_rank((*self.qv_ranks, *self.all_linear_ranks, *self.rslora_ranks), self.experiment.model.n_embd,
                        "StudyConfig.experiment.model.n_embd")
        for name in ("lora_lrs", "full_lrs"):  # a choice with a tried rate on both sides needs three to start from
            object.__setattr__(self, name, checks.rate_grid(getattr(self, name), f"StudyConfig.{name}", at_least=3))
        checks.fields(self, checks.positive_number, "rslora_lr")
        checks.choice(self.side_task, "StudyConfig.side_task", TASKS)
        need = {4, 8, 64} - set(self.qv_ranks)  # the analyses read r = 4, 8, 64 (Table 7, Fig. 3 and 4)
        if need:
            raise ValueError(f"StudyConfig.qv_ranks must hold 4, 8 and 64 (the §7 analyses use them), lacks {need}")
        checks.fields(self, checks.positive_int, "code_chars", "phi_size", "seed_phi_size")
        checks.fields(self, checks.nonnegative_int, "cipher_seed", "lr_extend")

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
        """The grid a search of this method starts from."""
        return self.full_lrs if lora is None else self.lora_lrs

    def rslora_searches(self) -> list[tuple[str, int]]:
        """(kind, r) of the rsLoRA comparison's searches that the task grid does not already hold: LoRA at a rank
        outside ``qv_ranks``, and rsLoRA at every rank but 1 (at r = 1, α/√r = α/r: the same runs as LoRA's)."""
        return ([("lora", r) for r in self.rslora_ranks if r not in self.qv_ranks]
                + [("rslora", r) for r in self.rslora_ranks if r != 1])

    def run_count(self) -> dict[str, int]:
        """How many fine-tuning runs the study makes: "planned" if every search chooses inside its grid (with one
        run per rank and kind at ``rslora_lr`` where it is outside ``lora_lrs``), "at_most" if every search steps
        past its edge ``lr_extend`` times."""
        grids = [len(self.lrs(lora)) for _, lora in self.methods()] * len(TASKS)  # every task's methods
        grids += [len(self.lora_lrs)] * (1 + len(self.rslora_searches()))  # full-rank LoRA, rsLoRA's searches
        one_lr = 0 if self.rslora_lr in self.lora_lrs else len(self.rslora_ranks) + len(
            [r for r in self.rslora_ranks if r != 1])  # LoRA at every rank, rsLoRA at every rank but 1
        planned = sum(grids) + len(TASKS) + one_lr  # + Fig. 4's second seed of r = 64 per task
        return {"planned": planned, "at_most": planned + self.lr_extend * len(grids)}

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


# -- the measures -------------------------------------------------------------------------------------------------


def gaps(task: dict[str, Any]) -> dict[str, float]:
    """method -> its test loss − full fine-tuning's (nats/char; > 0: worse than full), every method but full. From
    the task's "gap" where the results have it, else from its test losses (results written before it existed)."""
    if "gap" in task:
        return task["gap"]
    full = task["test_loss"]["full"]
    return {m: v - full for m, v in task["test_loss"].items() if m != "full"}


def uniform_loss(results: dict[str, Any]) -> float:
    """ln V: the loss of a uniform guess over the vocabulary. A base above it is worse than guessing."""
    return results.get("uniform_loss", math.log(results["vocab_size"]))


# φ(1, 1) of two independent random subspaces is the squared cosine between two uniformly random unit vectors of
# R^d (the top singular vector of a Gaussian matrix is uniform on the sphere): Beta(1/2, (d − 1)/2), mean 1/d, and
# d·φ(1, 1) is then about χ²₁, which exceeds 10.83 one time in a thousand. The paper's line for "shared" is 0.5.
PHI_SHARED = 0.5
PHI_CHANCE = 10.83


def phi_verdict(phi11: float, d: int) -> str:
    """What φ(1, 1) between two adapters' A says, against chance in R^d: "shared (> 0.5)" (the paper's reading of
    Fig. 3), "above chance" (d·φ > 10.83, p ≈ 0.001 for random directions) or "at chance"."""
    checks.positive_int(d, "phi_verdict: d")
    if not (checks.is_real(phi11) and -1e-9 <= phi11 <= 1 + 1e-9):
        checks.refuse("phi_verdict: φ(1, 1)", "a number in [0, 1]", phi11)
    if phi11 > PHI_SHARED:
        return "shared (> 0.5)"
    return "above chance" if d * phi11 > PHI_CHANCE else "at chance"


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
    """A run's row for the study's results: every step's loss dropped from the history (100-odd runs x 200 steps
    would dominate the JSON; the evaluated points stay)."""
    row = {**row, "history": {k: v for k, v in row["history"].items() if k != "step_loss"}}
    return row | extra


ANALYSED = ("lora-qv-r4", "lora-qv-r8", "lora-qv-r64", "full")  # the chosen models analyse_task reads, per task


def _chosen(found: dict[str, Any]) -> dict[str, Any]:
    """The chosen run's row of a ``search_lr`` result."""
    return next(r for r in found["rows"] if r["chosen"])


def _searched(found: dict[str, Any]) -> dict[str, Any]:
    """What a search decided, for the results: its chosen rate, whether that is interior, and the rates tried."""
    return {"lr": found["lr"], "interior": found["interior"], "grid": found["grid"]}


def run_study(cfg: StudyConfig, progress: bool = True, data: StudyData | None = None) -> dict[str, Any]:
    """The whole study -> one results dict (JSON-ready). ``data`` (``load_study_data(cfg)``) can be passed when
    the caller already loaded it (the command line does, to check it before any work)."""
    start = time.perf_counter()
    data = data or load_study_data(cfg)
    ecfg = cfg.experiment
    base, base_info = pretrain_base(ecfg, data.corpora("near"), progress)
    T, bs, nb = ecfg.model.block_size, ecfg.finetune.batch_size, ecfg.finetune.eval_batches
    base_pretrain = pretrain_val_loss(base, data.corpora("near"), ecfg)
    uniform = math.log(data.tokenizer.vocab_size)  # a uniform guess: the line a base can be above
    results: dict[str, Any] = {"experiment": "study", "config": asdict(cfg), "machine": machine_info(),
                               "data": data.info, "vocab_size": data.tokenizer.vocab_size, "uniform_loss": uniform,
                               "base": {**base_info, "total": count_parameters(base).total,
                                        "pretrain_val_loss": base_pretrain},
                               "tasks": {}, "runs": []}
    methods = cfg.methods()
    # The bar counts the planned runs; a search that steps past its grid adds one to the total as it does.
    bar = tqdm(total=cfg.run_count()["planned"], desc="study", disable=not progress)

    def run(task: str, spec: RunSpec, method: str, part: str, tcfg: ExperimentConfig,
            planned: bool = True) -> tuple[Any, dict]:
        if not planned:
            bar.total += 1
            bar.refresh()
        model, row = finetune_run(base, spec, tcfg, data.corpora(task), progress=False, measure_memory=False)
        row = _slim(row, task=task, method=method, part=part)
        results["runs"].append(row)
        bar.update()
        return model, row

    def search(task: str, method: str, lora: LoRAConfig | None, grid: tuple[float, ...], part: str,
               tcfg: ExperimentConfig, keep: bool = False) -> tuple[dict[str, Any], Any]:
        """``search_lr`` of one method on one task (on validation only) -> (its result, the chosen run's model if
        ``keep``, else None; the other models are not kept)."""
        models = {}

        def at(lr: float) -> dict[str, Any]:
            model, row = run(task, RunSpec(f"{task}/{method}/lr{lr:g}", lora, lr), method, part, tcfg,
                             planned=lr in grid)
            if keep:
                models[lr] = model
            return row

        found = search_lr(at, grid, extend=cfg.lr_extend)
        return found, models.get(found["lr"])

    searched: dict[str, dict[str, dict[str, Any]]] = {}  # task -> method -> its search_lr result
    for task in TASKS:
        tcfg = task_config(cfg, task, data.tokenizer)
        _, val, test = data.tasks[task]
        found, picked = {}, {}
        for method, lora in methods:
            found[method], model = search(task, method, lora, cfg.lrs(lora), "grid", tcfg, keep=method in ANALYSED)
            if model is not None:
                picked[method] = model
        searched[task] = found
        best = {m: _chosen(f) for m, f in found.items()}
        base_test = evaluate(base, test, T, bs, nb)
        full_test = best["full"]["test_loss"]
        # Fig. 4's second seed: r = 64 with another adapter seed AND another batch order, at r = 64's chosen lr
        lora64 = dict(methods)["lora-qv-r64"]
        seed_cfg = replace(tcfg, finetune=replace(tcfg.finetune, seed=1))
        seed_model, _ = run(task, RunSpec(f"{task}/lora-qv-r64-seed1", replace(lora64, seed=1),
                                          found["lora-qv-r64"]["lr"]), "lora-qv-r64-seed1", "seed", seed_cfg)
        results["tasks"][task] = {
            "text": TASK_TEXT[task], "base_val_loss": evaluate(base, val, T, bs, nb), "base_test_loss": base_test,
            "base_minus_uniform": base_test - uniform,  # > 0: the base is worse than a uniform guess
            "chosen_lr": {m: f["lr"] for m, f in found.items()},
            "lr_interior": {m: f["interior"] for m, f in found.items()},
            "lr_grid": {m: f["grid"] for m, f in found.items()},
            "test_loss": {m: r["test_loss"] for m, r in best.items()},
            "val_loss": {m: r["final_val_loss"] for m, r in best.items()},
            "trainable": {m: r["trainable"] for m, r in best.items()},
            "recovered": {m: recovered_share(base_test, r["test_loss"], full_test) for m, r in best.items()
                          if m != "full"},
            "gap": {m: r["test_loss"] - full_test for m, r in best.items() if m != "full"},  # nats/char
            # what each chosen run learned on the task, and what it forgot of the base's own pretraining text
            "learned": {m: base_test - r["test_loss"] for m, r in best.items()},
            "forgotten": {m: r["pretrain_val_loss"] - base_pretrain for m, r in best.items()},
            "analysis": analyse_task(base, picked | {"lora-qv-r64-seed1": seed_model}, cfg),
        }
        del picked, seed_model
    side = cfg.side_task
    tcfg = task_config(cfg, side, data.tokenizer)
    full = _chosen(searched[side]["full"])
    side_base = results["tasks"][side]["base_test_loss"]
    # Item 5: LoRA at full rank on every linear + embeddings, its rate searched like every method's
    full_rank = cfg.full_rank_lora()
    found_fr, _ = search(side, "lora-full-rank", full_rank, cfg.lora_lrs, "full-rank", tcfg)
    fr = _chosen(found_fr)
    results["full_rank"] = {"task": side, "lora": full_rank.to_dict(), **_searched(found_fr),
                            "test_loss": fr["test_loss"], "trainable": fr["trainable"],
                            "full_test_loss": full["test_loss"], "full_trainable": full["trainable"],
                            "full_lr": full["lr"], "base_test_loss": side_base,
                            "recovered": recovered_share(side_base, fr["test_loss"], full["test_loss"])}
    # Item 6: rsLoRA against LoRA on q, v, each at its own searched rate (the fair comparison) and both at
    # rslora_lr (rsLoRA's claim: one rate serves every rank). LoRA's searches at qv_ranks are the task grid's,
    # reused; at r = 1, α/√r = α/r, so rsLoRA's runs would repeat LoRA's exactly: reused too.
    rs_found: dict[str, dict[int, dict[str, Any]]] = {"lora": {}, "rslora": {}}
    one_lr: dict[str, dict[int, dict[str, Any]]] = {"lora": {}, "rslora": {}}
    todo = set(cfg.rslora_searches())
    for r in cfg.rslora_ranks:
        for kind in ("lora", "rslora"):
            lora = LoRAConfig(r=r, alpha=ecfg.lora.alpha, targets="q,v", rslora=kind == "rslora")
            if (kind, r) in todo:
                rs_found[kind][r], _ = search(side, f"{kind}-qv-r{r}", lora, cfg.lora_lrs, "rslora", tcfg)
            elif kind == "lora":  # r in qv_ranks: the task grid's search, reused
                rs_found[kind][r] = searched[side][f"lora-qv-r{r}"]
            else:  # r = 1: the same runs as LoRA's
                rs_found[kind][r], one_lr[kind][r] = rs_found["lora"][r], one_lr["lora"][r]
                continue
            row = next((x for x in rs_found[kind][r]["rows"] if x["lr"] == cfg.rslora_lr), None)
            if row is None:  # rslora_lr is not among the rates this search tried: one run at it
                _, row = run(side, RunSpec(f"{side}/{kind}-qv-r{r}/lr{cfg.rslora_lr:g}", lora, cfg.rslora_lr),
                             f"{kind}-qv-r{r}", "rslora-one-lr", tcfg)
                row["chosen"] = False
            one_lr[kind][r] = row
    results["rslora"] = {
        "task": side, "alpha": ecfg.lora.alpha, "base_test_loss": side_base, "full_test_loss": full["test_loss"],
        "lr": cfg.rslora_lr,  # "test_loss": both at this one rate
        "test_loss": {kind: {str(r): row["test_loss"] for r, row in rows.items()} for kind, rows in one_lr.items()},
        "own_lr": {kind: {str(r): {**_searched(f), "test_loss": _chosen(f)["test_loss"],
                                   "val_loss": _chosen(f)["final_val_loss"]} for r, f in found.items()}
                   for kind, found in rs_found.items()},
    }
    bar.total = bar.n  # fewer than planned where a search's extension reached rslora_lr
    bar.close()
    results["seconds"] = time.perf_counter() - start
    return to_json(results)


# -- tables for the command line and the README -------------------------------------------------------------------


def _f(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def _interior(results: dict[str, Any], lr: float, interior: bool | None, method: str) -> bool:
    """Whether a chosen rate had a tried rate on both sides: as the search recorded it, or, for results written
    before the searches (fixed grids), from the grid in their config."""
    if interior is not None:
        return interior
    grid = results["config"]["full_lrs" if method == "full" else "lora_lrs"]
    return min(grid) < lr < max(grid)


def _lr(results: dict[str, Any], lr: float, interior: bool | None, method: str) -> str:
    """'lr 0.003', or 'lr 0.01, edge' where the best rate may lie beyond the rates tried."""
    return f"lr {lr:g}" + ("" if _interior(results, lr, interior, method) else ", edge")


def markdown_table(results: dict[str, Any]) -> str:
    """The headline: per task, each method's test loss at its chosen lr, the share of full fine-tuning's gain it
    recovers and its absolute gap to full fine-tuning, with the base and a uniform guess for scale; then what each
    method learned and forgot (where the results have it)."""
    tasks, ln_v = results["tasks"], uniform_loss(results)
    methods = list(next(iter(tasks.values()))["test_loss"])
    head = "| method | " + " | ".join(f"{t}: test loss | {t}: recovered | {t}: gap to full" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(tasks)),
             f"| uniform guess (ln {results['vocab_size']}) | " + " | ".join(f"{ln_v:.3f} | – | –" for _ in tasks)
             + " |",
             "| base (no fine-tuning) | " + " | ".join(
                 f"{v['base_test_loss']:.3f} | 0 | {v['base_test_loss'] - v['test_loss']['full']:+.3f}"
                 for v in tasks.values()) + " |"]
    for m in methods:
        cells = []
        for v in tasks.values():
            lr = _lr(results, v["chosen_lr"][m], v.get("lr_interior", {}).get(m), m)
            share, gap = ("1", "0") if m == "full" else (_f(v["recovered"][m], ".2f"), f"{gaps(v)[m]:+.3f}")
            cells.append(f"{v['test_loss'][m]:.3f} ({lr}) | {share} | {gap}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Test loss in nats/char; gap to full = test loss − full fine-tuning's. \"edge\": the chosen rate is "
                  "the highest or lowest tried,", "so the best may lie beyond. The recovered share is inflated where "
                  "the base is above the uniform guess."]
    if all("forgotten" in v for v in tasks.values()):
        lines += ["", "| method | " + " | ".join(f"{t}: learned | {t}: forgotten" for t in tasks) + " |",
                  "|" + "---|" * (1 + 2 * len(tasks))]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{v['learned'][m]:+.3f} | {_f(v['forgotten'][m], '+.3f')}"
                                                   for v in tasks.values()) + " |")
        lines += ["", "Learned: base − test loss on the task; forgotten: the rise of the loss on the base's own "
                      "held-out pretraining text", f"(the base's: {results['base']['pretrain_val_loss']:.3f}), of "
                      "the run at its chosen rate; nats/char."]
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
     "r = 4: ‖UᵀWV‖_F 0.32 (ΔW) vs 21.67 (W) vs 0.02 (random), factor 21.5, ‖ΔW‖/‖W‖ = 6.91/61.95 = 0.11; "
     "r = 64: 1.90 / 37.71 / 0.33, factor 1.9, ‖ΔW‖/‖W‖ = 3.57/61.95 = 0.06"),
    ("rsLoRA: α/√r keeps high ranks learning at one learning rate",
     "Kalajdzievski 2023: with α/r, loss stops improving beyond small r; with α/√r, larger r keeps improving"),
)


def _phi_row(tasks: dict[str, Any], key: str, d: int) -> str:
    """φ(1, 1) of ``key`` ("r8_vs_r64" or "r64_seeds") per matrix, each task's value with its verdict."""
    return "; ".join(f"W_{w}: " + ", ".join(
        f"{t} {(p := v['analysis']['phi'][w][key][0][0]):.2f} {phi_verdict(p, d)}" for t, v in tasks.items())
        for w in ("q", "v"))


def measured_claims(results: dict[str, Any]) -> list[str]:
    """The 'what we measured here' column of the README's table, one line per entry of PAPER_CLAIMS, from the
    study's results (nothing typed by hand)."""
    tasks, side, ln_v = results["tasks"], results["full_rank"]["task"], uniform_loss(results)

    def rank_row(task: str, v: dict[str, Any]) -> str:
        qv = [m for m in v["recovered"] if m.startswith("lora-qv-")]
        return (f"{task} (base − ln V = {v['base_test_loss'] - ln_v:+.2f}): "
                + ", ".join(f"{m[8:]} {_f(v['recovered'][m], '.2f')} / {gaps(v)[m]:+.3f}" for m in qv))

    table6 = "; ".join(rank_row(t, v) for t, v in tasks.items())
    fr = results["full_rank"]
    sec41 = (f"{side}: full-rank LoRA + embeddings {fr['test_loss']:.3f} "
             f"({_lr(results, fr['lr'], fr.get('interior'), 'lora-full-rank')}) vs full {fr['full_test_loss']:.3f} "
             f"(base {fr['base_test_loss']:.3f}; recovered {_f(fr['recovered'], '.2f')}, gap "
             f"{fr['test_loss'] - fr['full_test_loss']:+.3f})")
    d = next(iter(tasks.values()))["analysis"]["d"]
    chance = f"chance 1/d = {1 / d:.3f}; above chance: d·φ > {PHI_CHANCE}"

    def amp(v: dict[str, Any]) -> str:
        parts = []
        for key, a in v["analysis"]["amplification"].items():
            ratio = a["delta_w_norm"] / a["w_norm"] if a else None  # results before "delta_w_over_w" existed
            parts.append(f"{key} –" if a is None else f"{key} {a['w_on_delta_w']:.2f}/{a['w_on_w']:.2f}/"
                         f"{a['w_on_random']:.2f}, factor {a['factor']:.1f}, ‖ΔW‖/‖W‖ {ratio:.2f}")
        return ", ".join(parts)

    table7 = "; ".join(f"{t}: {amp(v)}" for t, v in tasks.items())
    rs = results["rslora"]
    at_one = ", ".join(f"r={r}: {_f(rs['test_loss']['lora'][r])} vs {_f(rs['test_loss']['rslora'][r])}"
                       for r in rs["test_loss"]["lora"])
    rsl = f"{rs['task']}, test loss α/r vs α/√r, both at lr {rs['lr']:g} (the claim's setting): {at_one}"
    if "own_lr" in rs:

        def own(kind: str, r: str) -> str:
            o = rs["own_lr"][kind][r]
            return f"{_f(o['test_loss'])} ({_lr(results, o['lr'], o['interior'], kind)})"

        rsl = (f"{rs['task']}, test loss α/r vs α/√r, each at its own lr: "
               + ", ".join(f"r={r}: {own('lora', r)} vs {own('rslora', r)}" for r in rs["own_lr"]["lora"])
               + f"; both at lr {rs['lr']:g} (the claim's setting): {at_one}")
    return [f"q, v by rank, recovered share / gap to full (nats/char): {table6}", sec41,
            f"φ(1, 1), r = 8 vs 64 ({chance}): {_phi_row(tasks, 'r8_vs_r64', d)}",
            f"φ(1, 1), two seeds of r = 64 ({chance}): {_phi_row(tasks, 'r64_seeds', d)}",
            f"W_q of the last block, ‖UᵀWV‖_F ΔW/W/random, factor ‖ΔW‖/‖UᵀWV‖ and ‖ΔW‖/‖W‖: {table7}", rsl]


def paper_table(results: dict[str, Any]) -> str:
    """The README's 'what the paper reports / what we measured here' table, measured column filled from
    ``results`` (a reading per row is the lead's to write after the full run)."""
    lines = ["| claim | the paper | measured here |", "|---|---|---|"]
    for (claim, paper), ours in zip(PAPER_CLAIMS, measured_claims(results)):
        lines.append(f"| {claim} | {paper} | {ours} |")
    return "\n".join(lines)
