"""The README's code runs as written (with fewer training steps, to stay fast)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "the README lost its Python example"
    code = blocks[0].replace("max_steps=200", "max_steps=2")
    assert len([line for line in code.splitlines() if line.strip()]) <= 12  # the promised "ten lines" (+ imports)
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "trainable 16,384 of" in out  # q and v of 4 blocks at r=8, d=128: 4 · 2 · 2·128·8


def test_readme_quickstart_commands_are_the_ci_commands():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -r requirements.txt && python -m lora_np" in text
    assert "pip install -r requirements.txt && python -m pytest" in text
    assert "python -m pip install --quiet -r requirements.txt" in ci and "\npython -m pytest\n" in ci
