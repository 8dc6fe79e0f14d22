"""The training step of bench_step.py in PyTorch eager, timed against lora_np's in one process, steps alternating.

    python benchmarks/torch_step.py --config quick                  # a smoke run: CPU PyTorch against NumPy
    python benchmarks/torch_step.py --config bench --backend cupy   # on a GPU: lora_np on CuPy, PyTorch on CUDA
    python benchmarks/torch_step.py --config d768 --sdpa --out benchmarks/results/torch_step_d768.json

PyTorch is NOT a dependency of lora_np: this script imports it inside ``main`` and, where it is missing, says so in
one line and exits with code 2. Nothing of lora_np uses it.

The PyTorch model is lora_np's GPT (``lora_np/model.py``) written with ``torch.nn``: pre-LayerNorm blocks with
biases, learned positions, separate q, k, v, o projections, a 4x tanh-GELU MLP, a final LayerNorm and an untied
LM head without bias; the mean cross-entropy; AdamW (lr 1e-3, weight decay 0.01, PyTorch's defaults otherwise,
which are lora_np's); float32 with TF32 off, so both compute in full float32. LoRA (r = 8, α = 16, on q, k, v, o,
up and down) is written as peft writes it, y = x Wᵀ + b + s·(x A_pᵀ) B_pᵀ with A_p = Aᵀ (r, d_in) and B_p = Bᵀ
(d_out, r): lora_np instead merges the adapter on the fly, x @ (W + s·A@B) (``fused.py``), and multiplies q, k
and v as one product; each side runs its own way, as its users would. The attention is the plain one (scores,
mask, explicit softmax, @ v); ``--sdpa`` uses ``F.scaled_dot_product_attention`` instead.

Correctness first: the PyTorch model gets lora_np's initial weights (lora_np stores a Linear's W as (d_in, d_out)
for y = x @ W; torch.nn.Linear holds (d_out, d_in) for y = x Wᵀ, so every matrix except the two embedding tables
is transposed on the way), and the losses of the first two steps from the same batch are compared: the first
checks the forward, the second the gradients and the AdamW update too. Then per mode (full, LoRA) both take
``--warmup`` untimed steps and ``--steps`` timed ones, alternating lora_np, PyTorch, lora_np, ... with the device
synchronised before and after each step; the median, min and max go to the table and the JSON (``--out``).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # bench_step.py beside this file: the configs, the step, AdamW
from bench_step import ADAMW, CONFIGS, MODES, OneLineParser, _sync, build, out_file, write_result  # noqa: E402

from lora_np import backend  # noqa: E402
from lora_np.model import GPTConfig  # noqa: E402

LOSS_STEPS = 2  # steps whose losses are compared: the first (forward) and the second (gradients and AdamW too)
EMBEDDINGS = ("wte.weight", "wpe.weight")  # (num, C) tables in both libraries: copied as they are


def torch_gpt(torch: Any, cfg: GPTConfig, lora: Any, sdpa: bool) -> Any:
    """lora_np's GPT(cfg) in torch.nn, with LoRA (a ``LoRAConfig``) on its targets or, for ``lora=None``, every
    parameter trainable. Parameter names are lora_np's (``blocks.0.attn.q.weight``, ``...q.A``)."""
    nn, F = torch.nn, torch.nn.functional

    class LoRALinear(nn.Module):  # peft's layer: W frozen, y = x Wᵀ + b + s·(x Aᵀ) Bᵀ
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(d_out, d_in), requires_grad=False)  # (d_out, d_in)
            self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False) if cfg.bias else None
            self.A = nn.Parameter(torch.empty(lora.r, d_in))  # lora_np's A (d_in, r), transposed: peft's lora_A
            self.B = nn.Parameter(torch.zeros(d_out, lora.r))  # lora_np's B (r, d_out), transposed: peft's lora_B
            self.s = lora.scaling  # α / r

        def forward(self, x: Any) -> Any:
            return F.linear(x, self.weight, self.bias) + self.s * F.linear(F.linear(x, self.A), self.B)

    def linear(d_in: int, d_out: int, name: str) -> Any:
        if lora is not None and name in lora.targets:
            return LoRALinear(d_in, d_out)
        return nn.Linear(d_in, d_out, bias=cfg.bias)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            C = cfg.n_embd
            self.q, self.k, self.v, self.o = (linear(C, C, name) for name in ("q", "k", "v", "o"))
            self.register_buffer("future", torch.triu(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool),
                                                      diagonal=1), persistent=False)  # True above the diagonal

        def forward(self, x: Any) -> Any:
            B, T, C = x.shape
            nh, hs = cfg.n_head, C // cfg.n_head
            q, k, v = (m(x).view(B, T, nh, hs).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, nh, T, hs)
            if sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / hs**0.5)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
                att = att.masked_fill(self.future[:T, :T], float("-inf"))  # position t sees positions <= t
                y = torch.softmax(att, dim=-1) @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
            return self.o(y.transpose(1, 2).reshape(B, T, C))  # (B, T, nh, hs) -> (B, T, C)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = linear(cfg.n_embd, 4 * cfg.n_embd, "up"), linear(4 * cfg.n_embd, cfg.n_embd, "down")

        def forward(self, x: Any) -> Any:
            return self.down(F.gelu(self.up(x), approximate="tanh"))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)

    def layer_norm() -> Any:
        return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.attn, self.ln2, self.mlp = layer_norm(), Attention(), layer_norm(), MLP()

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.ln1(x))  # pre-LN, as lora_np's Block
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # (V, C)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # (block_size, C)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = layer_norm()
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied, as GPTConfig's default

        def forward(self, idx: Any, targets: Any) -> Any:
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
            for block in self.blocks:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    if cfg.tie_weights or cfg.dropout:
        raise ValueError("torch_step: the comparison model has an untied head and no dropout")
    model = GPT()
    if lora is not None:  # everything frozen except the adapters, as lora_np's apply_lora
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith((".A", ".B"))
    return model


