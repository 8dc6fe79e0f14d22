"""Data-parallel training over MPI (lora_np/distributed.py): two ranks give the one-process losses, a failing rank
ends the job, disagreeing ranks are one line, and without a launcher (or mpi4py) nothing changes.

The tests that start ranks run ``mpiexec -n 2``; they are skipped, saying why, where mpi4py or mpiexec is missing
(``pip install -r requirements-mpi.txt`` brings both). The rest run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_np import distributed

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("mpi_train.py")
MPIEXEC = distributed.find_mpiexec()
HAS_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not (MPIEXEC and HAS_MPI4PY), reason="mpi4py or mpiexec is not installed "
                               "(pip install -r requirements-mpi.txt)")
LAUNCHER = [v for pair in distributed.LAUNCHER_VARIABLES for v in pair]


def env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: no launcher variables of our own, the repository importable."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    return {**base, "PYTHONPATH": os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]), **extra}


def run(cmd: list[str], timeout: float = 180, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(**extra), timeout=timeout)


def mpiexec(n: int, *cmd: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``mpiexec -n n cmd`` (timeout: a hang fails the test instead of blocking the suite)."""
    return run([MPIEXEC, "-n", str(n), *cmd], timeout=timeout)


def driver(options: dict, ranks: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), json.dumps(options)]
    return mpiexec(ranks, *cmd) if ranks else run(cmd)


# -- without MPI ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size, size", [(b, n) for b in range(1, 10) for n in range(1, 5) if b >= n])
def test_shards_cover_the_global_batch_once_in_order(batch_size, size):
    rows = [distributed.shard_rows(batch_size, rank, size) for rank in range(size)]
    assert [i for r in rows for i in range(batch_size)[r]] == list(range(batch_size))
    counts = [r.stop - r.start for r in rows]
    assert max(counts) - min(counts) <= 1 and min(counts) >= 1


def test_a_batch_smaller_than_the_ranks_is_refused():
    with pytest.raises(distributed.DistributedError, match="a batch size >= 4"):
        distributed.shard_rows(3, 0, 4)


@pytest.mark.parametrize("variables, expected", [
    ({}, (0, 1)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2)),  # MPICH / Intel MPI (hydra), srun
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}, (3, 4)),  # Open MPI
    ({"PMI_RANK": "0", "PMI_SIZE": "1"}, (0, 1)),  # mpiexec -n 1
    ({"PMI_SIZE": "2"}, (0, 1)),  # half a pair is no launcher
])
def test_launched_ranks_reads_the_launcher_environment(monkeypatch, variables, expected):
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_ranks() == expected


def test_one_rank_is_the_one_process_path_and_never_imports_mpi4py():
    code = ("import sys; from lora_np import distributed; "
            "assert distributed.from_environment() is None; assert 'mpi4py' not in sys.modules")
    out = run([sys.executable, "-c", code], PMI_RANK="0", PMI_SIZE="1")
    assert out.returncode == 0, out.stderr


@pytest.fixture
def no_mpi4py(tmp_path):
    """A PYTHONPATH on which ``import mpi4py`` fails, as where it is not installed."""
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('No module named mpi4py')\n")
    return os.pathsep.join([str(tmp_path), str(ROOT)])


def test_launcher_without_mpi4py_is_one_line_from_rank_0(no_mpi4py):
    cmd = [sys.executable, "-m", "lora_np", "finetune", "--quick", "--no-progress"]
    first = run(cmd, PMI_RANK="0", PMI_SIZE="2", PYTHONPATH=no_mpi4py)
    assert first.returncode == 2 and first.stdout == ""
    assert re.fullmatch(r"error: started by an MPI launcher with 2 ranks, but mpi4py cannot be imported .*"
                        r"pip install -r requirements-mpi.txt\n", first.stderr), first.stderr
    other = run(cmd, PMI_RANK="1", PMI_SIZE="2", PYTHONPATH=no_mpi4py)
    assert (other.returncode, other.stdout, other.stderr) == (2, "", "")  # rank 0 says it, once


