"""Readers for the public infrared/visible data sets, each in its published layout.

``open_reader(kind, root, split, **options)`` returns a :class:`Reader`: a lazy,
indexable sequence of :class:`PairSample`. The pairs are listed (and matched by file
stem) when the reader is built; the pixels are read on ``reader[i]`` /
``reader[key]`` / iteration. Layouts and class mappings are documented in
``docs/DATASETS.md``.

Options shared by every kind:

``on_missing``        ``"error"`` (default) or ``"skip"``: what to do with a file that
                      has no partner (a visible image without its infrared, or the
                      reverse, or a missing label file when labels exist). ``"skip"``
                      drops the pair and emits one warning listing what was dropped.
``on_size_mismatch``  ``"error"`` (default) or ``"resize"``: what to do when the
                      infrared image's size differs from the visible one. ``"resize"``
                      resizes the infrared to the visible size (area interpolation when
                      shrinking, bilinear when enlarging). A label whose size differs
                      from the visible image is always an error.

Labels are returned as MFNet ids (0..8, 255 = ignore); values outside the data set's
class table raise :class:`DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import cv2
import numpy as np

from magicfuse.data.boxes import Box, rasterize_boxes, read_voc_boxes, read_yolo_boxes
from magicfuse.data.classes import (
    FMB_CLASSES,
    FMB_TO_MFNET,
    IGNORE_INDEX,
    LLVIP_BOX_TO_MFNET,
    MFNET_CLASSES,
    MSRS_BOX_CLASSES,
    MSRS_BOX_TO_MFNET,
)
from magicfuse.errors import ConfigError, DataError
from magicfuse.imageio import IMAGE_EXTENSIONS, read_image

__all__ = [
    "PairSample",
    "Reader",
    "MFNetReader",
    "MSRSReader",
    "FMBReader",
    "LLVIPReader",
    "RoadSceneReader",
    "PairsReader",
    "READERS",
    "open_reader",
    "scan_images",
]


@dataclass
class PairSample:
    """One aligned sample. ``visible`` uint8 (H,W,3) RGB; ``infrared`` uint8 (H,W);
    ``label`` uint8 (H,W) MFNet ids with 255 = ignore; ``boxes`` in pixels (MFNet ids);
    ``paths`` maps "visible"/"infrared"/"label"/"boxes" to the files read."""

    key: str
    visible: np.ndarray
    infrared: np.ndarray | None
    label: np.ndarray | None
    boxes: list[Box] | None
    source: str
    split: str
    paths: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    key: str
    visible: Path
    infrared: Path | None  # for MFNet: the same 4-channel file as `visible`
    label: Path | None = None
    boxes: Path | None = None


def scan_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder by stem (hidden and non-image files are ignored).

    Two images with the same stem (``a.png`` and ``a.jpg``) are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
            continue
        if p.stem in found:
            raise DataError(f"{p}: two images share the name {p.stem!r} ({found[p.stem].name} and {p.name})")
        found[p.stem] = p
    return found


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ConfigError(f"option {name}={value!r}: must be one of {list(allowed)}")
    return value


class Reader:
    """Base of every reader: lazy, ``len()``, ``keys()``, ``reader[i]`` / ``reader[key]``,
    iteration in key order. Subclasses implement :meth:`_list` (and may override
    :meth:`_read_images`)."""

    kind: str = ""
    #: class names of the label files as stored (values must index this table or be 255)
    label_classes: tuple[str, ...] = MFNET_CLASSES
    #: native id -> MFNet id; None when labels are stored as MFNet ids already
    label_to_mfnet: tuple[int, ...] | None = None

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        on_missing: str = "error",
        on_size_mismatch: str = "error",
        names_file: str | Path | None = None,
        scale: float = 1.0,
    ) -> None:
        self.root = Path(root)
        self.split = str(split)
        self.on_missing = _choice("on_missing", on_missing, ("error", "skip"))
        self.on_size_mismatch = _choice("on_size_mismatch", on_size_mismatch, ("error", "resize"))
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data set root folder not found")
        if not (isinstance(scale, (int, float)) and 0.0 < float(scale) <= 1.0):
            raise ConfigError(f"{self.kind} reader: scale must be in (0, 1], got {scale!r}")
        self.scale = float(scale)
        self.names_file = _resolve(self.root, str(names_file).replace("{split}", self.split)) if names_file else None
        self._skipped: list[str] = []
        entries = sorted(self._list(), key=lambda e: e.key)
        if self.names_file is not None:
            entries = self._keep_listed(entries, self.names_file)
        if self._skipped:
            shown = "; ".join(self._skipped[:5]) + (" ..." if len(self._skipped) > 5 else "")
            warnings.warn(
                f"{self.kind} reader at {self.root} (split {self.split!r}): skipped {len(self._skipped)} "
                f"file(s) without a partner: {shown}",
                stacklevel=3,
            )
        if not entries:
            raise DataError(f"{self._main_folder()}: no image pairs found ({self.kind}, split {self.split!r})")
        self._entries = entries
        self._index = {e.key: i for i, e in enumerate(entries)}
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        table = self.label_to_mfnet if self.label_to_mfnet is not None else range(len(self.label_classes))
        lut[: len(table)] = np.asarray(table, dtype=np.uint8)
        self._valid = np.zeros(256, dtype=bool)
        self._valid[: len(self.label_classes)] = True
        self._valid[IGNORE_INDEX] = True
        self._lut = lut

    def _keep_listed(self, entries: list[_Entry], list_file: Path) -> list[_Entry]:
        """Only the pairs named in `list_file` (one key or file name per line; still in key order): a fixed split
        such as MSRS's splits/train.txt. A listed name without a pair is missing."""
        if not list_file.is_file():
            raise DataError(f"{list_file}: names file not found")
        names = [Path(n).stem if Path(n).suffix.lower() in IMAGE_EXTENSIONS else n
                 for n in (line.strip() for line in list_file.read_text().splitlines()) if n]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise DataError(f"{list_file}: names listed more than once: {dup}")
        by_key = {e.key: e for e in entries}
        for name in names:
            if name not in by_key:
                self._missing(list_file, f"lists {name!r}, which has no pair in {self._main_folder()}")
        return sorted((by_key[n] for n in names if n in by_key), key=lambda e: e.key)  # key order, as always

    # -- to implement ------------------------------------------------------------------

    def _list(self) -> list[_Entry]:
        raise NotImplementedError

    def _main_folder(self) -> Path:
        return self.root

    # -- sequence protocol -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        return [e.key for e in self._entries]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def signature(self) -> str:
        """A digest of what the reader would yield without reading pixels: every sample's
        key and the name, size and modification time of each of its files. It changes when
        a file is added, removed, renamed or rewritten (write_shards redoes a finished split
        then)."""
        h = hashlib.sha256()
        for e in self._entries:
            h.update(e.key.encode("utf-8") + b"\0")
            for path in (e.visible, e.infrared, e.label, e.boxes):
                if path is None:
                    h.update(b"-\0")
                    continue
                try:
                    st = path.stat()
                except OSError as exc:
                    raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
                h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\0".encode("utf-8"))
        return h.hexdigest()

    def __getitem__(self, item: int | str) -> PairSample:
        if isinstance(item, str):
            if item not in self._index:
                raise KeyError(f"{self.kind} reader at {self.root}: no sample with key {item!r}")
            item = self._index[item]
        return self._load(self._entries[item])

    def __iter__(self) -> Iterator[PairSample]:
        for entry in self._entries:
            yield self._load(entry)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    # -- helpers for subclasses --------------------------------------------------------

    def _missing(self, path: Path, problem: str) -> None:
        """A file without its partner: error, or remember it as skipped."""
        if self.on_missing == "error":
            raise DataError(f"{path}: {problem} (use on_missing='skip' to drop such pairs)")
        self._skipped.append(f"{path.name} ({problem})")

    def _labels_folder(self, label_dir: Path) -> Path | None:
        """``label_dir`` when it exists; otherwise an error (``require_labels``) or a warning
        and None (samples then have ``label=None``)."""
        if label_dir.is_dir():
            return label_dir
        if getattr(self, "require_labels", False):
            raise DataError(f"{label_dir}: labels folder not found (require_labels=True)")
        warnings.warn(f"{label_dir}: no labels folder; samples will have label=None", stacklevel=5)
        return None

    def _match(
        self,
        vis_dir: Path,
        ir_dir: Path | None,
        label_dir: Path | None = None,
        boxes: dict[str, Path] | None = None,
    ) -> list[_Entry]:
        """Pair the images of ``vis_dir`` and ``ir_dir`` (and labels) by file stem."""
        vis = scan_images(vis_dir)
        ir = scan_images(ir_dir) if ir_dir is not None else None
        lab = scan_images(label_dir) if label_dir is not None else None
        entries = []
        for key, vpath in vis.items():
            ipath = None
            if ir is not None:
                ipath = ir.get(key)
                if ipath is None:
                    self._missing(vpath, f"no infrared image named {key}.* in {ir_dir}")
                    continue
            lpath = None
            if lab is not None:
                lpath = lab.get(key)
                if lpath is None:
                    self._missing(vpath, f"no label image named {key}.* in {label_dir}")
                    continue
            entries.append(_Entry(key, vpath, ipath, lpath, (boxes or {}).get(key)))
        for others, where in ((ir, vis_dir), (lab, vis_dir)):
            for key, path in (others or {}).items():
                if key not in vis:
                    self._missing(path, f"no visible image named {key}.* in {where}")
        return entries

    # -- reading -----------------------------------------------------------------------

    def _read_images(self, entry: _Entry) -> tuple[np.ndarray, np.ndarray | None]:
        visible = read_image(entry.visible, "rgb")
        infrared = read_image(entry.infrared, "gray") if entry.infrared is not None else None
        return visible, infrared

    def _read_label(self, path: Path) -> np.ndarray:
        label = read_image(path, "label")
        counts = np.bincount(label.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & ~self._valid)
        if bad.size:
            raise DataError(
                f"{path}: label values {bad.tolist()[:10]} are outside the {self.kind} class table "
                f"(0..{len(self.label_classes) - 1} and 255 = ignore)"
            )
        return self._lut[label]

    def _read_boxes(self, entry: _Entry, height: int, width: int) -> list[Box] | None:
        return None

    def _rescale(self, visible, infrared, label, boxes):
        """Everything of one sample shrunk by `scale` (area filter; labels nearest, boxes scaled)."""
        h, w = visible.shape[:2]
        nh, nw = max(1, round(h * self.scale)), max(1, round(w * self.scale))
        visible = cv2.resize(visible, (nw, nh), interpolation=cv2.INTER_AREA)
        if infrared is not None:
            infrared = cv2.resize(infrared, (nw, nh), interpolation=cv2.INTER_AREA)
        if label is not None:
            label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
        if boxes is not None:
            sx, sy = nw / w, nh / h
            boxes = [dataclasses.replace(b, x0=b.x0 * sx, x1=b.x1 * sx, y0=b.y0 * sy, y1=b.y1 * sy) for b in boxes]
        return visible, infrared, label, boxes

    def _load(self, entry: _Entry) -> PairSample:
        visible, infrared = self._read_images(entry)
        h, w = visible.shape[:2]
        if infrared is not None and infrared.shape[:2] != (h, w):
            ih, iw = infrared.shape[:2]
            if self.on_size_mismatch == "error":
                raise DataError(
                    f"{entry.visible} is {w}×{h} but {entry.infrared} is {iw}×{ih}: pair sizes differ "
                    "(use on_size_mismatch='resize' to resize the infrared)"
                )
            interp = cv2.INTER_AREA if iw * ih > w * h else cv2.INTER_LINEAR
            infrared = cv2.resize(infrared, (w, h), interpolation=interp)
        label = None
        if entry.label is not None:
            label = self._read_label(entry.label)
            if label.shape != (h, w):
                raise DataError(
                    f"{entry.label} is {label.shape[1]}×{label.shape[0]} but {entry.visible} is {w}×{h}: "
                    "label and image sizes differ"
                )
        boxes = self._read_boxes(entry, h, w)
        label = self._label_fallback(label, boxes, h, w)
        if self.scale != 1.0:
            visible, infrared, label, boxes = self._rescale(visible, infrared, label, boxes)
        paths = {"visible": str(entry.visible)}
        if entry.infrared is not None:
            paths["infrared"] = str(entry.infrared)
        if entry.label is not None:
            paths["label"] = str(entry.label)
        if entry.boxes is not None:
            paths["boxes"] = str(entry.boxes)
        return PairSample(entry.key, visible, infrared, label, boxes, self.kind, self.split, paths)

    def _label_fallback(self, label, boxes, h, w):
        return label


