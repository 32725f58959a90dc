from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from magicfuse.data.classes import CLASS_ID, MFNET_CLASSES, MFNET_PALETTE, NUM_CLASSES
from magicfuse.errors import DataError
from magicfuse.evaluation.segmentation import (
    IGNORE_COLOR,
    ConfusionMatrix,
    box_iou_protocol,
    colorize,
    legend_image,
)


def test_confusion_matrix_known_values():
    # target rows, pred columns; 255 ignored
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3).update(pred, target)
    expected = np.array([[1, 1, 0],
                         [1, 2, 0],
                         [1, 0, 1]])
    np.testing.assert_array_equal(cm.matrix.numpy(), expected)
    # IoU = TP/(row + col - TP): c0 = 1/(2+3-1) ; c1 = 2/(3+3-2) ; c2 = 1/(2+1-1)
    np.testing.assert_allclose(cm.iou(), [0.25, 0.5, 0.5])
    assert cm.miou() == pytest.approx(1.25 / 3)
    assert cm.miou(classes=[1, 2]) == pytest.approx(0.5)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)


def test_absent_class_is_nan_and_skipped():
    target = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 0], [1, 1]])
    cm = ConfusionMatrix(NUM_CLASSES).update(pred, target)
    iou = cm.iou()
    assert iou[0] == 1 and iou[1] == 1
    assert np.isnan(iou[2:]).all()
    assert cm.miou() == 1.0  # mean over defined classes among all 9
    names = cm.per_class_iou()
    assert list(names) == list(MFNET_CLASSES)
    # a class predicted but absent in target has IoU 0 and counts in the mean
    cm2 = ConfusionMatrix(NUM_CLASSES).update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    assert cm2.iou()[2] == 0.0
    assert cm2.miou() == pytest.approx((0.5 + 0.0) / 2)


def test_batches_accumulate_and_merge_equal_single_pass():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, NUM_CLASSES, (4, 16, 16), generator=g)
    tgt = torch.randint(0, NUM_CLASSES, (4, 16, 16), generator=g)
    tgt[0, :4] = 255
    whole = ConfusionMatrix().update(pred, tgt)
    a = ConfusionMatrix().update(pred[:2], tgt[:2])
    b = ConfusionMatrix()
    for i in range(2, 4):
        b.update(pred[i].numpy().astype(np.uint8), tgt[i].numpy().astype(np.uint8))
    a.merge(b)
    assert torch.equal(a.matrix, whole.matrix)
    assert int(whole.matrix.sum()) == 4 * 256 - 64


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(DataError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(DataError, match="target holds class id 7"):
        cm.update(np.zeros((1, 2), int), np.array([[0, 7]]))
    with pytest.raises(DataError, match="prediction holds class id 5"):
        cm.update(np.array([[0, 5]]), np.array([[0, 1]]))
    with pytest.raises(DataError, match="argmax"):
        cm.update(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))


def test_colorize_uses_palette_and_ignore_colour():
    seg = np.array([[0, 1, 2], [8, 255, 3]], np.uint8)
    rgb = colorize(seg)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == MFNET_PALETTE[1]
    assert tuple(rgb[1, 0]) == MFNET_PALETTE[8]
    assert tuple(rgb[1, 1]) == IGNORE_COLOR
    assert tuple(colorize(torch.tensor([[2]]))[0, 0]) == MFNET_PALETTE[2]
    with pytest.raises(DataError, match="class id 9"):
        colorize(np.array([[9]]))
    with pytest.raises(DataError, match=r"\(H,W\)"):
        colorize(np.zeros((2, 2, 3), np.uint8))


def test_legend_image_draws_each_colour_and_text():
    img = legend_image(MFNET_CLASSES, MFNET_PALETTE, row_height=20, width=150)
    assert img.shape == (20 * 9, 150, 3) and img.dtype == np.uint8
    for i, col in enumerate(MFNET_PALETTE):
        assert tuple(img[i * 20 + 10, 10]) == col
    # text pixels (dark) exist right of the swatches
    assert (img[:, 30:] < 128).any()


def test_box_protocol_known_values():
    person, car = CLASS_ID["person"], CLASS_ID["car"]
    mask = np.full((4, 6), 255, np.uint8)
    mask[0:2, 0:2] = person  # 4 px box
    mask[2:4, 3:6] = car     # 6 px box
    pred = np.zeros((4, 6), np.uint8)
    pred[0:2, 0:1] = person  # 2 of the 4 box pixels
    pred[2:4, 3:6] = car     # the whole car box
    pred[0, 5] = car         # car outside any box
    res = box_iou_protocol(pred, mask)
    assert res["person"] == pytest.approx(0.5)
    assert res["car"] == pytest.approx(1.0)  # outside pixel is ignored
    assert math.isnan(res["bike"])
    assert res["mIoU"] == pytest.approx(0.75)
    strict = box_iou_protocol(pred, mask, outside="background")
    assert strict["car"] == pytest.approx(6 / 7)
    # batch and list forms agree with the single pair
    batch = box_iou_protocol(np.stack([pred, pred]), np.stack([mask, mask]))
    listed = box_iou_protocol([pred, pred], [mask, mask])
    assert batch["person"] == listed["person"] == pytest.approx(0.5)
    with pytest.raises(DataError, match="differs"):
        box_iou_protocol(pred[:2], mask)
    with pytest.raises(ValueError, match="outside"):
        box_iou_protocol(pred, mask, outside="nope")
