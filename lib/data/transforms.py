"""Per-example image transforms in numpy / PIL with timm's semantics.

Training (timm ``transforms_imagenet_train``)::

    RandomResizedCrop -> horizontal flip -> RandAugment -> to float, normalise -> RandomErasing

Evaluation (timm ``transforms_imagenet_eval``)::

    resize the shorter side to floor(size / crop_pct) -> center crop size x size -> normalise

Every random decision draws from a ``numpy.random.Generator`` passed in by the caller (never from
the global ``random`` / ``np.random`` state). The pipeline gets that generator from grain's
``random_map``, which seeds it from (pipeline seed, example position in the stream), so a resumed
run re-creates exactly the augmented examples an uninterrupted one would have seen.

The RandAugment ops, their magnitude-to-argument mappings and their random choices follow timm's
``auto_augment.py`` (``rand_augment_transform``), including its quirks (e.g. ``Posterize`` at a
low level keeps 0 bits), so that recipes tuned with timm transfer unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
INTERPOLATIONS = (*_RESAMPLE, "random")
# timm's 'random' interpolation: a per-call choice between these two.
_RANDOM_RESAMPLE = (Image.BILINEAR, Image.BICUBIC)


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")


def _resample(interpolation: str, rng: np.random.Generator | None) -> int:
    """PIL resampling filter for a name; 'random' draws bilinear or bicubic from ``rng``."""
    if interpolation == "random":
        if rng is None:
            raise ValueError("interpolation='random' needs an rng")
        return _RANDOM_RESAMPLE[int(rng.integers(len(_RANDOM_RESAMPLE)))]
    _check_interpolation(interpolation)
    return _RESAMPLE[interpolation]


# ------------------------------------------------------------------------------------------------
# Decoding

def to_pil(image: Any) -> Image.Image:
    """An RGB PIL image from encoded bytes, a PIL image or a uint8 ``HxW`` / ``HxWxC`` array.

    Grey, palette and RGBA inputs become RGB (alpha is dropped), as timm's loader does.
    """
    if isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pil = Image.open(io.BytesIO(image))
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {array.dtype}")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {array.shape}")
        pil = Image.fromarray(array)
    return pil if pil.mode == "RGB" else pil.convert("RGB")


# ------------------------------------------------------------------------------------------------
# Geometry

def random_resized_crop_params(width: int, height: int, rng: np.random.Generator, *,
                               scale: Sequence[float] = (0.08, 1.0),
                               ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop, timm's ``RandomResizedCropAndInterpolation.get_params``.

    Up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    if none fits, a center crop of the whole image clamped to the ratio range.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator, *,
                        scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                        interpolation: str = "bicubic") -> Image.Image:
    """Crop with :func:`random_resized_crop_params` and resize to ``size x size``."""
    top, left, h, w = random_resized_crop_params(img.width, img.height, rng, scale=scale, ratio=ratio)
    resample = _resample(interpolation, rng)
    # resize(box=...) crops and resizes in one pass, like torchvision's resized_crop.
    return img.resize((size, size), resample, box=(left, top, left + w, top + h))


def resize_shorter_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(int)``: long side truncated)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _resample(interpolation, None))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central ``size x size`` window (torchvision rounding of the offsets)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center crop {size} larger than the image {w}x{h}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """Shorter-side size before the center crop: ``floor(image_size / crop_pct)`` as in timm."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return int(math.floor(image_size / crop_pct))


# ------------------------------------------------------------------------------------------------
# RandAugment

_LEVEL_DENOM = 10.0  # magnitudes live on timm's 0..10 scale


def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


# Level functions: (magnitude, rng, image) -> arguments of the op. Image-relative translation
# needs the image size, hence the third argument.
def _no_args(m, rng, img):
    return ()


def _rotate_args(m, rng, img):
    return (_negate(m / _LEVEL_DENOM * 30.0, rng),)


def _enhance_args(m, rng, img):
    return (m / _LEVEL_DENOM * 1.8 + 0.1,)


def _enhance_increasing_args(m, rng, img):
    return (max(0.1, 1.0 + _negate(m / _LEVEL_DENOM * 0.9, rng)),)


def _shear_args(m, rng, img):
    return (_negate(m / _LEVEL_DENOM * 0.3, rng),)


def _translate_rel_args(m, rng, img):
    return (_negate(m / _LEVEL_DENOM * 0.45, rng),)


def _posterize_args(m, rng, img):
    return (int(m / _LEVEL_DENOM * 4),)


def _posterize_increasing_args(m, rng, img):
    return (4 - int(m / _LEVEL_DENOM * 4),)


def _solarize_args(m, rng, img):
    return (min(256, int(m / _LEVEL_DENOM * 256)),)


def _solarize_increasing_args(m, rng, img):
    return (256 - min(256, int(m / _LEVEL_DENOM * 256)),)


