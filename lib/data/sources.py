"""Random-access image-classification sources: ``len(src)`` and ``src[i] -> {"image", "label"}``.

``image`` is either a uint8 ``HxWxC`` array (C in 1, 3, 4) or the encoded bytes of an image file;
:func:`lib.data.transforms.to_pil` accepts both, so decoding happens in the (possibly
multi-process) grain workers rather than when a source is built. ``label`` is a Python int.

Sources hold only the whole split; the per-process shard is taken by the pipeline (index striding),
so every kind of source is sharded the same way and ``process_index`` can be simulated in tests.

===============  ==================================================================================
``digits``       scikit-learn's bundled 8x8 digits (1797 images, 10 classes): offline smoke tests
``tfds``         any TFDS dataset prepared as ArrayRecord, read with ``tfds.data_source`` (no TF)
``imagefolder``  ``root/<split>/<class>/<image>``, class names sorted to label ids
``photos``       random crops of scikit-learn's two sample photographs (label: which photo), a
                 proxy dataset that shares nothing with a task's own images
===============  ==================================================================================
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DigitsSource:
    """scikit-learn's ``load_digits`` as uint8 RGB ``8x8x3`` images with a fixed held-out split.

    A permutation seeded with ``split_seed`` puts ``num_validation`` images in ``"validation"``
    and the rest in ``"train"``; it depends on nothing else, so the split never changes.
    """

    SPLITS = ("train", "validation")
    num_classes = 10

    def __init__(self, split: str = "train", *, num_validation: int = 300, split_seed: int = 0):
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        if split not in self.SPLITS:
            raise ValueError(f"digits has splits {self.SPLITS}, got {split!r}")
        digits = load_digits()
        # 0..16 intensities -> 0..255, grey -> RGB (the models expect 3 channels).
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self._images = np.repeat(images[..., None], 3, axis=-1)
        order = np.random.default_rng(split_seed).permutation(len(images))
        # Positions in load_digits() of this split's images, in increasing order.
        self.indices = np.sort(order[:num_validation] if split == "validation" else order[num_validation:])
        self._labels = digits.target.astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self.indices[index]
        return {"image": self._images[i], "label": int(self._labels[i])}

    def __repr__(self) -> str:
        return f"DigitsSource(len={len(self)})"


class TfdsSource:
    """A TFDS split in ArrayRecord format through ``tfds.data_source`` (TensorFlow not needed).

    Only ``image`` and ``label`` are kept: other features (file names, bounding boxes) have
    varying shapes or string types that cannot be batched.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds

        if not name:
            raise ValueError("dataset='tfds' needs input.name, the TFDS dataset name (e.g. 'imagenet2012')")
        try:
            # download=False: preparing a dataset is an offline step, never a side effect of training.
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
            where = data_dir if data_dir is not None else "the default TFDS data dir"
            # tfds's message lists every registered dataset; keep only the informative lines.
            reason = "\n".join(line for line in str(e).splitlines() if not line.startswith("\t- "))
            raise FileNotFoundError(
                f"could not open TFDS dataset {name!r} split {split!r} in {where} as ArrayRecord: "
                f"{type(e).__name__}: {reason}\n"
                f"Prepare it offline with: tfds build {name} --file_format=array_record"
                + (f" --data_dir={data_dir}" if data_dir is not None else "")) from e
        self._image_key, self._label_key = image_key, label_key
        info = getattr(self._source, "dataset_info", None)
        label = info.features[label_key] if info is not None and label_key in info.features else None
        self.num_classes: int | None = getattr(label, "num_classes", None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": record[self._image_key], "label": int(record[self._label_key])}

    def __repr__(self) -> str:
        return f"TfdsSource({self._source!r})"


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class names (the sub-directories) of an image-folder split."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f"image folder split directory {split_dir} does not exist; expected the layout "
            f"<root>/<split>/<class>/<image>.jpg (e.g. {split_dir}/cat/0001.jpg)")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir} has no class sub-directories; expected the layout "
                         f"<root>/<split>/<class>/<image>.jpg")
    return classes


