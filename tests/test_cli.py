"""The main job, end to end at the quick size: `python -m lora_np sweep --quick` and every subcommand."""

import json
import subprocess
import sys

import pytest

from lora_np.__main__ import COMMANDS, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out


def test_sweep_writes_results_with_every_rank(sweep_out):
    results = json.loads((sweep_out / "results" / "sweep.json").read_text())
    runs = {r["name"]: r for r in results["runs"]}
    ranks = results["config"]["ranks"]
    assert ranks == [1, 2, 4, 8, 16, 32, 64]
    for r in ranks:
        row = runs[f"lora-r{r}"]
        assert row["rank"] == r and row["targets"] == "q,v"
        assert row["final_val_loss"] > 0 and row["history"]["steps"]
        # q and v of every block: r·(d + d) each
        d, n_layer = results["config"]["model"]["n_embd"], results["config"]["model"]["n_layer"]
        assert row["trainable"] == n_layer * 2 * 2 * d * r
        assert row["adapter_bytes"] > 4 * row["trainable"]  # the tensors plus a small JSON header
        assert row["memory"]["measured"]["peak"] > 0
    assert runs["full"]["trainable"] == runs["full"]["total"]
    assert any(r["modules_to_save"] for r in results["runs"])
    assert results["base"]["finetune_val_loss"] > 0 and results["unseen_chars"]


def test_sweep_writes_valid_pngs(sweep_out):
    names = sorted(p.name for p in (sweep_out / "figures").glob("*.png"))
    assert names == ["loss_curves.png", "memory_by_mode.png", "params_vs_rank.png", "step_time.png",
                     "val_loss_vs_rank.png"]
    for name in names:
        data = (sweep_out / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name


def test_figures_redraw_from_results(sweep_out, tmp_path):
    assert main(["figures", "--results", str(sweep_out / "results" / "sweep.json"), "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*.png"))) == 5


def test_finetune_save_adapter_then_generate(tmp_path, capsys):
    adapter = tmp_path / "a.safetensors"
    assert main(["finetune", "--quick", "--no-progress", "--rank", "2", "--targets", "q,k,v,o",
                 "--save-adapter", str(adapter)]) == 0
    assert adapter.exists() and "adapter:" in capsys.readouterr().out
    assert main(["generate", "--quick", "--no-progress", "--adapter", str(adapter), "--prompt", "def ",
                 "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_finetune_on_any_text_file(tmp_path, capsys):
    corpus = tmp_path / "poem.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200, encoding="utf-8")
    assert main(["finetune", "--quick", "--no-progress", "--corpus", str(corpus), "--full"]) == 0
    assert "full: trainable" in capsys.readouterr().out


def test_report_prints_parameters_and_memory(capsys):
    assert main(["report", "--quick", "--rank", "4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "activations" in out and "optimizer" in out


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--quick", "--targets", "q,zz"], "unknown LoRA target"),
    (["sweep", "--quick", "--targets", "nope"], "unknown LoRA target"),
    (["finetune", "--quick", "--corpus", "/no/such/file.txt"], "file.txt"),
    (["generate", "--quick", "--adapter", "/no/such/adapter.safetensors"], "adapter"),
    (["finetune", "--quick", "--full", "--save-adapter", "x.safetensors"], "LoRA options"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main([*argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_for_every_subcommand(command):
    args = [sys.executable, "-m", "lora_np", *([command] if command else []), "--help"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "usage:" in out and "--quick" in out or command == "figures"


def test_targets_experiment_has_one_parameter_budget(tmp_path):
    assert main(["targets", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results" / "targets.json").read_text())
    runs = results["runs"]
    assert [r["targets"] for r in runs] == ["q", "k", "v", "o", "q,k", "q,v", "q,k,v,o"]
    assert len({r["trainable"] for r in runs}) == 1  # the same budget for every choice of weights
    assert all(r["final_val_loss"] > 0 for r in runs)
    assert (tmp_path / "figures" / "targets.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["figures", "--results", str(tmp_path / "results" / "targets.json"), "--out", str(tmp_path)]) == 0
