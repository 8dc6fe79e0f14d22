"""The benchmark scripts run (tiny configuration) and write every field the README's tables are made from."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)
    return out.stdout


def test_bench_step_quick_writes_every_field(tmp_path):
    path = tmp_path / "bench.json"
    run("bench_step.py", "--config", "quick", "--steps", "2", "--warmup", "1", "--out", str(path))
    result = json.loads(path.read_text())
    assert result["config_name"] == "quick" and result["config"]["n_embd"] == 64
    assert {"command", "quick", "config", "batch_size", "tokens_per_step", "lora", "adamw", "machine", "modes",
            "matmul_1024_float32_flops", "lora_over_full_step_time", "load_average"} <= set(result)
    assert "blas_threads" in result["machine"]
    for mode in ("full", "lora"):
        r = result["modes"][mode]
        assert {"flops", "matmuls", "times", "step_seconds", "tokens_per_s", "flop_per_s", "mfu", "memory",
                "outside_matmul_seconds"} <= set(r)
        assert r["matmuls"]["flops_per_step"] == r["flops"]["step"]  # the analytic count is the engine's count
        assert len(r["times"]) == 2 and r["mfu"] > 0
        assert {"analytic", "measured"} <= set(r["memory"])
    assert set(result["modes"]["lora"]["matmuls"]["by_kind"]) == {"attention", "dense", "rank-r"}


def test_bench_step_configs_and_the_quick_alias():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    parse = bench_step.parser().parse_args
    assert parse([]).config == "bench" and parse(["--quick"]).config == parse(["--config", "quick"]).config == "quick"
    d768, B = bench_step.CONFIGS["d768"]["config"], bench_step.CONFIGS["d768"]["batch_size"]
    assert (d768.n_layer, d768.n_head, d768.n_embd, d768.block_size, d768.vocab_size, B) == (12, 12, 768, 256, 96, 16)


BAD_ARGUMENTS = {"unknown config": (["--config", "huge"], "invalid choice: 'huge'"),
                 "no steps": (["--steps", "0"], "--steps must be >= 1")}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bench_step_bad_arguments_are_one_line_and_exit_2(case):
    args, message = BAD_ARGUMENTS[case]
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and message in out.stderr


@pytest.mark.parametrize("script", ["bench_step.py", "torch_step.py", "profile_step.py", "scaling.py",
                                    "count_launches.py", "allreduce.py", "variants.py"])
def test_an_out_that_is_a_folder_is_one_line_and_exit_2_before_any_work(script, tmp_path):
    args = ["--by-op"] if script == "profile_step.py" else []
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and f"argument --out: the file {tmp_path} is a folder" in out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written there


def test_profile_step_quick_prints_the_top_entries():
    out = run("profile_step.py", "--quick", "--steps", "1", "--top", "5")
    assert "per step under the profiler" in out and "matmul" in out


def test_qlora_quick_prints_every_table(tmp_path):
    env = {**os.environ, "LORA_NP_CACHE": str(tmp_path)}  # the quick base model is pretrained here, not in ~/.cache
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qlora.py"), "--quick", "--eval-batches", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=True, env=env).stdout
    assert out.count("bytes/number") == 2 and "validation loss" in out
    for row in ("nf4 ", "nf4 + dq", "uniform4 ", "uniform4 + dq", "float32"):
        assert row in out
    assert "0.5625" in out  # 4 bits + a float32 scale per 64 numbers


def test_multi_adapter_quick_prints_speed_and_memory():
    out = run("multi_adapter.py", "--quick", "--repeats", "2")
    assert "mixed batch" in out and "8 merged models" in out and "8 merged copies" in out


def test_variants_quick_prints_every_method_against_plain_lora():
    out = run("variants.py", "--quick")
    for method in ("base nf4+dq", "lora-r8", "dora-r8", "pissa-r8", "qlora-r8", "lora-r8-seed1"):
        assert f"\n{method} " in out
    assert "a second seed of plain LoRA moved it by" in out and "quick configuration" in out
    assert "the 4-bit base before training:" in out


def test_allreduce_quick_counts_the_bytes_and_draws(tmp_path):
    """The bytes table from the configs; where MPI is installed, the 1- and 2-rank runs, whose buffers held exactly
    the table's bytes (4 per trainable number, + the loss), else the reason it was not measured."""
    path, png = tmp_path / "allreduce.json", tmp_path / "allreduce.png"
    out = run("allreduce.py", "--quick", "--steps", "1", "--warmup", "0", "--reps", "2", "--out", str(path),
              "--figure", str(png))
    result = json.loads(path.read_text())
    assert png.read_bytes().startswith(b"\x89PNG") and "| GPT-3 175B | q,v |" in out
    gpt3 = result["bytes"]["GPT-3 175B"]
    assert round(gpt3["parameters"] / 1e9) == 175 and gpt3["lora"]["4"]["numbers"] == 2 * 96 * 2 * 12288 * 4
    assert result["bytes"]["GPT-2 124M"]["parameters"] == 124_439_808  # Hugging Face's gpt2
    measured = result["measured"]
    if "skipped" in measured:
        assert "requirements-mpi.txt" in measured["skipped"]
        return
    bench, two = result["bytes"]["bench"], measured["runs"]["2"]["steps"]
    assert two["full"]["bytes"] == bench["full"]["bytes"] == 4 * (two["full"]["trainable"] + 1)
    assert two["lora"]["bytes"] == bench["lora"]["8"]["bytes"] == 4 * (two["lora"]["trainable"] + 1)
    assert set(measured["speedup_2_ranks"]) == {"full", "lora"}


