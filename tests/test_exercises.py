"""lora_np/exercises.py: every check passes the right answer, fails plausible wrong ones with a message that says
what is off, and treats an untouched stub as "not attempted" (so a notebook with open exercises still runs)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lora_np import exercises as ex
from lora_np.analysis import subspace_similarity
from lora_np.memory import count_trainable


# -- right answers (the notebooks' solutions say the same in their own words) ---------------------------------
def matmul_backward(a, b, g):
    return g @ b.T, a.T @ g


def lora_backward(x, W, A, B, s, g):
    gB = g @ B.T  # (N, r)
    return g @ W.T + s * gB @ A.T, s * x.T @ gB, s * (x @ A).T @ g


def phi(X, Y, i, j):
    ux = np.linalg.svd(X, full_matrices=False)[0][:, :i]
    uy = np.linalg.svd(Y, full_matrices=False)[0][:, :j]
    return np.linalg.norm(ux.T @ uy) ** 2 / min(i, j)


LINEARS = {"q": (1, 1), "k": (1, 1), "v": (1, 1), "o": (1, 1), "up": (1, 4), "down": (4, 1)}


def trainable(cfg, r, targets):
    C = cfg.n_embd
    return cfg.n_layer * sum(r * (a * C + b * C) for t, (a, b) in LINEARS.items() if t in targets)


RIGHT = [
    (ex.check_matmul_backward, matmul_backward),
    (ex.check_lora_backward, lora_backward),
    (ex.check_lora_parameter_count, lambda d_in, d_out, r: r * (d_in + d_out)),
    (ex.check_merge, lambda W, A, B, s: W + s * A @ B),
    (ex.check_perplexity, math.exp),
    (ex.check_unseen_share, lambda pre, fine: sum(c not in set(pre) for c in fine) / len(fine)),
    (ex.check_trainable_parameters, trainable),
    (ex.check_recovered_share, lambda base, lora, full: (base - lora) / (base - full)),
    (ex.check_state_bytes, lambda n_total, n_trainable: 4 * n_total + 12 * n_trainable),
    (ex.check_phi, phi),
    (ex.check_planted_update, lambda sigma, u, s, v, c: c * _inv_sqrt(sigma) @ u @ np.diag(s) @ v.T),
    (ex.check_planted_reading, lambda: "b"),
    (ex.check_planted_reading, lambda: " (B) "),
    (ex.check_task_distance_reading, lambda: "b"),  # the reading the committed results/study.json supports
    (ex.check_spectrum_reading, lambda: "(c)"),
]


def _inv_sqrt(sigma):
    evals, evecs = np.linalg.eigh(sigma)
    return (evecs / np.sqrt(evals)) @ evecs.T


def round_trip(W, levels, block):  # notebook 10: blockwise absmax, nearest level, back
    blocks = W.reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    return (levels[np.abs((blocks / absmax)[..., None] - levels).argmin(axis=-1)] * absmax).reshape(W.shape)


def stored_bytes(size, block, double_quant):
    n_blocks = size // block
    return size // 2 + (n_blocks + 4 * -(-n_blocks // 256) + 4 if double_quant else 4 * n_blocks)


def mixed_batch(x, W, A, B, s, ids):
    return x @ W + s[ids][:, None, None] * (x @ A[ids] @ B[ids])


RIGHT += [(ex.check_absmax_round_trip, round_trip), (ex.check_stored_bytes, stored_bytes),
          (ex.check_mixed_batch, mixed_batch)]


@pytest.mark.parametrize("check, answer", RIGHT, ids=lambda v: getattr(v, "__name__", ""))
def test_the_right_answer_passes(check, answer, capsys):
    assert check(answer) is None  # nothing returned: the notebook shows the printed verdict only
    assert capsys.readouterr().out.startswith("passed: ")


def merge_in_place(W, A, B, s):
    W += s * A @ B
    return W


# (check, a plausible wrong answer, words the message must contain)
WRONG = [
    (ex.check_matmul_backward, lambda a, b, g: (g @ b, a.T @ g), "raised ValueError"),  # missing transpose of b
    (ex.check_matmul_backward, lambda a, b, g: (g @ b.T, g.T @ a), "transposed shape"),  # db transposed
    (ex.check_matmul_backward, lambda a, b, g: (2 * g @ b.T, a.T @ g), "2 times the right answer"),
    (ex.check_matmul_backward, lambda a, b, g: g @ b.T, "pair"),
    (ex.check_lora_backward, lambda x, W, A, B, s, g: (g @ W.T + gB(g, B) @ A.T, x.T @ gB(g, B), (x @ A).T @ g),
     "scale s is missing"),
    (ex.check_lora_backward, lambda x, W, A, B, s, g: (g @ W.T, s * x.T @ gB(g, B), s * (x @ A).T @ g),
     "only g @ W.T"),  # dx without the adapter's path
    (ex.check_lora_backward, lambda x, W, A, B, s, g: (g @ W.T + s * gB(g, B) @ A.T, s * x.T @ (g @ B),
                                                      s * (x @ A).T @ g), "shape"),  # missing B.T
    (ex.check_lora_backward, lambda x, W, A, B, s, g: (None, None, None, None), "three gradients"),
    (ex.check_lora_backward, lambda x, W, A, B, s, g: (g @ W.T + s * gB(g, B) @ A.T, None, s * (x @ A).T @ g),
     "dA is None"),
    (ex.check_lora_parameter_count, lambda d_in, d_out, r: 2 * d_in * r, "A is (768, 8) and B is (8, 3072)"),
    (ex.check_lora_parameter_count, lambda d_in, d_out, r: d_in * d_out, "the frozen W trains none"),
    (ex.check_merge, lambda W, A, B, s: W + A @ B, "scale s is missing"),
    (ex.check_merge, lambda W, A, B, s: s * A @ B, "W itself is missing"),
    (ex.check_merge, lambda W, A, B, s: W + s * (A @ B).T, "shape"),  # transposed update (non-square)
    (ex.check_merge, merge_in_place, "in place"),
    (ex.check_perplexity, lambda loss: 2 ** loss, "e to the loss"),
    (ex.check_perplexity, lambda loss: math.log(loss + 1), "e to the loss"),
    (ex.check_unseen_share, lambda pre, fine: len(set(fine) - set(pre)) / len(set(fine)), "every occurrence"),
    (ex.check_unseen_share, lambda pre, fine: sum(c in set(pre) for c in fine) / len(fine), "not in the pretraining"),
    (ex.check_trainable_parameters, lambda cfg, r, t: len(t) * 2 * cfg.n_embd * r, "every block"),  # one block
    (ex.check_trainable_parameters, lambda cfg, r, t: cfg.n_layer * len(t) * 2 * cfg.n_embd * r, "up is (C, 4C)"),
    (ex.check_recovered_share, lambda base, lora, full: full / lora, "(base − LoRA) / (base − full)"),
    (ex.check_recovered_share, lambda base, lora, full: (lora - full) / (base - full), "(base − LoRA)"),
    (ex.check_state_bytes, lambda n_total, n_trainable: 16 * n_total, "a frozen weight has neither"),
    (ex.check_state_bytes, lambda n_total, n_trainable: 4 * n_total + 4 * n_trainable, "AdamW"),
    (ex.check_state_bytes, lambda n_total, n_trainable: 2 * n_total + 6 * n_trainable, "4 bytes per weight"),
    (ex.check_phi, lambda X, Y, i, j: np.linalg.norm(np.linalg.svd(X)[0][:, :i].T @ np.linalg.svd(Y)[0][:, :j])
     / min(i, j), "square the Frobenius norm"),
    (ex.check_phi, lambda X, Y, i, j: phi(X, Y, i, j) * min(i, j) / max(i, j), "divide by min(i, j)"),
    (ex.check_phi, lambda X, Y, i, j: np.linalg.norm(X[:, :i].T @ Y[:, :j]) ** 2 / min(i, j), "LEFT singular vectors"),
    (ex.check_phi, lambda X, Y, i, j: phi(X.T, Y.T, i, j), "raised ValueError"),  # right singular vectors
    (ex.check_planted_update, lambda sigma, u, s, v, c: c * u @ np.diag(s) @ v.T, "plain metric"),
    (ex.check_planted_update, lambda sigma, u, s, v, c: c * np.linalg.inv(sigma) @ u @ np.diag(s) @ v.T,
     "inverse SQUARE ROOT"),
    (ex.check_planted_update, lambda sigma, u, s, v, c: (c * _inv_sqrt(sigma) @ u @ np.diag(s) @ v.T).T, "shape"),
    (ex.check_planted_update, lambda sigma, u, s, v, c: _inv_sqrt(sigma) @ u @ np.diag(s) @ v.T, "times the right"),
    (ex.check_planted_reading, lambda: "a", "(a) does not follow"),
    (ex.check_planted_reading, lambda: "c", "(c) does not follow"),
    (ex.check_planted_reading, lambda: "d", "(d) does not follow"),
    (ex.check_planted_reading, lambda: "e", "one of the letters"),
    # the judgment exercises on results/study.json: each wrong reading is told the numbers that refute it
    (ex.check_task_distance_reading, lambda: "a", "0.930 (far)"),  # the share misread as closeness: the far gap
    (ex.check_task_distance_reading, lambda: "a", "worse than a uniform guess"),
    (ex.check_task_distance_reading, lambda: "c", "73,728 numbers, fewer than lora-qv-r64's 131,072"),
    (ex.check_task_distance_reading, lambda: "d", "below a uniform guess"),
    (ex.check_task_distance_reading, lambda: "", "one of the letters"),
    (ex.check_spectrum_reading, lambda: "a", "in 24 of 24 matrices"),
    (ex.check_spectrum_reading, lambda: "b", "0.607 (far) nats from full fine-tuning"),
    (ex.check_spectrum_reading, lambda: "b", "differ by 0.0033 (near)"),
    (ex.check_spectrum_reading, lambda: "d", "ceiling, not a target"),
    (ex.check_spectrum_reading, lambda: 2, "one of the letters"),
    (ex.check_absmax_round_trip, lambda W, lv, b: round_trip(W.reshape(1, -1), lv, W.size).reshape(W.shape),
     "one absmax for the whole W"),
    (ex.check_absmax_round_trip, lambda W, lv, b: round_trip(W, lv, b) / np.repeat(
        np.abs(W.reshape(-1, b)).max(axis=1), b).reshape(W.shape), "multiply each block back"),
    (ex.check_absmax_round_trip, lambda W, lv, b: round_trip(W, lv, b).T, "transposed shape"),
    (ex.check_absmax_round_trip, lambda W, lv, b: round_trip(W, np.linspace(-1, 1, 16), b), "wrong values"),
    (ex.check_stored_bytes, lambda size, block, dq: size / 2, "the codes alone"),
    (ex.check_stored_bytes, lambda size, block, dq: size + stored_bytes(size, block, dq) - size // 2,
     "two codes share one byte"),
    (ex.check_stored_bytes, lambda size, block, dq: size // 2 + (size // block if dq else 4 * size // block),
     "float32 absmax"),
    (ex.check_stored_bytes, lambda size, block, dq: size // 2 + 4 * size // block, "stored_bytes(16384, 64, True)"),
    (ex.check_mixed_batch, lambda x, W, A, B, s, ids: x @ W + s[0] * (x @ A[0] @ B[0]), "adapter 0"),
    (ex.check_mixed_batch, lambda x, W, A, B, s, ids: x @ W + x @ A[ids] @ B[ids], "scale s[k] is missing"),
    (ex.check_mixed_batch, lambda x, W, A, B, s, ids: x @ W, "the adapter's path is missing"),
    (ex.check_mixed_batch, lambda x, W, A, B, s, ids: mixed_batch(x, W, A, B, s, np.arange(len(ids)) % len(s)),
     "ids[i]"),
]


def gB(g, B):
    return g @ B.T


@pytest.mark.parametrize("check, answer, words", WRONG, ids=lambda v: getattr(v, "__name__", "") if callable(v)
                         else None)
def test_a_wrong_answer_fails_saying_what_is_off(check, answer, words):
    with pytest.raises(ex.ExerciseError) as err:
        check(answer)
    message = str(err.value)
    assert words in message, message
    assert message.split(":")[0][:2].isdigit(), f"the message names the exercise: {message}"


def stub(*args):
    raise NotImplementedError("your code here")


@pytest.mark.parametrize("check", [c for c, _ in RIGHT], ids=lambda c: c.__name__)
def test_an_untouched_stub_is_not_attempted_and_does_not_raise(check, capsys):
    check(stub)
    check(None)
    out = capsys.readouterr().out
    assert out.count("not attempted yet") == 2 and "passed" not in out


READINGS = [ex.check_planted_reading, ex.check_task_distance_reading, ex.check_spectrum_reading]


def _verdicts(check, capsys, **kwargs):
    # letter -> what the check says to it: the printed "passed ..." or the error's message
    out = {}
    for letter in "abcd":
        try:
            check(lambda letter=letter: letter, **kwargs)
            out[letter] = capsys.readouterr().out
        except ex.ExerciseError as err:
            out[letter] = str(err)
    return out


@pytest.mark.parametrize("check", READINGS, ids=lambda c: c.__name__)
def test_a_reading_check_accepts_one_reading_and_never_names_it(check, capsys):
    verdicts = _verdicts(check, capsys)
    right = [letter for letter, said in verdicts.items() if said.startswith("passed")]
    assert len(right) == 1, verdicts  # the results support exactly one of the notebook's readings
    check(stub)
    untouched = capsys.readouterr().out
    detail = verdicts[right[0]].split("\n", 1)[1].strip()  # what the passing verdict explains
    for said in [*(said for letter, said in verdicts.items() if letter != right[0]), untouched, check.__doc__]:
        for name in (f"({right[0]})", f"'{right[0]}'", f'"{right[0]}"', f"reading {right[0]}"):
            assert name not in said, said
        assert detail not in said


def _study():
    return json.loads((Path(__file__).resolve().parents[1] / "results" / "study.json").read_text(encoding="utf-8"))


def test_the_study_reading_checks_follow_the_results_not_a_stored_letter(capsys):
    # Change the numbers and a reading the committed results refute becomes right: the checks judge the data.
    study = _study()
    for task in study["tasks"].values():  # LoRA on every linear layer, now worse than q, v at r = 64 everywhere
        task["gap"]["lora-all-r8"] = task["gap"]["lora-qv-r64"] + 0.1
    assert _verdicts(ex.check_task_distance_reading, capsys, results=study)["c"].startswith("passed")
    far = study["tasks"]["far"]
    far["gap"]["lora-qv-r1"] = 0.0  # r = 1 now as close to full fine-tuning on the far task as can be
    assert _verdicts(ex.check_task_distance_reading, capsys, results=study)["a"].startswith("passed")
    for task in study["tasks"].values():  # full fine-tuning's updates, now as low-rank as LoRA's
        for layer in task["analysis"]["spectrum"].values():
            layer["effective_rank"]["full"] = layer["effective_rank"]["lora-r64"]
    assert _verdicts(ex.check_spectrum_reading, capsys, results=study)["a"].startswith("passed")
    for task in study["tasks"].values():  # LoRA at r = 64 now exactly as good as full fine-tuning
        task["gap"]["lora-qv-r64"] = 0.0
    verdicts = _verdicts(ex.check_spectrum_reading, capsys, results=study)
    assert verdicts["b"].startswith("passed") and "(c) does not follow" in verdicts["c"]


def test_the_phi_check_uses_the_library_definition():
    # The exercise's φ and analysis.subspace_similarity agree (the check compares against the library).
    gen = np.random.default_rng(0)
    X, Y = gen.standard_normal((10, 4)), gen.standard_normal((10, 3))
    assert math.isclose(phi(X, Y, 3, 2), subspace_similarity(X, Y)[2, 1], rel_tol=1e-9)


def test_an_error_inside_the_answer_is_reported_with_its_cause():
    # Only NotImplementedError means "not attempted"; any other error is the student's bug, reported with the
    # inputs' shapes and chained to the original error (whose traceback points at the student's line).
    with pytest.raises(ex.ExerciseError, match="raised ZeroDivisionError") as err:
        ex.check_perplexity(lambda loss: 1 / 0)
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    with pytest.raises(ex.ExerciseError, match=r"raised ValueError.*shape \(3, 4\), shape \(4, 5\)"):
        ex.check_matmul_backward(lambda a, b, g: (g @ b, a.T @ g))  # g (3, 5) @ b (4, 5): a missing transpose


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CHECKS = {name for name in dir(ex) if name.startswith("check_")}
# Every notebook has an Exercises section but these (a notebook that gains one must leave this list)
WITHOUT_EXERCISES = {"00_course_guide.ipynb": "the course guide is a map, not a lesson"}


def exercise_cells(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    starts = [i for i, c in enumerate(cells) if "".join(c["source"]).startswith("## Exercises")]
    return cells, starts


def test_every_check_is_used_by_a_notebook_solution():
    # A check no notebook runs could rot unnoticed; the notebooks run their solutions in CI (nbmake, the site).
    used = set()
    for path in NOTEBOOKS:
        for cell in exercise_cells(path)[0]:
            if "solution" in cell["metadata"].get("tags", []):
                used |= {name for name in CHECKS if f"{name}(" in "".join(cell["source"])}
    assert used == CHECKS, f"checks no notebook solution calls: {sorted(CHECKS - used)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_sit_before_the_summary_with_folded_solutions(path):
    cells, starts = exercise_cells(path)
    if path.name in WITHOUT_EXERCISES:
        assert not starts, f"{path.name} has exercises now: take it out of WITHOUT_EXERCISES"
        pytest.skip(f"{path.name}: {WITHOUT_EXERCISES[path.name]}")
    assert len(starts) == 1, "one Exercises section"
    end = starts[0] + 1  # the section: its exercises' statements ("**Exercise ...") and their code cells
    while end < len(cells) and (cells[end]["cell_type"] == "code" or "".join(cells[end]["source"]).startswith(
            "**Exercise")):
        end += 1
    assert any(c["cell_type"] == "markdown" and "measured" in "".join(c["source"]).lower() for c in cells[end:]), \
        "the Exercises come before the summary of what the run measured"
    section = cells[starts[0]:end]
    solutions = [c for c in section if "solution" in c["metadata"].get("tags", [])]
    tries = [c for c in section if c["cell_type"] == "code" and c not in solutions]
    assert solutions and len(solutions) == len(tries), "each exercise: a cell to fill in, then its solution"
    for cell in solutions:
        assert "hide-input" in cell["metadata"]["tags"], "the site folds the solution (myst-nb's hide-input)"
        assert cell["metadata"].get("jupyter", {}).get("source_hidden") is True, "Jupyter folds it too"
    for cell in tries:
        assert "NotImplementedError" in "".join(cell["source"]), "the cell to fill in is a stub"


# -- notebook 08: the judgment exercise, on synthetic results ------------------------------------------------------
# The right readings depend on the run: each case is a results dict (its paired intervals, in shares) and the words
# every option's verdict must hold (None: the option is a right reading of that run).
def minilm_results(r1_full, r4_full, r4_probe):
    return {"differences": {"lora-qv-r1 - full": list(r1_full), "lora-qv-r4 - full": list(r4_full),
                            "lora-qv-r4 - probe": list(r4_probe)}}


MINILM_CASES = [
    # r=1 resolved below full, r=4 not resolved against full, r=4 resolved above the probe
    (minilm_results((-0.08, -0.01), (-0.03, 0.02), (0.02, 0.09)),
     {"a": None, "b": None, "c": "lies above 0", "d": "equal", "e": "contains 0"}),
    # r=1 not resolved, r=4 resolved below full, the probe resolved above r=4
    (minilm_results((-0.02, 0.03), (-0.06, -0.01), (-0.05, -0.01)),
     {"a": "contains 0", "b": "one side of 0", "c": None, "d": "equal", "e": None}),
    # r=1 resolved ABOVE full, r=4 resolved above full, r=4 against the probe not resolved
    (minilm_results((0.01, 0.04), (0.005, 0.03), (-0.01, 0.02)),
     {"a": "lies above 0", "b": "one side of 0", "c": "contains 0", "d": "equal", "e": None}),
    # the quick size: every interval is [0, 0]
    (minilm_results((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)),
     {"a": "contains 0", "b": None, "c": "contains 0", "d": "equal", "e": "contains 0"}),
]
MINILM_VERDICTS = [(results, letter, words) for results, verdicts in MINILM_CASES for letter, words in verdicts.items()]


def assert_reading_follows(check, letters, notebook, results, letter, words, capsys):
    """A reading check judged on ``results``: a right letter (``words`` None) passes in any of the notebook's
    spellings; a wrong one fails with a reason containing ``words`` that names no other option (so no right one)."""
    if words is None:
        for spelling in (letter, f"({letter.upper()}) "):
            check(lambda spelling=spelling: spelling, results)
            assert capsys.readouterr().out.startswith(f"passed: {notebook}")
        return
    with pytest.raises(ex.ExerciseError) as err:
        check(lambda: letter, results)
    message = str(err.value)
    assert message.startswith(f"{notebook} · ") and f"({letter}) does not follow" in message and words in message, \
        message
    assert not [o for o in letters if o != letter and f"({o})" in message], message
    assert capsys.readouterr().out == ""


def assert_stub_and_unknown_letter(check, results, capsys):
    """An untouched stub or None is "not attempted"; a letter that is not an option is refused as such."""
    check(stub, results)
    check(None, results)
    assert capsys.readouterr().out.count("not attempted yet") == 2
    with pytest.raises(ex.ExerciseError, match="one of the letters"):
        check(lambda: "f", results)


@pytest.mark.parametrize("results, letter, words", MINILM_VERDICTS)
def test_the_minilm_reading_follows_the_results(results, letter, words, capsys):
    assert_reading_follows(ex.check_minilm_reading, ex.MINILM_LETTERS, "08", results, letter, words, capsys)


def test_the_minilm_reading_not_attempted_other_letters_and_missing_results(capsys):
    assert_stub_and_unknown_letter(ex.check_minilm_reading, MINILM_CASES[0][0], capsys)
    with pytest.raises(ValueError, match="lora-qv-r4 - full"):  # the notebook's error, not the student's
        ex.check_minilm_reading(lambda: "b", {"differences": {"lora-qv-r1 - full": [0.0, 0.0]}})


def test_allreduce_bytes_check_names_the_usual_slips():
    def right(cfg, r, targets):
        d = cfg.n_embd
        shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (d, 4 * d), "down": (4 * d, d)}
        return 4 * cfg.n_layer * sum(r * sum(shapes[t]) for t in targets)

    ex.check_allreduce_bytes(right)
    with pytest.raises(ex.ExerciseError, match="2dr holds only for a square matrix"):
        ex.check_allreduce_bytes(lambda cfg, r, targets: 4 * cfg.n_layer * len(targets) * 2 * cfg.n_embd * r)
    with pytest.raises(ex.ExerciseError, match="float32 takes 4 bytes each"):
        ex.check_allreduce_bytes(lambda cfg, r, targets: right(cfg, r, targets) // 4)
    with pytest.raises(ex.ExerciseError, match="full fine-tuning's buffer"):
        ex.check_allreduce_bytes(lambda cfg, r, targets: 4 * count_trainable(cfg, None)[1])


# -- notebook 10: the reading exercise, on synthetic results ----------------------------------------------------
def variants_results(lora, dora, pissa, qlora, seed1):
    # the chosen runs of run_variants, in variants_specs' order, with their test losses (and an unchosen row)
    names = ["lora-r8", "dora-r8", "pissa-r8", "qlora-r8", "lora-r8-seed1"]
    runs = [{"method": n, "test_loss": t, "chosen": True} for n, t in zip(names, (lora, dora, pissa, qlora, seed1))]
    return {"runs": [{"method": "lora-r8", "test_loss": 9.0, "chosen": False}, *runs]}


VARIANTS_CASES = [
    # seed gap 0.01: PiSSA better beyond it, DoRA within, the 4-bit base worse beyond it
    (variants_results(2.50, 2.495, 2.47, 2.53, 2.51),
     {"a": "better, but by no more", "b": None, "c": None, "d": "larger than the seeds' difference", "e": None}),
    # every variant within the seed gap (0.02), one of them worse
    (variants_results(2.50, 2.51, 2.49, 2.515, 2.48),
     {"a": "DoRA ends worse", "b": "better, but by no more", "c": "worse, but by no more", "d": None,
      "e": "every difference is within"}),
    # DoRA better beyond the gap, the 4-bit base better too (so (c) is refuted by its sign)
    (variants_results(2.50, 2.40, 2.52, 2.45, 2.505),
     {"a": None, "b": "PiSSA ends worse", "c": "the 4-bit base ends no worse", "d": "DoRA − plain LoRA = -0.1000",
      "e": None}),
]
VARIANTS_VERDICTS = [(r, letter, words) for r, verdicts in VARIANTS_CASES for letter, words in verdicts.items()]


@pytest.mark.parametrize("results, letter, words", VARIANTS_VERDICTS)
def test_the_variants_reading_follows_the_results(results, letter, words, capsys):
    assert_reading_follows(ex.check_variants_reading, ex.VARIANTS_LETTERS, "10", results, letter, words, capsys)


def test_the_variants_reading_not_attempted_other_letters_and_missing_results(capsys):
    results = VARIANTS_CASES[0][0]
    assert_stub_and_unknown_letter(ex.check_variants_reading, results, capsys)
    without = {"runs": [r for r in results["runs"] if r["method"] != "pissa-r8"]}
    with pytest.raises(ValueError, match="pissa"):  # the notebook's error, not the student's
        ex.check_variants_reading(lambda: "b", without)


def test_one_of_d_and_e_is_always_right():
    # (d) and (e) negate each other, so every run has a right reading
    for results, _ in VARIANTS_CASES:
        verdicts = ex.variants_readings(results)
        assert (verdicts["d"] is None) != (verdicts["e"] is None)
