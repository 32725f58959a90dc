"""Data set readers and box annotations: layouts, class mappings, and clear errors."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import need_shared
from magicfuse.data.boxes import Box, rasterize_boxes, read_voc_boxes, read_yolo_boxes
from magicfuse.data.classes import (
    FMB_CLASSES,
    FMB_TO_MFNET,
    IGNORE_INDEX,
    MSRS_BOX_CLASSES,
    MSRS_BOX_TO_MFNET,
)
from magicfuse.data.readers import PairSample, open_reader
from magicfuse.errors import ConfigError, DataError, ImageReadError
from magicfuse.imageio import read_image, write_png

MSRS_KEYS = ("00012N", "00032N", "00040N")


def _count_images(folder: Path) -> int:
    """How many images a shared folder holds (the tests follow the data, not a fixed count)."""
    return sum(1 for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))


def _rand(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _msrs_sources():
    vi = need_shared("data", "msrs", "test", "vi")
    ir = need_shared("data", "msrs", "test", "ir")
    boxes = need_shared("data", "msrs_detection_labels", "visible", "test")
    return vi, ir, boxes


def _pairs_layout(root: Path, n=3, size=(12, 16), *, vis="vi", ir="ir", seed=0) -> Path:
    h, w = size
    for i in range(n):
        write_png(root / vis / f"{i:03d}.png", _rand((h, w, 3), seed + i))
        write_png(root / ir / f"{i:03d}.png", _rand((h, w), seed + 100 + i))
    return root


# --- MFNet: a real fixture built from 3 MSRS pairs -------------------------------------


@pytest.fixture
def mfnet_root(tmp_path):
    vi, ir, box_dir = _msrs_sources()
    root = tmp_path / "MFNet"
    labels = {}
    for key in MSRS_KEYS:
        v = read_image(vi / f"{key}.png", "rgb")
        t = read_image(ir / f"{key}.png", "gray")
        h, w = t.shape
        boxes = read_yolo_boxes(box_dir / f"{key}.txt", w, h, MSRS_BOX_TO_MFNET, names=MSRS_BOX_CLASSES)
        labels[key] = rasterize_boxes(boxes, h, w, ignore_unboxed=False)
        write_png(root / "images" / f"{key}.png", np.dstack([v, t]))
        write_png(root / "labels" / f"{key}.png", labels[key])
    (root / "train.txt").write_text("00012N\n00032N\n")
    (root / "test.txt").write_text("00040N\n\n")
    return root, labels


def test_mfnet_reader_reads_rgb_t_and_labels(mfnet_root):
    root, labels = mfnet_root
    vi, ir, _ = _msrs_sources()
    # The file is what MFNet ships: Pillow (MFNet's own loader) sees R, G, B, T.
    raw = np.asarray(Image.open(root / "images" / "00012N.png"))
    assert raw.shape == (480, 640, 4)
    np.testing.assert_array_equal(raw[..., 3], read_image(ir / "00012N.png", "gray"))

    train = open_reader("mfnet", root, "train")
    assert len(train) == 2 and train.keys() == ["00012N", "00032N"]
    test = open_reader("mfnet", root, "test")
    assert test.keys() == ["00040N"]
    assert len(open_reader("mfnet", root, "all")) == 3
    for reader in (train, test):
        for s in reader:
            assert isinstance(s, PairSample) and s.source == "mfnet" and s.split == reader.split
            assert s.visible.shape == (480, 640, 3) and s.visible.dtype == np.uint8
            np.testing.assert_array_equal(s.visible, read_image(vi / f"{s.key}.png", "rgb"))
            np.testing.assert_array_equal(s.infrared, read_image(ir / f"{s.key}.png", "gray"))
            np.testing.assert_array_equal(s.label, labels[s.key])
            assert s.paths["visible"] == s.paths["infrared"] == str(root / "images" / f"{s.key}.png")
    # the boxes put cars (1) and people (2) into the labels
    assert set(np.unique(labels["00012N"]).tolist()) >= {0, 1}


def test_mfnet_errors(mfnet_root):
    root, _ = mfnet_root
    with pytest.raises(DataError, match=r"val\.txt.*split list not found"):
        open_reader("mfnet", root, "val")
    (root / "val.txt").write_text("00012N\nghost\n")
    with pytest.raises(DataError, match="ghost.png"):
        open_reader("mfnet", root, "val")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert open_reader("mfnet", root, "val", on_missing="skip").keys() == ["00012N"]
    # a 3-channel image where MFNet needs 4
    write_png(root / "images" / "00012N.png", _rand((480, 640, 3)))
    with pytest.raises(DataError, match=r"00012N\.png.*4-channel"):
        open_reader("mfnet", root, "train")[0]
    # a label value outside MFNet's 9 classes
    bad = np.zeros((480, 640), np.uint8)
    bad[0, 0] = 9
    write_png(root / "labels" / "00032N.png", bad)
    with pytest.raises(DataError, match=r"00032N\.png.*\[9\]"):
        open_reader("mfnet", root, "train")["00032N"]


# --- MSRS ------------------------------------------------------------------------------


def test_msrs_real_test_split_with_boxes():
    _, _, box_dir = _msrs_sources()
    root = need_shared("data", "msrs")
    with pytest.warns(UserWarning, match="Segmentation_labels"):
        r = open_reader("msrs", root, "test", boxes_dir=box_dir)
    assert len(r) == _count_images(root / "test" / "vi") > 0
    s = r["00012N"]
    assert s.visible.shape == (480, 640, 3) and s.infrared.shape == (480, 640) and s.label is None
    first = (box_dir / "00012N.txt").read_text().split("\n")[0].split()
    cls, cx, cy, bw, bh = int(first[0]), *map(float, first[1:])
    b = s.boxes[0]
    assert b.cls == {0: 2, 1: 3, 2: 1}[cls] and b.source_class == MSRS_BOX_CLASSES[cls]
    assert b.x0 == pytest.approx((cx - bw / 2) * 640) and b.y1 == pytest.approx((cy + bh / 2) * 480)
    # coarse labels from the boxes: box pixels carry the class, the rest is ignored (and no
    # warning about the missing dense labels: the boxes stand in for them)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2 = open_reader("msrs", root, "test", boxes_dir=box_dir, labels_from_boxes=True)
    lab = r2["00012N"].label
    np.testing.assert_array_equal(lab, rasterize_boxes(s.boxes, 480, 640))
    assert lab[int(b.y0) + 2, int(b.x0) + 2] == b.cls and (lab == IGNORE_INDEX).any()


def test_msrs_layout_with_labels_and_bad_values(tmp_path):
    root = tmp_path / "MSRS"
    _pairs_layout(root / "train", n=2)
    lab = (np.arange(12 * 16).reshape(12, 16) % 9).astype(np.uint8)
    lab[0, 0] = 255
    write_png(root / "train" / "Segmentation_labels" / "000.png", lab)
    write_png(root / "train" / "Segmentation_labels" / "001.png", lab)
    r = open_reader("msrs", root, "train", require_labels=True)
    np.testing.assert_array_equal(r[0].label, lab)
    with pytest.raises(DataError, match=r"MSRS/test: split folder not found.*\['train'\]"):
        open_reader("msrs", root, "test")
    lab[3, 3] = 12
    write_png(root / "train" / "Segmentation_labels" / "001.png", lab)
    with pytest.raises(DataError, match=r"001\.png: label values \[12\]"):
        r["001"]
    # a missing label file is a missing partner
    (root / "train" / "Segmentation_labels" / "000.png").unlink()
    with pytest.raises(DataError, match=r"vi/000\.png: no label"):
        open_reader("msrs", root, "train")


# --- FMB -------------------------------------------------------------------------------


def test_fmb_labels_mapped_to_mfnet(tmp_path):
    root = tmp_path / "FMB"
    _pairs_layout(root / "test", n=1, size=(3, 5), vis="Visible", ir="Infrared")
    native = np.array([list(range(0, 5)), list(range(5, 10)), list(range(10, 15))], np.uint8)
    write_png(root / "test" / "Label" / "000.png", native)
    s = open_reader("fmb", root, "test")[0]
    np.testing.assert_array_equal(s.label, np.asarray(FMB_TO_MFNET, np.uint8)[native])
    idx = {n: i for i, n in enumerate(FMB_CLASSES)}
    assert s.label.ravel()[idx["car"]] == 1 and s.label.ravel()[idx["person"]] == 2
    assert s.label.ravel()[idx["bicycle"]] == 3 and s.label.ravel()[idx["motorcycle"]] == 3
    assert s.label.ravel()[idx["truck"]] == IGNORE_INDEX and s.label.ravel()[idx["road"]] == 0
    np.testing.assert_array_equal(open_reader("fmb", root, "test", native_labels=True)[0].label, native)
    native[0, 0] = 15
    write_png(root / "test" / "Label" / "000.png", native)
    with pytest.raises(DataError, match=r"000\.png: label values \[15\]"):
        open_reader("fmb", root, "test")[0]


def test_fmb_real_three_channel_infrared():
    folder = need_shared("data", "fmb_unverified")
    with pytest.warns(UserWarning, match="Label"):
        r = open_reader("fmb", folder.parent, folder.name)
    s = r["00079"]
    assert s.visible.shape == (600, 800, 3) and s.infrared.shape == (600, 800)
    np.testing.assert_array_equal(s.infrared, np.asarray(Image.open(folder / "Infrared" / "00079.png"))[..., 0])


# --- LLVIP -----------------------------------------------------------------------------

VOC = """<annotation><size><width>16</width><height>12</height><depth>3</depth></size>
<object><name>person</name><bndbox><xmin>3</xmin><ymin>2</ymin><xmax>6</xmax><ymax>9</ymax></bndbox></object>
<object><name>Person</name><bndbox><xmin>10</xmin><ymin>1</ymin><xmax>20</xmax><ymax>4</ymax></bndbox></object>
</annotation>"""


def test_llvip_layout_with_voc_boxes(tmp_path):
    root = tmp_path / "LLVIP"
    for i in range(2):
        write_png(root / "visible" / "train" / f"{i:06d}.png", _rand((12, 16, 3), i))
        write_png(root / "infrared" / "train" / f"{i:06d}.png", _rand((12, 16, 3), 9))  # stored as RGB
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"{i:06d}.xml").write_text(VOC)
    r = open_reader("llvip", root, "train", labels_from_boxes=True)
    s = r["000000"]
    assert s.boxes == [Box(2, 2.0, 1.0, 6.0, 9.0, "person"), Box(2, 9.0, 0.0, 16.0, 4.0, "Person")]
    assert s.infrared.shape == (12, 16)
    assert s.label[1:9, 2:6].tolist() == np.full((8, 4), 2).tolist() and s.label[11, 0] == IGNORE_INDEX
    (root / "Annotations" / "000001.xml").unlink()
    with pytest.raises(DataError, match=r"000001\.png: no annotation"):
        open_reader("llvip", root, "train")


def test_llvip_real_samples():
    root = need_shared("data", "llvip")
    r = open_reader("llvip", root, "test")
    assert len(r) == _count_images(root / "visible" / "test") > 0
    assert len(open_reader("llvip", root, "train")) == _count_images(root / "visible" / "train") > 0
    s = r[0]
    assert s.visible.shape == (1024, 1280, 3) and s.infrared.shape == (1024, 1280) and s.boxes is None


# --- RoadScene and generic pairs -------------------------------------------------------


def test_roadscene_real_and_hash_split():
    root = need_shared("data", "roadscene")
    every = open_reader("roadscene", root, "all")
    train = open_reader("roadscene", root, "train")
    test = open_reader("roadscene", root, "test")
    assert len(every) == _count_images(root / "crop_LR_visible") > 0
    assert sorted(train.keys() + test.keys()) == every.keys() and not set(train.keys()) & set(test.keys())
    assert 0 < len(test) < len(every) / 2
    assert open_reader("roadscene", root, "test").keys() == test.keys()
    s = test[0]
    assert s.visible.shape[:2] == s.infrared.shape and s.visible.shape[2] == 3
    with pytest.raises(ConfigError, match="split"):
        open_reader("roadscene", root, "val")


def test_pairs_real_tno_and_palette_sets():
    tno_root = need_shared("data", "tno")
    tno = open_reader("pairs", tno_root, "all")
    assert len(tno) == _count_images(tno_root / "vi") > 0 and all(s.infrared.ndim == 2 for s in tno)
    folder = need_shared("data", "dspfusion_hybrid", "val")
    r = open_reader("pairs", folder, "val", vis_dir="VI_enhanced", ir_dir="IR_enhanced")
    assert r.keys() == ["00001D", "00025N", "010167", "01545D", "060430", "06307", "08835"]
    s = r["00001D"]
    np.testing.assert_array_equal(s.visible, np.asarray(Image.open(folder / "VI_enhanced" / "00001D.png").convert("RGB")))
    assert s.infrared.shape == (480, 640)


def test_pairs_visible_only_and_mixed_extensions(tmp_path):
    write_png(tmp_path / "vi" / "a.png", _rand((4, 5, 3)))
    (tmp_path / "ir").mkdir()
    Image.fromarray(_rand((4, 5), 1)).save(tmp_path / "ir" / "a.jpg")
    r = open_reader("pairs", tmp_path, "all")
    assert r.keys() == ["a"] and r[0].paths["infrared"].endswith("a.jpg")
    only = open_reader("pairs", tmp_path, "all", ir_dir=None)
    assert only[0].infrared is None
    write_png(tmp_path / "vi" / "a.jpg.png", _rand((4, 5, 3)))  # stem 'a.jpg' is a different key
    (tmp_path / "vi" / "notes.txt").write_text("ignored")
    assert open_reader("pairs", tmp_path, "all", ir_dir=None).keys() == ["a", "a.jpg"]


# --- errors shared by all readers ------------------------------------------------------


def test_missing_partner_error_and_skip(tmp_path):
    root = _pairs_layout(tmp_path / "d", n=3)
    (root / "ir" / "001.png").unlink()
    with pytest.raises(DataError, match=r"vi/001\.png: no infrared image"):
        open_reader("pairs", root, "all")
    with pytest.warns(UserWarning, match="001.png"):
        assert open_reader("pairs", root, "all", on_missing="skip").keys() == ["000", "002"]
    write_png(root / "ir" / "extra.png", _rand((12, 16)))
    write_png(root / "ir" / "001.png", _rand((12, 16)))
    with pytest.raises(DataError, match=r"ir/extra\.png: no visible image"):
        open_reader("pairs", root, "all")


def test_mismatched_sizes_error_and_resize(tmp_path):
    root = _pairs_layout(tmp_path / "d", n=1, size=(12, 16))
    write_png(root / "ir" / "000.png", _rand((24, 32)))
    r = open_reader("pairs", root, "all")
    with pytest.raises(DataError) as exc:
        r[0]
    msg = str(exc.value)
    assert "vi/000.png is 16×12" in msg and "ir/000.png is 32×24" in msg
    s = open_reader("pairs", root, "all", on_size_mismatch="resize")[0]
    assert s.infrared.shape == (12, 16)


def test_unreadable_file_raises_image_read_error(tmp_path):
    root = _pairs_layout(tmp_path / "d", n=2)
    (root / "ir" / "001.png").write_text("not an image")
    r = open_reader("pairs", root, "all")
    assert r[0].infrared.shape == (12, 16)  # lazy: only the bad pair fails
    with pytest.raises(ImageReadError, match=r"ir/001\.png"):
        r["001"]


def test_empty_dataset_and_bad_options(tmp_path):
    (tmp_path / "vi").mkdir()
    (tmp_path / "ir").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path}/vi: no image pairs"):
        open_reader("pairs", tmp_path, "all")
    with pytest.raises(DataError, match="root folder not found"):
        open_reader("msrs", tmp_path / "absent", "test")
    with pytest.raises(ConfigError, match="unknown reader kind"):
        open_reader("kaist", tmp_path, "test")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['vi_dir'\]"):
        open_reader("pairs", tmp_path, "all", vi_dir="x")
    with pytest.raises(ConfigError, match="on_missing"):
        open_reader("pairs", tmp_path, "all", on_missing="ignore")


def test_duplicate_stems_rejected(tmp_path):
    root = _pairs_layout(tmp_path / "d", n=1)
    Image.fromarray(_rand((12, 16, 3))).save(root / "vi" / "000.jpg")
    with pytest.raises(DataError, match=r"vi/000\.(png|jpg): two images share the name .000. \(000\.jpg and 000\.png\)"):
        open_reader("pairs", root, "all")


# --- boxes -----------------------------------------------------------------------------


def test_read_yolo_boxes_values_and_errors(tmp_path):
    p = tmp_path / "b.txt"
    p.write_text("2 0.5 0.5 0.5 0.25\n\n0 0.1 0.2 0.2 0.4\n")
    boxes = read_yolo_boxes(p, 200, 100, MSRS_BOX_TO_MFNET, names=MSRS_BOX_CLASSES)
    assert boxes == [Box(1, 50.0, 37.5, 150.0, 62.5, "car"), Box(2, 0.0, 0.0, 40.0, 40.0, "person")]
    for text, needle in (
        ("2 0.5 0.5 0.5\n", "expected 5 fields"),
        ("7 0.5 0.5 0.1 0.1\n", "class id 7"),
        ("1 320 240 40 80\n", "coordinates outside 0..1"),
        ("1 a b c d\n", "not numbers"),
    ):
        p.write_text("0 0.5 0.5 0.1 0.1\n" + text)
        with pytest.raises(DataError, match=rf"b\.txt:2: {needle}"):
            read_yolo_boxes(p, 200, 100, MSRS_BOX_TO_MFNET)
    with pytest.raises(DataError, match="missing.txt: annotation file not found"):
        read_yolo_boxes(tmp_path / "missing.txt", 10, 10, MSRS_BOX_TO_MFNET)


def test_read_voc_boxes_errors(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(VOC.replace("<name>Person</name>", "<name>dog</name>"))
    with pytest.raises(DataError, match=r"a\.xml: object 1 has class 'dog'"):
        read_voc_boxes(p, {"person": 2})
    p.write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"a\.xml: not valid XML"):
        read_voc_boxes(p, {"person": 2})


def test_rasterize_boxes_smaller_wins_and_pixel_centres():
    big = Box(1, 0, 0, 8, 6, "car")
    small = Box(2, 2, 1, 4, 3, "person")
    for order in ([big, small], [small, big]):
        m = rasterize_boxes(order, 6, 10)
        assert m.dtype == np.uint8
        assert (m[1:3, 2:4] == 2).all() and m[0, 0] == 1 and m[5, 7] == 1
        assert (m[:, 8:] == IGNORE_INDEX).all()
    m = rasterize_boxes([big], 6, 10, ignore_unboxed=False, background=0)
    assert (m[:, 8:] == 0).all() and int((m == 1).sum()) == 48
    # pixel i is inside when its centre i + 0.5 is: [1.4, 3.6) covers columns 1, 2, 3; [1.6, 3.4) only 2
    assert rasterize_boxes([Box(3, 1.4, 0, 3.6, 1, "bike")], 1, 6).tolist() == [[255, 3, 3, 3, 255, 255]]
    assert rasterize_boxes([Box(3, 1.6, 0, 3.4, 1, "bike")], 1, 6).tolist() == [[255, 255, 3, 255, 255, 255]]
    # a box thinner than a pixel still marks one pixel
    m = rasterize_boxes([Box(3, 2.1, 0, 2.3, 1, "bike")], 1, 6)
    assert m.tolist() == [[255, 255, 3, 255, 255, 255]]
    assert rasterize_boxes([], 2, 3).tolist() == [[255] * 3] * 2


def test_msrs_fixed_split_lists_scale_and_background_labels(tmp_path):
    """The real profile's reader: splits from msrs/splits/{train,val}.txt over the one test/
    folder, boxes rasterised with background outside them, train frames shrunk by `scale`."""
    root = need_shared("data", "msrs")
    box_dir = need_shared("data", "msrs_detection_labels", "fusion", "test")
    opts = dict(folder="test", names_file="splits/{split}.txt", boxes_dir=box_dir, labels_from_boxes=True,
                unboxed="background")
    listed = {s: [n.strip() for n in (root / "splits" / f"{s}.txt").read_text().splitlines() if n.strip()]
              for s in ("train", "val")}
    assert listed["train"] and listed["val"] and not set(listed["train"]) & set(listed["val"])  # premise
    val = open_reader("msrs", root, "val", **opts)
    assert val.keys() == sorted(listed["val"]) and val.split == "val"
    key = next(k for k in val.keys() if (box_dir / f"{k}.txt").read_text().strip())
    s = val[key]
    assert s.split == "val" and s.visible.shape == (480, 640, 3)
    np.testing.assert_array_equal(s.label, rasterize_boxes(s.boxes, 480, 640, ignore_unboxed=False))
    assert not (s.label == IGNORE_INDEX).any() and (s.label == 0).mean() > 0.5
    # scale 0.5: everything halves, boxes included; labels stay class ids
    half = open_reader("msrs", root, "val", scale=0.5, **opts)[key]
    assert half.visible.shape == (240, 320, 3) and half.infrared.shape == (240, 320) and half.label.shape == (240, 320)
    assert half.boxes[0].x1 == pytest.approx(s.boxes[0].x1 / 2) and half.boxes[0].y0 == pytest.approx(s.boxes[0].y0 / 2)
    assert set(np.unique(half.label)) <= set(np.unique(s.label))
    assert abs(float(half.infrared.mean()) - float(s.infrared.mean())) < 1.0
    # errors name the file and what is wrong
    bad = tmp_path / "names.txt"
    bad.write_text(f"{key}\nghost\n")
    with pytest.raises(DataError, match=r"names\.txt.*'ghost'"):
        open_reader("msrs", root, "val", **{**opts, "names_file": bad})
    with pytest.raises(DataError, match="names file not found"):
        open_reader("msrs", root, "val", **{**opts, "names_file": tmp_path / "none.txt"})
    with pytest.raises(ConfigError, match="scale"):
        open_reader("msrs", root, "val", scale=2.0, **opts)
    with pytest.raises(ConfigError, match="unboxed"):
        open_reader("msrs", root, "val", **{**opts, "unboxed": "sky"})
