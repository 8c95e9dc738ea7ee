"""The grain input pipeline: a config in, per-process batches of numpy arrays out.

    from lib import data
    cfg = data.default_input_config()          # then cfg.dataset = "tfds"; cfg.name = "imagenet2012" ...
    train = data.make_pipeline(cfg, train=True, batch_size=128, seed=0)
    it = iter(train)                           # a grain DatasetIterator: it.get_state() / it.set_state()
    batch = next(it)                           # {"image": f32 [128, H, W, 3], "label": i32 [128]} (+ "valid" in eval)

Per process ``p`` of ``P``, the split is strided: examples ``p, p + P, p + 2P, ...``.

* Train: shards are cut to the same length ``N // P`` (so every process runs the same number of
  steps per epoch), shuffled with a seed derived from ``(seed, p)``, augmented with per-example
  randomness (grain ``random_map``: the generator is seeded by the example's position in the
  stream), batched with ``drop_remainder`` and repeated forever; each epoch is reshuffled and
  re-augmented. The stream is a pure function of ``(config, seed, p, P, position)``, so restoring a
  saved iterator state resumes on exactly the batches an uninterrupted run would have seen.
* Eval: a single ordered pass over the whole shard. Every process yields the same number of
  full batches, ``ceil(ceil(N / P) / batch_size)``; padding examples are zeros (for every key) with ``valid`` 0.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
from ml_collections import config_dict

from lib.data import sources, transforms

DATASETS = ("digits", "tfds", "imagefolder", "photos")


def default_input_config() -> ml_collections.ConfigDict:
    """The ``input`` section of a training config, with timm's ImageNet recipe defaults."""
    return ml_collections.ConfigDict(dict(
        dataset="digits",                          # "digits" | "tfds" | "imagefolder" | "photos"
        name=config_dict.placeholder(str),         # TFDS dataset name, e.g. "imagenet2012"
        data_dir=config_dict.placeholder(str),     # TFDS data dir (None: TFDS default) / image-folder root
        train_split="train",
        val_split=config_dict.placeholder(str),    # None: "validation" (digits, tfds) / "val" (imagefolder)
        image_size=224,
        crop_pct=0.875,                            # eval: resize to image_size / crop_pct, center crop
        interpolation="bicubic",                   # "bicubic" | "bilinear" | "random" (train only)
        scale=(0.08, 1.0),                         # RandomResizedCrop area fraction
        ratio=(3 / 4, 4 / 3),                      # RandomResizedCrop aspect ratio
        hflip=0.5,
        auto_augment=config_dict.placeholder(str),  # e.g. "rand-m9-mstd0.5-inc1"; None: off
        reprob=0.0,                                # RandomErasing probability
        remode="pixel",                            # RandomErasing fill: "pixel" | "rand" | "const"
        mean=transforms.IMAGENET_MEAN,
        std=transforms.IMAGENET_STD,
        num_workers=0,                             # grain worker processes (0: in-process threads)
        num_threads=8,                             # threads per process, each preparing a whole batch
        prefetch=8,                                # batches prepared ahead (at least num_threads)
        shuffle=True,
        train_classes=(),                          # keep only these labels in the training split (() = all)
        grayscale=False,                           # photos: grey crops (3 channels)
    ))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a pipeline yields, for the trainer (all counts are per process)."""

    num_examples: int          # real examples of the split in this process's shard
    batch_size: int            # examples per batch in this process
    steps_per_epoch: int       # train: num_examples // batch_size; eval: batches of one pass
    num_classes: int | None    # what the source reports (its ``num_classes``), None when it has none
    process_index: int
    process_count: int


class Pipeline:
    """An iterable of batches; ``iter()`` returns a fresh grain ``DatasetIterator``.

    Train pipelines are infinite and their iterators checkpointable (``get_state`` / ``set_state``,
    or ``grain.checkpoint.CheckpointSave`` with orbax). Eval pipelines make one pass per ``iter()``.
    """

    def __init__(self, dataset: grain.IterDataset, spec: DataSpec, *, train: bool):
        self.dataset = dataset
        self.spec = spec
        self.train = train

    num_examples = property(lambda self: self.spec.num_examples)
    steps_per_epoch = property(lambda self: self.spec.steps_per_epoch)
    num_classes = property(lambda self: self.spec.num_classes)
    batch_size = property(lambda self: self.spec.batch_size)

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset)

    def __len__(self) -> int:
        if self.train:
            raise TypeError("a training pipeline repeats forever; use steps_per_epoch")
        return self.spec.steps_per_epoch

    def __repr__(self) -> str:
        return f"Pipeline(train={self.train}, {self.spec})"


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """Attribute access that tolerates missing fields (configs from before a field existed)."""
    return getattr(cfg, name, default) if not isinstance(cfg, dict) else cfg.get(name, default)


def split_of(cfg: Any, *, train: bool) -> str:
    """The split a train or eval pipeline reads (eval default: "validation", or "val" for image folders)."""
    if train:
        return _get(cfg, "train_split", "train")
    split = _get(cfg, "val_split")
    if split:
        return split
    return "val" if _get(cfg, "dataset") == "imagefolder" else "validation"


def validate_config(cfg: Any, *, batch_size: int, check_dataset: bool = True) -> None:
    """Raise a clear error for a config that cannot work, before any data is touched.

    ``check_dataset=False`` skips the checks of ``dataset`` / ``name`` / ``data_dir`` (used when
    the caller supplies its own source). Text configs (:mod:`lib.data.text`) are checked there.
    """
    if _is_text(cfg):
        from lib.data import text
        text.validate_text_config(cfg, batch_size=batch_size, check_path=check_dataset)
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size (per process) must be a positive int, got {batch_size!r}")
    if check_dataset:
        kind = _get(cfg, "dataset")
        if kind not in DATASETS:
            raise ValueError(f"input.dataset must be one of {DATASETS}, got {kind!r}")
        data_dir = _get(cfg, "data_dir")
        if kind == "imagefolder" and not data_dir:
            raise ValueError("dataset='imagefolder' needs input.data_dir, the root holding <split>/<class>/<image>")
        if kind == "tfds" and not _get(cfg, "name"):
            raise ValueError("dataset='tfds' needs input.name, the TFDS dataset name (e.g. 'imagenet2012')")
        if kind in ("tfds", "imagefolder") and data_dir and not Path(data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"input.data_dir {data_dir} does not exist (dataset={kind!r})")
    image_size = _get(cfg, "image_size")
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"input.image_size must be a positive int, got {image_size!r}")
    transforms.eval_resize_size(image_size, _get(cfg, "crop_pct", 0.875))  # checks crop_pct
    transforms._check_interpolation(_get(cfg, "interpolation", "bicubic"))
    for key in ("mean", "std"):
        value = _get(cfg, key, ())
        if len(value) != 3:
            raise ValueError(f"input.{key} needs 3 (RGB) values, got {value!r}")
    if _get(cfg, "num_workers", 0) < 0:
        raise ValueError(f"input.num_workers must be >= 0, got {_get(cfg, 'num_workers')}")
    if _get(cfg, "remode", "pixel") not in transforms.ERASE_MODES:
        raise ValueError(f"input.remode must be one of {transforms.ERASE_MODES}, got {_get(cfg, 'remode')!r}")
    if _get(cfg, "auto_augment"):
        transforms.RandAugment.from_string(_get(cfg, "auto_augment"))  # raises ValueError if malformed


def _is_text(cfg: Any) -> bool:
    from lib.data.text import TEXT_DATASETS  # text imports this module: import when called
    return _get(cfg, "dataset") in TEXT_DATASETS


def make_source(cfg: Any, split: str):
    """The random-access source of a whole split (not yet sharded) for ``cfg.dataset``; for a
    text dataset (:mod:`lib.data.text`), the list of the split's records."""
    kind = _get(cfg, "dataset")
    if _is_text(cfg):
        from lib.data import text
        return text.load_split(cfg, train=split == _get(cfg, "train_split", "train"))
    source = _image_source(cfg, kind, split)
    if split == _get(cfg, "train_split", "train") and _get(cfg, "train_classes", ()):
        source = sources.ClassSubset(source, _get(cfg, "train_classes"))
    return source


