"""The official FCViT ImageNet-1k recipe (ma-xu/FCViT ``train.py``, timm-0.6.13 style; README).

    python -m projects.fcvit.train --config configs/fcvit/imagenet.py:variant=tiny --workdir DIR \\
        --config.input.data_dir=~/tensorflow_datasets

Global batch 1024 (8 GPUs x 128) with lr 1e-3 (README: lr = batch / 1024 * 1e-3), AdamW wd 0.05
(no decay on 1-D parameters), 300 epochs cosine + 5 warmup epochs from 1e-6 (laid over the cosine)
+ 10 cooldown epochs at min_lr 1e-6, stepped per epoch (``schedules.json``: ``fcvit``);
RandAugment rand-m9-mstd0.5-inc1, random train interpolation, mixup 0.8 + cutmix 1.0, label
smoothing 0.1, RandomErasing 0.25; drop path tiny/b12/b24: 0.1, b48: 0.2; no EMA.
Eval: 224, bicubic, crop_pct 0.9 (tiny, b12) or 0.95 (b24, b48), the models' ``default_cfg``.
``batch=N`` rescales the learning rate by the README's rule, ``lr = 1e-3 * batch / 1024``.
BatchNorm (stem and reducers): upstream used per-GPU statistics over 128 images; here statistics
are global over the data-parallel batch (sync-BN) unless ``batch_groups`` is set on the BatchNorms.
"""
from configs import common

# variant: (drop path rate, eval crop_pct)
VARIANTS = {"tiny": (0.1, 0.9), "b12": (0.1, 0.9), "b24": (0.1, 0.95), "b48": (0.2, 0.95)}


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="tiny", batch=1024, runlocal=False)
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown FCViT variant {arg.variant!r}; expected one of {sorted(VARIANTS)}")
    drop_path, crop_pct = VARIANTS[arg.variant]
    c = common.imagenet_config(model=f"fcvit_{arg.variant}", batch_size=arg.batch, lr=1e-3 * arg.batch / 1024,
                               min_lr=1e-6, auto_augment="rand-m9-mstd0.5-inc1", cutmix_alpha=1.0,
                               crop_pct=crop_pct, runlocal=arg.runlocal)
    c.model.kwargs.drop_path_rate = drop_path
    return c