def test_torch_step_without_pytorch_is_one_line_and_exit_2():
    """PyTorch is no dependency of lora_np: torch_step.py (the comparison with it) says so in one line."""
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("PyTorch is installed here; the missing-PyTorch message cannot be seen")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_step.py"), "--config", "quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "PyTorch is not installed" in out.stderr


def test_torch_step_takes_bench_steps_configs():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "torch_step.py"), "--config", "huge"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "invalid choice: 'huge'" in out.stderr and "d768" in out.stderr  # the choices are bench_step's


def test_count_launches_needs_the_cpu_stand_in():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_launches.py")], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "tests/strict_cupy" in out.stderr


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="the stand-in builds the kernels with a C++ compiler (g++), which is not installed")
def test_count_launches_counts_fewer_launches_with_the_fused_kernels(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "strict_cupy"), "LORA_NP_BACKEND": ""}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "count_launches.py"), "--config", "quick",
                          "--out", str(tmp_path / "counts.json")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    modes = json.loads((tmp_path / "counts.json").read_text())["modes"]
    for mode in ("full", "lora"):
        assert modes[mode]["products"] == modes[f"{mode}_reference"]["products"]  # the same products either way
        assert modes[f"{mode}_reference"]["kernels"] == 0 < modes[mode]["kernels"]
        assert modes[mode]["other_launches"] * 2 < modes[f"{mode}_reference"]["other_launches"]


def test_profile_step_by_op_accounts_for_the_step(tmp_path):
    out = run("profile_step.py", "--by-op", "--quick", "--steps", "2", "--mode", "lora",
              "--out", str(tmp_path / "profile.json"))
    assert "fused_linear" in out and "optimizer" in out
    r = json.loads((tmp_path / "profile.json").read_text())
    assert r["config"] == "quick" and r["mode"] == "lora" and r["ops"]["causal_attention"]["calls"] == 2  # 2 blocks
    timed = sum(v["forward"] + v["backward"] for v in r["ops"].values()) + sum(r["parts"].values())
    assert 0.9 * r["step"] < timed <= r["step"] * 1.0001  # every part of the step is charged to something, once
