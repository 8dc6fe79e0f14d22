"""The checks of the notebooks' exercises: each ``check_...(answer)`` tests a student's answer on inputs the
student did not choose and says what is off.

Three outcomes, so that a notebook with an unanswered exercise still runs top to bottom:

* not attempted yet (the stub still raises ``NotImplementedError``, or the answer is ``None``): a printed note;
* wrong: raises ``ExerciseError`` naming what is off (which output, its shape, by how much, a likely cause);
* right: prints a line starting with "passed".

A judgment exercise (notebooks 06, 07, 09) asks which of a few readings of a table or figure holds; its check
judges the letter on the results (for 06 and 07, the committed ``results/study.json``, read when the check runs) and
tells a wrong reading the numbers that refute it, never which reading is right.

Every check is tested against the solutions and against plausible wrong answers (tests/test_exercises.py), and
the notebooks run their solutions in CI, so a solution and its check cannot drift apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import backend
from .analysis import subspace_similarity
from .lora import TARGETS, LoRAConfig
from .memory import analytic_ledger, count_trainable
from .model import GPTConfig

np = backend.np  # host arrays: answers are small and checked on the CPU whatever the backend


class ExerciseError(AssertionError):
    """A wrong answer to an exercise; the message says what is off."""


class _NotAttempted(Exception):
    pass


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else repr(value)[:40]


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    # The student's function on our inputs; a stub that still raises NotImplementedError is "not attempted", any
    # other error is reported with the inputs' shapes (a shape error is the usual sign of a missing transpose).
    if fn is None:
        raise _NotAttempted
    try:
        return fn(*args)
    except NotImplementedError:
        raise _NotAttempted from None
    except Exception as err:
        inputs = ", ".join(_describe(a) for a in args)
        raise ExerciseError(f"the function raised {type(err).__name__}: {err} (on inputs: {inputs})") from err


def _exercise(title: str):
    # Decorator: the three outcomes of every check, in one place.
    def wrap(check):
        def run(answer: Any, *args: Any, **kwargs: Any) -> None:
            # Returns nothing, so that a notebook shows the printed verdict and no stray True/False after it.
            try:
                detail = check(answer, *args, **kwargs)
            except _NotAttempted:
                print(f"{title}: not attempted yet.\n  Replace `raise NotImplementedError` with your answer and run "
                      "the cell again.")
                return
            except ExerciseError as err:
                raise ExerciseError(f"{title}: {err}") from err.__cause__
            print(f"passed: {title}" + (f"\n  {detail}" if detail else ""))

        run.__name__, run.__qualname__, run.__doc__ = check.__name__, check.__qualname__, check.__doc__
        return run

    return wrap


def _array(name: str, value: Any) -> Any:
    if value is None:
        raise ExerciseError(f"{name} is None: did the function forget to return it?")
    try:
        return np.asarray(backend.to_numpy(value), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ExerciseError(f"{name} is not an array of numbers ({type(value).__name__}): {err}") from None


def _compare(name: str, got: Any, expected: Any, why: str, rtol: float = 1e-6) -> None:
    # got against expected: shape first (with what the shape should be and why), then values, with a diagnosis of
    # the usual slips: a constant factor (a missing or doubled scale), a transpose, a sign.
    got = _array(name, got)
    if got.shape != expected.shape:
        hint = " (that is the transposed shape: a transpose is missing or extra)" if got.shape == expected.T.shape \
            else ""
        raise ExerciseError(f"{name} has shape {got.shape}, expected {expected.shape}: {why}{hint}")
    if not np.all(np.isfinite(got)):
        raise ExerciseError(f"{name} holds NaN or inf")
    scale = max(np.abs(expected).max(), 1e-12)
    err = np.abs(got - expected).max()
    if err <= rtol * scale + 1e-12:
        return
    msg = f"{name} has the right shape {expected.shape} but wrong values (largest error {err:.3g}, the values " \
          f"are of size {scale:.3g})"
    ratio = float(np.vdot(got, expected) / max(np.vdot(expected, expected), 1e-300))
    if abs(ratio) > 1e-9 and np.abs(got - ratio * expected).max() <= 1e-6 * scale:
        msg += f": it is {ratio:.4g} times the right answer; check the scale factors (and the sign)"
    elif got.ndim == 2 and got.shape == got.T.shape and np.abs(got.T - expected).max() <= 1e-6 * scale:
        msg += ": it is the transpose of the right answer; check the order of the product and its transposes"
    raise ExerciseError(msg)


def _known_slips(name: str, got: Any, slips: dict[str, Any]) -> None:
    # A wrong answer that equals one of the usual slips gets that slip named (slips: message -> the slip's value).
    got = _array(name, got)
    for message, value in slips.items():
        if got.shape == value.shape and np.allclose(got, value, rtol=1e-9, atol=1e-12):
            raise ExerciseError(f"{name}: {message}")


def _number(name: str, value: Any, expected: float, why: str, rel: float = 1e-9) -> None:
    if value is None:
        raise ExerciseError(f"{name} is None: did the function forget to return it?")
    try:
        got = float(value)
    except (TypeError, ValueError):
        raise ExerciseError(f"{name} should be a number, got {type(value).__name__}") from None
    if not math.isclose(got, expected, rel_tol=rel, abs_tol=1e-12):
        raise ExerciseError(f"{name} = {got:.6g}, expected {expected:.6g}: {why}")


# -- judgment exercises: which reading of a table or figure the results support ----------------------------------
# The notebook states a few readings, one letter each; the check holds, for each letter, whether the results
# support that reading and, when they do not, the numbers that say why. Where the results are a committed file
# (results/*.json), the check reads them when it runs: the right letter is whichever reading the data supports,
# written down nowhere, so new results with other numbers make the check follow them. No message names it.


def _committed(name: str) -> dict[str, Any]:
    # A results file committed with the repository (results/<name>, the full-size run), as the notebooks read it.
    path = Path(__file__).resolve().parents[1] / "results" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the reading exercises judge the committed full-size results "
                                "(run lora_np from a checkout of the repository)")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_reading(reading: Callable[[], Any], readings: dict[str, tuple[bool, str]]) -> None:
    # readings: letter -> (the results support it, why not). Accepts "b", "(b)", " B ".
    answer = _call(reading)
    letter = str(answer).strip().lower().strip("()")
    if letter not in readings:
        raise ExerciseError(f"answer with one of the letters {', '.join(readings)}; got {answer!r}")
    supported, why = readings[letter]
    if not supported:
        raise ExerciseError(f"({letter}) does not follow: {why}")


def _increasing(values: list[float]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def _each(values: dict[str, float], fmt: str = ".3f") -> str:
    # {"near": 0.06, "middle": 0.41} -> "0.060 (near), 0.410 (middle)"
    return ", ".join(f"{v:{fmt}} ({k})" for k, v in values.items())


# -- notebook 01: the backward of an op ------------------------------------------------------------------------


@_exercise("01 · the backward of a matrix product")
def check_matmul_backward(matmul_backward: Callable[[Any, Any, Any], tuple[Any, Any]]) -> str:
    """``matmul_backward(a, b, g) -> (da, db)`` for ``out = a @ b``, a (N, K), b (K, M), g = dL/d out (N, M)."""
    gen = np.random.default_rng(101)
    for N, K, M in ((3, 4, 5), (2, 6, 2), (5, 1, 3)):  # no square shapes: a missing transpose shows as a shape
        a, b, g = gen.standard_normal((N, K)), gen.standard_normal((K, M)), gen.standard_normal((N, M))
        result = _call(matmul_backward, a, b, g)
        if not isinstance(result, tuple | list) or len(result) != 2:
            raise ExerciseError("return the pair (da, db)")
        da, db = result
        _compare("da", da, g @ b.T, f"da has a's shape (N, K) = {a.shape}")
        _compare("db", db, a.T @ g, f"db has b's shape (K, M) = {b.shape}")
    return "da = g @ b.T and db = a.T @ g on three shapes"


# -- notebook 02: the LoRA layer -------------------------------------------------------------------------------


def _lora_case(gen: Any, N: int, d_in: int, d_out: int, r: int, s: float) -> tuple:
    x, W = gen.standard_normal((N, d_in)), gen.standard_normal((d_in, d_out))
    A, B, g = gen.standard_normal((d_in, r)), gen.standard_normal((r, d_out)), gen.standard_normal((N, d_out))
    return x, W, A, B, s, g


@_exercise("02 · the backward of a LoRA layer")
def check_lora_backward(lora_backward: Callable[..., tuple[Any, Any, Any]]) -> str:
    """``lora_backward(x, W, A, B, s, g) -> (dx, dA, dB)`` for ``y = x @ W + s * (x @ A) @ B`` with W frozen."""
    gen = np.random.default_rng(102)
    for N, d_in, d_out, r, s in ((4, 6, 5, 2, 2.0), (3, 7, 4, 3, 0.5)):
        x, W, A, B, s, g = _lora_case(gen, N, d_in, d_out, r, s)
        result = _call(lora_backward, x, W, A, B, s, g)
        if not isinstance(result, tuple | list) or len(result) != 3:
            raise ExerciseError("return the three gradients (dx, dA, dB); W is frozen and gets none")
        dx, dA, dB = result
        gB = g @ B.T  # (N, r): the gradient reaching x @ A, before the scale
        _known_slips("dA", dA, {"the scale s is missing (y has s · (x @ A) @ B)": x.T @ gB})
        _known_slips("dB", dB, {"the scale s is missing (y has s · (x @ A) @ B)": (x @ A).T @ g})
        _compare("dA", dA, s * x.T @ gB, f"dA has A's shape (d_in, r) = {A.shape}")
        _compare("dB", dB, s * (x @ A).T @ g, f"dB has B's shape (r, d_out) = {B.shape}")
        _known_slips("dx", dx, {"it is only g @ W.T: x also reaches y through the adapter, s · (x @ A) @ B": g @ W.T,
                                "the adapter's part lacks the scale s": g @ W.T + gB @ A.T})
        _compare("dx", dx, g @ W.T + s * gB @ A.T, f"dx has x's shape (N, d_in) = {x.shape}")
    return "dx, dA and dB on two layers, with s = 2 and s = 0.5"


@_exercise("02 · trainable numbers of a LoRA layer")
def check_lora_parameter_count(count: Callable[[int, int, int], int]) -> str:
    """``count(d_in, d_out, r)``: the numbers a LoRA adapter of rank r on a (d_in, d_out) layer trains."""
    for d_in, d_out, r in ((768, 768, 8), (768, 3072, 8), (4096, 1024, 1), (12288, 12288, 4)):
        got = _call(count, d_in, d_out, r)
        expected = r * (d_in + d_out)
        _number(f"count({d_in}, {d_out}, {r})", got, expected,
                f"A is ({d_in}, {r}) and B is ({r}, {d_out}); together they hold that many numbers; the frozen W "
                "trains none")
    return "r·(d_in + d_out), which is 2dr for a square layer"


@_exercise("02 · merging an adapter into W")
def check_merge(merge_weights: Callable[[Any, Any, Any, float], Any]) -> str:
    """``merge_weights(W, A, B, s) -> W_merged`` such that ``x @ W_merged == x @ W + s * (x @ A) @ B``."""
    gen = np.random.default_rng(103)
    for N, d_in, d_out, r, s in ((5, 6, 4, 2, 3.0), (2, 5, 5, 1, 0.25)):
        x, W, A, B, s, _ = _lora_case(gen, N, d_in, d_out, r, s)
        W_before = W.copy()
        merged = _array("W_merged", _call(merge_weights, W, A, B, s))
        if not np.array_equal(W, W_before):
            raise ExerciseError("the function changed W in place; return a new array and leave W as it was "
                                "(unmerge needs the original)")
        _known_slips("W_merged", merged, {"the scale s is missing: the layer adds s · (x @ A) @ B": W + A @ B,
                                          "W itself is missing: merging adds the update to W": s * A @ B})
        _compare("W_merged", merged, W + s * A @ B, f"the merged weight has W's shape (d_in, d_out) = {W.shape}")
        _compare("x @ W_merged", x @ merged, x @ W + s * (x @ A) @ B, "the merged layer's output")
    return "x @ W_merged equals the unmerged layer's output"


# -- notebook 03: reading a loss -------------------------------------------------------------------------------


@_exercise("03 · perplexity from a loss in nats")
def check_perplexity(perplexity: Callable[[float], float]) -> str:
    """``perplexity(loss)``: the perplexity per character of a mean cross-entropy ``loss`` in nats."""
    for loss in (0.0, 1.472, math.log(103), 5.767):
        _number(f"perplexity({loss:.4g})", _call(perplexity, loss), math.exp(loss),
                "a loss in nats is a natural logarithm, so the perplexity is e to the loss (a uniform guess over "
                "V characters has loss ln V and perplexity V)")
    return "e^loss: a loss of ln 103 is a uniform guess over 103 characters"


@_exercise("03 · the share of unseen characters")
def check_unseen_share(unseen_share: Callable[[str, str], float]) -> str:
    """``unseen_share(pretrain_text, finetune_text)``: the share of the fine-tuning text's characters (every
    occurrence counts) that never occur in the pretraining text."""
    cases = (("abc abc", "aab{}", 2 / 5), ("the lord", "def f(x):\n    return x", None), ("xyz", "xyz", 0.0))
    for pre, fine, expected in cases:
        if expected is None:
            expected = sum(c not in set(pre) for c in fine) / len(fine)
        got = _call(unseen_share, pre, fine)
        distinct = len(set(fine) - set(pre)) / len(set(fine))
        why = ("count every occurrence in the fine-tuning text, not each distinct character once"
               if got is not None and math.isclose(float(got), distinct) and not math.isclose(distinct, expected)
               else "the characters of the fine-tuning text (every occurrence) that are not in the pretraining text, "
               "divided by the fine-tuning text's length")
        _number(f"unseen_share({pre!r}, {fine!r})", got, expected, why)
    return "a share of occurrences, as notebook 03 computes it on the validation targets"


# -- notebook 04: the rank sweep -------------------------------------------------------------------------------


@_exercise("04 · trainable parameters of a LoRA setup")
def check_trainable_parameters(trainable: Callable[[GPTConfig, int, tuple[str, ...]], int]) -> str:
    """``trainable(config, r, targets)``: the numbers LoRA of rank r on the ``targets`` ("q", "k", "v", "o",
    "up", "down") of every block of ``GPT(config)`` trains."""
    base = GPTConfig(vocab_size=103, block_size=64, n_layer=4, n_head=4, n_embd=128)
    cases = ((base, 8, ("q", "v")), (base, 1, ("q", "v")), (GPTConfig(vocab_size=50, n_layer=2, n_embd=64,
             n_head=2), 4, ("q", "k", "v", "o", "up", "down")), (base, 16, ("up",)))
    for cfg, r, targets in cases:
        got = _call(trainable, cfg, r, targets)
        expected = count_trainable(cfg, LoRAConfig(r=r, alpha=16, targets=targets))[1]
        _number(f"trainable(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, r={r}, {','.join(targets)})", got, expected,
                "every block has its own adapters; q, k, v, o are (C, C), up is (C, 4C), down is (4C, C), and an "
                "adapter on a (d_in, d_out) weight trains r·(d_in + d_out)")
    return "the same count as count_parameters on the real model"


@_exercise("04 · the share of the gap LoRA recovers")
def check_recovered_share(recovered: Callable[[float, float, float], float]) -> str:
    """``recovered(base_loss, lora_loss, full_loss)``: the share of full fine-tuning's improvement over the base
    model that the LoRA run achieves (1: as good as full fine-tuning; 0: no better than the base model)."""
    for base, lora, full in ((5.767, 2.592, 1.598), (3.0, 3.0, 1.0), (4.0, 1.0, 1.0), (2.0, 1.5, 1.0)):
        _number(f"recovered({base}, {lora}, {full})", _call(recovered, base, lora, full),
                (base - lora) / (base - full),
                "(base − LoRA) / (base − full): LoRA's drop in loss over full fine-tuning's")
    return "(base − LoRA) / (base − full)"


# -- notebook 05: memory ---------------------------------------------------------------------------------------


@_exercise("05 · the parameter memory of a training setup")
def check_state_bytes(state_bytes: Callable[[int, int], int]) -> str:
    """``state_bytes(n_total, n_trainable)``: bytes of float32 weights, gradients and AdamW moments of a model
    with ``n_total`` parameters of which ``n_trainable`` train (activations left out)."""
    cfg = GPTConfig(vocab_size=103, block_size=64, n_layer=4, n_head=4, n_embd=128)
    for lora in (None, LoRAConfig(r=8, alpha=16, targets="q,v"), LoRAConfig(r=64, alpha=16, targets="q,k,v,o,up,down")):
        n_total, n_trainable = count_trainable(cfg, lora)
        ledger = analytic_ledger(cfg, lora, batch_size=1)
        got = _call(state_bytes, n_total, n_trainable)
        _number(f"state_bytes({n_total:,}, {n_trainable:,})", got, ledger.weights + ledger.gradients + ledger.optimizer,
                "4 bytes per weight (frozen or not), and for each trainable one 4 bytes of gradient and 8 of AdamW's "
                "two moments m and v; a frozen weight has neither")
    return "4·total + 12·trainable bytes, the ledger's weights + gradients + optimizer"


# -- notebook 06: the task-distance study -----------------------------------------------------------------------


def _study_methods(results: dict[str, Any]) -> tuple[str, str, str]:
    # LoRA on q, v at the study's smallest and largest rank, and LoRA on every linear layer at its largest rank.
    config = results["config"]
    return (f"lora-qv-r{min(config['qv_ranks'])}", f"lora-qv-r{max(config['qv_ranks'])}",
            f"lora-all-r{max(config['all_linear_ranks'])}")


def _task_distance_readings(results: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """The readings of notebook 06's exercise, each judged on the study's results (tasks in order of distance)."""
    from .experiments.task_distance import gaps, uniform_loss

    tasks = results["tasks"]
    names, far = list(tasks), list(tasks)[-1]
    low, top, every = _study_methods(results)
    gap = {t: gaps(v) for t, v in tasks.items()}
    at = lambda method: {t: gap[t][method] for t in names}  # noqa: E731  (method -> its gap on each task)
    gain = {t: v["test_loss"][low] - v["test_loss"][top] for t, v in tasks.items()}  # what rank buys on q, v
    share = {t: v["recovered"][low] for t, v in tasks.items()}
    above_uniform = tasks[far]["base_test_loss"] - uniform_loss(results)

    closest = min(names, key=lambda t: gap[t][low])
    why_a = (f"the share of full fine-tuning's gain is {_each(share, '.2f')} for {low}, but the gap to full "
             f"fine-tuning, in nats, is {_each(at(low))}: LoRA comes closest on the {closest} task. The share "
             "divides by full fine-tuning's own gain, which differs from task to task")
    if above_uniform > 0:
        why_a += (f"; on the {far} task the base starts {above_uniform:.2f} nats worse than a uniform guess, and "
                  "undoing that is easy for any method, so every method gets a high share there")

    failing = [what for what, ok in ((f"the gap at {top}: {_each(at(top))}", _increasing(list(at(top).values()))),
                                     (f"what going from {low} to {top} gains: {_each(gain)}",
                                      _increasing(list(gain.values())))) if not ok]
    why_b = "it needs both to grow from task to task with the distance, and this does not: " + "; ".join(failing)

    placement = [t for t in names if gap[t][every] <= gap[t][top]]
    n_top, n_every = tasks[far]["trainable"][top], tasks[far]["trainable"][every]
    where = "every task" if len(placement) == len(names) else f"the {', '.join(placement)} task(s)"
    why_c = (f"{every} trains {n_every:,} numbers, {'fewer' if n_every < n_top else 'more'} than {top}'s "
             f"{n_top:,}, and leaves the smaller (or equal) gap on {where}: {_each(at(every))} against "
             f"{_each(at(top))}. Where the adapters sit matters more here than their rank")

    far_loss, uniform = tasks[far]["test_loss"][top], uniform_loss(results)
    why_d = (f"on the {far} task {top} reaches a test loss of {far_loss:.3f}, {uniform - far_loss:.2f} nats below a "
             f"uniform guess (ln V = {uniform:.3f}) and {tasks[far]['base_test_loss'] - far_loss:.2f} below the "
             f"base: it learns a lot. It stays {gap[far][top]:.3f} nats from full fine-tuning, which is not failing")

    return {"a": (closest == far, why_a),
            "b": (not failing, why_b),
            "c": (not placement, why_c),
            "d": (far_loss >= uniform, why_d)}


@_exercise("06 · reading the task-distance study")
def check_task_distance_reading(reading: Callable[[], str], results: dict[str, Any] | None = None) -> str:
    """``reading()``: the letter of the reading of notebook 06 that the study's committed results
    (``results/study.json``) support. ``results``: judge against another study's results instead."""
    _check_reading(reading, _task_distance_readings(_committed("study.json") if results is None else results))
    return "read the gap in nats next to the share: the share's denominator differs from task to task"


