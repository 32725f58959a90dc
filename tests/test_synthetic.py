from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from magicfuse.data.boxes import read_yolo_boxes
from magicfuse.data.classes import CLASS_ID, MSRS_BOX_TO_MFNET, NUM_CLASSES
from magicfuse.data.synthetic import Scene, generate_scene, write_synthetic_dataset
from magicfuse.errors import ConfigError


def _boxes_overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _road_mask(scene: Scene) -> np.ndarray:
    mask = np.zeros(scene.label.shape, np.uint8)
    pts = np.round(np.asarray(scene.meta["road_polygon"])).astype(np.int32)
    cv2.fillPoly(mask, [pts], 1)
    return (mask == 1) & (scene.label == 0)


def test_same_seed_index_same_bytes_and_types():
    a = generate_scene(3, 17)
    b = generate_scene(3, 17)
    assert isinstance(a, Scene)
    assert a.visible.shape == (96, 128, 3) and a.visible.dtype == np.uint8
    assert a.infrared.shape == (96, 128) and a.infrared.dtype == np.uint8
    assert a.label.shape == (96, 128) and a.label.dtype == np.uint8
    assert a.visible.tobytes() == b.visible.tobytes()
    assert a.infrared.tobytes() == b.infrared.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.meta == b.meta
    json.dumps(a.meta)  # JSON-able


def test_different_index_or_seed_differs():
    a = generate_scene(3, 17)
    assert generate_scene(3, 18).visible.tobytes() != a.visible.tobytes()
    assert generate_scene(4, 17).visible.tobytes() != a.visible.tobytes()
    assert generate_scene(3, 18).infrared.tobytes() != a.infrared.tobytes()


def test_labels_in_range_and_classes_occur():
    seen = np.zeros(NUM_CLASSES, bool)
    times = set()
    for i in range(60):
        sc = generate_scene(1, i)
        assert sc.label.max() < NUM_CLASSES
        seen[np.unique(sc.label)] = True
        times.add(sc.meta["time"])
        counts = np.bincount(sc.label.ravel(), minlength=NUM_CLASSES)
        assert sc.meta["class_pixels"] == {
            name: int(counts[CLASS_ID[name]]) for name in CLASS_ID if counts[CLASS_ID[name]]
        }
    assert seen.all(), f"classes never drawn: {np.flatnonzero(~seen).tolist()}"
    assert times == {"day", "night"}


def test_thermal_model_people_and_running_cars_warm_sky_cold():
    checked = {"person": 0, "car": 0}
    for i in range(40):
        sc = generate_scene(7, i)
        ir = sc.infrared.astype(np.float64)
        road = ir[_road_mask(sc)].mean()
        sky = ir[: sc.meta["sky_rows"]].mean()
        assert sky + 40 < road, f"scene {i}: sky {sky:.1f} not colder than road {road:.1f}"
        objs = [o for o in sc.meta["objects"] if "box" in o]
        for k, o in enumerate(objs):
            warm = o["class"] == "person" or (o["class"] == "car" and o["moving"])
            if not warm or any(_boxes_overlap(o["box"], p["box"]) for p in objs[k + 1:]):
                continue  # only unoccluded warm objects
            x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
            sel = sc.label[y0:y1, x0:x1] == CLASS_ID[o["class"]]
            if sel.sum() < 30:
                continue
            mean = ir[y0:y1, x0:x1][sel].mean()
            assert mean > road, f"scene {i}: {o['class']} IR {mean:.1f} not warmer than road {road:.1f}"
            checked[o["class"]] += 1
    assert checked["person"] >= 10 and checked["car"] >= 10, checked


def test_night_visible_dark_but_infrared_informative():
    day, night = [], []
    for i in range(40):
        sc = generate_scene(2, i)
        (night if sc.meta["time"] == "night" else day).append(sc)
    assert day and night
    assert np.mean([s.visible.mean() for s in night]) < 0.5 * np.mean([s.visible.mean() for s in day])
    # infrared keeps its contrast at night
    assert np.mean([s.infrared.std() for s in night]) > 0.6 * np.mean([s.infrared.std() for s in day])


