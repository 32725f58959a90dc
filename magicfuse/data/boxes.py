"""Bounding-box annotations (YOLO text, Pascal VOC XML) and their rasterisation.

Boxes are kept in pixel-edge coordinates: ``x0, y0`` is the top-left corner and
``x1, y1`` the bottom-right corner of the box, so a box covering exactly pixel
column 0 has ``x0 = 0, x1 = 1``. Class ids are MFNet ids (see
:mod:`magicfuse.data.classes`); ``source_class`` keeps the data set's own name.

:func:`rasterize_boxes` turns boxes into a **coarse** segmentation target: every pixel
inside a box gets the box's class, including the background pixels a box always
contains. It is weak supervision for data sets that only have boxes (MSRS detection
labels, LLVIP), never a substitute for real masks, and mIoU computed against it is not
comparable with mIoU on real labels.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from magicfuse.data.classes import IGNORE_INDEX
from magicfuse.errors import DataError

__all__ = ["Box", "read_yolo_boxes", "read_voc_boxes", "rasterize_boxes"]

# Normalised YOLO coordinates may overshoot 0..1 by rounding; beyond this they are
# taken as a format error (e.g. pixel coordinates in a YOLO file).
_YOLO_TOLERANCE = 0.01


@dataclass(frozen=True)
class Box:
    """One box: MFNet class id, pixel-edge corners, and the data set's class name."""

    cls: int
    x0: float
    y0: float
    x1: float
    y1: float
    source_class: str = ""

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: annotation file is not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read annotation file: {exc.strerror or exc}") from None