def _solarize_add_args(m, rng, img):
    return (min(128, int(m / _LEVEL_DENOM * 110)),)


# Ops: (img, *args, fill, resample) -> img. fill / resample only matter for geometric ops.
def _affine(img, coeffs, fill, resample):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _solarize_add(img, add, fill, resample, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img, bits, fill, resample):
    if bits >= 8:
        return img
    if bits <= 0:
        # Keeping 0 bits is black. timm relies on older Pillow doing this; current Pillow raises.
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits)


_OPS: dict[str, tuple[Callable, Callable]] = {
    "AutoContrast": (lambda img, fill, resample: ImageOps.autocontrast(img), _no_args),
    "Equalize": (lambda img, fill, resample: ImageOps.equalize(img), _no_args),
    "Invert": (lambda img, fill, resample: ImageOps.invert(img), _no_args),
    "Rotate": (lambda img, deg, fill, resample: img.rotate(deg, resample=resample, fillcolor=fill), _rotate_args),
    "Posterize": (_posterize, _posterize_args),
    "PosterizeIncreasing": (_posterize, _posterize_increasing_args),
    "Solarize": (lambda img, t, fill, resample: ImageOps.solarize(img, t), _solarize_args),
    "SolarizeIncreasing": (lambda img, t, fill, resample: ImageOps.solarize(img, t), _solarize_increasing_args),
    "SolarizeAdd": (_solarize_add, _solarize_add_args),
    "Color": (lambda img, f, fill, resample: ImageEnhance.Color(img).enhance(f), _enhance_args),
    "ColorIncreasing": (lambda img, f, fill, resample: ImageEnhance.Color(img).enhance(f), _enhance_increasing_args),
    "Contrast": (lambda img, f, fill, resample: ImageEnhance.Contrast(img).enhance(f), _enhance_args),
    "ContrastIncreasing": (lambda img, f, fill, resample: ImageEnhance.Contrast(img).enhance(f),
                           _enhance_increasing_args),
    "Brightness": (lambda img, f, fill, resample: ImageEnhance.Brightness(img).enhance(f), _enhance_args),
    "BrightnessIncreasing": (lambda img, f, fill, resample: ImageEnhance.Brightness(img).enhance(f),
                             _enhance_increasing_args),
    "Sharpness": (lambda img, f, fill, resample: ImageEnhance.Sharpness(img).enhance(f), _enhance_args),
    "SharpnessIncreasing": (lambda img, f, fill, resample: ImageEnhance.Sharpness(img).enhance(f),
                            _enhance_increasing_args),
    "ShearX": (lambda img, s, fill, resample: _affine(img, (1, s, 0, 0, 1, 0), fill, resample), _shear_args),
    "ShearY": (lambda img, s, fill, resample: _affine(img, (1, 0, 0, s, 1, 0), fill, resample), _shear_args),
    "TranslateXRel": (lambda img, p, fill, resample: _affine(img, (1, 0, p * img.width, 0, 1, 0), fill, resample),
                      _translate_rel_args),
    "TranslateYRel": (lambda img, p, fill, resample: _affine(img, (1, 0, 0, 0, 1, p * img.height), fill, resample),
                      _translate_rel_args),
}

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ('Cutout' is RandomErasing instead).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                       "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                       "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: ``num_layers`` ops drawn with replacement, each applied with ``prob``.

    Each applied op perturbs ``magnitude`` with ``N(0, magnitude_std)`` noise (``inf``: uniform in
    ``[0, magnitude]``), clips it to ``[0, magnitude_max or 10]``, and maps it to the op's argument.
    Geometric ops fill uncovered pixels with ``fill`` (timm: the mean pixel) and resample with
    ``interpolation`` ('random': bilinear or bicubic per op).
    """

    ops: tuple[str, ...] = RAND_OPS
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    prob: float = 0.5
    fill: tuple[int, int, int] = (128, 128, 128)
    interpolation: str = "random"

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in _OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(_OPS)}")
        _check_interpolation(self.interpolation)

    @classmethod
    def from_string(cls, config_str: str, *, fill: Sequence[int] = (128, 128, 128),
                    interpolation: str = "random") -> RandAugment:
        """Parse a timm string ``rand-m9-n2-mstd0.5-mmax10-inc1-p0.5`` (sections in any order).

        ``m`` magnitude (default 10), ``n`` ops per image (2), ``mstd`` magnitude noise std (>100
        means uniform), ``mmax`` magnitude upper bound, ``inc1`` the increasing-severity op set,
        ``p`` per-op probability (0.5).
        """
        sections = config_str.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand-', got {config_str!r}")
        kwargs: dict[str, Any] = {}
        for section in sections[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", section)
            if match is None:
                raise ValueError(f"bad RandAugment section {section!r} in {config_str!r}; expected sections "
                                 f"like m9, n2, mstd0.5, mmax10, inc1, p0.5")
            key, value = match.group(1), float(match.group(2))
            if key == "m":
                kwargs["magnitude"] = value
            elif key == "n":
                kwargs["num_layers"] = int(value)
            elif key == "mstd":
                kwargs["magnitude_std"] = math.inf if value > 100 else value
            elif key == "mmax":
                kwargs["magnitude_max"] = value
            elif key == "inc":
                kwargs["ops"] = RAND_INCREASING_OPS if value else RAND_OPS
            elif key == "p":
                kwargs["prob"] = value
        return cls(fill=tuple(int(v) for v in fill), interpolation=interpolation, **kwargs)

    def _magnitude(self, rng: np.random.Generator) -> float:
        m = self.magnitude
        if self.magnitude_std == math.inf:
            m = rng.uniform(0.0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return float(np.clip(m, 0.0, self.magnitude_max or _LEVEL_DENOM))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        chosen = rng.integers(len(self.ops), size=self.num_layers)
        for index in chosen:
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            op, level_fn = _OPS[self.ops[index]]
            args = level_fn(self._magnitude(rng), rng, img)
            resample = _resample(self.interpolation, rng)
            img = op(img, *args, fill=self.fill, resample=resample)
        return img


# ------------------------------------------------------------------------------------------------
# Float stages

@functools.lru_cache(maxsize=16)
def _normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``[256, C]`` float32 table: the normalised value of every uint8 level, per channel."""
    std32 = np.asarray(std, np.float32)
    levels = np.arange(256, dtype=np.float32)[:, None]
    return (levels * (1.0 / (255.0 * std32)) - np.asarray(mean, np.float32) / std32).astype(np.float32)