def test_parked_cars_cooler_than_running_and_vegetation_cool():
    running, parked = [], []
    for i in range(60):
        sc = generate_scene(9, i)
        t = sc.meta["temperatures"]
        assert t["veg"] < t["amb"] < t["road"] + 0.05
        objs = [o for o in sc.meta["objects"] if "box" in o]
        for k, o in enumerate(objs):
            if o["class"] != "car" or any(_boxes_overlap(o["box"], p["box"]) for p in objs[k + 1:]):
                continue
            x0, y0, x1, y1 = (int(round(v)) for v in o["box"])
            sel = sc.label[y0:y1, x0:x1] == CLASS_ID["car"]
            if sel.sum() >= 30:
                (running if o["moving"] else parked).append(sc.infrared[y0:y1, x0:x1][sel].mean())
    assert len(running) >= 10 and len(parked) >= 5
    assert np.mean(parked) + 20 < np.mean(running)


@pytest.mark.parametrize("h,w", [(30, 40), (48, 64), (96, 128), (120, 320), (480, 640)])
def test_sizes(h, w):
    sc = generate_scene(0, 5, height=h, width=w)
    assert sc.visible.shape == (h, w, 3)
    assert sc.infrared.shape == (h, w)
    assert sc.label.shape == (h, w)
    assert sc.label.max() < NUM_CLASSES
    assert sc.meta["height"] == h and sc.meta["width"] == w


def test_bad_arguments():
    with pytest.raises(ConfigError, match="too small"):
        generate_scene(0, 0, height=8, width=8)
    with pytest.raises(ConfigError, match="seed"):
        generate_scene(-1, 0)
    with pytest.raises(ConfigError, match="integer"):
        generate_scene(0, 1.5)  # type: ignore[arg-type]


def test_write_dataset_layout_roundtrip_and_idempotent(tmp_path):
    out = tmp_path / "syn"
    res = write_synthetic_dataset(out, seed=5, splits={"train": 3, "test": 2}, height=30, width=40, progress=False)
    assert res["files_written"] == 20  # vi, ir, label and boxes of 5 scenes
    n_boxes = 0
    index = json.loads((out / "scenes.json").read_text())
    assert set(index["scenes"]) == set(res["keys"]["train"]) | set(res["keys"]["test"])
    for split, keys in res["keys"].items():
        for i, key in enumerate(keys):
            assert key.startswith(f"syn_{split}_{i:06d}") and key[-1] in "DN"
            meta = index["scenes"][key]
            sc = generate_scene(5, meta["index"], height=30, width=40)
            vi = cv2.imread(str(out / split / "vi" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
            ir = cv2.imread(str(out / split / "ir" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
            lab = cv2.imread(str(out / split / "Segmentation_labels" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(cv2.cvtColor(vi, cv2.COLOR_BGR2RGB), sc.visible)
            assert ir.ndim == 2 and np.array_equal(ir, sc.infrared)
            assert lab.ndim == 2 and np.array_equal(lab, sc.label)
            # the YOLO boxes cover exactly the labelled people/bikes/cars, one box per region
            boxes = read_yolo_boxes(out / "boxes" / f"{key}.txt", 40, 30, MSRS_BOX_TO_MFNET)
            n_boxes += len(boxes)
            for cls in MSRS_BOX_TO_MFNET.values():
                covered = np.zeros_like(lab, dtype=bool)
                for b in (b for b in boxes if b.cls == cls):
                    y0, y1, x0, x1 = (int(round(v)) for v in (b.y0, b.y1, b.x0, b.x1))
                    assert (lab[y0:y1, x0:x1] == cls).any()
                    covered[y0:y1, x0:x1] = True
                assert covered[lab == cls].all()
                assert sum(b.cls == cls for b in boxes) == cv2.connectedComponents((lab == cls).astype(np.uint8))[0] - 1
    assert n_boxes > 0  # the premise: these scenes hold objects
    train_idx = {index["scenes"][k]["index"] for k in res["keys"]["train"]}
    test_idx = {index["scenes"][k]["index"] for k in res["keys"]["test"]}
    assert not train_idx & test_idx
    again = write_synthetic_dataset(out, seed=5, splits={"train": 3, "test": 2}, height=30, width=40, progress=False)
    assert again["files_written"] == 0 and again["files_unchanged"] == 20
    assert not list(out.rglob("*.tmp"))


def test_write_dataset_rejects_bad_splits(tmp_path):
    with pytest.raises(ConfigError, match="count"):
        write_synthetic_dataset(tmp_path, seed=0, splits={"train": -1}, progress=False)
    with pytest.raises(ConfigError, match="split name"):
        write_synthetic_dataset(tmp_path, seed=0, splits={"../x": 1}, progress=False)
