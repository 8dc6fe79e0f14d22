"""Data-parallel training over MPI: every rank holds the whole model, computes the gradient of its share of every
global batch, and the ranks average the gradients of what trains before each optimizer step.

    mpiexec -n 2 python -m lora_np finetune --quick            # two processes on this machine
    mpiexec -f hosts -n 8 python -m lora_np finetune --rank 8  # eight, on the machines the file ``hosts`` lists

Why it gives the one-process run: a batch's loss is the mean of its rows' losses, so its gradient is the mean of
the rows' gradients. Split the B rows of a global batch into shards of b_i rows, L_i the mean loss of shard i:

    L = Σ_i (b_i / B) · L_i        ∇L = Σ_i (b_i / B) · ∇L_i

Rank i computes ∇L_i on its b_i rows, scales it by b_i / B, and one all-reduce (a sum every rank receives) leaves
the same ∇L on every rank. Every rank then clips and steps AdamW on the same numbers, so the ranks stay equal
without ever sending a weight. The sums are rounded in another order than one process's, so the losses agree to
float32 rounding, not bit for bit (tests/test_distributed.py measures how close).

What travels is the gradient of the **trainable** parameters only, flattened into one buffer per step (one message
per step instead of one per tensor: latency is paid once). A frozen weight has no gradient (engine.py never
computes one) and nothing to synchronise: every rank's copy stays the one it started with. Full fine-tuning of a
d × d matrix sends d² numbers every step, LoRA sends A and B, 2·d·r (benchmarks/allreduce.py counts the bytes).

This is the only module that imports mpi4py, and only when the process was started by an MPI launcher with more
than one rank (``from_environment``); otherwise training is the one-process loop, and mpi4py need not be installed.
Rank 0 alone evaluates, prints and writes; the other ranks train and wait. Arrays travel through host memory
(a CuPy gradient is copied to the host first), so any MPI works, CUDA-aware or not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from . import backend
from .nn import Module, Parameter

# What MPI launchers put in each rank's environment: MPICH's and Intel MPI's mpiexec (hydra) and Slurm's srun
# (PMI), Open MPI's mpirun, MVAPICH's. Reading them needs no mpi4py, so one process never imports it.
LAUNCHER_VARIABLES = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                      ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))
INSTALL = "pip install -r requirements-mpi.txt"
POLL_SECONDS = 1e-3  # how often a waiting rank looks whether rank 0 is done (sleeping, not spinning a core)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A problem every rank found at the same moment (the ranks disagree on their weights, say): rank 0 says it in
    one line and every rank stops cleanly, with no MPI_Abort needed."""


def launched_ranks() -> tuple[int, int]:
    """(rank, number of ranks) as the MPI launcher announced them in the environment; (0, 1) without one."""
    for rank, size in LAUNCHER_VARIABLES:
        if os.environ.get(size, "").isdigit() and os.environ.get(rank, "").isdigit():
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def from_environment() -> DataParallel | None:
    """The data-parallel group this process belongs to, or None where it runs alone (no MPI launcher, or
    ``mpiexec -n 1``): then mpi4py is never imported and training is the one-process loop.

    Started by a launcher with more ranks but without mpi4py, rank 0 raises a RuntimeError naming the install
    command and the other ranks exit with code 2 quietly, so the user reads the line once."""
    rank, size = launched_ranks()
    if size == 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as e:
        if rank != 0:
            raise SystemExit(2) from None  # rank 0 says why
        raise RuntimeError(f"started by an MPI launcher with {size} ranks, but mpi4py cannot be imported ({e}): "
                           f"{INSTALL}") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != size:  # e.g. Open MPI's mpirun starting ranks of an mpi4py built on MPICH
        raise RuntimeError(f"the MPI launcher started {size} ranks, but mpi4py's MPI sees {comm.Get_size()}: the "
                           "launcher and mpi4py come from different MPI libraries; use the mpiexec that ships with "
                           f"mpi4py's MPI ({INSTALL} brings both)")
    return DataParallel(comm)


