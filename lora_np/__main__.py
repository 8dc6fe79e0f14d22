"""The command line: ``python -m lora_np [subcommand] [options]``.

With no subcommand it runs the default experiment (``sweep``): pretrain a base GPT on the King James Bible (cached
after the first run), fine-tune it on Python's reference docs with LoRA at ranks 1…64 and with full fine-tuning,
then write ``figures/*.png`` and ``results/sweep.json``. ``--quick`` (or ``LORA_NP_QUICK=1``) runs the same thing
at a tiny size in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from . import backend


def _common(p: argparse.ArgumentParser, corpus_help: str) -> None:
    p.add_argument("--quick", action="store_true", default=os.environ.get("LORA_NP_QUICK", "") not in ("", "0"),
                   help="tiny model and few steps (seconds); also set by LORA_NP_QUICK=1")
    p.add_argument("--corpus", metavar="PATH", help=corpus_help)
    p.add_argument("--pretrain-corpus", metavar="PATH", help="pretraining corpus: 'bible' (default) or a text file")
    p.add_argument("--backend", choices=("numpy", "cupy"), help="array backend (default: numpy or $LORA_NP_BACKEND)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _finetune_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="q,v", help="layers to adapt: comma list of q,k,v,o,up,down or all-linear")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scaling is alpha/r (default 16)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: the experiment's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_np", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{sweep,targets,pretrain,finetune,generate,report,figures}")

    p = sub.add_parser("sweep", help="the default experiment: base model, LoRA rank sweep, full fine-tuning, figures")
    _common(p, "fine-tuning corpus: 'python-docs' (default) or a text file")
    _finetune_opts(p)
    p.add_argument("--ranks", default=None, help="comma list of ranks (default 1,2,4,8,16,32,64)")
    p.add_argument("--out", default=None, help="folder for figures/ and results/ (default: the current folder; "
                   "with --quick, runs/quick, so a quick run never overwrites the full run's files)")

    p = sub.add_parser("targets", help="which weights to adapt at a fixed parameter budget (Hu et al. Table 5)")
    _common(p, "fine-tuning corpus: 'python-docs' (default) or a text file")
    p.add_argument("--out", default=None, help="folder for figures/ and results/ (default as for sweep)")

    p = sub.add_parser("pretrain", help="pretrain (or load from the cache) the base GPT and show a sample")
    _common(p, "fine-tuning corpus whose characters join the vocabulary (default 'python-docs')")
    p.add_argument("--force", action="store_true", help="retrain even if a cached base model exists")

    p = sub.add_parser("finetune", help="one fine-tuning run: LoRA at one rank, or --full")
    _common(p, "fine-tuning corpus: 'python-docs' (default) or a text file")
    _finetune_opts(p)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--train-embeddings", action="store_true", help="also train wte and lm_head (modules_to_save)")
    p.add_argument("--save-adapter", metavar="PATH", help="write the adapter (safetensors) here")

    p = sub.add_parser("generate", help="sample text from the base model, optionally with an adapter")
    _common(p, "fine-tuning corpus of the base model's vocabulary (default 'python-docs')")
    p.add_argument("--adapter", metavar="PATH", help="an adapter file from 'finetune --save-adapter'")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("report", help="parameter and memory table (analytic vs measured) for a config")
    _common(p, "corpus for the measured step (default 'python-docs')")
    _finetune_opts(p)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--full", action="store_true", help="report full fine-tuning instead of LoRA")
    p.add_argument("--batch-size", type=int, default=16)

    p = sub.add_parser("figures", help="redraw the figures from a results file")
    p.add_argument("--results", default="results/sweep.json",
                   help="results file: results/sweep.json (default) or results/targets.json")
    p.add_argument("--out", default="figures", help="folder for the PNGs (default figures)")
    return parser


def _experiment(args: argparse.Namespace):
    from .experiments import ExperimentConfig

    cfg = ExperimentConfig.quick() if args.quick else ExperimentConfig()
    if args.corpus:
        cfg = replace(cfg, finetune_corpus=args.corpus)
    if args.pretrain_corpus:
        cfg = replace(cfg, pretrain_corpus=args.pretrain_corpus)
    if getattr(args, "targets", None):
        cfg = replace(cfg, targets=args.targets, alpha=args.alpha, rslora=args.rslora)
    if getattr(args, "steps", None):
        cfg = replace(cfg, finetune=replace(cfg.finetune, max_steps=args.steps))
    return cfg


def _out_dir(args: argparse.Namespace) -> Path:
    """Where an experiment writes figures/ and results/: --out, else here, else (quick) runs/quick."""
    return Path(args.out or ("runs/quick" if args.quick else "."))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["sweep", *argv]  # bare `python -m lora_np [options]` is the default experiment
    args = build_parser().parse_args(argv)
    if getattr(args, "backend", None):
        backend.set_backend(args.backend)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_sweep(args: argparse.Namespace) -> int:
    from .experiments import run_sweep
    from .lora import resolve_targets

    cfg = _experiment(args)
    resolve_targets(cfg.targets)  # fail before pretraining on a typo
    if args.ranks:
        cfg = replace(cfg, ranks=tuple(int(r) for r in args.ranks.split(",")))
    out = _out_dir(args)
    results = run_sweep(cfg, out, progress=not args.no_progress)
    print(summary_table(results))
    print(f"\nwrote {out / 'results' / 'sweep.json'} and {len(results['figures'])} figures "
          f"in {out / 'figures'} ({results['seconds']:.0f} s)")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from .experiments import run_sweep, targets_specs

    cfg = _experiment(args)
    out = _out_dir(args)
    results = run_sweep(cfg, out, not args.no_progress, targets_specs(cfg), name="targets", measure_memory=False)
    print(f"{'adapted':<10} {'rank':>4} {'trainable':>10} {'val loss':>9}")
    for r in results["runs"]:
        print(f"{r['targets']:<10} {r['rank']:>4} {r['trainable']:>10,} {r['final_val_loss']:>9.3f}")
    print(f"\nwrote {out / 'results' / 'targets.json'} and {out / 'figures' / 'targets.png'} "
          f"({results['seconds']:.0f} s)")
    return 0


def summary_table(results: dict) -> str:
    lines = [f"{'run':<24} {'trainable':>10} {'val loss':>9} {'unseen':>8} {'peak MiB':>9} {'s/step':>7}",
             f"{'base (no fine-tuning)':<24} {0:>10,} {results['base']['finetune_val_loss']:>9.3f} "
             f"{results['base']['val_loss_unseen'] or float('nan'):>8.3f}"]
    for r in results["runs"]:
        peak = r.get("memory", {}).get("measured", {}).get("peak", float("nan")) / 2**20
        lines.append(f"{r['name']:<24} {r['trainable']:>10,} {r['final_val_loss']:>9.3f} "
                     f"{r['val_loss_unseen'] or float('nan'):>8.3f} {peak:>9.1f} {r['step_seconds']:>7.3f}")
    return "\n".join(lines)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .experiments import load_corpora, pretrain_base, sample_text

    cfg = _experiment(args)
    corpora = load_corpora(cfg)
    model, info = pretrain_base(cfg, corpora, progress=not args.no_progress, force=args.force)
    h = info["history"]
    print(f"base model: {info['path']} ({'from the cache' if info['cached'] else 'trained now'})")
    if h.get("val_loss"):
        print(f"pretraining validation loss {h['val_loss'][-1]:.3f} after {h['steps'][-1]} steps")
    print("sample:\n" + sample_text(model, corpora.tokenizer, "And God said", cfg.sample_tokens))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .experiments import RunSpec, finetune_run, load_corpora, pretrain_base

    cfg = _experiment(args)
    if args.full and (args.save_adapter or args.train_embeddings):
        raise ValueError("--save-adapter and --train-embeddings are LoRA options; drop them or --full")
    corpora = load_corpora(cfg)
    if args.full:
        spec = RunSpec("full", "full")
    else:
        extra = ("wte", "lm_head") if args.train_embeddings else ()
        spec = RunSpec(f"lora-r{args.rank}", "lora", args.rank, cfg.targets, cfg.alpha, cfg.rslora, extra)
        from .lora import resolve_targets

        resolve_targets(spec.targets)
    base, _ = pretrain_base(cfg, corpora, progress=not args.no_progress)
    out = Path(args.save_adapter).parent if args.save_adapter else None
    row = finetune_run(base, spec, cfg, corpora, out, progress=not args.no_progress, measure_memory=False)
    if args.save_adapter and spec.mode == "lora":
        os.replace(out / f"{spec.name}.safetensors", args.save_adapter)
        print(f"adapter: {args.save_adapter} ({row['adapter_bytes']:,} bytes)")
    print(f"{spec.name}: trainable {row['trainable']:,} of {row['total']:,}; validation loss "
          f"{row['final_val_loss']:.3f} (seen chars {row['val_loss_seen']:.3f}, unseen {row['val_loss_unseen']:.3f})")
    print("sample:\n" + row["sample"])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .experiments import load_corpora, pretrain_base
    from .lora import load_adapter

    cfg = _experiment(args)
    corpora = load_corpora(cfg)
    model, _ = pretrain_base(cfg, corpora, progress=not args.no_progress)
    if args.adapter:
        load_adapter(model, args.adapter)
    tok = corpora.tokenizer
    ids = model.generate(tok.encode(args.prompt)[None], args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(tok.decode(ids[0]))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import memory
    from .experiments import RunSpec, load_corpora, prepare_model
    from .lora import count_parameters
    from .model import GPT

    cfg = _experiment(args)
    corpora = load_corpora(cfg)
    base = GPT(replace(cfg.model, vocab_size=corpora.tokenizer.vocab_size))  # sizes only: no training needed
    spec = RunSpec("full", "full") if args.full else RunSpec(f"lora-r{args.rank}", "lora", args.rank, cfg.targets,
                                                              cfg.alpha, cfg.rslora)
    model = prepare_model(base, spec)
    print(count_parameters(model).report())
    print()
    mem = memory.measure_model(model, corpora.finetune[0], args.batch_size)
    print(memory.format_comparison(mem))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .figures import make_all_figures, make_targets_figure

    results = json.loads(Path(args.results).read_text())
    draw = make_targets_figure if Path(args.results).stem == "targets" else make_all_figures
    for path in draw(results, Path(args.out)):
        print(path)
    return 0


COMMANDS = {"sweep": cmd_sweep, "targets": cmd_targets, "pretrain": cmd_pretrain, "finetune": cmd_finetune,
            "generate": cmd_generate, "report": cmd_report, "figures": cmd_figures}

if __name__ == "__main__":
    sys.exit(main())
