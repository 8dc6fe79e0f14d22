"""Run by tests/test_distributed.py, alone or under ``mpiexec -n N``: a tiny GPT trained with LoRA (or fully),
data-parallel when started with several ranks; rank 0 prints the history as one line of JSON.

    python tests/mpi_train.py '{"batch_size": 8}'
    mpiexec -n 2 python tests/mpi_train.py '{"batch_size": 8, "fault": "raise"}'

``fault`` plants a failure on rank 1: "raise" (an exception at step 3), "nan" (a non-finite loss at step 3 on
that rank only), "weights" (one frozen weight differs before training).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from lora_np import distributed
from lora_np.lora import LoRAConfig, prepare_finetuning
from lora_np.model import GPT, GPTConfig
from lora_np.train import TrainConfig, train


def main(options: dict) -> None:
    dp = distributed.from_environment()
    rank = 0 if dp is None else dp.rank
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16))
    lora = None if options.get("full") else LoRAConfig(r=2, alpha=4.0, targets="q,v")
    model = prepare_finetuning(model, lora)
    ids = (np.arange(3000) * 7 + np.random.default_rng(0).integers(0, 3, 3000)) % 11  # a noisy cycle: learnable
    fault, calls = options.get("fault"), [0]
    if fault == "weights" and rank == 1:
        model.wte.weight.data[0, 0] += 1e-3

    def targets(x, y):
        calls[0] += 1
        if rank == 1 and calls[0] == 3 and fault == "raise":
            raise ValueError("planted failure on rank 1")
        if rank == 1 and calls[0] == 3 and fault == "nan":
            return np.full((*y.shape, 11), np.nan, dtype=np.float32)
        return y

    cfg = TrainConfig(max_steps=options.get("steps", 12), batch_size=options["batch_size"], lr=1e-2, warmup_steps=2,
                      eval_every=4, eval_batches=2)
    try:
        with distributed.stop_all_on_error(dp):
            history = train(model, (ids[:2500], ids[2500:]), cfg, progress=False, data_parallel=dp,
                            targets=targets if fault else None)
    except distributed.DistributedError as e:  # rank 0 says it, as the command line does
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if rank == 0:
        print(json.dumps({"step_loss": history.step_loss, "val_loss": history.val_loss, "stopped": history.stopped,
                          "bytes": None if dp is None else dp.bytes_reduced, "ranks": 1 if dp is None else dp.size,
                          "fingerprint": distributed.weights_fingerprint(model)}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
