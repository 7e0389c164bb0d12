"""vtok.bench.clip_scenes: the 224-px scenes of the small VLM on the real CLIP tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vtok.bench import clip_scenes as cs
from vtok.bench import vlm_task as task
from vtok.bench.fashion_mnist import DEFAULT_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST missing (Debian dataset-fashion-mnist)")


def test_scene_is_deterministic_and_well_formed():
    a, b = cs.make_scene("train", cs.TRAIN_SEED, 7), cs.make_scene("train", cs.TRAIN_SEED, 7)
    assert np.array_equal(a.image, b.image) and (a.question, a.answer) == (b.question, b.answer)
    assert a.image.shape == (224, 224, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, cs.make_scene("train", cs.TRAIN_SEED, 8).image)
    assert task.MIN_OBJECTS <= (a.cells >= 0).sum() <= task.MAX_OBJECTS


@pytest.mark.parametrize("index", range(6))
def test_labels_stay_in_their_cells(index):
    s = cs.make_scene("test", cs.HELDOUT_SEED, index)
    labels = s.meta["labels"]
    for r in range(cs.CELLS):
        for c in range(cs.CELLS):
            block = labels[r * cs.CELL:(r + 1) * cs.CELL, c * cs.CELL:(c + 1) * cs.CELL]
            k = int(s.cells[r, c])
            if k < 0:
                assert (block == -1).all()
            else:  # the item is drawn, big enough to see, and only there
                assert set(np.unique(block)) <= {-1, k} and (block == k).sum() >= 60
    # items are brighter than the background they sit on
    fg, bg = s.image[labels >= 0].mean(), s.image[labels < 0].mean()
    assert fg > bg + 30


def test_token_targets_point_at_the_items():
    for i in range(5):
        s = cs.make_scene("train", cs.TRAIN_SEED, i)
        cls, rows, cols = cs.token_targets(s)
        assert cls.shape == rows.shape == cols.shape == (cs.N_TOKENS,)
        items = np.nonzero(cls < task.N_CLASSES)[0]
        assert len(items) >= 3  # every scene has items that cover tokens
        for t in items:
            assert s.cells[rows[t], cols[t]] == cls[t]
        # a token's class covers at least min_cover of its pixels
        y, x = divmod(int(items[0]), cs.SIDE)
        block = s.meta["labels"][y * cs.PATCH:(y + 1) * cs.PATCH, x * cs.PATCH:(x + 1) * cs.PATCH]
        assert (block == cls[items[0]]).mean() >= 0.2


def test_heldout_reads_the_test_split():
    train_items, test_items = cs._items("train"), cs._items("test")
    assert sum(len(v) for v in test_items) < sum(len(v) for v in train_items)
    hs = cs.heldout(3, start=2)
    assert [h.question for h in hs] == [cs.make_scene("test", cs.HELDOUT_SEED, i).question for i in (2, 3, 4)]
    with pytest.raises(ValueError, match="n and start"):
        cs.heldout(-1)
    with pytest.raises(ValueError, match="split"):
        cs.make_scene("val", 0, 0)


def test_pixel_values_are_clips_normalisation():
    s = cs.make_scene("train", cs.TRAIN_SEED, 0)
    x = cs.pixel_values([s.image])
    assert x.shape == (1, 3, 224, 224)
    want = (torch.tensor(s.image[10, 20], dtype=torch.float32) / 255 - torch.tensor(cs.CLIP_MEAN)) / torch.tensor(
        cs.CLIP_STD)
    torch.testing.assert_close(x[0, :, 10, 20], want)
