"""The official Context Cluster ImageNet-1k recipe (ma-xu/Context-Cluster ``train.py``, timm 0.6.13).

    python -m projects.coc.train --config configs/coc/imagenet.py:variant=tiny --workdir DIR \\
        --config.input.data_dir=~/tensorflow_datasets

Upstream: 8 GPUs x 128 = global batch 1024, ``lr = 1e-3 * batch / 1024`` (the README's rule; it
notes 2e-3 is sometimes better at 1024), AdamW wd 0.05 (no decay on 1-D parameters), 300 epochs
cosine + 5 warmup epochs from 1e-6 (laid over the cosine) + 10 cooldown epochs at min_lr 1e-6,
stepped per epoch; RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0, label smoothing 0.1,
RandomErasing 0.25; drop path 0.1 (the README's example; it gives no per-variant values); no EMA;
seed 42. Eval: 224, bicubic, crop_pct 0.9 (``default_cfg = model_small`` for every variant).
``batch=N`` rescales the learning rate by the rule above.
"""
from configs import common

VARIANTS = ("tiny", "tiny2", "tiny_plain", "small", "medium", "base_dim64", "base_dim96")


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="tiny", batch=1024, drop_path=0.1, runlocal=False)
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown Context Cluster variant {arg.variant!r}; expected one of {VARIANTS}")
    c = common.base_config()
    c.seed = 42
    c.model.name = f"coc_{arg.variant}"
    c.model.kwargs.drop_path_rate = arg.drop_path
    c.num_classes = 1000
    c.input.dataset = "tfds"
    c.input.name = "imagenet2012"
    c.input.image_size = 224
    c.input.crop_pct = 0.9
    c.input.interpolation = "random"
    c.input.auto_augment = "rand-m9-mstd0.5-inc1"
    c.input.reprob = 0.25
    c.input.batch_size = arg.batch
    c.lr, c.min_lr, c.wd = 1e-3 * arg.batch / 1024, 1e-6, 0.05
    c.warmup_epochs, c.warmup_lr, c.total_epochs, c.cooldown_epochs = 5, 1e-6, 300, 10
    c.schedule_per_epoch = True
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha = 0.8, 1.0
    c.label_smoothing = 0.1
    c.ema_decay = 0.0
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    if arg.runlocal:  # a few steps on a laptop: tiny batches, small images (64 = 16 points per side)
        c.input.batch_size, c.input.image_size, c.total_steps = 8, 64, 5
        c.model.kwargs.fold = (2, 1, 1, 1)
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 5
    return c
