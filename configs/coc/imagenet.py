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
    c = common.imagenet_config(model=f"coc_{arg.variant}", batch_size=arg.batch, lr=1e-3 * arg.batch / 1024,
                               min_lr=1e-6, auto_augment="rand-m9-mstd0.5-inc1", cutmix_alpha=1.0, crop_pct=0.9,
                               runlocal=arg.runlocal)
    c.model.kwargs.drop_path_rate = arg.drop_path
    if arg.runlocal:  # 64x64 = 16 points per side: fold stage 0 only
        c.model.kwargs.fold = (2, 1, 1, 1)
    return c
