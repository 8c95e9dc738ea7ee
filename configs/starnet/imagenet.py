"""The official StarNet / DemoNet ImageNet-1k recipes (Rewrite-the-Stars ``train_imagenet.py``, timm 0.6.13).

    python -m projects.starnet.train --config configs/starnet/imagenet.py:variant=s1 --workdir DIR \\
        --config.input.data_dir=~/tensorflow_datasets

StarNet (``variant=s050 .. s4``): global batch 2048 (8 GPUs x 256, lr not rescaled), AdamW lr 3e-3
wd 0.05, 300 epochs + 5 warmup (from 1e-6, laid over the cosine) + 10 cooldown at min_lr 1e-5,
stepped per epoch; RandAugment rand-m1-mstd0.5-inc1, mixup 0.8 + cutmix 0.2, label smoothing 0.1,
RandomErasing 0.25, drop path s1: 0, s2/s3: 0.01, s4: 0.02; no EMA. Eval: 224, bicubic, crop_pct 0.875.
BatchNorm: upstream used per-GPU statistics over 256 images; here statistics are global over the
data-parallel batch (sync-BN), which the README discusses.

DemoNet (``variant=demonet_d12_w192_mul`` etc., the registered ``demonet_d{depth}_w{width}_{sum|mul}``):
the README's ``-b 256 --lr 4e-3 --model-ema`` on 8 GPUs with the script's defaults otherwise, i.e.
global batch 2048, lr 4e-3, EMA 0.9998 every step, RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 +
cutmix 1.0, drop path 0 (the factories' default), the same schedule and min_lr 1e-5.
"""
import re

from configs import common

DROP_PATH = {"s050": 0.0, "s100": 0.0, "s150": 0.0, "s1": 0.0, "s2": 0.01, "s3": 0.01, "s4": 0.02}
DEMONET = re.compile(r"demonet_d\d+_w\d+_(sum|mul)")


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="s1", runlocal=False)
    if DEMONET.fullmatch(arg.variant):
        return common.imagenet_config(model=arg.variant, batch_size=2048, lr=4e-3, min_lr=1e-5,
                                      auto_augment="rand-m9-mstd0.5-inc1", cutmix_alpha=1.0, ema_decay=0.9998,
                                      runlocal=arg.runlocal)
    if arg.variant not in DROP_PATH:
        raise ValueError(f"unknown StarNet variant {arg.variant!r}; expected one of {sorted(DROP_PATH)} "
                         f"or demonet_d<depth>_w<width>_<sum|mul>")
    c = common.imagenet_config(model=f"starnet_{arg.variant}", batch_size=2048, lr=3e-3, min_lr=1e-5,
                               auto_augment="rand-m1-mstd0.5-inc1", cutmix_alpha=0.2, runlocal=arg.runlocal)
    c.model.kwargs.drop_path_rate = DROP_PATH[arg.variant]
    return c
