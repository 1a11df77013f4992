import numpy as np

from ftsearch.augment import TokenAugment

IDS = np.arange(100, 200, dtype=np.int32)


def test_zero_strength_is_identity():
    out = TokenAugment(0.0, 0.0, mask_id=4)(IDS, np.random.default_rng(0))
    assert np.array_equal(out, IDS)


def test_masking_replaces_about_p_of_inner_tokens_and_keeps_the_ends():
    out = TokenAugment(mask_prob=0.3, mask_id=4)(IDS, np.random.default_rng(0))
    assert len(out) == len(IDS) and out[0] == IDS[0] and out[-1] == IDS[-1]
    assert 15 <= int((out == 4).sum()) <= 45


def test_deletion_shortens_and_keeps_order_and_ends():
    out = TokenAugment(delete_prob=0.2)(IDS, np.random.default_rng(0))
    assert 60 <= len(out) < len(IDS)
    assert out[0] == IDS[0] and out[-1] == IDS[-1]
    assert np.all(np.diff(out) > 0) and out.dtype == IDS.dtype


def test_seeded_and_without_mask_token_masking_is_off():
    aug = TokenAugment(mask_prob=0.5, delete_prob=0.1, mask_id=4)
    assert np.array_equal(aug(IDS, np.random.default_rng(7)), aug(IDS, np.random.default_rng(7)))
    assert not TokenAugment(mask_prob=0.5, mask_id=None).active