class _BoxLabelMixin:
    """Optional coarse labels from boxes (``labels_from_boxes=True``) when a sample has
    boxes and no segmentation label; see :func:`rasterize_boxes`. Pixels outside every box
    are ignored (``unboxed="ignore"``) or background (``unboxed="background"``, right when
    the boxes cover every object of their classes, as the MSRS detection labels do)."""

    labels_from_boxes: bool = False
    unboxed: str = "ignore"

    def _label_fallback(self, label, boxes, h, w):
        if label is None and self.labels_from_boxes and boxes is not None:
            return rasterize_boxes(boxes, h, w, ignore_unboxed=self.unboxed == "ignore")
        return label


def _split_folder(root: Path, split: str, kind: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(f"{folder}: split folder not found for {kind} (found: {have})")
    return folder


def _resolve(root: Path, sub: str | Path | None) -> Path | None:
    if sub is None:
        return None
    sub = Path(sub)
    return sub if sub.is_absolute() else root / sub


class MFNetReader(Reader):
    """MFNet: ``images/{name}.png`` 4-channel R,G,B,T; ``labels/{name}.png`` class ids;
    split lists ``{split}.txt`` (one name per line; ``split="all"`` takes every image)."""

    kind = "mfnet"

    def __init__(self, root, split, *, require_labels: bool = False, **common) -> None:
        self.require_labels = require_labels
        super().__init__(root, split, **common)

    def _main_folder(self) -> Path:
        return self.root / "images"

    def _list(self) -> list[_Entry]:
        images = scan_images(self.root / "images")
        label_dir = self._labels_folder(self.root / "labels")
        labels = scan_images(label_dir) if label_dir is not None else None
        if self.split == "all":
            names = list(images)
        else:
            list_file = self.root / f"{self.split}.txt"
            if not list_file.is_file():
                have = sorted(p.stem for p in self.root.glob("*.txt"))
                raise DataError(f"{list_file}: split list not found (available: {have}, or split='all')")
            names = []
            for line in list_file.read_text().splitlines():
                name = line.strip()
                if name:
                    names.append(Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name)
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})[:5]
                raise DataError(f"{list_file}: names listed more than once: {dup}")
        entries = []
        for name in names:
            img = images.get(name)
            if img is None:
                self._missing(self.root / "images" / f"{name}.png", "listed in the split but not found")
                continue
            lab = None
            if labels is not None:
                lab = labels.get(name)
                if lab is None:
                    self._missing(img, f"no label named {name}.* in {label_dir}")
                    continue
            entries.append(_Entry(name, img, img, lab))
        return entries

    def _read_images(self, entry: _Entry) -> tuple[np.ndarray, np.ndarray | None]:
        arr = read_image(entry.visible, "any")
        if arr.ndim != 3 or arr.shape[2] != 4:
            raise DataError(f"{entry.visible}: expected a 4-channel (R,G,B,T) MFNet PNG, got shape {arr.shape}")
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])


