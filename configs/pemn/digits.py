"""PEMN on the embedded handwritten digits (scikit-learn's, offline): one point of the paper's curve.

    python -m projects.pemn.train --config configs/pemn/digits.py:strategy=rp,ratio=1e-3 --workdir DIR

``strategy``: ``dense`` (ordinary trainable network), ``mask`` (masks on i.i.d. random weights),
``one_layer``, ``mp`` or ``rp`` (with ``ratio`` r and ``tiling`` copy/rand). ``model``: ``convmixer``
or ``vit`` of ``width``/``depth``. ``seed`` seeds everything, the frozen weights included.

As PEMN's ``src/convmixer/train.py``: AdamW over every trainable parameter (the BatchNorm affines
are decayed too: ``decay_1d_params``), plain cross-entropy (no label smoothing, no mixup), and its
per-step learning rate ``np.interp(t, [0, E*2//5, E*4//5, E], [0, lr, lr/20, 0])`` at ``t = (step+1) /
steps_per_epoch`` (``lr_schedule="piecewise_linear"``, no separate warmup; ``min_lr`` unused). The
batch, epochs and augmentation are the digits adaptation (README table).
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
    # PEMN trains scores with AdamW at a large lr (0.01-0.05, wd 0.005-0.01); the dense twin uses the same.
    c = common.digits_config(model=f"pemn_{arg.model}_{arg.width}_{arg.depth}", image_size=arg.image_size,
                             epochs=arg.epochs, lr=1e-2, warmup_epochs=0, runlocal=arg.runlocal)
    c.seed = arg.seed
    c.wd = 5e-3
    c.decay_1d_params = True               # torch.optim.AdamW(model.parameters()): no exempt group
    c.label_smoothing = 0.0                # nn.CrossEntropyLoss()
    c.lr_schedule = "piecewise_linear"     # upstream lr_schedule: 0 -> lr at 2E//5 -> lr/20 at 4E//5 -> 0, per step
    kwargs = dict(masked=arg.strategy != "dense", weight_seed=arg.seed)
    if arg.strategy != "dense":
        kwargs.update(keep=arg.keep, weight_strategy="iid" if arg.strategy == "mask" else arg.strategy,
                      rp_ratio=arg.ratio, rp_tiling=arg.tiling)
    if arg.model == "vit":
        kwargs["img_size"] = arg.image_size
    c.model.kwargs.update(kwargs)
    c.log_every = 100
    c.checkpoint_every = 0                 # one checkpoint at the end
    if arg.runlocal:
        c.log_every = 5
    return c
