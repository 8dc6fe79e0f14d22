"""The course site (course/build.py), built at the quick size and read in a real browser: Debian's chromium, driven
by Selenium through Debian's chromium-driver (never a browser that a tool downloads). Every page is checked the
way a student would notice a fault: a console error, an image that did not load, math left as raw TeX, a link to
nowhere, an exercise's solution shown before it is asked for. Screenshots of the landing page and of a notebook's
exercises go to runs/ci-artefacts/.

Needs the build tools (pip install -r requirements-course.txt) and, for the browser, `apt-get install chromium
chromium-driver`; `.ci/run` installs both. Without them these tests are skipped, saying which is missing.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "runs" / "ci-artefacts"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BUILD_TOOLS = ("sphinx", "myst_nb", "sphinx_book_theme", "mathjax")

missing_tools = [m for m in BUILD_TOOLS if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(missing_tools), reason=f"course build tools missing ({', '.join(missing_tools)}):"
                                " pip install -r requirements-course.txt")


def chromium_paths() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (os.path.exists("/usr/lib/chromium/chromedriver")
                                              and "/usr/lib/chromium/chromedriver") or None
    return browser, driver


def run_build(course_dir: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LORA_NP_QUICK="1")
    return subprocess.run([sys.executable, str(course_dir / "build.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)


@pytest.fixture(scope="module")
def site() -> Path:
    # The quick site, built once for the module, kept under runs/ci-artefacts for a person to open afterwards.
    out = ARTEFACTS / "course-site"
    shutil.rmtree(out, ignore_errors=True)
    (out / "html").mkdir(parents=True)
    (out / "html" / "stale.html").write_text("a page of an older build")  # the new site replaces the old one
    t0 = time.perf_counter()
    done = run_build(ROOT / "course", out)
    assert done.returncode == 0, f"the quick build failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    print(f"quick course build: {time.perf_counter() - t0:.0f} s")
    assert not (out / "html" / "stale.html").exists() and not list(out.glob(".html-*"))
    return out / "html"


def pages(html_root: Path) -> list[Path]:
    # Every page a reader can reach: the landing page, the notebooks, results and API (not Sphinx's own
    # genindex/search pages, whose links are generated).
    found = sorted(p for p in html_root.rglob("*.html") if not p.relative_to(html_root).parts[0].startswith("_"))
    return [p for p in found if p.name not in ("genindex.html", "search.html", "py-modindex.html")]


def solution_cells() -> dict[str, int]:
    # notebook stem -> number of its cells tagged "solution" (the exercises' solutions)
    counts = {}
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        counts[path.stem] = sum("solution" in c.get("metadata", {}).get("tags", []) for c in cells)
    return counts


def test_the_site_has_a_page_for_every_notebook_with_its_outputs(site):
    for nb in NOTEBOOKS:
        page = site / "notebooks" / f"{nb.stem}.html"
        assert page.exists(), f"no page for {nb.name}"
        text = page.read_text(encoding="utf-8")
        assert 'class="cell_output' in text, f"{page.name}: no executed outputs"
    assert (site / "index.html").exists() and (site / "api.html").exists() and (site / "results.html").exists()
    assert "lora_np.lora.LoRALinear" in (site / "api.html").read_text(encoding="utf-8"), "autodoc left out lora.py"
    assert (site / "_static" / "mathjax" / "tex-svg.js").exists()


def test_the_site_needs_no_network(site):
    # No page loads anything from another host: scripts, styles, fonts and images are all in the site.
    for page in pages(site):
        text = page.read_text(encoding="utf-8")
        for attr in ('src="http', "src='http", 'href="//', "src=\"//"):
            assert attr not in text, f"{page.relative_to(site)} loads a resource from the network ({attr}...)"
        for tag in text.split("<link")[1:]:
            tag = tag.split(">")[0]
            assert not ('stylesheet' in tag and 'href="http' in tag), f"{page.name}: stylesheet from the network"


BROWSER_SKIP = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"


@pytest.fixture(scope="module")
def browser():
    path, driver_path = chromium_paths()
    if path is None or driver_path is None or importlib.util.find_spec("selenium") is None:
        pytest.skip(BROWSER_SKIP if importlib.util.find_spec("selenium") else "selenium missing: pip install -r "
                    "requirements-course.txt")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, page: Path) -> list[str]:
    # Load a page, wait until it and its images are loaded and MathJax has finished; return its console errors.
    driver.get(page.as_uri())
    driver.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not driver.execute_script(
            "return document.readyState === 'complete' && [...document.images].every(i => i.complete);"):
        time.sleep(0.2)
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
            MathJax.startup.promise.then(() => done(true), () => done(false));
        } else { done(null); }""")
    return [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def broken_links(driver, site: Path, page: Path) -> list[str]:
    # Every link into the site must reach a file, and an anchor must name an element of that file.
    broken = []
    for href in driver.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href);"):
        parts = urlsplit(href)
        if parts.scheme in ("http", "https", "mailto"):
            continue  # outside the site (the paper, ...): not followed, there is no network here
        target = Path(unquote(parts.path))
        if parts.scheme != "file" or not target.is_relative_to(site):
            broken.append(f"{href} (outside the site)")
            continue
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            broken.append(f"{href} (no such file)")
        elif parts.fragment and target.suffix == ".html":
            text = target.read_text(encoding="utf-8")
            frag = html.escape(unquote(parts.fragment))
            if f'id="{frag}"' not in text and f"id='{frag}'" not in text:
                broken.append(f"{href} (no element with this id)")
    return broken