# -- with mpiexec -n 2 ---------------------------------------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize("batch_size", [8, 5], ids=["even", "uneven"])  # 5: shards of 2 and 3 rows
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_two_ranks_give_the_one_process_losses(batch_size, full):
    """The same global batches, the gradients averaged: every step's loss and every validation loss of the
    one-process run, to float32 rounding (measured: at most 2e-7 relative over 12 steps). Not bitwise: each rank
    sums its rows' gradients and the all-reduce adds the two sums, another order of additions than one process's."""
    options = {"batch_size": batch_size, "full": full}
    one, two = driver(options), driver(options, ranks=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["ranks"] == 2 and len(b["step_loss"]) == len(a["step_loss"]) == 12 and not b["stopped"]
    np.testing.assert_allclose(b["step_loss"], a["step_loss"], rtol=2e-6)
    np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=2e-6)
    n_trainable = 2 * 2 * (2 * 16 * 2) if not full else None  # q and v of 2 blocks: r·(16 + 16) each, A and B
    if n_trainable:  # 4 bytes a number, + 1 for the loss, every step: only trainable gradients travel
        assert b["bytes"] == 12 * 4 * (n_trainable + 1)


@needs_mpi
def test_the_command_line_under_mpiexec_matches_one_process():
    cmd = [sys.executable, "-m", "lora_np", "finetune", "--quick", "--no-progress", "--steps", "6"]
    one, two = run(cmd), mpiexec(2, *cmd)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout.count("validation loss") == 1  # rank 0 alone prints
    assert "data-parallel over 2 ranks: 6 gradient all-reduces of 8,196 bytes each" in two.stdout
    losses = [[float(v) for v in re.findall(r"loss (\d+\.\d+)", o.stdout)] for o in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], atol=1.5e-3)  # printed to 3 decimals


@needs_mpi
@pytest.mark.parametrize("fault, code, stderr", [
    ("raise", 1, r"error: rank 1 of 2: ValueError: planted failure on rank 1"),
    ("weights", 1, r"error: the ranks' weights disagree at the start of training: rank 1 differs from rank 0 .*"),
])
def test_a_failing_rank_ends_every_rank_with_one_line(fault, code, stderr):
    out = driver({"batch_size": 8, "fault": fault}, ranks=2)  # a hang would be the timeout, a failure
    assert out.returncode == code and out.stdout == ""
    ours = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and re.fullmatch(stderr, ours[0]), out.stderr


@needs_mpi
def test_a_non_finite_loss_on_one_rank_stops_all_at_the_same_step():
    out = driver({"batch_size": 8, "fault": "nan"}, ranks=2)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["stopped"].startswith("non-finite loss nan at step 3") and len(result["step_loss"]) == 2


FINETUNE = ["finetune", "--quick", "--no-progress"]


@needs_mpi
@pytest.mark.parametrize("first, second, message", [
    (FINETUNE, [*FINETUNE, "--rank", "4"],
     r"error: the ranks disagree on the run: rank 1's arguments, config or corpora differ .*"),
    (FINETUNE, [*FINETUNE, "--corpus", "no-such-file.txt"], r"error: rank 1 of 2: .*no-such-file.txt.*"),
    (FINETUNE, [*FINETUNE, "--rank", "0"], r"error: rank 1 of 2: .*argument --rank: '0' is not a positive integer"),
    ([*FINETUNE, "--rank", "0"], [*FINETUNE, "--rank", "0"], r"error: .*argument --rank: '0' is not a positive .*"),
    (["sweep", "--quick"], ["sweep", "--quick"], r"error: under mpiexec only finetune runs \(data-parallel\); .*"),
    (["sweep", "--quick"], FINETUNE, r"error: under mpiexec only finetune runs \(data-parallel\); .*"),
], ids=["other-config", "check-fails-on-rank-1", "bad-argument-on-rank-1", "bad-argument-everywhere",
        "sweep", "sweep-and-finetune"])
def test_ranks_that_disagree_or_fail_a_check_are_one_line(first, second, message):
    python = [sys.executable, "-m", "lora_np"]
    out = run([MPIEXEC, "-n", "1", *python, *first, ":", "-n", "1", *python, *second], timeout=120)  # rank 0 : rank 1
    assert out.returncode == 2 and out.stdout == ""
    assert re.fullmatch(message + "\n", out.stderr), out.stderr