def find_mpiexec() -> str | None:
    """The ``mpiexec`` to start ranks with: the one next to this Python (where ``pip install mpich`` puts it, also
    when the environment is not activated), else the first on the PATH; None if there is none."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.is_file() else shutil.which("mpiexec")


class DataParallel:
    """One rank of a data-parallel group on an mpi4py communicator; ``train(..., data_parallel=dp)`` uses it.

    It counts what it all-reduces (``bytes_reduced``, ``seconds_reducing``, ``reductions``) for the benchmark.
    """

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI  # the caller made comm with it: the import is already done

        self._mpi = MPI
        self.comm = comm
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self.bytes_reduced = 0  # gradient buffers all-reduced so far, in bytes (each rank's buffer counted once)
        self.seconds_reducing = 0.0  # wall time inside the gradient all-reduce
        self.reductions = 0

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that evaluates, prints and writes."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, size={self.size})"

    # -- the training step --------------------------------------------------------------------------------------

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (``shard_rows``)."""
        return shard_rows(batch_size, self.rank, self.size)

    def shard(self, x: Any, y: Any) -> tuple[Any, Any]:
        """This rank's rows of the global batch ``(x, y)``, which every rank drew alike from the same seed."""
        rows = self.rows(len(x))
        return x[rows], y[rows]

    def average_gradients(self, params: list[Parameter], loss: float, share: float) -> float:
        """Replace every trainable parameter's gradient by the global batch's: Σ_i share_i · grad_i over the ranks,
        ``share`` = this rank's rows / the global batch's. The mean loss rides in the same buffer, so one
        all-reduce per step carries everything; returns the global batch's loss.

        The gradients are flattened into one buffer ([p₀ … p_n, loss]): one message per step, whose size is the
        number of trainable parameters + 1 — the 2dr against d² of LoRA, in bytes on the wire. A parameter that
        this loss did not reach (``grad is None``, the same on every rank) sends zeros and stays None.
        """
        np = backend.np
        dtype = np.result_type(*(p.data.dtype for p in params))
        sizes = [p.data.size for p in params]
        buf = np.empty(sum(sizes) + 1, dtype)  # (n_trainable + 1,)
        offset = 0
        for p, n in zip(params, sizes):
            buf[offset:offset + n] = 0 if p.grad is None else backend.to_numpy(p.grad).ravel()
            offset += n
        buf[-1] = loss
        buf *= share  # share_i · grad_i: the all-reduce's sum is then the global batch's mean
        start = time.perf_counter()
        self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        self.seconds_reducing += time.perf_counter() - start
        self.bytes_reduced += buf.nbytes
        self.reductions += 1
        offset = 0
        for p, n in zip(params, sizes):
            if p.grad is not None:
                p.grad[...] = backend.xp.asarray(buf[offset:offset + n].reshape(p.grad.shape))
            offset += n
        return float(buf[-1])

    # -- agreement: the same weights, the same run ------------------------------------------------------------

    def check_same_weights(self, model: Module, when: str) -> None:
        """Every rank's parameters (frozen and trainable, names, shapes, dtypes, values) are bit for bit rank 0's,
        or a DistributedError naming the ranks that differ. Each rank hashes its own weights and only the 64-hex
        digests travel: an allgather rather than an all-reduce of MIN and MAX, which would say that some rank
        differs but not which."""
        self._agree(weights_fingerprint(model), f"the ranks' weights disagree {when}")

    def _agree(self, digest: str, what: str) -> None:
        digests = self.comm.allgather(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise DistributedError(f"{what}: rank{'s' * (len(differ) > 1)} {', '.join(map(str, differ))} "
                                   f"differ{'s' * (len(differ) == 1)} from rank 0 (fingerprint "
                                   f"{digests[differ[0]][:12]} against {digests[0][:12]})")

    # -- rank 0 works, the others wait ---------------------------------------------------------------------------

    def broadcast_parameters(self, model: Module) -> None:
        """Rank 0's weights into every rank's ``model`` (same architecture). The other ranks wait politely while
        rank 0 gets its model ready (loads it, or pretrains it), then receive every parameter."""
        self._wait(self.comm.Ibarrier())
        for p in model.parameters():
            host = backend.np.ascontiguousarray(backend.to_numpy(p.data))
            self.comm.Bcast(host, root=0)
            if not self.is_root:
                p.data[...] = backend.xp.asarray(host)

    def broadcast_value(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a validation loss: all ranks must stop together if it is not finite)."""
        buf = backend.np.array([value if self.is_root else 0.0], dtype=backend.np.float64)
        self._wait(self.comm.Ibcast(buf, root=0))
        return float(buf[0])

    def _wait(self, request: Any) -> None:
        """Wait for a non-blocking collective by sleeping between looks: a blocking one spins its core at 100%,
        which on a machine with fewer cores than ranks takes time from the rank that is working."""
        while not request.Test():
            time.sleep(POLL_SECONDS)


def shard_rows(batch_size: int, rank: int, size: int) -> slice:
    """Rank ``rank``'s rows of a global batch shared by ``size`` ranks: contiguous, in rank order, covering every
    row once, as even as can be (their counts differ by at most one)."""
    if batch_size < size:
        raise DistributedError(f"a global batch of {batch_size} sequences cannot be shared by {size} ranks: give "
                               f"every rank at least one (a batch size >= {size})")
    return slice(batch_size * rank // size, batch_size * (rank + 1) // size)


def weights_fingerprint(model: Module) -> str:
    """SHA-256 of every parameter's name, shape, dtype and bytes, in the model's order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        data = backend.np.ascontiguousarray(backend.to_numpy(p.data))
        h.update(f"{name} {data.shape} {data.dtype}\n".encode())
        h.update(data.tobytes())
    return h.hexdigest()


class AgreedError(ValueError):
    """A failed check or a disagreement that every rank already knows of (``agreed``, ``fail_together``): rank 0
    raises it, to be printed as one line; the other ranks exit quietly."""


def agreed(dp: DataParallel | None, checks: Callable[[], T], describe: Callable[[T], str]) -> T:
    """Run a command's ``checks`` on every rank, then make their outcome collective: a check that fails on any
    rank fails on all (else the ranks that passed would wait forever for one that left), and ``describe(result)``
    (the config, the corpora's digest, ...) must be the same on every rank. Rank 0 raises one AgreedError saying
    which rank failed and why, or that the ranks disagree; the other ranks exit with code 2 quietly. Without
    ``dp``: ``checks()``.
    """
    if dp is None:
        return checks()
    try:
        result = checks()
    except Exception as e:  # whatever it is, every rank must hear of it
        mine: tuple[str | None, str | None] = (str(e), None)
    else:
        mine = (None, hashlib.sha256(describe(result).encode()).hexdigest())
    message = _settle(dp, mine)
    if message is None:
        return result
    if not dp.is_root:
        raise SystemExit(2)  # rank 0 says it
    raise AgreedError(message)


def fail_together(error: Exception) -> Exception | None:
    """A check failed on this rank before it reached ``agreed`` (a bad argument, say): join the other ranks'
    agreement with the failure, so that none of them waits for this one. Returns the error rank 0 prints (this
    rank's, or the first failing rank's), None on the other ranks. Without MPI to tell the others with (no mpi4py),
    rank 0 prints its own error."""
    rank, _ = launched_ranks()
    try:
        dp = from_environment()
    except (RuntimeError, SystemExit):
        return error if rank == 0 else None
    if dp is None:
        return error
    message = _settle(dp, (str(error), None))
    return AgreedError(message) if dp.is_root else None


def _settle(dp: DataParallel, mine: tuple[str | None, str | None]) -> str | None:
    """One allgather of every rank's (failure message or None, digest of its run or None) -> what rank 0 must say,
    or None when every rank passed and all describe the same run."""
    outcomes = dp.comm.allgather(mine)
    failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        return message if rank == 0 else f"rank {rank} of {dp.size}: {message}"
    if any(digest != outcomes[0][1] for _, digest in outcomes):
        differ = next(rank for rank, (_, digest) in enumerate(outcomes) if digest != outcomes[0][1])
        return (f"the ranks disagree on the run: rank {differ}'s arguments, config or corpora differ from rank 0's "
                "(every rank must run the same command on the same files)")
    return None


@contextmanager
def stop_all_on_error(dp: DataParallel | None) -> Iterator[None]:
    """Around the work of a data-parallel command: a rank that raises ends the whole job. It prints one line
    and calls MPI_Abort, which the launcher turns into ending every rank (the others would otherwise wait forever
    in the next all-reduce for a partner that is gone). A DistributedError is known to all ranks at once: rank 0
    raises it (one line), the others exit with code 1. Without ``dp`` it does nothing."""
    if dp is None:
        yield
        return
    try:
        yield
    except DistributedError:
        if dp.is_root:
            raise
        raise SystemExit(1) from None
    except (Exception, KeyboardInterrupt) as e:  # any failure must end every rank
        message = " ".join(str(e).split())
        print(f"error: rank {dp.rank} of {dp.size}: {type(e).__name__}: {message}", file=sys.stderr, flush=True)
        dp.comm.Abort(1)


__all__ = ["AgreedError", "DataParallel", "DistributedError", "agreed", "fail_together", "find_mpiexec",
           "from_environment", "launched_ranks", "shard_rows", "stop_all_on_error", "weights_fingerprint"]