class ImageFolderSource:
    """``root/<split>/<class>/*.{jpg,png,...}`` read as encoded bytes (decoded in the transforms).

    ``classes`` fixes the label ids; pass the training split's classes when reading the validation
    split so that both agree even if validation lacks a class. By default the split's own
    sub-directories, sorted, are the classes (as timm / torchvision ``ImageFolder``).
    """

    def __init__(self, root: str | os.PathLike, split: str, *, classes: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist; expected the layout "
                                    f"{root}/<split>/<class>/<image>.jpg")
        split_dir = root / split
        found = list_classes(split_dir)
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{split_dir} has classes {unknown} that are not among the {len(self.classes)} "
                             f"known classes (those of the training split)")
        label_of = {name: i for i, name in enumerate(self.classes)}
        files: list[tuple[str, int]] = []
        for name in found:
            for path in sorted((split_dir / name).rglob("*")):
                if _is_image(path):
                    files.append((str(path), label_of[name]))
        if not files:
            raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {split_dir}/<class>/; "
                             f"expected the layout {root}/<split>/<class>/<image>.jpg")
        self._files = files
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._files[index]
        return {"image": Path(path).read_bytes(), "label": label}

    def __repr__(self) -> str:
        return f"ImageFolderSource(len={len(self)}, classes={self.num_classes})"


class SamplePhotoCrops:
    """Random crops of scikit-learn's two bundled photographs (``china.jpg``, ``flower.jpg``, 640x427).

    Example ``i`` is a fixed crop (its own random generator, seeded by the split and ``i``): photo
    ``i % 2``, a square of log-uniform side between ``min_side`` and ``max_side`` pixels at a uniform
    position, resized to ``size`` (bicubic); ``grayscale`` turns it grey (kept 3 channels), to share a
    grey task's colour statistics and nothing else. ``label`` is the photo. A miniature of the
    "single image" proxy dataset of data-free distillation: the student sees textures and edges,
    never the task's images.
    """

    SPLITS = ("train", "validation")
    PHOTOS = ("china.jpg", "flower.jpg")
    num_classes = 2

    def __init__(self, split: str = "train", *, num_examples: int | None = None, size: int = 32,
                 min_side: int = 16, max_side: int = 256, grayscale: bool = False):
        from sklearn.datasets import load_sample_image  # bundled with scikit-learn: no download

        if split not in self.SPLITS:
            raise ValueError(f"photos has splits {self.SPLITS}, got {split!r}")
        if not 0 < min_side <= max_side <= 427:
            raise ValueError(f"photo crops need 0 < min_side <= max_side <= 427, got {min_side}, {max_side}")
        self.split, self.size, self.grayscale = split, int(size), bool(grayscale)
        self.num_examples = int(num_examples or (1500 if split == "train" else 300))
        self.min_side, self.max_side = min_side, max_side
        self._photos = [load_sample_image(name) for name in self.PHOTOS]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng((self.SPLITS.index(self.split), int(index)))
        photo = self._photos[index % 2]
        side = int(round(np.exp(rng.uniform(np.log(self.min_side), np.log(self.max_side)))))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side])
        if self.grayscale:
            crop = crop.convert("L").convert("RGB")
        image = np.asarray(crop.resize((self.size, self.size), Image.Resampling.BICUBIC))
        return {"image": image, "label": index % 2}

    def __repr__(self) -> str:
        return f"SamplePhotoCrops({self.split}, len={len(self)}, size={self.size}, grayscale={self.grayscale})"


class ClassSubset:
    """The examples of ``source`` whose label is in ``classes`` (``input.train_classes``): train or
    distil on some classes, probe on the others."""

    def __init__(self, source: Any, classes: Sequence[int]):
        self.source, self.classes = source, tuple(int(c) for c in classes)
        labels = [int(source[i]["label"]) for i in range(len(source))]
        self.indices = np.flatnonzero(np.isin(labels, self.classes))
        if not len(self.indices):
            raise ValueError(f"input.train_classes={self.classes}: no training example has one of these labels")
        self.num_classes = getattr(source, "num_classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[index])]
