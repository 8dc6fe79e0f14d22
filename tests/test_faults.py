"""Fault injection: signals during a save (in a subprocess), a full disk, read-only and missing folders. Each case
holds lora_np to one promise: a clear error, nothing lost (the old file byte for byte, its mode too), nothing left
behind (no temporary file).

The full disk and the read-only folder are small tmpfs mounts, made where the test may mount one (root on Linux)
and skipped, saying why, where it may not."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import adapted_gpt, assert_files_untouched, snapshot_files, tiny_gpt

from lora_np import checkpoint
from lora_np.checkpoint import TEMP_PREFIX, load_model, save_adapter, save_model

ROOT = Path(__file__).resolve().parent.parent

# The child saves a model over an old one; its fsync (the bytes are in the temporary file, not yet renamed) says
# "writing" and waits, so that the test can signal it at exactly that moment.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    # Ctrl-C as in a terminal, even where the test runner was started as a background job (SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from helpers import tiny_gpt, adapted_gpt
    from lora_np import checkpoint
    real_fsync = os.fsync
    def slow_fsync(fd):
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = slow_fsync
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "model":
        checkpoint.save_model(tiny_gpt(seed=1, n_embd=64), path)
    else:
        checkpoint.save_adapter(adapted_gpt(seed=1), path)
""").format(tests=str(ROOT / "tests"))


def signalled_save(tmp_path: Path, kind: str, signum: int) -> subprocess.CompletedProcess:
    """Start a child that saves ``kind`` over ``tmp_path/file.safetensors``, send ``signum`` mid-write."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(tmp_path / "file.safetensors")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing", child.stderr.read()
        assert any(p.name.startswith(TEMP_PREFIX) for p in tmp_path.iterdir())  # caught in the middle
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("kind", ["model", "adapter"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, kind, signum):
    path = tmp_path / "file.safetensors"
    (save_model(tiny_gpt(), path) if kind == "model" else save_adapter(adapted_gpt(), path))
    path.chmod(0o640)
    files = snapshot_files(tmp_path)
    done = signalled_save(tmp_path, kind, signum)
    assert done.returncode != 0  # the signal ended the process, as it would have without lora_np's handler
    if signum == signal.SIGTERM:
        assert done.returncode == -signal.SIGTERM, done.stderr
    assert_files_untouched(files, tmp_path)
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_temporary_left_by_sigkill_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "file.safetensors"
    save_model(tiny_gpt(), path)
    old = path.read_bytes()
    signalled_save(tmp_path, "model", signal.SIGKILL)  # no handler runs: the temporary file stays ...
    assert path.read_bytes() == old and len(list(tmp_path.iterdir())) == 2
    save_model(tiny_gpt(seed=2), tmp_path / "other.safetensors")  # ... until the next write into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.safetensors", "other.safetensors"]
    assert path.read_bytes() == old


# -- a full disk and a read-only folder: small tmpfs mounts -------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *options: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (skips the test, saying why, where it cannot be mounted)."""
    where.mkdir()
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (full disk, read-only folder) needs root on Linux")
    opts = ",".join((f"size={size}", *options))
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        path = disk / "model.safetensors"
        save_model(tiny_gpt(), path)  # about 10 kB
        path.chmod(0o600)
        files = snapshot_files(disk)
        with pytest.raises(OSError, match="No space left"):
            save_model(tiny_gpt(seed=1, n_embd=64), path)  # about 250 kB: does not fit
        assert_files_untouched(files, disk)
        assert path.stat().st_mode & 0o777 == 0o600
        assert load_model(path)[0].config.seed == 0


def test_a_full_disk_while_drawing_figures_keeps_the_old_pngs(tmp_path):
    """`figures --out DIR` on a nearly full disk: exit 1, one line, the PNGs there before are unchanged."""
    results = ROOT / "results" / "sweep.json"
    if not results.exists():
        pytest.skip("needs the committed results/sweep.json")
    with tmpfs(tmp_path / "disk", "200k") as disk:
        old = disk / "params_vs_rank.png"
        old.write_bytes(b"\x89PNG old figure")
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (200_000 - 8192))
        files = snapshot_files(disk)
        run = subprocess.run([sys.executable, "-m", "lora_np", "figures", "--results", str(results), "--out",
                              str(disk)], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "No space left" in lines[0], run.stderr
        after = snapshot_files(disk)
        assert after["params_vs_rank.png"] == files["params_vs_rank.png"]  # the old figure, not half of a new one
        assert not [n for n in after if n.startswith(TEMP_PREFIX)]


def test_a_read_only_folder_is_an_error_and_changes_nothing(tmp_path):
    with tmpfs(tmp_path / "ro", "64k") as folder:
        path = folder / "adapter.safetensors"
        save_adapter(adapted_gpt(), path)
        remount_read_only(folder)
        files = snapshot_files(folder)
        with pytest.raises(OSError, match="Read-only file system"):
            save_adapter(adapted_gpt(seed=1), path)
        with pytest.raises(OSError, match="Read-only file system"):
            checkpoint.write_atomic(folder / "sub" / "new.bin", b"x")  # a missing folder cannot be made there
        assert_files_untouched(files, folder)


def test_the_cli_refuses_a_read_only_output_folder_before_any_work(tmp_path):
    with tmpfs(tmp_path / "ro", "64k") as folder:
        remount_read_only(folder)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_NP_CACHE": str(tmp_path / "cache"), "LORA_NP_QUICK": "1"}
        for args in (["finetune", "--save-adapter", str(folder / "a.safetensors")], ["sweep", "--out", str(folder)]):
            run = subprocess.run([sys.executable, "-m", "lora_np", *args, "--no-progress"], capture_output=True,
                                 text=True, env=env, cwd=tmp_path, timeout=120)
            lines = run.stderr.strip().splitlines()
            assert run.returncode == 2 and len(lines) == 1 and "no permission to write" in lines[0], run.stderr
            assert run.stdout == "" and not (tmp_path / "cache").exists()
