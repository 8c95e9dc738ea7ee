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

Distillation (``c.distill``, implemented in ``lib.train.distill``): upstream distils every variant
except s_conv from a RegNetY-160 with alpha 0.9 and tau 1. RegNetY-160 is not in our zoo, so
``teacher`` is empty by default (plain training); set ``teacher`` to a zoo model with
``teacher_weights`` (an official PyTorch checkpoint or a ``zoo.save_weights`` directory), or
``teacher_logits`` to a ``.npy`` of precomputed logits of any teacher.
"""
import ml_collections

from configs import common

# variant: drop path rate hard-coded in the upstream factory
DROP_PATH = {"xxs": 0.0, "xs": 0.0, "s": 0.02, "s_conv": 0.02}


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="xxs", runlocal=False)
    if arg.variant not in DROP_PATH:
        raise ValueError(f"unknown EfficientMod variant {arg.variant!r}; expected one of {sorted(DROP_PATH)}")
    c = common.base_config()
    c.model.name = f"efficientmod_{arg.variant}"
    c.model.kwargs.drop_path_rate = DROP_PATH[arg.variant]
    c.num_classes = 1000
    c.input.dataset = "tfds"
    c.input.name = "imagenet2012"
    c.input.image_size = 224
    c.input.interpolation = "random"
    c.input.auto_augment = "rand-m9-mstd0.5-inc1"
    c.input.reprob = 0.25
    c.input.batch_size = 2048
    c.lr, c.min_lr, c.wd = 4e-3, 1e-5, 0.05
    c.warmup_epochs, c.warmup_lr, c.total_epochs, c.cooldown_epochs = 5, 1e-6, 300, 10
    c.schedule_per_epoch = True
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha = 0.8, 1.0
    c.label_smoothing = 0.1
    c.ema_decay = 0.9998
    # Soft distillation as upstream (alpha 0.9, tau 1). The recipe's RegNetY-160 teacher is not in
    # the zoo: pass a converted checkpoint of a zoo model (teacher + teacher_weights) or precomputed
    # logits (teacher_logits). teacher="" trains without a teacher.
    c.distill = ml_collections.ConfigDict(dict(
        teacher="",
        teacher_weights=ml_collections.config_dict.placeholder(str),
        teacher_logits=ml_collections.config_dict.placeholder(str),
        alpha=0.9,
        tau=1.0,
    ))
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    if arg.runlocal:  # a few steps on a laptop: tiny batches, small images
        c.input.batch_size, c.input.image_size, c.total_steps = 8, 64, 5
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 5
    return c
