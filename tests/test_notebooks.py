"""The notebooks as files: committed without outputs (reviewable diffs), each opening with what it teaches,
giving its takeaways in words and ending with what it measured; the course guide lists every one of them.
(pytest runs them top to bottom through nbmake, at the quick size.)"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_course_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["00_course_guide.ipynb", "01_autograd.ipynb", "02_lora_layer.ipynb",
                                           "03_pretrain_base.ipynb", "04_rank_sweep.ipynb", "05_memory.ipynb",
                                           "06_task_distance.ipynb", "07_why_low_rank.ipynb", "08_real_model.ipynb",
                                           "09_when_low_rank_suffices.ipynb", "10_lora_in_practice.ipynb",
                                           "11_distributed.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code), "strip the outputs"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    first, last_md = nb["cells"][0], [c for c in nb["cells"] if c["cell_type"] == "markdown"][-1]
    assert first["cell_type"] == "markdown" and "teach" in "".join(first["source"]).lower()
    assert "measured" in "".join(last_md["source"]).lower()


GUIDE = NOTEBOOKS[0].parent / "00_course_guide.ipynb"
LESSONS = [p for p in NOTEBOOKS if p != GUIDE]


def _markdown(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_notebook_has_three_to_five_takeaways_before_its_measured_table(path):
    cells = _markdown(path)
    found = [i for i, text in enumerate(cells) if text.startswith("## Takeaways")]
    assert len(found) == 1, "one '## Takeaways' markdown cell"
    items = re.findall(r"^(?:\d+\.|[*-]) \S", cells[found[0]], flags=re.M)
    assert 3 <= len(items) <= 5, f"{len(items)} takeaways; the course asks for three to five"
    assert found[0] < len(cells) - 1  # before the summary of what was measured (the last markdown cell)


def test_the_guide_lists_every_notebook():
    """A notebook added to notebooks/ must appear in the guide's table, so the course cannot forget it."""
    text = "\n".join(_markdown(GUIDE))
    missing = [p.name for p in LESSONS if f"`{p.name}`" not in text]
    assert not missing, f"add these to notebooks/00_course_guide.ipynb: {missing}"
    for section in ("## Prerequisites", "## Glossary", "## What to read next"):
        assert section in text
