"""Sphinx configuration of the course site: myst-nb executes every notebook in notebooks/ and renders it with its
outputs; autodoc documents lora_np from its docstrings. Build it with `python course/build.py` (README, "Course").

Everything the pages need is served from the built folder itself: no CDN at build or view time. Math is typeset by
MathJax 3 copied from the `django-static-mathjax` wheel (a plain copy of MathJax's files; Django is not needed),
using the SVG output, which carries its glyphs inside the script, so it works even from file:// pages.
"""

import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path

import mathjax  # the django-static-mathjax wheel: MathJax 3's files under mathjax/static/mathjax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # autodoc documents this checkout's lora_np, not another installed copy

project = "lora_np: LoRA from scratch on NumPy"
author = "lora_np contributors"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode", "sphinx.ext.mathjax"]
root_doc = "index"
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "build.py"]

# --- notebooks: executed at every build (never a cache: a quick build must not reuse full-size outputs) ---
nb_execution_mode = "force"
# A cell that raises is a warning that shows the cell and its traceback; build.py's -W turns it (and every other
# warning) into a failed build. (raise_on_error would stop at once but hide the traceback in a log file.)
nb_execution_raise_on_error = False
nb_execution_show_tb = True
nb_execution_timeout = int(os.environ.get("LORA_NP_COURSE_TIMEOUT", "-1"))  # per cell; -1: none (full size)
nb_execution_in_temp = False  # run in notebooks/, as Jupyter does, so "../results" and "../figures" resolve
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # [text](#a-heading) links inside the course pages

# --- math: MathJax from the installed wheel, copied into _static/mathjax at the end of the build ---
MATHJAX_SRC = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
MATHJAX_PARTS = ["tex-svg.js", "input/tex/extensions", "ui", "a11y"]  # the component and what it loads on demand
mathjax_path = "mathjax/tex-svg.js"  # relative to _static
mathjax3_config = {"options": {"enableMenu": True}}

# --- autodoc ---
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"

# --- HTML ---
html_theme = "sphinx_book_theme"
html_title = "lora_np course"
html_static_path = []
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,  # the executed .ipynb, and the page's source
    "use_fullscreen_button": False,
    "navigation_with_keys": False,
}
html_context = {"default_mode": "light"}  # without it the theme logs a console error on a first visit
html_last_updated_fmt = None
suppress_warnings = ["mystnb.unknown_mime_type"]


def copy_mathjax(app, exception):
    # After a successful HTML build: the MathJax files that mathjax_path and its on-demand loads point to.
    if exception is not None or app.builder.format != "html":
        return
    target = Path(app.outdir) / "_static" / "mathjax"
    for part in MATHJAX_PARTS:
        src, dst = MATHJAX_SRC / part, target / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)


# --- pages filled in at build time, so that they follow the repository without being edited ---
README_FIRST, README_STOP = "## Results of the full run", "## Decisions"  # the README's results and figures
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def readme_results() -> str:
    # The README from README_FIRST up to README_STOP, with its links made to work from course/: images point one
    # folder up, links to files outside the site become plain text (the site does not host them).
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, stop = text.find(README_FIRST), text.find(README_STOP)
    if start < 0 or stop < start:
        raise RuntimeError(f"course/conf.py: README.md has no section {README_FIRST!r} followed by {README_STOP!r}; "
                           "update README_FIRST/README_STOP to the README's headings")

    def fix(m):
        bang, label, target = m.groups()
        if target.startswith(("http://", "https://", "#")):
            return m.group(0)
        if bang:
            return f"![{label}](../{target})"
        return label

    return LINK.sub(fix, text[start:stop])


def api_modules() -> str:
    # One automodule per module of lora_np (subpackages included), in alphabetical order; __main__ is the CLI.
    import lora_np

    names = sorted(m.name for m in pkgutil.walk_packages(lora_np.__path__, "lora_np.")
                   if not m.name.endswith("__main__"))
    return "\n".join(f"## `{name}`\n\n```{{automodule}} {name}\n```\n" for name in ["lora_np", *names])


def fill_page(app, docname, source):
    marker = {"results": ("<!-- README-RESULTS -->", readme_results),
              "api": ("<!-- API-MODULES -->", api_modules)}.get(docname)
    if marker is not None:
        source[0] = source[0].replace(marker[0], marker[1]())


def setup(app):
    app.connect("source-read", fill_page)
    app.connect("build-finished", copy_mathjax)