class _YoloBoxes:
    def _box_files(self, boxes_dir: Path | None) -> dict[str, Path] | None:
        if boxes_dir is None:
            return None
        if not boxes_dir.is_dir():
            raise DataError(f"{boxes_dir}: boxes folder not found")
        return {p.stem: p for p in sorted(boxes_dir.glob("*.txt")) if p.name != "classes.txt"}


class MSRSReader(_BoxLabelMixin, _YoloBoxes, Reader):
    """MSRS: ``{split}/vi``, ``{split}/ir``, optional ``{split}/Segmentation_labels``
    (MFNet ids). ``boxes_dir`` points at YOLO box files ``{key}.txt`` (classes 0 person,
    1 bicycle, 2 car); a key without a box file has no objects. ``folder`` reads another
    folder than ``split`` (e.g. splits ``train``/``val`` both from ``test/`` with
    ``names_file: splits/{split}.txt``)."""

    kind = "msrs"

    def __init__(
        self,
        root,
        split,
        *,
        boxes_dir: str | Path | None = None,
        labels_from_boxes: bool = False,
        unboxed: str = "ignore",
        folder: str | None = None,
        require_labels: bool = False,
        **common,
    ) -> None:
        self.boxes_dir = _resolve(Path(root), boxes_dir)
        self.labels_from_boxes = labels_from_boxes
        self.unboxed = _choice("unboxed", unboxed, ("ignore", "background"))
        self.folder = folder or str(split)
        self.require_labels = require_labels
        if labels_from_boxes and boxes_dir is None:
            raise ConfigError("msrs reader: labels_from_boxes=True needs boxes_dir")
        super().__init__(root, split, **common)

    def _main_folder(self) -> Path:
        return self.root / self.folder / "vi"

    def _list(self) -> list[_Entry]:
        folder = _split_folder(self.root, self.folder, self.kind)
        label_dir = folder / "Segmentation_labels"
        # without dense labels, coarse ones come from the boxes: nothing to warn about then
        label_dir = None if self.labels_from_boxes and not label_dir.is_dir() else self._labels_folder(label_dir)
        boxes = self._box_files(self.boxes_dir)
        entries = self._match(folder / "vi", folder / "ir", label_dir, boxes)
        if boxes is not None and entries and not any(e.boxes for e in entries):
            raise DataError(f"{self.boxes_dir}: no box file matches any image of {folder / 'vi'}")
        return entries

    def _read_boxes(self, entry: _Entry, height: int, width: int) -> list[Box] | None:
        if self.boxes_dir is None:
            return None
        if entry.boxes is None:
            return []
        return read_yolo_boxes(entry.boxes, width, height, MSRS_BOX_TO_MFNET, names=MSRS_BOX_CLASSES)


