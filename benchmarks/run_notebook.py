"""Run one notebook's code cells top to bottom in one namespace, without Jupyter: for machines that have no
jupyter/nbconvert/nbmake (the GPU visit's, benchmarks/gpu_visit.sh). Where Jupyter exists, use it instead.

    LORA_NP_QUICK=1 python benchmarks/run_notebook.py notebooks/02_lora_layer.ipynb

The cells run with the notebook's folder as the current folder, matplotlib on its file backend (Agg), and, where
IPython is missing, a stand-in ``IPython.display`` whose ``display``, ``Image`` and ``Markdown`` print a line
instead of rendering. A cell that raises stops the run: its number and the error go to stderr, exit code 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import types
from pathlib import Path


def ipython_stand_in() -> None:
    """A minimal ``IPython.display`` in sys.modules, if the real one cannot be imported."""
    try:
        import IPython.display  # noqa: F401
        return
    except ImportError:
        pass

    class Shown:
        def __init__(self, data: object = None, **kwargs: object) -> None:
            self.data = data

        def __repr__(self) -> str:
            what = repr(self.data[:200]) if isinstance(self.data, str) else f"<{type(self.data).__name__}>"
            return f"{type(self).__name__}({what})"

    def display(*objs: object, **kwargs: object) -> None:
        for o in objs:
            print(repr(o))

    display_mod = types.ModuleType("IPython.display")
    display_mod.Image = type("Image", (Shown,), {})
    display_mod.Markdown = type("Markdown", (Shown,), {})
    display_mod.HTML = type("HTML", (Shown,), {})
    display_mod.display = display
    package = types.ModuleType("IPython")
    package.display = display_mod
    package.version_info = (8, 24)  # matplotlib reads it; from 8.24 on it leaves IPython's GUI loop alone
    sys.modules.update({"IPython": package, "IPython.display": display_mod})
    print("note: IPython is not installed; IPython.display is a stand-in that prints", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/run_notebook.py NOTEBOOK.ipynb", file=sys.stderr)
        return 2
    path = Path(argv[0]).resolve()
    cells = ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code"]
    os.environ.setdefault("MPLBACKEND", "Agg")
    ipython_stand_in()
    os.chdir(path.parent)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for i, source in enumerate(cells, 1):
        t0 = time.perf_counter()
        try:
            exec(compile(source, f"{path.name}, cell {i}", "exec"), namespace)
        except Exception:
            traceback.print_exc()
            print(f"error: {path.name}: code cell {i} of {len(cells)} raised", file=sys.stderr)
            return 1
        print(f"[cell {i}/{len(cells)}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
