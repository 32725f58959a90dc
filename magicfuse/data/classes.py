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
# The thermal classes of eq. 11 (the radiation threshold caps w on their pixels): car and
# person, as the paper says. The authors' code uses person only; their imported checkpoints
# carry that choice in their sampler settings (`models.importer.OFFICIAL_SAMPLER`).
THERMAL_CLASSES: tuple[int, ...] = (CLASS_ID["car"], CLASS_ID["person"])

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

# --- Other data sets, mapped onto MFNet ids -------------------------------------------
# (Appended by the readers; see docs/DATASETS.md for the reasoning behind each mapping.)

# FMB (Liu et al., ICCV 2023, "Multi-interactive feature learning and a full-time
# multi-modality benchmark"): 15 label ids as shipped in FMB's `Label/` PNGs.
FMB_CLASSES: tuple[str, ...] = (
    "unlabelled",
    "road",
    "sidewalk",
    "building",
    "traffic_lamp",
    "traffic_sign",
    "vegetation",
    "sky",
    "person",
    "car",
    "truck",
    "bus",
    "motorcycle",
    "bicycle",
    "pole",
)
# FMB id -> MFNet id. Car -> car, Person -> person, the two-wheelers (motorcycle,
# bicycle) -> bike. Truck and bus -> 255 (ignore): MFNet's "car" class is annotated on
# cars, so scoring trucks/buses as car or as background would both be guesses. Stuff
# classes (road, sidewalk, building, lamp, sign, vegetation, sky, pole) have no MFNet
# counterpart and MFNet labels such pixels "unlabelled" (0), so they map to 0.
FMB_TO_MFNET: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 0, 0, 2, 1, IGNORE_INDEX, IGNORE_INDEX, 3, 3, 0)

# MSRS detection boxes (Lele-3/MSRS-detection-label, YOLO format): 0 person, 1 bicycle, 2 car.
MSRS_BOX_CLASSES: tuple[str, ...] = ("person", "bicycle", "car")
MSRS_BOX_TO_MFNET: dict[int, int] = {0: CLASS_ID["person"], 1: CLASS_ID["bike"], 2: CLASS_ID["car"]}

# LLVIP VOC annotations: one object class, "person".
LLVIP_BOX_TO_MFNET: dict[str, int] = {"person": CLASS_ID["person"]}