class FMBReader(Reader):
    """FMB: ``{split}/Visible``, ``{split}/Infrared``, optional ``{split}/Label`` with
    FMB's 15 ids, mapped to MFNet ids (``native_labels=True`` keeps FMB ids)."""

    kind = "fmb"
    label_classes = FMB_CLASSES
    label_to_mfnet = FMB_TO_MFNET

    def __init__(self, root, split, *, native_labels: bool = False, require_labels: bool = False, **common) -> None:
        self.require_labels = require_labels
        if native_labels:
            self.label_to_mfnet = None
        super().__init__(root, split, **common)

    def _main_folder(self) -> Path:
        return self.root / self.split / "Visible"

    def _list(self) -> list[_Entry]:
        folder = _split_folder(self.root, self.split, self.kind)
        label_dir = self._labels_folder(folder / "Label")
        return self._match(folder / "Visible", folder / "Infrared", label_dir)


class LLVIPReader(_BoxLabelMixin, Reader):
    """LLVIP: ``visible/{split}``, ``infrared/{split}``; person boxes in
    ``Annotations/{key}.xml`` (VOC) when that folder exists."""

    kind = "llvip"

    def __init__(
        self,
        root,
        split,
        *,
        annotations_dir: str | Path = "Annotations",
        labels_from_boxes: bool = False,
        unboxed: str = "ignore",
        **common,
    ) -> None:
        self.annotations_dir = _resolve(Path(root), annotations_dir)
        self.labels_from_boxes = labels_from_boxes
        self.unboxed = _choice("unboxed", unboxed, ("ignore", "background"))
        super().__init__(root, split, **common)

    def _main_folder(self) -> Path:
        return self.root / "visible" / self.split

    def _list(self) -> list[_Entry]:
        vis_dir = self.root / "visible" / self.split
        if not vis_dir.is_dir():
            have = sorted(p.name for p in (self.root / "visible").glob("*") if p.is_dir())
            raise DataError(f"{vis_dir}: split folder not found for llvip (found: {have})")
        entries = self._match(vis_dir, self.root / "infrared" / self.split)
        ann = self.annotations_dir
        if ann is None or not ann.is_dir():
            if self.labels_from_boxes:
                raise DataError(f"{ann}: annotations folder not found (labels_from_boxes=True)")
            self.annotations_dir = None
            return entries
        out = []
        for e in entries:
            xml = ann / f"{e.key}.xml"
            if not xml.is_file():
                self._missing(e.visible, f"no annotation {xml}")
                continue
            out.append(_Entry(e.key, e.visible, e.infrared, None, xml))
        return out

    def _read_boxes(self, entry: _Entry, height: int, width: int) -> list[Box] | None:
        if entry.boxes is None:
            return None
        return read_voc_boxes(entry.boxes, LLVIP_BOX_TO_MFNET)


