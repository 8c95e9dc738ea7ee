"""Input pipelines: TF-free sources + grain + timm-style augmentation (host side only).

    from lib import data
    cfg = data.default_input_config()
    cfg.dataset, cfg.name = "tfds", "imagenet2012"       # or "digits" (offline), "imagefolder"
    cfg.auto_augment, cfg.reprob = "rand-m9-mstd0.5-inc1", 0.25
    train = data.make_pipeline(cfg, train=True, batch_size=per_process_batch, seed=0)
    it = iter(train)                                     # checkpointable grain DatasetIterator
    batch = next(it)                                     # numpy: image [b,H,W,3] f32, label [b] i32

Modules: :mod:`~lib.data.sources` (digits / tfds / imagefolder random-access sources),
:mod:`~lib.data.transforms` (numpy/PIL per-example transforms), :mod:`~lib.data.pipeline`
(grain pipelines, per-process sharding, eval padding with a ``valid`` mask). What runs on device
inside the step (Mixup/CutMix) belongs to the task: :mod:`lib.tasks.mixup`.
"""
from lib.data.pipeline import (DATASETS, VALID_KEY, DataSpec, Pipeline, default_input_config, make_pipeline,
                               make_source)
from lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, RandAugment, TrainTransform

__all__ = [
    "DATASETS", "VALID_KEY", "DataSpec", "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD", "Pipeline", "RandAugment",
    "TrainTransform", "default_input_config", "make_pipeline", "make_source",
]