def _image_source(cfg: Any, kind: str, split: str):
    if kind in ("digits", "photos"):   # built-in sources: "train" and "validation" (alias "val")
        split = "validation" if split in ("val", "validation") else split
        if kind == "digits":
            return sources.DigitsSource(split)
        return sources.SamplePhotoCrops(split, grayscale=bool(_get(cfg, "grayscale", False)))
    if kind == "tfds":
        data_dir = _get(cfg, "data_dir")
        data_dir = str(Path(data_dir).expanduser()) if data_dir else None
        return sources.TfdsSource(_get(cfg, "name"), split, data_dir=data_dir)
    if kind == "imagefolder":
        root = Path(_get(cfg, "data_dir")).expanduser()
        # Label ids come from the training split's classes, so train and eval agree.
        classes = sources.list_classes(root / _get(cfg, "train_split", "train"))
        return sources.ImageFolderSource(root, split, classes=classes)
    raise ValueError(f"input.dataset must be one of {DATASETS}, got {kind!r}")


def _process_seed(seed: int, process_index: int) -> int:
    # Distinct per process so that hosts do not apply identical crops to their (different) images.
    return int(np.random.SeedSequence([int(seed) % 2**32, process_index]).generate_state(1)[0])


def _read_options(cfg: Any) -> grain.ReadOptions:
    # Batching happens inside the MapDataset, so grain's buffer counts *batches*: keep it small
    # (grain's default of 500 would hold hundreds of full batches), but no smaller than the
    # thread count, or threads sit idle.
    threads = max(1, int(_get(cfg, "num_threads", 8)))
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, int(_get(cfg, "prefetch", 8))))