class RoadSceneReader(Reader):
    """RoadScene: ``crop_LR_visible/`` and ``cropinfrared/``; no official split.

    ``split="all"`` gives every pair; ``"train"``/``"test"`` a deterministic split by
    hash of the key (a key is in test when ``sha1(key)`` maps below ``test_fraction``)."""

    kind = "roadscene"

    def __init__(self, root, split, *, test_fraction: float = 0.2, **common) -> None:
        _choice("split", split, ("all", "train", "test"))
        if not 0.0 <= test_fraction <= 1.0:
            raise ConfigError(f"roadscene reader: test_fraction must be in [0, 1], got {test_fraction}")
        self.test_fraction = float(test_fraction)
        super().__init__(root, split, **common)

    def _main_folder(self) -> Path:
        return self.root / "crop_LR_visible"

    @staticmethod
    def hash_fraction(key: str) -> float:
        return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64

    def _list(self) -> list[_Entry]:
        entries = self._match(self.root / "crop_LR_visible", self.root / "cropinfrared")
        if self.split == "all":
            return entries
        want_test = self.split == "test"
        return [e for e in entries if (self.hash_fraction(e.key) < self.test_fraction) == want_test]


class PairsReader(Reader):
    """Generic: two folders with matching file stems (any image extension), an optional
    label folder (MFNet ids). Folders are relative to ``root`` unless absolute;
    ``ir_dir=None`` reads visible images alone. ``split`` only tags the samples."""

    kind = "pairs"

    def __init__(
        self,
        root,
        split: str = "all",
        *,
        vis_dir: str | Path = "vi",
        ir_dir: str | Path | None = "ir",
        label_dir: str | Path | None = None,
        **common,
    ) -> None:
        self.vis_dir = _resolve(Path(root), vis_dir)
        self.ir_dir = _resolve(Path(root), ir_dir)
        self.label_dir = _resolve(Path(root), label_dir)
        super().__init__(root, split, **common)

    def _main_folder(self) -> Path:
        return self.vis_dir

    def _list(self) -> list[_Entry]:
        return self._match(self.vis_dir, self.ir_dir, self.label_dir)


READERS: dict[str, type[Reader]] = {
    "mfnet": MFNetReader,
    "msrs": MSRSReader,
    "fmb": FMBReader,
    "llvip": LLVIPReader,
    "roadscene": RoadSceneReader,
    "pairs": PairsReader,
}


def _allowed_options(cls: type[Reader]) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY:
                names.add(p.name)
    return names


def reader_options_error(kind: str, options: Mapping[str, Any]) -> str | None:
    """What is wrong with reader `kind` and its option names (None when nothing is)."""
    if kind not in READERS:
        return f"unknown reader kind {kind!r}; known: {sorted(READERS)}"
    allowed = _allowed_options(READERS[kind])
    unknown = sorted(set(options) - allowed)
    if unknown:
        return f"{kind} reader: unknown option(s) {unknown}; allowed: {sorted(allowed)}"
    return None


def open_reader(kind: str, root: str | Path, split: str = "test", **options: Any) -> Reader:
    """Open a data set reader. ``kind`` is one of ``READERS``; ``options`` are the
    reader's keyword options (unknown ones raise ConfigError)."""
    problem = reader_options_error(kind, options)
    if problem:
        raise ConfigError(problem)
    return READERS[kind](root, split, **options)