def copy_weights(torch: Any, lora_np_model: Any, torch_model: Any) -> None:
    """lora_np's parameters into the PyTorch model: the same names; every matrix but the embeddings transposed."""
    theirs = dict(torch_model.named_parameters())
    ours = lora_np_model.state_dict()  # host NumPy copies
    if set(ours) != set(theirs):
        raise AssertionError(f"parameter names differ: {sorted(set(ours) ^ set(theirs))}")
    with torch.no_grad():
        for name, value in ours.items():
            value = value if value.ndim == 1 or name in EMBEDDINGS else value.T  # (d_in, d_out) -> (d_out, d_in)
            if tuple(value.shape) != tuple(theirs[name].shape):
                raise AssertionError(f"{name}: lora_np {value.shape}, PyTorch {tuple(theirs[name].shape)}")
            theirs[name].copy_(torch.from_numpy(value.copy()))


def run(args: Any, torch: Any) -> dict[str, Any]:
    """Both steps, on lora_np's backend (``main`` has set it) and on CUDA when PyTorch sees a GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 products on both sides
    torch.backends.cudnn.allow_tf32 = False
    setup = CONFIGS[args.config]
    cfg, B = setup["config"], setup["batch_size"]
    gen = backend.rng(0)
    x, y = (gen.integers(0, cfg.vocab_size, size=(B, cfg.block_size)) for _ in range(2))  # bench_step's batch
    batch = {"lora_np": (backend.to_device(x), backend.to_device(y)),  # on the device once, not every step
             "torch": (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))}

    def sync(impl: str) -> None:
        if impl == "lora_np":
            _sync()  # bench_step's: CuPy's stream, nothing on NumPy
        elif device.type == "cuda":
            torch.cuda.synchronize()

    steps: dict[str, dict[str, Any]] = {}  # mode -> impl -> a function doing one step and returning its loss
    for mode, lora in MODES.items():
        model, opt = build(cfg, mode)
        tmodel = torch_gpt(torch, cfg, lora, args.sdpa)
        copy_weights(torch, model, tmodel)
        tmodel.to(device)
        topt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], **ADAMW)

        def ours(model: Any = model, opt: Any = opt) -> Any:
            model.zero_grad()
            _, loss = model(*batch["lora_np"])
            loss.backward()
            opt.step()
            return loss

        def theirs(tmodel: Any = tmodel, topt: Any = topt) -> Any:
            topt.zero_grad(set_to_none=True)
            loss = tmodel(*batch["torch"])
            loss.backward()
            topt.step()
            return loss

        steps[mode] = {"lora_np": ours, "torch": theirs}

    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "config_name": args.config,
        "config": asdict(cfg), "batch_size": B, "tokens_per_step": B * cfg.block_size, "lora": MODES["lora"].to_dict(),
        "adamw": ADAMW, "lora_np_backend": backend.get_backend(), "torch_device": str(device),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "cupy": backend.xp.__version__ if backend.get_backend() == "cupy" else None,
        "attention": "sdpa" if args.sdpa else "plain", "tf32": False, "steps": args.steps, "warmup": args.warmup,
        "modes": {},
    }
    for mode, impls in steps.items():  # the losses of the first steps, from the same weights and batch
        losses = {impl: [float(backend.to_numpy(step().data)) if impl == "lora_np" else float(step().item())
                         for step in [fn] * LOSS_STEPS] for impl, fn in impls.items()}
        diffs = [abs(a - b) for a, b in zip(losses["lora_np"], losses["torch"])]
        result["modes"][mode] = {"loss": {**losses, "abs_difference": diffs}, "lora_np": {"times": []},
                                 "torch": {"times": []}}
        for _ in range(max(args.warmup - LOSS_STEPS, 0)):
            for fn in impls.values():
                fn()
    for impl in ("lora_np", "torch"):
        sync(impl)
    for i in range(args.steps):  # alternate modes and libraries: drift of the machine hits all four alike
        for mode, impls in steps.items():
            for impl, fn in impls.items():
                sync(impl)
                t0 = time.perf_counter()
                fn()
                sync(impl)
                result["modes"][mode][impl]["times"].append(time.perf_counter() - t0)
        print(f"step {i + 1}/{args.steps}: " + ", ".join(
            f"{mode} {impl} {r[impl]['times'][-1] * 1e3:.1f} ms" for mode, r in result["modes"].items()
            for impl in ("lora_np", "torch")), file=sys.stderr)
    for r in result["modes"].values():
        for impl in ("lora_np", "torch"):
            t = r[impl]["times"]
            r[impl].update(median=statistics.median(t), min=min(t), max=max(t))
        r["lora_np_over_torch"] = r["lora_np"]["median"] / r["torch"]["median"]
    full, lora = result["modes"]["full"], result["modes"]["lora"]
    result["lora_over_full"] = {impl: lora[impl]["median"] / full[impl]["median"] for impl in ("lora_np", "torch")}
    return result


def report(result: dict[str, Any]) -> str:
    m, ms = result["modes"], 1e3
    lines = [f"lora_np on {result['lora_np_backend']}"
             + (f" (CuPy {result['cupy']})" if result["cupy"] else "")
             + f", PyTorch {result['torch']} on {result['torch_device']}"
             + (f" ({result['gpu']})" if result["gpu"] else "")
             + f"; {result['attention']} attention, TF32 off; median of {result['steps']} timed steps after "
             f"{result['warmup']} untimed, steps alternating",
             "",
             "| config | full lora_np ms | full torch ms | ratio | LoRA lora_np ms | LoRA torch ms | ratio "
             "| LoRA/full lora_np | LoRA/full torch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {result['config_name']} | {m['full']['lora_np']['median'] * ms:.2f} "
             f"| {m['full']['torch']['median'] * ms:.2f} | {m['full']['lora_np_over_torch']:.2f} "
             f"| {m['lora']['lora_np']['median'] * ms:.2f} | {m['lora']['torch']['median'] * ms:.2f} "
             f"| {m['lora']['lora_np_over_torch']:.2f} | {result['lora_over_full']['lora_np']:.3f} "
             f"| {result['lora_over_full']['torch']:.3f} |",
             ""]
    for mode, r in m.items():
        loss = r["loss"]
        lines.append(f"{mode}: losses of the first {LOSS_STEPS} steps from the same weights: lora_np "
                     + ", ".join(f"{v:.6f}" for v in loss["lora_np"]) + "; PyTorch "
                     + ", ".join(f"{v:.6f}" for v in loss["torch"]) + "; |difference| "
                     + ", ".join(f"{v:.1e}" for v in loss["abs_difference"]))
        lines.append(f"{mode}: min/max ms lora_np {r['lora_np']['min'] * ms:.2f}/{r['lora_np']['max'] * ms:.2f}, "
                     f"PyTorch {r['torch']['min'] * ms:.2f}/{r['torch']['max'] * ms:.2f}")
    return "\n".join(lines)


def parser() -> OneLineParser:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=tuple(CONFIGS), default="bench",
                   help="model size, as bench_step.py's: bench (default), quick, d768")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                   help="lora_np's backend (default: cupy where it has a GPU, else numpy)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode and library (default 20)")
    p.add_argument("--warmup", type=int, default=3, help=f"untimed steps first, at least {LOSS_STEPS} (default 3)")
    p.add_argument("--sdpa", action="store_true", help="PyTorch attention by F.scaled_dot_product_attention")
    p.add_argument("--threads", type=int, default=None, help="PyTorch's CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=out_file, default=None,
                   help="JSON results file (default benchmarks/results/torch_step_CONFIG.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < LOSS_STEPS:
        p.error(f"--steps must be >= 1 and --warmup >= {LOSS_STEPS} (the steps whose losses are compared)")
    try:
        import torch
    except ImportError:
        p.exit(2, f"{p.prog}: error: PyTorch is not installed; this comparison needs it (pip install torch), "
                  "lora_np itself does not\n")
    args.backend = args.backend or ("cupy" if backend.cupy_available() else "numpy")
    try:
        backend.set_backend(args.backend)  # a missing CuPy or GPU: one line, before any work
    except RuntimeError as e:
        p.error(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args, torch)
    write_result(result, Path(args.out or Path(__file__).parent / "results" / f"torch_step_{args.config}.json"),
                 report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
