"""Thermal-object box contrast (magicfuse.evaluation.objects) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from magicfuse.data.boxes import Box
from magicfuse.evaluation.objects import box_contrasts, contrast_scores, mean_box_contrast
from magicfuse.errors import DataError


def _image():
    img = np.full((40, 60), 50.0)
    img[10:20, 10:16] = 200.0  # a warm person box (10 x 6 px)
    img[25:35, 40:50] = 20.0   # a cold car box
    return img


def test_box_contrast_matches_a_hand_computation():
    img = _image()
    person = Box(2, 10, 10, 16, 20)
    car = {"cls": 1, "x0": 40, "y0": 25, "x1": 50, "y1": 35}
    sd = img.std()
    # person ring: the box grown by 0.5 x its shorter side (3 px) minus every box -> all 50
    assert box_contrasts(img, [person, car], 2) == [pytest.approx((200 - 50) / sd)]
    assert box_contrasts(img, [person, car], 1) == [pytest.approx((20 - 50) / sd)]
    # the other box is excluded from the ring: a car right beside the person changes nothing
    near = Box(1, 16, 10, 19, 20)
    img2 = img.copy()
    img2[10:20, 16:19] = 0.0
    got = box_contrasts(img2, [person, near], 2)[0]
    assert got == pytest.approx((200 - 50) / img2.std())
    # colour images use BT.601 luma; a constant image and an absent class give nothing
    rgb = np.dstack([img, img, img]).astype(np.uint8)
    assert box_contrasts(rgb, [person], 2)[0] == pytest.approx(box_contrasts(img.astype(np.uint8), [person], 2)[0])
    assert box_contrasts(np.full((40, 60), 7.0), [person], 2) == []
    assert box_contrasts(img, [person], 1) == []


def test_mean_box_contrast_pools_boxes_of_all_images():
    img = _image()
    person = Box(2, 10, 10, 16, 20)
    value, count = mean_box_contrast([img, 255 - img], [[person], [person]], 2)
    assert count == 2 and value == pytest.approx(0.0, abs=1e-9)  # +c and -c
    assert mean_box_contrast([img], [None], 2) == (None, 0)
    with pytest.raises(DataError, match="2 images but 1 box lists"):
        mean_box_contrast([img, img], [[person]], 2)


def test_contrast_scores_name_each_class_with_boxes():
    img = _image()
    person, car = Box(2, 10, 10, 16, 20), Box(1, 40, 25, 50, 35)
    sd = img.std()
    got = contrast_scores([img, img], [[person, car], None])
    assert got == {"person_contrast": pytest.approx((200 - 50) / sd), "car_contrast": pytest.approx((20 - 50) / sd)}
    # a class without boxes is left out; no boxes at all gives nothing
    assert contrast_scores([img], [[person]]) == {"person_contrast": pytest.approx((200 - 50) / sd)}
    assert contrast_scores([img], [None]) == {}