UNTYPESET = """
    // Math elements that MathJax did not typeset, and raw TeX delimiters left in the prose (code excluded).
    const bare = [...document.querySelectorAll('.math')].filter(m => !m.querySelector('mjx-container'));
    const prose = document.querySelector('main, body').cloneNode(true);
    prose.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight').forEach(e => e.remove());
    const text = prose.textContent;
    const raw = ['$$', '\\\\(', '\\\\['].filter(d => text.includes(d));
    return {bare: bare.map(m => m.textContent.slice(0, 60)), raw: raw, typeset:
            document.querySelectorAll('mjx-container').length};
"""


def test_every_page_in_a_real_browser(site, browser):
    checked, problems = 0, []
    for page in pages(site):
        name = str(page.relative_to(site))
        errors = open_page(browser, page)
        problems += [f"{name}: console {e}" for e in errors]
        bad_images = browser.execute_script(
            "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);")
        problems += [f"{name}: image not loaded {src}" for src in bad_images]
        math = browser.execute_script(UNTYPESET)
        problems += [f"{name}: math not typeset: {m!r}" for m in math["bare"]]
        problems += [f"{name}: raw TeX delimiter {d!r} in the text" for d in math["raw"]]
        problems += [f"{name}: broken link {link}" for link in broken_links(browser, site, page)]
        checked += 1
    assert checked >= len(NOTEBOOKS) + 3
    assert not problems, "\n".join(problems)


def test_the_pages_show_math_and_figures(site, browser):
    # The checks above pass vacuously on a page with no math or no figure; these pages have both.
    open_page(browser, site / "index.html")
    assert browser.execute_script("return document.querySelectorAll('mjx-container').length;") >= 5
    open_page(browser, site / "notebooks" / "02_lora_layer.html")
    assert browser.execute_script("return document.querySelectorAll('mjx-container').length;") >= 20
    assert browser.execute_script("return [...document.images].filter(i => i.naturalWidth > 0).length;") >= 2


def test_solutions_are_folded_until_clicked(site, browser):
    expected = solution_cells()
    assert sum(expected.values()) >= 6, "the exercises' solutions are cells tagged 'solution'"
    for stem, count in expected.items():
        open_page(browser, site / "notebooks" / f"{stem}.html")
        cells = browser.find_elements("css selector", ".cell.tag_solution")
        assert len(cells) == count, f"{stem}: {len(cells)} solution cells on the page, {count} in the notebook"
        for cell in cells:
            code = cell.find_element("css selector", ".cell_input")
            details = cell.find_element("css selector", "details")
            assert not details.get_attribute("open") and not code.is_displayed(), f"{stem}: a solution is shown"
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", details)
            details.find_element("css selector", "summary").click()
            deadline = time.monotonic() + 10  # the theme animates the opening
            while time.monotonic() < deadline and not code.is_displayed():
                time.sleep(0.1)
            assert details.get_attribute("open") is not None and code.is_displayed(), f"{stem}: click did not open"
            assert "def " in code.text or "=" in code.text, f"{stem}: the unfolded solution shows no code"


def screenshot(browser, path: Path) -> None:
    # The browser's PNG, re-saved with a 64-colour palette (a page is mostly flat colour): a third of the size,
    # small enough for the README's copy in figures/.
    from PIL import Image

    assert browser.save_screenshot(str(path))
    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=64).save(path, optimize=True)
    assert path.stat().st_size > 10_000, f"{path.name}: an empty page?"


def test_screenshots_of_the_landing_page_and_a_notebook(site, browser):
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    open_page(browser, site / "index.html")
    screenshot(browser, ARTEFACTS / "course_landing.png")
    open_page(browser, site / "notebooks" / "02_lora_layer.html")
    heading = browser.find_elements("css selector", "#exercises")
    assert heading, "notebook 02 has an Exercises section"
    browser.execute_script("arguments[0].scrollIntoView();", heading[0])  # the exercises, solutions folded
    screenshot(browser, ARTEFACTS / "course_notebook.png")


FAILING_NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "id": "c0", "metadata": {}, "source": ["# 01 · A notebook whose cell raises"]},
        {"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": None, "outputs": [],
         "source": ["print('before')\n", "raise ZeroDivisionError('the cell that breaks the course')"]},
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def test_the_build_fails_loudly_when_a_notebook_cell_raises(tmp_path):
    # The real course/ (conf.py, build.py, pages) over a notebooks/ folder holding one notebook that raises.
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "course", repo / "course", symlinks=True, ignore=shutil.ignore_patterns("_build"))
    shutil.copy(ROOT / "README.md", repo / "README.md")
    (repo / "lora_np").symlink_to(ROOT / "lora_np")
    (repo / "figures").symlink_to(ROOT / "figures")  # the results page's images: the cell is the only fault
    (repo / "notebooks").mkdir()
    (repo / "notebooks" / "01_broken.ipynb").write_text(json.dumps(FAILING_NOTEBOOK), encoding="utf-8")
    old_site = tmp_path / "out" / "html"
    old_site.mkdir(parents=True)
    (old_site / "index.html").write_text("the site of the last good build")
    done = run_build(repo / "course", tmp_path / "out")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    # the last good site as it was, and no half-built one beside it
    assert [p.name for p in old_site.iterdir()] == ["index.html"]
    assert (old_site / "index.html").read_text() == "the site of the last good build"
    assert not list((tmp_path / "out").glob(".html-*"))
    assert "FAILED" in output and "ZeroDivisionError" in output and "the cell that breaks the course" in output
    assert "01_broken" in output, "the error must name the notebook"
    others = [line for line in output.splitlines() if ": WARNING:" in line and "01_broken" not in line]
    assert not others, f"a fault other than the cell's: {others}"
