"""The notebooks as files: committed without outputs (reviewable diffs), each opening with what it teaches and
ending with what it measured. (pytest runs them top to bottom through nbmake, at the quick size.)"""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_course_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_autograd.ipynb", "02_lora_layer.ipynb", "03_pretrain_base.ipynb",
                                           "04_rank_sweep.ipynb", "05_memory.ipynb", "07_why_low_rank.ipynb",
                                           "08_real_model.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code), "strip the outputs"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    first, last_md = nb["cells"][0], [c for c in nb["cells"] if c["cell_type"] == "markdown"][-1]
    assert first["cell_type"] == "markdown" and "teach" in "".join(first["source"]).lower()
    assert "measured" in "".join(last_md["source"]).lower()
