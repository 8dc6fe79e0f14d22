"""Tests for lora_np/gpt2.py (and the two GPTConfig fields it needs: tie_weights, layer_norm_eps), offline: each
test writes a tiny checkpoint itself in exactly Hugging Face's GPT-2 layout (names, shapes, float32, config keys)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from lora_np import gpt2
from lora_np.checkpoint import load_model, save_model
from lora_np.gpt2 import GPT2Tokenizer, gpt_config_from_hf, load_gpt2, load_gpt2_weights
from lora_np.gradcheck import gradcheck
from lora_np.model import GPT, GPTConfig

TINY = dict(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=8)


def tiny_gpt(seed: int = 0, tie: bool = True, eps: float = 1e-3) -> GPT:
    """A 2-layer GPT with GPT-2's options, weights drawn large (std 0.3) so that every part of the forward matters."""
    model = GPT(GPTConfig(**TINY, seed=seed, tie_weights=tie, layer_norm_eps=eps))
    gen = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters():
        p.data = (gen.standard_normal(p.shape) * 0.3).astype(np.float32)
    return model


def hf_config(cfg: GPTConfig, **changes) -> dict:
    """config.json as Hugging Face writes it for GPT-2 (every key of openai-community/gpt2's file)."""
    d = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
         "bos_token_id": cfg.vocab_size - 1, "embd_pdrop": 0.1, "eos_token_id": cfg.vocab_size - 1,
         "initializer_range": 0.02, "layer_norm_epsilon": cfg.layer_norm_eps, "model_type": "gpt2",
         "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_inner": None,
         "n_layer": cfg.n_layer, "n_positions": cfg.block_size, "resid_pdrop": 0.1, "summary_activation": None,
         "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
         "summary_use_proj": True, "vocab_size": cfg.vocab_size}
    if not cfg.tie_weights:
        d["tie_word_embeddings"] = False
    d.update(changes)
    return {k: v for k, v in d.items() if v != "drop"}


def hf_tensors(model: GPT) -> dict:
    """The model's weights named and shaped as in GPT-2's model.safetensors, written out here by hand: c_attn is
    [q | k | v] side by side, Conv1D weights are (d_in, d_out) as ours, and each block carries its mask buffer."""
    P = {n: p.data.copy() for n, p in model.named_parameters()}
    T = model.config.block_size
    t = {"wte.weight": P["wte.weight"], "wpe.weight": P["wpe.weight"],
         "ln_f.weight": P["ln_f.weight"], "ln_f.bias": P["ln_f.bias"]}
    for i in range(model.config.n_layer):
        b, h = f"blocks.{i}.", f"h.{i}."
        t[h + "ln_1.weight"], t[h + "ln_1.bias"] = P[b + "ln1.weight"], P[b + "ln1.bias"]
        t[h + "attn.c_attn.weight"] = np.concatenate([P[b + f"attn.{x}.weight"] for x in "qkv"], axis=1)  # (C, 3C)
        t[h + "attn.c_attn.bias"] = np.concatenate([P[b + f"attn.{x}.bias"] for x in "qkv"])  # (3C,)
        t[h + "attn.c_proj.weight"], t[h + "attn.c_proj.bias"] = P[b + "attn.o.weight"], P[b + "attn.o.bias"]
        t[h + "ln_2.weight"], t[h + "ln_2.bias"] = P[b + "ln2.weight"], P[b + "ln2.bias"]
        t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = P[b + "mlp.up.weight"], P[b + "mlp.up.bias"]
        t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = P[b + "mlp.down.weight"], P[b + "mlp.down.bias"]
        t[h + "attn.bias"] = np.tril(np.ones((T, T), dtype=np.float32))[None, None]  # the causal-mask buffer
    if not model.config.tie_weights:
        t["lm_head.weight"] = P["lm_head.weight"].T.copy()  # nn.Linear: (V, C)
    return t


def write_folder(model: GPT, folder, config: dict | None = None, tensors: dict | None = None) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or hf_config(model.config)))
    save_file(tensors if tensors is not None else hf_tensors(model), str(folder / "model.safetensors"))