def read_yolo_boxes(
    path: str | Path,
    width: int,
    height: int,
    class_map: Mapping[int, int],
    *,
    names: Sequence[str] | None = None,
) -> list[Box]:
    """Read a YOLO text file (one ``class cx cy w h`` line per box, normalised to 0..1).

    ``class_map`` maps the file's class ids to MFNet ids (255 keeps the box as an
    ignore region). ``names`` gives the file's class names for ``Box.source_class``.
    Boxes are clipped to the image; boxes with no area left are dropped. Malformed
    lines, unknown classes and coordinates clearly outside 0..1 raise DataError naming
    the file and line.
    """
    path = Path(path)
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size must be positive, got {width}×{height}")
    boxes: list[Box] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 5:
            raise DataError(f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}")
        try:
            src = int(fields[0])
            cx, cy, bw, bh = (float(v) for v in fields[1:])
        except ValueError:
            raise DataError(f"{where}: not numbers: {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in (cx, cy, bw, bh)):
            raise DataError(f"{where}: non-finite coordinate: {line.strip()!r}")
        if src not in class_map:
            raise DataError(f"{where}: class id {src} is not in the class map {sorted(class_map)}")
        if bw < 0 or bh < 0:
            raise DataError(f"{where}: negative box size: {line.strip()!r}")
        lo, hi = -_YOLO_TOLERANCE, 1 + _YOLO_TOLERANCE
        if not all(lo <= v <= hi for v in (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)):
            raise DataError(f"{where}: coordinates outside 0..1 (YOLO boxes must be normalised): {line.strip()!r}")
        x0 = min(max((cx - bw / 2) * width, 0.0), width)
        x1 = min(max((cx + bw / 2) * width, 0.0), width)
        y0 = min(max((cy - bh / 2) * height, 0.0), height)
        y1 = min(max((cy + bh / 2) * height, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            continue
        name = names[src] if names is not None and 0 <= src < len(names) else str(src)
        boxes.append(Box(int(class_map[src]), x0, y0, x1, y1, name))
    return boxes


def read_voc_boxes(path: str | Path, class_map: Mapping[str, int]) -> list[Box]:
    """Read a Pascal VOC XML file.

    VOC ``xmin..xmax`` are 1-based inclusive pixel indices; they become pixel edges
    ``x0 = xmin - 1``, ``x1 = xmax`` (likewise for y). Class names are matched
    case-insensitively against ``class_map`` (name -> MFNet id); an unknown name is an
    error. Boxes are clipped to the ``<size>`` the file declares, when it declares one.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML: {exc}") from None
    cmap = {k.lower(): v for k, v in class_map.items()}

    def number(node: ET.Element, tag: str, where: str) -> float:
        child = node.find(tag)
        if child is None or child.text is None:
            raise DataError(f"{path}: {where} has no <{tag}>")
        try:
            return float(child.text.strip())
        except ValueError:
            raise DataError(f"{path}: {where} <{tag}> is not a number: {child.text!r}") from None

    width = height = None
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width, height = number(size, "width", "<size>"), number(size, "height", "<size>")
        if width <= 0 or height <= 0:
            width = height = None  # some tools write 0; then do not clip

    boxes: list[Box] = []
    for i, obj in enumerate(root.iter("object")):
        where = f"object {i}"
        name_node = obj.find("name")
        if name_node is None or not (name_node.text or "").strip():
            raise DataError(f"{path}: {where} has no <name>")
        name = name_node.text.strip()
        if name.lower() not in cmap:
            raise DataError(f"{path}: {where} has class {name!r}, not in the class map {sorted(class_map)}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{path}: {where} ({name}) has no <bndbox>")
        xmin, ymin = number(bnd, "xmin", where), number(bnd, "ymin", where)
        xmax, ymax = number(bnd, "xmax", where), number(bnd, "ymax", where)
        if xmax < xmin or ymax < ymin:
            raise DataError(f"{path}: {where} ({name}) has max < min: ({xmin}, {ymin}, {xmax}, {ymax})")
        x0, y0, x1, y1 = xmin - 1, ymin - 1, xmax, ymax
        x0, y0 = max(x0, 0.0), max(y0, 0.0)
        if width is not None and height is not None:
            x1, y1 = min(x1, width), min(y1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        boxes.append(Box(int(cmap[name.lower()]), x0, y0, x1, y1, name))
    return boxes


def _pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixels whose centre lies in [lo, hi); at least one pixel for a box of positive
    extent that overlaps the image."""
    a = max(math.ceil(lo - 0.5), 0)
    b = min(math.ceil(hi - 0.5), size)
    if b <= a and hi > lo and lo < size and hi > 0:
        a = min(max(int(math.floor(lo)), 0), size - 1)
        b = a + 1
    return a, b


def rasterize_boxes(
    boxes: Iterable[Box],
    height: int,
    width: int,
    *,
    background: int = 0,
    ignore_unboxed: bool = True,
) -> np.ndarray:
    """Coarse label map (uint8 ``height×width``) from boxes.

    Box interiors (pixels whose centre lies inside the box) get the box's class id;
    pixels outside every box get 255 (ignore) when ``ignore_unboxed``, else
    ``background``. Where boxes overlap the smaller box wins (ties: the later box).
    This is coarse supervision; see the module docstring.
    """
    if height <= 0 or width <= 0:
        raise DataError(f"rasterize_boxes: size must be positive, got {height}×{width}")
    fill = IGNORE_INDEX if ignore_unboxed else int(background)
    if not 0 <= fill <= 255:
        raise DataError(f"rasterize_boxes: background {background} does not fit in uint8")
    mask = np.full((height, width), fill, dtype=np.uint8)
    indexed = list(enumerate(boxes))
    # Paint large boxes first so that smaller ones end on top; stable on ties.
    indexed.sort(key=lambda ib: (-ib[1].area, ib[0]))
    for _, box in indexed:
        if not 0 <= box.cls <= 255:
            raise DataError(f"rasterize_boxes: class id {box.cls} does not fit in uint8")
        c0, c1 = _pixel_span(box.x0, box.x1, width)
        r0, r1 = _pixel_span(box.y0, box.y1, height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = box.cls
    return mask