# -- notebook 07: subspace similarity --------------------------------------------------------------------------


@_exercise("07 · the subspace similarity φ")
def check_phi(phi: Callable[[Any, Any, int, int], float]) -> str:
    """``phi(X, Y, i, j)``: ‖U_Xⁱᵀ U_Yʲ‖²_F / min(i, j), with U_Xⁱ the top-i left singular vectors of X (d, m)."""
    gen = np.random.default_rng(107)
    d = 12
    shared = gen.standard_normal((d, 2))
    X = np.concatenate([shared, gen.standard_normal((d, 4))], axis=1) @ np.diag([6, 5, 3, 2, 1, 0.5])
    Y = np.concatenate([shared, gen.standard_normal((d, 1))], axis=1) @ np.diag([4, 3, 1])
    table = subspace_similarity(X, Y)
    for i, j in ((1, 1), (2, 3), (6, 3), (4, 2)):
        _number(f"phi(X, Y, {i}, {j})", _call(phi, X, Y, i, j), table[i - 1, j - 1],
                "take the LEFT singular vectors (columns of U from np.linalg.svd(X, full_matrices=False)), the top "
                "i of X and top j of Y, square the Frobenius norm of U_Xᵀ U_Y and divide by min(i, j)", rel=1e-6)
    return "φ in [0, 1]: 1 when one subspace contains the other"