def logits(model: GPT, ids) -> np.ndarray:
    with model.inference():
        return model(ids)[0].data


IDS = np.random.default_rng(9).integers(0, 40, size=(3, 12))


def state(model) -> dict:
    return {n: a.copy() for n, a in model.state_dict().items()}


# -- round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_hf_layout_round_trip_gives_the_same_logits(tmp_path, tie):
    src = tiny_gpt(seed=1, tie=tie)
    write_folder(src, tmp_path)
    loaded = load_gpt2(tmp_path)
    assert loaded.config == GPTConfig(**TINY, tie_weights=tie, layer_norm_eps=1e-3)  # dropout 0, seed 0
    np.testing.assert_allclose(logits(loaded, IDS), logits(src, IDS), rtol=1e-6, atol=1e-6)
    assert (loaded.lm_head is None) == tie


def test_a_different_model_gives_different_logits(tmp_path):
    # the round trip above could not pass by accident: another model's logits are far from these
    write_folder(tiny_gpt(seed=1), tmp_path)
    assert np.abs(logits(load_gpt2(tmp_path), IDS) - logits(tiny_gpt(seed=2), IDS)).max() > 0.1


def test_the_layernorm_epsilon_comes_from_the_config(tmp_path):
    src = tiny_gpt(seed=1, eps=0.5)  # a huge epsilon, so that using 1e-5 instead would show
    write_folder(src, tmp_path)
    loaded = load_gpt2(tmp_path)
    assert loaded.blocks[0].ln1.eps == loaded.ln_f.eps == 0.5
    np.testing.assert_allclose(logits(loaded, IDS), logits(src, IDS), rtol=1e-6, atol=1e-6)


