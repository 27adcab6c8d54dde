"""Image data for `--task image-classify`: where images are listed, how each is read, how a batch is preprocessed.

Sources (`--train`, `--eval`, `eval`/`predict`'s `--data`):
    a folder    root/CLASS/*.png|jpg|jpeg|bmp|gif|webp|tif|tiff: the sub-folder names are the classes (sorted)
    a file      .csv/.tsv/.jsonl/.json (softprompt.data.read_records): `--image-field` (default `image`) holds the
                path, relative to the file's own folder; `--label-field` the class (absent: unlabelled, predict)
Every image is opened with Pillow and converted to RGB (modes 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16,
I, F). A bad image (missing, unreadable, not an image, truncated, a mode with no RGB meaning) stops the run with
one line naming the file, and for a CSV/JSONL row its line: `data.csv:7: images/x.png: not an image`. With
--skip-bad-images it is skipped instead and counted (`ImageSet.skipped`, reported by the caller).
Preprocessing is the model's own image processor (transformers AutoImageProcessor, saved beside the model):
resize, crop, rescale, normalise, exactly as the model was trained; `processor_settings` is what a prompt file
records of it. Notation: B images, H x W pixels.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.data import DataError, read_records

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RGB_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I;16", "I", "F")


class BadImageError(DataError):
    """An image that cannot be used; the message is one line naming the file (and the list file's line)."""


@dataclass
class ImageRecord:
    path: str  # the image file
    label: str | None  # its class (None: unlabelled)
    where: str  # how an error names it: "list.csv:7: img/x.png", or the path itself for a folder tree


@dataclass
class ImageSet:
    """Preprocessed images: pixels (B, 3, H, W) float32 and their classes (indices into `classes`)."""

    pixels: torch.Tensor
    labels: list[int]
    classes: list[str]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)  # the bad images skipped (--skip-bad-images): one line each

    def __len__(self) -> int:
        return len(self.labels)


def list_images(source: str, *, image_field: str = "image", label_field: str = "label") -> list[ImageRecord]:
    """The images a folder tree or a CSV/JSONL file lists, in a fixed order (class, then file name)."""
    src = Path(source)
    if src.is_dir():
        classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{source}: an image folder needs one sub-folder per class (root/CLASS/*.png)")
        out = []
        for c in classes:
            for f in sorted((src / c).iterdir()):
                if f.is_file() and f.suffix.lower() in EXTENSIONS:
                    out.append(ImageRecord(str(f), c, str(f)))
        if not out:
            raise DataError(f"{source}: no images ({', '.join(EXTENSIONS)}) in its class folders")
        return out
    if not src.exists():
        raise DataError(f"{source}: no such folder or file")
    base = src.parent
    out = []
    for line, rec in read_records(source):
        if image_field not in rec or not rec[image_field].strip():
            raise DataError(f"{source}:{line}: no {image_field!r} field (--image-field names the image column)")
        p = rec[image_field].strip()
        path = p if os.path.isabs(p) else str(base / p)
        label = rec.get(label_field)
        out.append(ImageRecord(path, label if label not in (None, "") else None, f"{source}:{line}: {p}"))
    return out


def open_image(path: str, where: str | None = None) -> Any:
    """The image at `path` as an RGB PIL image, fully decoded; BadImageError naming `where` (default: path)."""
    name = where or path
    if not os.path.exists(path):
        raise BadImageError(f"{name}: image file not found")
    if not os.path.isfile(path):
        raise BadImageError(f"{name}: not a regular file")
    return decode_image(path, name)


def image_from_bytes(data: bytes, where: str) -> Any:
    """An uploaded image (the server's base64 or multipart bodies) -> RGB PIL image; BadImageError naming `where`."""
    import io

    return decode_image(io.BytesIO(data), where)


def decode_image(fp: Any, name: str) -> Any:
    """Decode a path or file object with Pillow, checked: RGB out, or one BadImageError line naming `name`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                im.load()  # decode now: a truncated file fails here, not inside the processor
                mode = im.mode
                if mode not in RGB_MODES:
                    raise BadImageError(f"{name}: image mode {mode!r} cannot be converted to RGB")
                if mode in ("I;16", "I", "F"):  # 16/32-bit greyscale: scale into 8 bits first
                    im = im.convert("F").point(lambda v: v / 256 if mode != "F" else v * 255).convert("L")
                return im.convert("RGB")
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImageError(f"{name}: truncated or corrupt image ({msg})") from None


def as_image(x: Any, where: str = "image") -> Any:
    """A PIL image (converted to RGB) or a path -> an RGB PIL image."""
    if isinstance(x, (str, os.PathLike)):
        return open_image(str(x))
    from PIL import Image

    if not isinstance(x, Image.Image):
        raise BadImageError(f"{where}: expected a PIL image or a path, got {type(x).__name__}")
    if x.mode not in RGB_MODES:
        raise BadImageError(f"{where}: image mode {x.mode!r} cannot be converted to RGB")
    return x if x.mode == "RGB" else x.convert("RGB")


def preprocess(images: list[Any], processor: Any) -> torch.Tensor:
    """RGB PIL images -> (B, 3, H, W) float32 through the model's own image processor."""
    return processor(images=images, return_tensors="pt")["pixel_values"].float()


def load_image_set(
    source: str,
    processor: Any,
    *,
    classes: list[str] | None = None,
    image_field: str = "image",
    label_field: str = "label",
    skip_bad: bool = False,
    labelled: bool = True,
    chunk: int = 64,
) -> ImageSet:
    """Read, check and preprocess every image `source` lists. `classes`: the class list to index into (a trained
    prompt's); None: the sorted classes found. A label outside `classes` is an error naming the row."""
    recs = list_images(source, image_field=image_field, label_field=label_field)
    if labelled:
        for r in recs:
            if r.label is None:
                raise DataError(f"{r.where}: no {label_field!r} (a labelled set needs one per image)")
    if classes is None:
        classes = sorted({r.label for r in recs if r.label is not None})
    index = {c: i for i, c in enumerate(classes)}
    ok: list[tuple[ImageRecord, Any]] = []
    skipped: list[str] = []
    for r in recs:
        try:
            ok.append((r, open_image(r.path, r.where)))
        except BadImageError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
        if r.label is not None and labelled and r.label not in index:
            raise DataError(f"{r.where}: class {r.label!r} is not one of the prompt's ({', '.join(classes)})")
    if not ok:
        raise DataError(f"{source}: no usable images ({len(skipped)} skipped)")
    pixels = torch.cat([preprocess([im for _, im in ok[i : i + chunk]], processor) for i in range(0, len(ok), chunk)])
    labels = [index[r.label] if r.label is not None and r.label in index else -1 for r, _ in ok]
    return ImageSet(pixels, labels, list(classes), [r.path for r, _ in ok], skipped)


def processor_settings(processor: Any) -> dict[str, Any]:
    """What a prompt file records of the image processor: its class and the settings that shape the pixels."""
    d = processor.to_dict()
    keep = ("image_processor_type", "size", "crop_size", "do_resize", "do_center_crop", "do_rescale",
            "rescale_factor", "do_normalize", "image_mean", "image_std", "resample", "do_convert_rgb")  # fmt: skip
    out = {k: d[k] for k in keep if k in d}
    out.setdefault("image_processor_type", type(processor).__name__)
    return json.loads(json.dumps(out, default=str))  # as the prompt file's header reads back (tuples: lists)