def _finish(ds: grain.MapDataset, cfg: Any) -> grain.IterDataset:
    it_ds = ds.to_iter_dataset(_read_options(cfg))
    num_workers = int(_get(cfg, "num_workers", 0))
    if num_workers > 0:
        # grain's worker processes read absl flags; outside absl.app (pytest, notebooks, plain
        # scripts) they were never parsed, so take the defaults rather than crash.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it_ds


VALID_KEY = "valid"  # eval batches: 1.0 for real examples, 0.0 for the padding that fills the last batch


class _KeepSideData:
    """Wrap an example transform so every key of the example that the transform does not produce
    (side data a source attaches, e.g. a teacher's precomputed logits) passes through unchanged."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, example: dict[str, Any], *rng: np.random.Generator) -> dict[str, Any]:
        out = self.transform(example, *rng)
        return {**{k: v for k, v in example.items() if k not in out and k not in _CONSUMED}, **out}


# Keys a transform turns into others (an encoded image becomes a decoded, normalised one).
_CONSUMED = ("image", "label")


def _mark_valid(example: dict[str, Any]) -> dict[str, Any]:
    return {**example, VALID_KEY: np.float32(1.0)}


class _Constant:
    """A random-access source repeating one element (the eval padding)."""

    def __init__(self, element: Any, length: int):
        self._element, self._length = element, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        return self._element


def make_pipeline(input_cfg: Any, *, train: bool, batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  source: Any | None = None) -> Pipeline:
    """Build the train (infinite, shuffled, augmented) or eval (one padded pass) pipeline.

    Args:
      input_cfg: the ``input`` config (see :func:`default_input_config`); attribute access.
      train: training pipeline if True, evaluation pipeline otherwise.
      batch_size: examples per batch *in this process* (global batch / process count).
      seed: pipeline seed (shuffling and augmentation); unused by eval pipelines.
      process_index, process_count: this process's shard; default ``jax.process_index()`` /
        ``jax.process_count()``.
      source: a random-access source of the whole split to use instead of the one
        ``input_cfg.dataset`` names (custom or synthetic data); the transforms still come from
        ``input_cfg``.

    Returns:
      A :class:`Pipeline` yielding dicts of numpy arrays: ``image`` float32 ``[b, H, W, 3]``
      (normalised), ``label`` int32 ``[b]``, any side data the source attaches, and in eval batches
      ``valid`` float32 ``[b]`` (0 marks the padding of the last batch).
    """
    if _is_text(input_cfg):  # token rows instead of images: lib.data.text (tokenizer from input_cfg.tokenizer)
        from lib.data import text
        return text.make_text_pipeline(input_cfg, train=train, batch_size=batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count, records=source)
    validate_config(input_cfg, batch_size=batch_size, check_dataset=source is None)
    if process_index is None or process_count is None:
        import jax
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")

    cfg = input_cfg
    split = split_of(cfg, train=train)
    if source is None:
        source = make_source(cfg, split)
    total = len(source)
    image_size = int(_get(cfg, "image_size"))
    mean, std = tuple(_get(cfg, "mean")), tuple(_get(cfg, "std"))
    num_classes = getattr(source, "num_classes", None)
    # Strided shard of this process: examples process_index, process_index + P, ...
    shard = grain.MapDataset.source(source)[process_index::process_count]

    if train:
        per_process = total // process_count
        if per_process < batch_size:
            raise ValueError(f"split {split!r} has {total} examples: {per_process} per process, fewer than "
                             f"one batch of {batch_size}")
        shard = shard[:per_process]  # equal shards: every process has the same steps per epoch
        aa = _get(cfg, "auto_augment")
        # timm fills geometric RandAugment ops with the mean pixel.
        fill = tuple(min(255, round(255 * m)) for m in mean)
        transform = transforms.TrainTransform(
            image_size=image_size, scale=tuple(_get(cfg, "scale")), ratio=tuple(_get(cfg, "ratio")),
            interpolation=_get(cfg, "interpolation"), hflip=float(_get(cfg, "hflip", 0.5)),
            rand_augment=(transforms.RandAugment.from_string(aa, fill=fill, interpolation=_get(cfg, "interpolation"))
                          if aa else None),
            reprob=float(_get(cfg, "reprob", 0.0)), remode=_get(cfg, "remode", "pixel"), mean=mean, std=std)
        ds = shard.seed(_process_seed(seed, process_index))
        if _get(cfg, "shuffle", True):
            ds = ds.shuffle()
        # random_map before batch/repeat: batching and repeating pass the absolute stream position
        # down, so epoch e re-seeds both the shuffle and the augmentation of every example.
        ds = ds.random_map(_KeepSideData(transform)).batch(batch_size, drop_remainder=True).repeat()
        spec = DataSpec(num_examples=per_process, batch_size=batch_size, steps_per_epoch=per_process // batch_size,
                        num_classes=num_classes, process_index=process_index,
                        process_count=process_count)
        return Pipeline(_finish(ds, cfg), spec, train=True)

    transform = transforms.EvalTransform(image_size=image_size, crop_pct=float(_get(cfg, "crop_pct", 0.875)),
                                         interpolation=_get(cfg, "interpolation"), mean=mean, std=std)
    ds = shard.map(_KeepSideData(transform)).map(_mark_valid)
    # Same number of batches on every process (collectives in the eval step must line up).
    num_batches = math.ceil(math.ceil(total / process_count) / batch_size)
    num_padding = num_batches * batch_size - len(shard)
    if num_padding:  # zeros shaped like a real example, whatever its keys, marked invalid
        first = ds[0] if len(shard) else _mark_valid(_KeepSideData(transform)(source[0]))
        pad = {k: np.zeros_like(v) for k, v in first.items()}
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source(_Constant(pad, num_padding))])
    ds = ds.batch(batch_size, drop_remainder=False)
    spec = DataSpec(num_examples=len(shard), batch_size=batch_size, steps_per_epoch=num_batches,
                    num_classes=num_classes, process_index=process_index,
                    process_count=process_count)
    return Pipeline(_finish(ds, cfg), spec, train=False)
