"""Tokenisation cache and dynamic padding."""

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from ftsearch.augment import TokenAugment
from ftsearch.data.tokens import TRUNCATIONS, PadCollator, make_loader, tokenize_cached, tokenizer_key


@pytest.fixture
def frame():
    return pd.DataFrame({"text": ["great film", "awful boring plot and story", "the movie"], "label": [1, 0, 1]})


def test_cache_is_reused_and_keyed_by_length_and_data(tiny_bert, frame, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    first = tokenize_cached(tokenizer, frame, 8, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    # Same class name and definition as the real tokenizer, so the same cache key.
    refusing = type(type(tokenizer).__name__, (), {"backend_tokenizer": tokenizer.backend_tokenizer, "__call__": refuse})
    again = tokenize_cached(refusing(), frame, 8, cache=tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(first.ids, again.ids, strict=True))
    assert np.array_equal(first.labels, again.labels)

    tokenize_cached(tokenizer, frame, 4, cache=tmp_path)
    tokenize_cached(tokenizer, frame.assign(label=[0, 0, 1]), 8, cache=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_truncation_and_special_tokens(tiny_bert, frame, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    split = tokenize_cached(tokenizer, frame, 4, cache=tmp_path)
    assert [len(ids) for ids in split.ids] == [4, 4, 4]
    assert all(ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id for ids in split.ids)


def test_a_long_text_is_read_from_its_head_its_tail_or_both_and_a_short_one_whole(tiny_bert, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    words = ["great", "awful", "film", "plot", "boring", "story", "movie", "loved", "hated", "dull"]
    frame = pd.DataFrame({"text": [" ".join(words), "great film"], "label": [1, 1]})
    body = tokenizer(words[0], add_special_tokens=False)["input_ids"]
    assert len(body) == 1  # one token a word: the kept words are read off the ids
    ids = {t: tokenize_cached(tokenizer, frame, 10, cache=tmp_path, truncation=t).ids for t in TRUNCATIONS}

    def words_of(seq):
        assert seq[0] == tokenizer.cls_token_id and seq[-1] == tokenizer.sep_token_id
        return tokenizer.convert_ids_to_tokens(seq[1:-1].tolist())

    assert words_of(ids["head"][0]) == words[:8]
    assert words_of(ids["tail"][0]) == words[-8:]
    assert words_of(ids["head_tail"][0]) == words[:2] + words[-6:]  # a quarter of the 8 from the start
    assert all(words_of(found[1]) == ["great", "film"] for found in ids.values())
    assert len(list(tmp_path.glob("*.npz"))) == 3  # cached apart: they are different inputs


def test_tokenizer_key_differs_between_tokenizers(tiny_bert):
    from ftsearch.catalog import TEXT_BACKBONES

    minilm = AutoTokenizer.from_pretrained(TEXT_BACKBONES["minilm-l6"].local_folder())
    assert tokenizer_key(AutoTokenizer.from_pretrained(tiny_bert)) != tokenizer_key(minilm)


def test_dynamic_padding_pads_to_the_longest_in_the_batch():
    batch = [(np.array([2, 5, 3]), 1), (np.array([2, 5, 6, 7, 3]), 0)]
    out = PadCollator(pad_id=0)(batch)
    assert out["input_ids"].shape == (2, 5)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [1, 0]


def test_augmentation_only_where_asked_and_seeded(tiny_bert, frame, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    split = tokenize_cached(tokenizer, frame, 16, cache=tmp_path)
    aug = TokenAugment(mask_prob=0.9, mask_id=tokenizer.mask_token_id)
    masked = next(iter(make_loader(split, 3, 0, shuffle=False, augment=aug, seed=1)))
    plain = next(iter(make_loader(split, 3, 0, shuffle=False)))
    assert (masked["input_ids"] == tokenizer.mask_token_id).sum() > 0
    assert (plain["input_ids"] == tokenizer.mask_token_id).sum() == 0
    again = next(iter(make_loader(split, 3, 0, shuffle=False, augment=aug, seed=1)))
    assert masked["input_ids"].equal(again["input_ids"])


def test_a_full_disk_leaves_no_partial_cache_file_and_the_split_is_still_tokenised(tiny_bert, frame, tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from ftsearch.data import tokens

    tok = AutoTokenizer.from_pretrained(tiny_bert)

    def full(file, **arrays):
        Path(file).write_bytes(b"half")  # what was written before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokens.np, "savez", full)
    split = tokenize_cached(tok, frame, 16, cache=tmp_path / "tokens")
    assert len(split.ids) == len(frame)
    assert list((tmp_path / "tokens").iterdir()) == []  # neither the entry nor its partial file
    assert "no space left on device writing" in capsys.readouterr().err
