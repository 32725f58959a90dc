"""Class tables, as data.

MFNet's 9 classes are the label space of the whole project. Other data sets map
onto them (a class with no MFNet counterpart maps to 255 = ignore).
"""

from __future__ import annotations

IGNORE_INDEX = 255

MFNET_CLASSES: tuple[str, ...] = (
    "unlabelled",
    "car",
    "person",
    "bike",
    "curve",
    "car_stop",
    "guardrail",
    "color_cone",
    "bump",
)
NUM_CLASSES = len(MFNET_CLASSES)
CLASS_ID = {name: i for i, name in enumerate(MFNET_CLASSES)}

# Colours for visualising segmentation maps (RGB), one per MFNet class.
MFNET_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
    (0, 0, 192),
    (128, 128, 0),
    (64, 64, 128),
    (192, 128, 128),
    (192, 64, 0),
)

# Class weights of the segmentation cross-entropy in the authors' fusion training code.
SEG_CLASS_WEIGHTS: tuple[float, ...] = (0.4, 0.8, 1.0, 2.0, 4.0, 1.8, 1.8, 1.5, 1.5)