def _seed_differences(results: dict[str, Any]) -> dict[str, float]:
    # task -> |test loss of the study's second seed of a method − the first seed's|: the one measure of seed noise.
    out = {}
    for row in results["runs"]:
        if row.get("part") == "seed":
            method = row["method"].rsplit("-seed", 1)[0]
            out[row["task"]] = abs(row["test_loss"] - results["tasks"][row["task"]]["test_loss"][method])
    return out


def _spectrum_readings(results: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """The readings of notebook 07's exercise, judged on the effective ranks (90% of the energy) of the study's
    updates, every W_q and W_v of every block on every task, and on the gaps to full fine-tuning of the same tasks."""
    from .experiments.task_distance import gaps

    ranks = [s["effective_rank"] for t in results["tasks"].values() for s in t["analysis"]["spectrum"].values()]
    full, r8, r64, rnd = ([e[k] for e in ranks] for k in ("full", "lora-r8", "lora-r64", "random"))
    span = lambda v: f"{min(v)}–{max(v)}"  # noqa: E731
    counts = (f"full fine-tuning's ΔW holds 90% of its energy in {span(full)} directions, LoRA's at r = 64 in "
              f"{span(r64)}, at r = 8 in {span(r8)}, a random matrix's in {span(rnd)} ({len(ranks)} matrices)")
    top = max(results["config"]["qv_ranks"])
    gap = {t: gaps(v)[f"lora-qv-r{top}"] for t, v in results["tasks"].items()}
    seeds = _seed_differences(results)
    matches = [t for t in gap if gap[t] <= seeds.get(t, 0.0)]  # as good as full fine-tuning, within two seeds
    gaps_said = (f"LoRA on q, v at r = {top} stays {_each(gap)} nats from full fine-tuning, while two seeds of it "
                 f"differ by {_each(seeds, '.4f')}")

    as_low = sum(f <= lo for f, lo in zip(full, r64))
    why_a = (f"{counts}: full fine-tuning needs more directions than LoRA at r = 64 in {len(ranks) - as_low} of "
             f"{len(ranks)} matrices. Low rank is LoRA's restriction, not what fine-tuning does when left free")
    why_b = (f"{gaps_said}. The effective rank counts the directions that hold 90% of the energy of W_q and W_v "
             "alone; full fine-tuning also changes the MLPs, the embeddings and the head, and the remaining 10% of "
             "the energy is not nothing")
    below = max(full) < top
    why_c = (f"{counts}; {gaps_said}: "
             + ("" if below else f"some full fine-tuning update needs {max(full)} directions, not fewer than {top}; ")
             + (f"on the {', '.join(matches)} task(s) LoRA at r = {top} is within the seed difference of full "
                "fine-tuning" if matches else ""))
    median = sorted(r64)[len(r64) // 2]
    why_d = (f"{counts}: the median matrix uses {median} of the {top} directions LoRA at r = {top} allows. The rank "
             "is a ceiling, not a target")
    return {"a": (as_low * 2 >= len(ranks), why_a),
            "b": (len(matches) == len(gap), why_b),
            "c": (below and not matches, why_c),
            "d": (median * 2 >= top, why_d)}  # the median matrix uses at least half of its rank


@_exercise("07 · reading the spectrum of the updates")
def check_spectrum_reading(reading: Callable[[], str], results: dict[str, Any] | None = None) -> str:
    """``reading()``: the letter of the reading of notebook 07 that the effective ranks in the study's committed
    results (``results/study.json``) support. ``results``: judge against another study's results instead."""
    _check_reading(reading, _spectrum_readings(_committed("study.json") if results is None else results))
    return "an effective rank describes the update; whether a rank suffices is measured on the loss"


# -- notebook 09: when low rank suffices -----------------------------------------------------------------------


@_exercise("09 · a rank-k update planted in the metric of the data")
def check_planted_update(planted_update: Callable[[Any, Any, Any, Any, float], Any]) -> str:
    """``planted_update(sigma, u, s, v, c)``: ΔW* = c · Σ^(-1/2) U diag(s) Vᵀ (d_in, d_out), with Σ (d_in, d_in)
    the inputs' second moment (symmetric, positive definite), U (d_in, k) and V (d_out, k) orthonormal."""
    gen = np.random.default_rng(109)
    d_in, d_out, k = 6, 9, 2
    x = gen.standard_normal((500, d_in)) * np.array([3.0, 2.0, 1.0, 0.6, 0.3, 0.1])
    sigma = x.T @ x / len(x)
    u = np.linalg.qr(gen.standard_normal((d_in, k)))[0]
    v = np.linalg.qr(gen.standard_normal((d_out, k)))[0]
    s, c = np.array([1.0, 0.5]), 1.7
    evals, evecs = np.linalg.eigh(sigma)
    inv_half = (evecs / np.sqrt(evals)) @ evecs.T
    expected = c * inv_half @ u @ np.diag(s) @ v.T
    got = _call(planted_update, sigma, u, s, v, c)
    _known_slips("planted_update(...)", got, {
        "without Σ^(-1/2) the update is planted in the plain metric: the inputs' strong directions would dominate "
        "what it does": c * u @ np.diag(s) @ v.T,
        "that is Σ^(+1/2): whitening divides by the square root of Σ's eigenvalues (x Σ^(-1/2) has second moment I)":
            c * ((evecs * np.sqrt(evals)) @ evecs.T) @ u @ np.diag(s) @ v.T,
        "that is Σ^(-1): whitening uses the inverse SQUARE ROOT of Σ": c * np.linalg.inv(sigma) @ u @ np.diag(s) @ v.T,
    })
    _compare("planted_update(...)", got, expected, "ΔW* maps inputs (d_in) to outputs (d_out), like W")
    whitened = np.linalg.svd((evecs * np.sqrt(evals)) @ evecs.T @ _array("planted_update(...)", got),
                             compute_uv=False)
    return f"on whitened inputs its singular values are c·s = {', '.join(f'{v:.2f}' for v in whitened[:k])}"


# The judgment exercise of notebook 09: a reading of the planted-rank results. The options are in the notebook;
# each wrong one has its reason here, so the check explains without giving the right answer away.
PLANTED_READINGS = {
    "a": "a difference of a few hundredths of a percent of the base's KL is within what the seeds' intervals "
         "span, and the oracle is 0 from r = k on: neither method is short of capacity there, so 'better' is noise "
         "or optimisation, not rank",
    "b": None,
    "c": "the teacher's update has rank k by construction (its oracle is exactly 0 at r = k): a student at 2k doing "
         "as well as one at k says the extra directions are not needed, not that they are",
    "d": "the oracle truncates each planted matrix on its own; a student adapts q and v of every block together, "
         "and one matrix can take over part of another's job, so a student may beat the oracle without any bug",
}


@_exercise("09 · reading the planted-rank experiment")
def check_planted_reading(reading: Callable[[], str]) -> str:
    """``reading()``: returns the letter of the reading that the planted-rank results support (notebook 09)."""
    _check_reading(reading, {letter: (why is None, why) for letter, why in PLANTED_READINGS.items()})
    return "low rank suffices when the needed update is low rank and lies in the adapted matrices"


# -- notebook 08: reading the MiniLM lab -----------------------------------------------------------------------
# The judgment exercise of notebook 08: which reading of the lab's table its results support. The options are in
# the notebook. Whether an option is right depends on the run, so the check derives every verdict from the lab's
# paired chapter-bootstrap intervals (results["differences"], in shares): a difference is resolved by the test set
# when its 95% interval excludes 0. A wrong option gets its reason; the check never names the right one.

MINILM_LETTERS = ("a", "b", "c", "d", "e")


def _minilm_difference(results: dict[str, Any], key: str) -> tuple[float, float, str]:
    # (lo, hi) in points and the interval as the reason quotes it, from results["differences"][key].
    try:
        lo, hi = (100 * float(v) for v in results["differences"][key])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"check_minilm_reading needs the lab's results (run_minilm's dict, or results/minilm.json "
                         f"with its 'differences'); results['differences'][{key!r}] is missing") from err
    a, b = key.split(" - ")
    names = f"{a.replace('lora-qv-r', 'LoRA r=')} − {'the probe' if b == 'probe' else 'full fine-tuning'}"
    text = f"the paired 95% interval of {names} is {lo:+.1f} to {hi:+.1f} points"
    return lo, hi, text


def minilm_readings(results: dict[str, Any]) -> dict[str, str | None]:
    """Each option of notebook 08's judgment exercise -> None if ``results`` support it, else why not."""
    lo1, hi1, r1_full = _minilm_difference(results, "lora-qv-r1 - full")
    lo4, hi4, r4_full = _minilm_difference(results, "lora-qv-r4 - full")
    lo_p, hi_p, r4_probe = _minilm_difference(results, "lora-qv-r4 - probe")
    unresolved = lo4 <= 0 <= hi4
    return {
        # (a) LoRA r=1 on q, v is worse than full fine-tuning.
        "a": None if hi1 < 0 else (
            f"{r1_full}: it contains 0, so another draw of test chapters could give the other sign; a lower mean "
            "that the test set does not resolve is not 'worse'" if lo1 <= 0 else
            f"{r1_full}: it lies above 0, so on this test set LoRA r=1 is the more accurate of the two"),
        # (b) This test set does not resolve the difference between LoRA r=4 on q, v and full fine-tuning.
        "b": None if unresolved else (
            f"{r4_full}: it lies entirely on one side of 0, and an interval that excludes 0 is a difference the "
            "test set resolves"),
        # (c) The linear probe beats LoRA r=4 on q, v.
        "c": None if hi_p < 0 else (
            f"{r4_probe}: it contains 0, so the test set does not resolve which of the two is better (a higher "
            "mean alone is not a win)" if lo_p <= 0 else
            f"{r4_probe}: it lies above 0, so on this test set the probe is the less accurate of the two"),
        # (d) LoRA r=4 on q, v is as accurate as full fine-tuning.
        "d": "no interval shows that two accuracies are equal: one that contains 0 says only that the test set "
             "cannot tell them apart (every difference inside it fits the data as well as 0 does), and one that "
             "excludes 0 says they differ",
        # (e) This test set resolves a difference between LoRA r=4 on q, v and full fine-tuning.
        "e": None if not unresolved else f"{r4_full}: it contains 0, so another draw of test chapters could give "
                                          "either sign",
    }


def check_minilm_reading(reading: Callable[[], str], results: dict[str, Any]) -> None:
    """``reading()``: returns the letter of a reading of the MiniLM lab's table that ``results`` (the lab's results
    dict, as notebook 08 runs or reads it) support. Several options can be right; each depends on the run."""
    verdicts = minilm_readings(results)  # first: results without the lab's intervals are not the student's error

    @_exercise("08 · reading the MiniLM lab")
    def check(answer: Callable[[], str]) -> str:
        _check_reading(answer, {letter: (why is None, why) for letter, why in verdicts.items()})
        return "a difference counts as resolved only when its paired 95% interval over test chapters excludes 0"

    check(reading)


# -- notebook 11: data-parallel training -----------------------------------------------------------------------


@_exercise("11 · the bytes a LoRA run all-reduces per step")
def check_allreduce_bytes(allreduce_bytes: Callable[[GPTConfig, int, tuple[str, ...]], int]) -> str:
    """``allreduce_bytes(cfg, r, targets)``: the bytes of float32 gradients that one data-parallel step of LoRA at
    rank ``r`` on ``targets`` (names of the block linears, e.g. ("q", "v")) of a GPT ``cfg`` all-reduces: the
    gradients of A and B of every adapted matrix of every block, nothing of the frozen weights."""
    cases = ((GPTConfig(vocab_size=103, block_size=64, n_layer=4, n_head=4, n_embd=128), 8, ("q", "v")),
             (GPTConfig(vocab_size=103, block_size=64, n_layer=2, n_head=2, n_embd=32), 1, TARGETS),
             (GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768), 4, ("q", "v")))
    for cfg, r, targets in cases:
        expected = 4 * count_trainable(cfg, LoRAConfig(r=r, alpha=16, targets=targets))[1]
        got = _call(allreduce_bytes, cfg, r, targets)
        d, f = cfg.n_embd, 4 * cfg.n_embd  # the MLP's up is (d, 4d), down (4d, d): not every matrix is square
        square = 4 * cfg.n_layer * len(targets) * 2 * d * r
        full = 4 * count_trainable(cfg, None)[1]
        why = ("each adapted matrix of shape (d_in, d_out) sends r·(d_in + d_out) numbers (A and B), 4 bytes each, "
               "in every block")
        if got is not None and not isinstance(got, bool) and isinstance(got, (int, float)):
            if got == square and square != expected:
                why = f"up is ({d}, {f}) and down ({f}, {d}): 2dr holds only for a square matrix"
            elif got == full:
                why = "that is full fine-tuning's buffer: with LoRA the frozen weights send nothing"
            elif got * 4 == expected:
                why = "those are numbers; float32 takes 4 bytes each"
        _number(f"allreduce_bytes(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, r={r}, {targets})", got, expected,
                why)
    return "4 bytes × r·(d_in + d_out) per adapted matrix per block: the trainable count, nothing frozen"


