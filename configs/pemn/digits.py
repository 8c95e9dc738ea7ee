"""PEMN on the embedded handwritten digits (scikit-learn's, offline): one point of the paper's curve.

    python -m projects.pemn.train --config configs/pemn/digits.py:strategy=rp,ratio=1e-3 --workdir DIR

``strategy``: ``dense`` (ordinary trainable network), ``mask`` (masks on i.i.d. random weights),
``one_layer``, ``mp`` or ``rp`` (with ``ratio`` r and ``tiling`` copy/rand). ``model``: ``convmixer``
or ``vit`` of ``width``/``depth``. ``seed`` seeds everything, the frozen weights included.
"""
from configs import common

STRATEGIES = ("dense", "mask", "one_layer", "mp", "rp")


def get_config(arg=None):
    arg = common.parse_arg(arg, strategy="mask", ratio=1e-3, tiling="copy", keep=0.5, model="convmixer", width=64,
                           depth=4, image_size=16, epochs=15, seed=0, runlocal=False)
    if arg.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {arg.strategy!r}; expected one of {STRATEGIES}")
    if arg.model not in ("convmixer", "vit"):
        raise ValueError(f"unknown model {arg.model!r}; expected 'convmixer' or 'vit'")
    c = common.base_config()
    c.seed = arg.seed
    c.model.name = f"pemn_{arg.model}_{arg.width}_{arg.depth}"
    kwargs = dict(masked=arg.strategy != "dense", weight_seed=arg.seed)
    if arg.strategy != "dense":
        kwargs.update(keep=arg.keep, weight_strategy="iid" if arg.strategy == "mask" else arg.strategy,
                      rp_ratio=arg.ratio, rp_tiling=arg.tiling)
    if arg.model == "vit":
        kwargs["img_size"] = arg.image_size
    c.model.kwargs.update(kwargs)
    c.num_classes = 10
    c.input.dataset = "digits"
    c.input.image_size = arg.image_size
    c.input.crop_pct = 1.0
    c.input.scale = (0.6, 1.0)             # digits fill the frame: crop gently
    c.input.hflip = 0.0                    # a flipped digit is another digit
    c.input.batch_size = 64
    # PEMN trains scores with AdamW at a large lr (0.01-0.05, wd 0.005-0.01); the dense twin uses the same.
    c.lr, c.min_lr, c.warmup_epochs, c.cooldown_epochs, c.wd = 1e-2, 1e-5, 1, 0, 5e-3
    c.total_epochs = arg.epochs
    c.schedule_per_epoch = False
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.label_smoothing = 0.1
    c.log_every = 100
    c.checkpoint_every = 0                 # one checkpoint at the end
    if arg.runlocal:
        c.total_epochs, c.warmup_epochs, c.input.batch_size, c.log_every = 1, 0, 32, 5
    return c
