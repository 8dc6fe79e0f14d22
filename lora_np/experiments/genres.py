"""A text classification set: the genre of a King James Bible verse, split by chapter into train, validation and
test. The data of the MiniLM lab (``minilm.py``), where a pretrained sentence encoder learns to tell the genres
apart; the verses come from ``data.load_bible_verses``.

    splits = bible_genre_splits(seed=0, max_per_class=400)  # GenreSplits: train, val, test
    splits.train.texts[0], GENRES[splits.train.labels[0]]  # a verse and its genre's name
    print(splits.report())  # verses per genre and split
"""

from __future__ import annotations

from typing import Any

from .. import backend, checks
from ..data import load_bible_verses

np = backend.np  # host NumPy: texts and labels live on the host

GENRES = ("law", "history", "wisdom", "prophets", "gospels", "letters", "apocalypse")  # label i is GENRES[i]
# The usual Protestant division of the canon into genres; every book of the KJV has exactly one. Choices a reader
# might make differently: Acts is "history" (the narrative of the early church, as the usual division of the New
# Testament into gospels, history, letters and prophecy has it), not "gospels", although Luke wrote both;
# Lamentations and Daniel are "prophets" (where the canon places them), although Lamentations is poetry and half of
# Daniel is apocalyptic; "wisdom" is the five poetical books, Job to the Song of Solomon; "apocalypse" is Revelation.
GENRE_BOOKS = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": ("Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
                "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Acts"),
    "wisdom": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "prophets": ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
                 "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi"),
    "gospels": ("Matthew", "Mark", "Luke", "John"),
    "letters": ("Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
                "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews",
                "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude"),
    "apocalypse": ("Revelation",),
}


class LabelledTexts:
    """One split of a text classification set: ``texts[i]`` has the integer label ``labels[i]`` and comes from
    ``citations[i]`` (e.g. "Genesis 1:1")."""

    def __init__(self, texts: list[str], labels: Any, citations: list[str]) -> None:
        if not len(texts) == len(labels) == len(citations):
            raise ValueError(f"LabelledTexts: {len(texts)} texts, {len(labels)} labels, {len(citations)} citations")
        self.texts, self.citations = list(texts), list(citations)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return f"LabelledTexts({len(self)} texts)"


class GenreSplits:
    """Train, validation and test splits of the verse-genre set, and the genre names (label i is ``genres[i]``)."""

    def __init__(self, train: LabelledTexts, val: LabelledTexts, test: LabelledTexts, genres: tuple[str, ...]) -> None:
        self.train, self.val, self.test, self.genres = train, val, test, genres

    def counts(self) -> dict[str, list[int]]:
        """split name -> the number of verses of each genre in it (the label balance)."""
        return {name: np.bincount(s.labels, minlength=len(self.genres)).tolist()
                for name, s in (("train", self.train), ("val", self.val), ("test", self.test))}

    def report(self) -> str:
        """A printable table: verses per genre and split."""
        counts, w = self.counts(), max(len(g) for g in self.genres)
        lines = [f"{'genre':<{w}}  {'train':>6}  {'val':>6}  {'test':>6}"]
        lines += [f"{g:<{w}}  " + "  ".join(f"{counts[s][i]:>6}" for s in ("train", "val", "test"))
                  for i, g in enumerate(self.genres)]
        lines.append(f"{'total':<{w}}  " + "  ".join(f"{sum(counts[s]):>6}" for s in ("train", "val", "test")))
        return "\n".join(lines)


def bible_genre_splits(val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                       max_per_class: int | None = None) -> GenreSplits:
    """The genre of a KJV verse (``GENRES``: law, history, wisdom, prophets, gospels, letters, apocalypse), split
    by CHAPTER into train, validation and test, so that every test verse comes from a chapter never trained on.

    Why chapters, not books: a split by book cannot give every genre a test set (apocalypse is one book,
    Revelation; law is five) and would make the test score depend on which few books were drawn. A split by verse
    would put a verse's neighbours, which often repeat its words, in training. Chapters are drawn at random within
    each genre (``seed``), so each genre keeps about the same fractions in each split (at least one chapter each).
    Parallel passages in different chapters remain (Kings and Chronicles, the synoptic gospels); they share a genre.

    Each split lists its verses in canonical order (shuffle when batching). The classes are unbalanced (Revelation
    has 404 verses, the histories 8,025); ``max_per_class`` keeps at most that many verses of each genre in each
    split, drawn at random with ``seed``. ``GenreSplits.report()`` prints the balance.
    """
    checks.fraction(val_fraction, "bible_genre_splits: val_fraction")
    checks.fraction(test_fraction, "bible_genre_splits: test_fraction")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"bible_genre_splits: val_fraction + test_fraction = {val_fraction + test_fraction} "
                         "leaves no training data")
    if max_per_class is not None:
        max_per_class = checks.positive_int(max_per_class, "bible_genre_splits: max_per_class")
    genre_of = {book: g for g, books in enumerate(GENRE_BOOKS[name] for name in GENRES) for book in books}
    verses = load_bible_verses()
    unknown = sorted({v["book"] for v in verses} - set(genre_of))
    if unknown:
        raise RuntimeError(f"bible_genre_splits: no genre for book(s) {unknown}")

    chapters: list[list[tuple[str, int]]] = [[] for _ in GENRES]  # per genre, its chapters in canonical order
    for v in verses:
        key = (v["book"], v["chapter"])
        if not chapters[genre_of[v["book"]]] or chapters[genre_of[v["book"]]][-1] != key:
            chapters[genre_of[v["book"]]].append(key)
    gen = backend.rng(seed)
    split_of: dict[tuple[str, int], int] = {}  # chapter -> 0 train, 1 val, 2 test
    for chs in chapters:
        order = gen.permutation(len(chs))
        n_test = max(1, round(test_fraction * len(chs)))
        n_val = max(1, round(val_fraction * len(chs)))
        for rank, i in enumerate(order):
            split_of[chs[i]] = 2 if rank < n_test else 1 if rank < n_test + n_val else 0

    members: list[list[int]] = [[], [], []]  # verse indices per split, canonical order
    for i, v in enumerate(verses):
        members[split_of[(v["book"], v["chapter"])]].append(i)
    labels = np.array([genre_of[v["book"]] for v in verses], dtype=np.int64)
    if max_per_class is not None:
        for s, idx in enumerate(members):
            idx = np.array(idx, dtype=np.int64)
            keep = [gen.permutation(idx[labels[idx] == g])[:max_per_class] for g in range(len(GENRES))]
            members[s] = sorted(np.concatenate(keep).tolist())

    def part(idx: list[int]) -> LabelledTexts:
        return LabelledTexts([verses[i]["text"] for i in idx], labels[idx], [verses[i]["citation"] for i in idx])

    return GenreSplits(part(members[0]), part(members[1]), part(members[2]), GENRES)