# -- notebook 10: LoRA in practice (a 4-bit base, many adapters in one batch, the variants) ----------------------
# Self-contained: the block imports what it checks against where it is used, so the rest of this file does not
# depend on the quantizer.


@_exercise("10 · a blockwise absmax round trip")
def check_absmax_round_trip(round_trip: Callable[[Any, Any, int], Any]) -> str:
    """``round_trip(W, levels, block) -> W_hat``: W's numbers cut into blocks of ``block`` (row-major), each block
    divided by its largest |w|, each number replaced by the nearest of the 16 sorted ``levels``, then multiplied back:
    what ``quantize`` stores and ``dequantize`` gives back, W's shape kept."""
    from .quantize import CODE_BOOKS, QuantConfig, quantize

    gen = np.random.default_rng(110)
    for kind, shape, block in (("nf4", (8, 16), 16), ("uniform4", (6, 10), 4), ("nf4", (4, 32), 64)):
        W = gen.standard_normal(shape) * 0.02
        W[0, :3] = 0.0  # a few exact zeros: NF4 keeps them exactly
        levels = CODE_BOOKS[kind]()
        expected = backend.to_numpy(quantize(W, QuantConfig(kind, block)).dequantize()).astype(np.float64)
        got = _array("W_hat", _call(round_trip, W.copy(), levels.copy(), block))
        # the usual slips, in float64 as a student computes them
        absmax = np.abs(W.reshape(-1, block)).max(axis=1, keepdims=True)  # (n_blocks, 1)
        scaled = W.reshape(-1, block) / absmax  # in [-1, 1]
        nearest = levels[np.abs(scaled[..., None] - levels).argmin(axis=-1)]  # (n_blocks, block)
        below = levels[np.clip(np.searchsorted(levels, scaled, side="right") - 1, 0, 15)]  # the level at or below
        unit = W / np.abs(W).max()  # one scale for the whole W
        _known_slips("W_hat", got, {
            "one absmax for the whole W: each block of `block` numbers has its own scale (an outlier then costs "
            "only its own block its precision)": levels[np.abs(unit[..., None] - levels).argmin(axis=-1)]
                                                 * np.abs(W).max(),
            "the levels are in [-1, 1]: multiply each block back by its absmax": nearest.reshape(shape),
            "that is the level at or below each number; take the NEAREST level": (below * absmax).reshape(shape),
        })
        _compare("W_hat", got, expected, f"W_hat has W's shape {shape}", rtol=1e-5)
    return "the same numbers as quantize(W).dequantize(), for NF4 and for 16 evenly spaced levels"