def normalize(image: np.ndarray | Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """uint8 RGB -> float32 ``(x / 255 - mean) / std`` (mean/std on the 0..1 scale).

    A per-channel lookup table: the input has only 256 levels, and a gather is ~3x faster than
    float arithmetic over the whole image.
    """
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ValueError(f"normalize expects a uint8 image, got {x.dtype}")
    lut = _normalize_lut(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    out = np.empty(x.shape, np.float32)
    for c in range(x.shape[-1]):
        out[..., c] = lut[:, c][x[..., c]]
    return out


ERASE_MODES = ("pixel", "rand", "const")


def random_erasing(x: np.ndarray, rng: np.random.Generator, *, prob: float = 0.25,
                   area: Sequence[float] = (0.02, 1 / 3), aspect: Sequence[float] = (0.3, 1 / 0.3),
                   mode: str = "pixel") -> np.ndarray:
    """timm ``RandomErasing`` on a normalised float ``HxWxC`` image (modified in place and returned).

    With probability ``prob``, one rectangle of ``area`` fraction (uniform) and log-uniform aspect
    ratio is replaced by per-pixel N(0, 1) noise ('pixel'), one per-channel normal colour ('rand')
    or zeros ('const'). Up to 10 tries to fit it; if none fits nothing is erased.
    """
    if mode not in ERASE_MODES:
        raise ValueError(f"random erasing mode must be one of {ERASE_MODES}, got {mode!r}")
    if prob <= 0.0 or rng.random() > prob:
        return x
    height, width, channels = x.shape
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(10):
        target_area = rng.uniform(area[0], area[1]) * height * width
        ratio = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * ratio)))
        w = int(round(math.sqrt(target_area / ratio)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            if mode == "pixel":
                fill = rng.standard_normal((h, w, channels), dtype=np.float32)
            elif mode == "rand":
                fill = rng.standard_normal((1, 1, channels), dtype=np.float32)
            else:
                fill = np.float32(0.0)
            x[top:top + h, left:left + w] = fill
            break
    return x


# ------------------------------------------------------------------------------------------------
# Whole-example transforms used by the pipeline (picklable, for grain worker processes)

def _as_example(image: np.ndarray, label: Any) -> dict[str, np.ndarray]:
    return {"image": image, "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """``(example, rng) -> example``: the timm training chain; plug into ``MapDataset.random_map``."""

    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    rand_augment: RandAugment | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        img = to_pil(example["image"])
        img = random_resized_crop(img, self.image_size, rng, scale=self.scale, ratio=self.ratio,
                                  interpolation=self.interpolation)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        x = normalize(img, self.mean, self.std)
        if self.reprob > 0:
            x = random_erasing(x, rng, prob=self.reprob, mode=self.remode)
        return _as_example(x, example["label"])


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """``example -> example``: shorter side to ``floor(size / crop_pct)``, center crop, normalise."""

    image_size: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
        # 'random' is a training-time augmentation; evaluation is deterministic (bicubic).
        interpolation = "bicubic" if self.interpolation == "random" else self.interpolation
        img = to_pil(example["image"])
        img = resize_shorter_side(img, eval_resize_size(self.image_size, self.crop_pct), interpolation)
        img = center_crop(img, self.image_size)
        return _as_example(normalize(img, self.mean, self.std), example["label"])