def test_gpt2lmheadmodel_files_load_too(tmp_path):
    # GPT2LMHeadModel saves "transformer."-prefixed names and a copy of wte as lm_head.weight (tied)
    src = tiny_gpt(seed=3)
    tensors = {f"transformer.{n}": a for n, a in hf_tensors(src).items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    tensors["transformer.h.0.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    write_folder(src, tmp_path, tensors=tensors)
    np.testing.assert_allclose(logits(load_gpt2(tmp_path), IDS), logits(src, IDS), rtol=1e-6, atol=1e-6)


# -- refusals ----------------------------------------------------------------------------------------------------


def _missing(t):
    del t["h.1.mlp.c_fc.bias"]


def _unexpected(t):
    t["h.2.ln_1.weight"] = np.ones(8, np.float32)


def _transposed(t):  # an nn.Linear-style (3C, C) where GPT-2's Conv1D (C, 3C) belongs
    t["h.0.attn.c_attn.weight"] = t["h.0.attn.c_attn.weight"].T.copy()


def _nan(t):
    t["wpe.weight"][2, 3] = np.inf


def _untied_head(t):
    t["lm_head.weight"] = t["wte.weight"] * 2.0


def _int(t):
    t["ln_f.bias"] = np.zeros(8, np.int64)


WEIGHT_ERRORS = [
    (_missing, r"missing tensors \['h.1.mlp.c_fc.bias'\]"),
    (_unexpected, r"unexpected tensors \['h.2.ln_1.weight'\]"),
    (_transposed, re.escape("h.0.attn.c_attn.weight: shape (24, 8), expected (8, 24)")),
    (_nan, "wpe.weight: holds NaN or inf"),
    (_untied_head, "lm_head.weight differs from wte.weight, but the config ties them"),
    (_int, "ln_f.bias: dtype int64 cannot be held"),
]


@pytest.mark.parametrize("breaks, message", WEIGHT_ERRORS)
def test_bad_weights_are_refused_and_change_nothing(breaks, message):
    tensors = hf_tensors(tiny_gpt(seed=4))
    breaks(tensors)
    model = tiny_gpt(seed=5)
    before = state(model)
    with pytest.raises(ValueError, match=message):
        load_gpt2_weights(model, tensors)
    after = state(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


CONFIG_ERRORS = [
    ({"activation_function": "relu"}, "activation_function='relu'"),
    ({"activation_function": "gelu"}, "activation_function='gelu'"),  # erf GELU: not what our GPT computes
    ({"model_type": "gpt_neo"}, "model_type='gpt_neo'"),
    ({"n_inner": 24}, "n_inner=24"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
    ({"n_head": "drop"}, r"missing key\(s\) \['n_head'\]"),
    ({"n_head": 3}, "n_embd=8 must be divisible by n_head=3"),
    ({"layer_norm_epsilon": 0}, "layer_norm_eps must be a number in"),
]


@pytest.mark.parametrize("change, message", CONFIG_ERRORS)
def test_unmappable_configs_are_refused_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        gpt_config_from_hf(hf_config(GPTConfig(**TINY, tie_weights=True), **change))


def _config(**changes):
    def make(folder, src):
        write_folder(src, folder, config=hf_config(src.config, **changes))
    return make


def _config_text(text):
    def make(folder, src):
        write_folder(src, folder)
        (folder / "config.json").write_text(text)
    return make


def _weights_bytes(data):
    def make(folder, src):
        write_folder(src, folder)
        (folder / "model.safetensors").write_bytes(data)
    return make


# (the folder's defect, the file the message names, what it says): each refused before a model is built
FOLDER_ERRORS = {
    "a million layers": (_config(n_layer=10**6), "model.safetensors", "the config says n_layer 1000000, the file "
                         "holds 2 layers"),
    "null where a number belongs": (_config(n_embd=None), "config.json", "n_embd must be a positive integer, got None"),
    "a string where a number belongs": (_config(n_layer="2"), "config.json", "n_layer must be a positive integer"),
    "config not JSON": (_config_text("{n_layer: 2"), "config.json", "is not a JSON file"),
    "config nested 100000 deep": (_config_text("[" * 100_000 + "]" * 100_000), "config.json", "is not a JSON file"),
    "config a list": (_config_text("[1, 2]"), "config.json", "expected the dict of a config.json"),
    "config of 2 MB": (_config_text(" " * 2**21 + "{}"), "config.json", "more than the 1,048,576"),
    "corrupt weights": (_weights_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"), "model.safetensors",
                        "is not a valid safetensors file"),
    "weights empty": (_weights_bytes(b""), "model.safetensors", "is not a valid safetensors file"),
}


@pytest.mark.parametrize("case", FOLDER_ERRORS)
def test_a_broken_folder_is_refused_naming_the_file(tmp_path, case, monkeypatch):
    make, culprit, message = FOLDER_ERRORS[case]
    make(tmp_path, tiny_gpt())
    built = []
    monkeypatch.setattr(gpt2, "GPT", lambda cfg: built.append(cfg))  # any model built before the checks shows
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        load_gpt2(tmp_path)
    assert str(tmp_path / culprit) in str(refused.value) and "\n" not in str(refused.value)
    assert not built


def test_bad_folders_are_refused(tmp_path):
    src = tiny_gpt()
    write_folder(src, tmp_path / "a", config=hf_config(src.config, activation_function="silu"))
    with pytest.raises(ValueError, match="activation_function='silu'"):
        load_gpt2(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps(hf_config(src.config)))
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*pickle"):
        load_gpt2(tmp_path / "b")
    tensors = hf_tensors(src)
    tensors["wte.weight"] = tensors["wte.weight"][:-1]  # one token short of the config's vocab_size
    write_folder(src, tmp_path / "c", tensors=tensors)
    shape = "model.safetensors (a GPT-2 with 2 layers): wte.weight: shape (39, 8), expected (40, 8)"
    with pytest.raises(ValueError, match=re.escape(shape)):
        load_gpt2(tmp_path / "c")


# -- GPTConfig: tie_weights and layer_norm_eps -------------------------------------------------------------------


def test_tied_head_is_wte_transposed_and_gets_both_gradients():
    model = tiny_gpt(seed=6).to(np.float64)
    assert model.lm_head is None and "lm_head.weight" not in dict(model.named_parameters())
    ids = np.array([[1, 5, 7, 1]])
    with model.inference():
        h = model.ln_f(model.blocks[1](model.blocks[0](model.wte(ids) + model.wpe(np.arange(4))))).data
        np.testing.assert_allclose(model(ids)[0].data, h @ model.wte.weight.data.T, rtol=1e-12)
    gradcheck(lambda w: model(ids, np.array([[5, 7, 1, 2]]))[1], model.wte.weight)  # embedding + head paths


def test_defaults_keep_old_configs_and_checkpoints(tmp_path):
    old = {"vocab_size": 40, "block_size": 12, "n_layer": 2, "n_head": 2, "n_embd": 8, "dropout": 0.0, "bias": True,
           "seed": 0}  # a config dict as checkpoints saved it before these two fields existed
    cfg = GPTConfig(**old)
    assert (cfg.tie_weights, cfg.layer_norm_eps) == (False, 1e-5)
    assert GPT(cfg).lm_head is not None
    tied = tiny_gpt(seed=7)
    save_model(tied, tmp_path / "m.safetensors")
    back, _ = load_model(tmp_path / "m.safetensors")
    assert back.config == tied.config
    np.testing.assert_allclose(logits(back, IDS), logits(tied, IDS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [("tie_weights", 1, "tie_weights must be True or False"),
                                                   ("layer_norm_eps", 0.0, "layer_norm_eps must be a number in"),
                                                   ("layer_norm_eps", True, "layer_norm_eps must be a number in")])
def test_new_config_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**TINY, **{field: value})


# -- tokenizer ---------------------------------------------------------------------------------------------------

TEXTS = ["In the beginning God created the heaven and the earth.", "def f(x):\n    return x + 1  # ünïcode ok",
         "And the earth was without form, and void."] * 20


@pytest.fixture(scope="module")
def bpe_folders(tmp_path_factory):
    """A tiny byte-level BPE trained here, saved both ways GPT-2 folders hold it."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs Hugging Face's tokenizers: pip install tokenizers")
    bpe = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=2, show_progress=False)
    one, two = tmp_path_factory.mktemp("json"), tmp_path_factory.mktemp("vocab_merges")
    bpe.save(str(one / "tokenizer.json"))
    bpe.save_model(str(two))  # vocab.json + merges.txt
    return one, two


def test_tokenizer_from_either_file_set(bpe_folders):
    a, b = (GPT2Tokenizer(f) for f in bpe_folders)
    assert a.vocab_size == b.vocab_size
    for text in TEXTS[:3] + ["unseen wörds, \t tabs and  double  spaces"]:
        ids = a.encode(text)
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert a.decode(ids) == text  # byte-level: every string round-trips exactly
        np.testing.assert_array_equal(b.encode(text), ids)
    assert len(a.encode(TEXTS[0])) < len(TEXTS[0])  # merges were learned and used


def test_tokenizer_needs_its_files(tmp_path):
    pytest.importorskip("tokenizers", reason="needs Hugging Face's tokenizers: pip install tokenizers")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, and not both vocab.json and merges.txt"):
        GPT2Tokenizer(tmp_path)


@pytest.mark.parametrize("files", [{"tokenizer.json": "{"}, {"vocab.json": "[1]", "merges.txt": "a b\n"}],
                         ids=["tokenizer.json", "vocab+merges"])
def test_broken_tokenizer_files_are_a_value_error_naming_the_folder(tmp_path, files):
    from lora_np.gpt2 import load_gpt2_tokenizer

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        load_gpt2_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json", "merges.txt"])
def test_a_tokenizer_file_too_large_to_be_one_is_refused_naming_it(tmp_path, name):
    for other in ("vocab.json", "merges.txt"):
        (tmp_path / other).write_text("{}" if other == "vocab.json" else "")
    (tmp_path / name).touch()
    os.truncate(tmp_path / name, 65 * 2**20)  # sparse: its size, not its bytes, is what is checked
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} is 68,157,440 bytes, more than the 67,108,864")):
        GPT2Tokenizer(tmp_path)