@_exercise("10 · the bytes of a 4-bit weight")
def check_stored_bytes(stored_bytes: Callable[[int, int, bool], int]) -> str:
    """``stored_bytes(size, block, double_quant)``: the bytes of a weight of ``size`` numbers in 4 bits: two codes a
    byte, and per block of ``block`` numbers one float32 scale, or, with double quantization, one 8-bit scale plus a
    float32 absmax per group of 256 scales (the last group may be short) and one float32 mean for the weight."""
    from .quantize import QuantConfig, stored_nbytes

    for size, block, dq in ((4096, 64, False), (16384, 64, True), (64 * 300, 64, True), (1_048_576, 64, True),
                            (240, 8, False)):
        got = _call(stored_bytes, size, block, dq)
        expected = stored_nbytes(size, QuantConfig(block=block, double_quant=dq))
        slips = {"the codes alone: every block also stores its scale": size / 2,
                 "a 4-bit code is half a byte: two codes share one byte": size + expected - size // 2}
        if dq:
            slips["with double quantization each group of 256 scales also keeps a float32 absmax, and the weight a "
                  "float32 mean"] = size / 2 + size // block
        _known_slips(f"stored_bytes({size}, {block}, {dq})", got, {k: np.float64(v) for k, v in slips.items()})
        _number(f"stored_bytes({size}, {block}, {dq})", got, expected,
                "count the codes (½ byte a number), then the scales (4 bytes per block, or with double quantization "
                "1 byte per block + 4 per group of 256 blocks, rounded up, + 4 for the mean)")
    return "½ byte a number + the scales: 0.5625 byte a number at block 64, 0.516 with double quantization"


@_exercise("10 · many adapters in one batch")
def check_mixed_batch(mixed_batch: Callable[..., Any]) -> str:
    """``mixed_batch(x, W, A, B, s, ids) -> y``: x (n, L, d_in), W (d_in, d_out), A (K, d_in, r), B (K, r, d_out),
    s (K,), ids (n,): y_i = x_i @ W + s[k] · (x_i @ A[k]) @ B[k] with k = ids[i], for every sample i."""
    gen = np.random.default_rng(111)
    for n, L, d_in, d_out, r, K, ids in ((5, 3, 6, 4, 2, 3, [2, 0, 2, 1, 0]), (4, 2, 5, 7, 3, 4, [3, 3, 1, 2])):
        x, W = gen.standard_normal((n, L, d_in)), gen.standard_normal((d_in, d_out))
        A, B = gen.standard_normal((K, d_in, r)), gen.standard_normal((K, r, d_out))
        s, ids = gen.uniform(0.5, 2.0, K), np.array(ids)
        got = _array("y", _call(mixed_batch, x, W, A, B, s, ids))
        # each sample alone through its adapter merged into W: what the batch must equal
        merged = np.stack([x[i] @ (W + s[k] * A[k] @ B[k]) for i, k in enumerate(ids)])
        _known_slips("y", got, {
            "every sample ran with adapter 0: gather each sample's own A[ids[i]] and B[ids[i]]":
                np.stack([x[i] @ (W + s[0] * A[0] @ B[0]) for i in range(n)]),
            "the scale s[k] is missing": np.stack([x[i] @ (W + A[k] @ B[k]) for i, k in enumerate(ids)]),
            "sample i ran with adapter i mod K: the adapter of sample i is ids[i]":
                np.stack([x[i] @ (W + s[i % K] * A[i % K] @ B[i % K]) for i in range(n)]),
            "only the base x @ W: the adapter's path is missing": x @ W,
        })
        _compare("y", got, merged, f"y has shape (n, L, d_out) = {(n, L, d_out)}")
    return "each sample equals itself alone through its adapter merged into W"


VARIANTS_LETTERS = ("a", "b", "c", "d", "e")


def variants_gaps(results: dict[str, Any]) -> dict[str, float]:
    """From the variants comparison (``run_variants``'s dict or results/variants.json): each variant's test loss
    minus plain LoRA's ("dora", "pissa", "qlora") and the yardstick, "seed": the second seed of plain LoRA minus
    the first. Plain LoRA is the first method, the yardstick the last (``variants_specs``' order)."""
    runs = [r for r in results["runs"] if r.get("chosen", True)]
    plain, yardstick = runs[0], runs[-1]
    gaps = {"seed": yardstick["test_loss"] - plain["test_loss"]}
    for run in runs[1:-1]:
        gaps[run["method"].split("-")[0]] = run["test_loss"] - plain["test_loss"]
    missing = {"dora", "pissa", "qlora"} - set(gaps)
    if missing:
        raise ValueError(f"variants_gaps: the results lack {sorted(missing)} (run_variants' methods)")
    return gaps


def variants_readings(results: dict[str, Any]) -> dict[str, str | None]:
    """Each option of notebook 10's reading exercise -> None if ``results`` support it, else why not (with the
    numbers). Test losses; a difference is 'told apart' when it exceeds the two seeds' difference of plain LoRA."""
    g = variants_gaps(results)
    y = abs(g["seed"])
    names = {"dora": "DoRA", "pissa": "PiSSA", "qlora": "LoRA on the 4-bit base"}
    said = {m: f"{names[m]} − plain LoRA = {g[m]:+.4f} nats, against {y:.4f} between plain LoRA's two seeds"
            for m in names}
    apart = [m for m in names if abs(g[m]) > y]
    return {
        # (a) DoRA ends better than plain LoRA, by more than one seed's difference.
        "a": None if g["dora"] < -y else f"{said['dora']}: " + (
            "DoRA ends worse" if g["dora"] >= 0 else "better, but by no more than a seed alone moves it"),
        # (b) PiSSA ends better than plain LoRA, by more than one seed's difference.
        "b": None if g["pissa"] < -y else f"{said['pissa']}: " + (
            "PiSSA ends worse" if g["pissa"] >= 0 else "better, but by no more than a seed alone moves it"),
        # (c) Fine-tuning on the 4-bit base ends worse than on the float base, by more than one seed's difference.
        "c": None if g["qlora"] > y else f"{said['qlora']}: " + (
            "the 4-bit base ends no worse" if g["qlora"] <= 0 else "worse, but by no more than a seed alone moves it"),
        # (d) None of the three is told apart from plain LoRA.
        "d": None if not apart else "; ".join(said[m] for m in apart) + ": larger than the seeds' difference",
        # (e) At least one of the three is told apart from plain LoRA, in one direction or the other.
        "e": None if apart else "every difference is within the seeds' difference: " + "; ".join(
            said[m] for m in names),
    }


def check_variants_reading(reading: Callable[[], str], results: dict[str, Any]) -> None:
    """``reading()``: returns the letter of a reading of notebook 10's comparison that ``results`` (the variants
    comparison, as the notebook runs or reads it) support. Several options can be right; each depends on the run."""
    verdicts = variants_readings(results)  # first: results without the methods are not the student's error

    @_exercise("10 · reading the variants comparison")
    def check(answer: Callable[[], str]) -> str:
        _check_reading(answer, {letter: (why is None, why) for letter, why in verdicts.items()})
        return ("one pair of seeds is a yardstick, a lower bound on the noise: a difference beyond it is worth "
                "another look with more seeds, not yet a significant one")

    check(reading)
