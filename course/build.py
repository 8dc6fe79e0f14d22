"""Build the course site: every notebook executed, with its outputs, the README's results, the API from docstrings.

    pip install -r requirements-course.txt
    python course/build.py            # full size (the cached base model; minutes) -> course/_build/full/html
    python course/build.py --quick    # quick size, as CI (LORA_NP_QUICK=1 does the same) -> course/_build/quick/html

A notebook cell that raises fails the build (exit code 1) with the cell and its traceback. The site needs no
network, neither to build nor to read: open <out>/html/index.html in a browser.

The site is a folder, so it cannot be written atomically file by file as lora_np's files are
(``checkpoint.write_atomic``): Sphinx builds into a hidden folder next to ``html`` and only a successful build
takes its place (two renames: the old site aside, the new one in, the old one removed). A failed or interrupted
build leaves the previous site as it was, never a mix of old and new pages; a folder left by a killed build is
removed by the next one. ``doctrees`` is Sphinx's own cache (rebuilt with -E every time), not part of the site.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

COURSE = Path(__file__).resolve().parent
ROOT = COURSE.parent
TOOLS = {"sphinx": "sphinx", "myst_nb": "myst-nb", "sphinx_book_theme": "sphinx-book-theme",
         "mathjax": "django-static-mathjax"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="execute the notebooks at the quick size (CI)")
    parser.add_argument("--out", type=Path, default=None,
                        help="build folder (default course/_build/full, or course/_build/quick with --quick)")
    return parser.parse_args(argv)


def kernel_environment(quick: bool) -> dict[str, str]:
    # What the notebooks' kernels inherit: the size, this checkout's lora_np first on the path, inline figures
    # (a test runner's MPLBACKEND=Agg would leave every figure out of the page).
    env = dict(os.environ)
    env["LORA_NP_QUICK"] = "1" if quick else "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env.setdefault("LORA_NP_COURSE_TIMEOUT", "600" if quick else "-1")  # seconds per cell; -1: no limit
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences a debugger warning on frozen modules
    return env


STAGING = ".html-building-"  # + the build's pid: where Sphinx writes, next to html/ (any ".html-*" is ours)


def replace_folder(new: Path, target: Path) -> None:
    """Put folder ``new`` in the place of folder ``target`` (which may not exist). A folder cannot be renamed over
    a non-empty one, so the old one is renamed aside first and removed last: a reader sees the old site or the new
    one, never a mix of both."""
    aside = target.with_name(f".{target.name}-old-{os.getpid()}")
    if target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def build(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick or os.environ.get("LORA_NP_QUICK", "0") not in ("", "0")
    missing = [pkg for module, pkg in TOOLS.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"build.py: missing {', '.join(missing)}: pip install -r requirements-course.txt", file=sys.stderr)
        return 2
    out = (args.out or COURSE / "_build" / ("quick" if quick else "full")).resolve()
    # -E: read every page afresh, so every notebook is executed at the size asked for, never reused from before.
    # -W --keep-going: any warning (an image or page not found, a bad cross-reference) fails the build, after
    # all of them have been listed.
    site, staging = out / "html", out / f"{STAGING}{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(".html-*"):  # left by a build that was killed (its staging folder, or the old site aside)
        shutil.rmtree(old, ignore_errors=True)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-q", "-W", "--keep-going", "-d", str(out / "doctrees"),
           "-w", str(out / "warnings.txt"), str(COURSE), str(staging)]
    print(f"building the course ({'quick' if quick else 'full'} size) into {site} ...", flush=True)
    t0 = time.perf_counter()
    try:
        code = subprocess.call(cmd, env=kernel_environment(quick), cwd=ROOT)
        if code == 0:
            replace_folder(staging, site)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build's pages, or nothing
    seconds = time.perf_counter() - t0
    if code != 0:
        print(f"build.py: the build FAILED (exit code {code}) after {seconds:.0f} s; see the error above",
              file=sys.stderr)
        return 1
    print(f"built in {seconds:.0f} s: open {out / 'html' / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(build())
