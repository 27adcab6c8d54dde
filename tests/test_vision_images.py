"""Image data (softprompt.vision.images): folder trees and CSV/JSONL lists, every kind of bad image named in one line
(or skipped and counted), modes converted to RGB, preprocessing = the model's own image processor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_vision import image_folder, quadrant_image, tiny_processor

from softprompt.data import DataError
from softprompt.vision.images import (
    BadImageError,
    as_image,
    list_images,
    load_image_set,
    open_image,
    preprocess,
    processor_settings,
)


def test_folder_tree_order_and_classes(tmp_path):
    root = image_folder(tmp_path / "t", classes=("zebra", "ant"), per_class=2)
    (root / "ant" / "notes.txt").write_text("not listed")
    recs = list_images(str(root))
    assert [(r.label, r.path.rsplit("/", 1)[1]) for r in recs] == [
        ("ant", "0.png"), ("ant", "1.png"), ("zebra", "0.png"), ("zebra", "1.png")]  # fmt: skip
    with pytest.raises(DataError, match="no images .* in its class folders"):
        list_images(str(tmp_path))  # one level too high: its "class" t/ holds folders, not images
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="one sub-folder per class"):
        list_images(str(empty))


def test_csv_and_jsonl_paths_are_relative_to_the_file(tmp_path):
    image_folder(tmp_path / "img", classes=("a", "b"), per_class=1)
    (tmp_path / "l.csv").write_text("path,y\nimg/a/0.png,a\nimg/b/0.png,b\n")
    recs = list_images(str(tmp_path / "l.csv"), image_field="path", label_field="y")
    assert [r.path for r in recs] == [str(tmp_path / "img/a/0.png"), str(tmp_path / "img/b/0.png")]
    assert recs[1].where == f"{tmp_path / 'l.csv'}:3: img/b/0.png"
    (tmp_path / "l.jsonl").write_text(json.dumps({"image": "img/a/0.png"}) + "\n" + json.dumps({"x": 1}) + "\n")
    with pytest.raises(DataError, match=r"l.jsonl:2: no 'image' field \(--image-field"):
        list_images(str(tmp_path / "l.jsonl"))


def test_bad_images_one_line_each(tmp_path):
    good = tmp_path / "g.png"
    quadrant_image(0, 0).save(good)
    cases = {
        "missing.png": (None, "image file not found"),
        "text.png": (b"hello", "not an image"),
        "cut.png": (good.read_bytes()[:200], "truncated or corrupt image"),
    }
    for name, (data, msg) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImageError) as e:
            open_image(str(tmp_path / name))
        assert msg in str(e.value) and name in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(BadImageError, match="not a regular file"):
        open_image(str(tmp_path / "dir.png"))
    with pytest.raises(BadImageError, match="image mode 'HSV' cannot be converted"):
        as_image(Image.new("HSV", (4, 4)))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    grey = quadrant_image(1, 0).convert("L")
    im = quadrant_image(1, 0).convert("L" if mode in ("I;16", "1") else mode)
    if mode == "I;16":  # the grey image at 16 bits: v * 256
        im = Image.fromarray(np.asarray(grey).astype("uint16") * 256)
    elif mode == "1":
        im = im.convert("1")
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    out = open_image(str(path))
    assert out.mode == "RGB" and out.size == (32, 32)
    if mode == "I;16":  # 16-bit grey scaled back into 8 bits (v * 256 / 256), not clipped to white
        assert np.array_equal(np.asarray(out.convert("L")), np.asarray(grey))


def test_skip_bad_images_counts_and_preprocess_is_the_processors(tmp_path):
    root = image_folder(tmp_path / "t", classes=("a", "b"), per_class=2)
    (root / "a" / "bad.png").write_bytes(b"x")
    proc = tiny_processor("vit")
    with pytest.raises(BadImageError, match="bad.png: not an image"):
        load_image_set(str(root), proc)
    s = load_image_set(str(root), proc, skip_bad=True)
    assert len(s) == 4 and len(s.skipped) == 1 and "bad.png" in s.skipped[0]
    assert s.classes == ["a", "b"] and s.labels == [0, 0, 1, 1]
    ims = [open_image(p) for p in s.paths]
    torch.testing.assert_close(s.pixels, proc(images=ims, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(preprocess(ims, proc), s.pixels)
    st = processor_settings(proc)
    assert st["size"] == {"height": 32, "width": 32} and st["image_mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(DataError, match="class 'b' is not one of the prompt's"):
        load_image_set(str(root), proc, classes=["a", "c"], skip_bad=True)
