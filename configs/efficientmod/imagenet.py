"""The official EfficientMod ImageNet-1k recipe (ma-xu/EfficientMod ``train.py``, timm 0.6.13).

    python -m projects.efficientmod.train --config configs/efficientmod/imagenet.py:variant=xxs \\
        --workdir DIR --config.input.data_dir=~/tensorflow_datasets

Upstream command: ``-b 256 --lr 4e-3 --amp --model-ema --distillation-type soft --distillation-tau 1``
on 8 GPUs, i.e. global batch 2048 with lr 4e-3 (not rescaled). Script defaults otherwise: AdamW
wd 0.05, 300 epochs cosine + 5 warmup (from 1e-6, laid over the cosine) + 10 cooldown at min_lr
1e-5, stepped per epoch; RandAugment rand-m9-mstd0.5-inc1, mixup 0.8 + cutmix 1.0, label smoothing
0.1, RandomErasing 0.25; EMA 0.9998 every step (the EMA weights are evaluated and pick the best
checkpoint). Drop path: the factories hard-code 0 (xxs, xs) and 0.02 (s, s_conv). Eval: 224,
bicubic, crop_pct 0.875.

Distillation (``c.distill``, implemented in ``lib.tasks.distillation``): upstream distils every variant
except s_conv from a RegNetY-160 with alpha 0.9 and tau 1. RegNetY-160 is not in our zoo, so
``teacher`` is empty by default (plain training); set ``teacher`` to a zoo model with
``teacher_weights`` (an official PyTorch checkpoint or a ``zoo.save_weights`` directory), or
``teacher_logits`` to a ``.npy`` of precomputed logits of any teacher.
"""
from configs import common

# variant: drop path rate hard-coded in the upstream factory
DROP_PATH = {"xxs": 0.0, "xs": 0.0, "s": 0.02, "s_conv": 0.02}


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="xxs", runlocal=False)
    if arg.variant not in DROP_PATH:
        raise ValueError(f"unknown EfficientMod variant {arg.variant!r}; expected one of {sorted(DROP_PATH)}")
    c = common.imagenet_config(model=f"efficientmod_{arg.variant}", batch_size=2048, lr=4e-3, min_lr=1e-5,
                               auto_augment="rand-m9-mstd0.5-inc1", cutmix_alpha=1.0, ema_decay=0.9998,
                               runlocal=arg.runlocal)
    c.model.kwargs.drop_path_rate = DROP_PATH[arg.variant]
    # Soft distillation as upstream (alpha 0.9, tau 1). The recipe's RegNetY-160 teacher is not in
    # the zoo: pass a converted checkpoint of a zoo model (teacher + teacher_weights) or precomputed
    # logits (teacher_logits). With neither it trains without a teacher.
    c.distill.alpha, c.distill.tau = 0.9, 1.0
    return c
