"""Shared config pieces: big_vision's ``parse_arg`` and the training defaults every recipe starts from."""
from __future__ import annotations

import ml_collections

from lib import data


def parse_arg(arg: str | None, lazy: bool = False, **spec):
    """Parse ``"variant=s1,runlocal"`` (the part after ``config.py:``) against typed defaults.

    ``spec`` gives each known key's default; its type converts the string. A bare word is a
    boolean True. Unknown keys are an error, so a typo never goes unnoticed.
    """
    out = ml_collections.ConfigDict(dict(spec))
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in spec:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(spec)}")
        default = spec[key]
        if not value:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            out[key] = value
        else:
            out[key] = type(default)(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    """Defaults for :func:`lib.train.loop.run`; recipes override what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"                # lib.tasks: what the run optimises and measures
    c.model = ml_collections.ConfigDict(dict(name="starnet_s1", kwargs=ml_collections.ConfigDict()))
    c.num_classes = 1000
    c.trainable = ()                          # path regexes narrowing what is trained (empty: all parameters)
    c.input = data.default_input_config()
    c.input.batch_size = 2048                 # global batch, over all processes and devices
    c.mesh = [("data", -1)]                   # data parallel over every device
    c.sharding_rules = [("batch", "data")]    # FSDP: add ("out_channels", "data"), ("classes", "data")
    c.optimizer = "adamw"
    c.lr = 3e-3
    c.min_lr = 1e-5
    c.warmup_lr = 1e-6
    c.warmup_epochs = 5
    c.total_epochs = 300
    c.cooldown_epochs = 10
    c.total_steps = 0                         # 0: derived from the epochs
    c.schedule_per_epoch = True               # timm's per-epoch stepping, as the official runs
    c.wd = 0.05
    c.momentum = 0.9                          # SGD only
    c.grad_clip = ml_collections.config_dict.placeholder(float)
    c.decay_1d_params = False                 # True: weight decay on biases and norms too (torch SGD over all params)
    c.grad_accum_steps = 1
    c.label_smoothing = 0.1
    c.mixup = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5))
    c.ema_decay = 0.0
    # Soft distillation (lib.tasks.distillation): a zoo teacher (+ weights) or precomputed logits; off when both empty.
    c.distill = ml_collections.ConfigDict(dict(teacher="", teacher_weights="", teacher_kwargs=ml_collections.ConfigDict(),
                                               teacher_logits="", alpha=0.9, tau=1.0))
    c.log_every = 50
    c.eval_every = 0                          # 0: only at the end
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.init_from = ml_collections.config_dict.placeholder(str)
    c.init_from_ema = False                   # take a PyTorch training checkpoint's state_dict_ema
    c.init_from_reinit = r"^head"             # keys init_from may lack or mis-shape (a classifier for other classes)
    c.eval_only = False
    c.compute_dtype = "float32"               # "bfloat16": mixed precision (params, norms, losses stay float32)
    c.conv_impl = "auto"                      # "auto" | "xla" | "fast": see lib.layers.conv.set_conv_impl
    return c


def imagenet_config(*, model: str, batch_size: int, lr: float, min_lr: float, auto_augment: str,
                    cutmix_alpha: float, crop_pct: float = 0.875, ema_decay: float = 0.0,
                    runlocal: bool = False) -> ml_collections.ConfigDict:
    """The timm-0.6.13 ImageNet-1k recipe every paper here trained with; a recipe passes what differs.

    Shared: AdamW wd 0.05 (no decay on 1-D parameters), 300 epochs cosine + 5 warmup epochs from
    1e-6 (laid over the cosine) + 10 cooldown epochs at ``min_lr``, stepped per epoch; random train
    interpolation, RandomErasing 0.25, mixup 0.8, label smoothing 0.1; seed 42 (the scripts'
    default); eval at 224, bicubic.
    ``runlocal``: a few steps on a laptop (tiny batches, 64x64 images).
    """
    c = base_config()
    c.seed = 42                               # timm train.py's --seed default, which no recipe overrides
    c.model.name = model
    c.num_classes = 1000
    c.input.dataset = "tfds"
    c.input.name = "imagenet2012"
    c.input.image_size = 224
    c.input.crop_pct = crop_pct
    c.input.interpolation = "random"
    c.input.auto_augment = auto_augment
    c.input.reprob = 0.25
    c.input.batch_size = batch_size
    c.lr, c.min_lr, c.wd = lr, min_lr, 0.05
    c.warmup_epochs, c.warmup_lr, c.total_epochs, c.cooldown_epochs = 5, 1e-6, 300, 10
    c.schedule_per_epoch = True
    c.mixup.mixup_alpha, c.mixup.cutmix_alpha = 0.8, cutmix_alpha
    c.label_smoothing = 0.1
    c.ema_decay = ema_decay
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    if runlocal:
        c.input.batch_size, c.input.image_size, c.total_steps = 8, 64, 5
        c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 5
    return c


def digits_config(*, model: str, image_size: int, epochs: int, lr: float, min_lr: float = 1e-5,
                  warmup_epochs: int = 2, runlocal: bool = False) -> ml_collections.ConfigDict:
    """Training on the embedded handwritten digits (scikit-learn's, offline, 1497 train / 300 val).

    Batch 64, no mixup/cutmix (a digit blended with another is not a useful target here), label
    smoothing 0.1, gentle crops (digits fill the frame), no flips (a flipped digit is another
    digit), the schedule stepped per step. ``runlocal``: one short epoch.
    """
    c = base_config()
    c.model.name = model
    c.num_classes = 10
    c.input.dataset = "digits"
    c.input.image_size = image_size
    c.input.crop_pct = 1.0
    c.input.scale = (0.6, 1.0)
    c.input.hflip = 0.0
    c.input.batch_size = 64
    c.lr, c.min_lr, c.warmup_epochs, c.cooldown_epochs = lr, min_lr, warmup_epochs, 0
    c.total_epochs = epochs
    c.schedule_per_epoch = False
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.label_smoothing = 0.1
    c.log_every = 50
    c.checkpoint_every = 200
    if runlocal:
        c.total_epochs, c.warmup_epochs, c.input.batch_size, c.log_every = 1, 0, 32, 5
    return c


def lm_config(*, model: str, init_from: str | None = None, dataset: str = "arithmetic", path: str | None = None,
              tokenizer: str | None = None, max_length: int = 512, batch_size: int = 128, epochs: int = 2,
              lr: float = 2e-5, warmup_ratio: float = 0.03, compute_dtype: str = "float32",
              fsdp: bool = False) -> ml_collections.ConfigDict:
    """Causal-LM fine-tuning (SFT) in open-instruct's form, the recipe Mask Fine-Tuning and SoupLM
    start from: AdamW, no weight decay, linear warmup over ``warmup_ratio`` of the steps then linear
    decay to 0, gradient clipping at 1.0, loss on the assistant tokens of packed chat rows.

    ``model``: a zoo name (``smollm2_135m``, ``llama2_7b``, ...); ``init_from``: the weights to
    start from (an HF directory, a ``.gguf`` file or a cached hub id); ``tokenizer`` defaults to
    ``init_from``'s (``"bytes"``: a built-in byte tokenizer, for tests).
    """
    c = base_config()
    c.task = "causal_lm"
    c.z_loss = 0.0
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict(dict(remat="full"))
    c.init_from = init_from
    c.init_from_reinit = ""
    from lib.data import text
    c.input = text.default_text_config()
    c.input.dataset, c.input.path, c.input.max_length = dataset, path, max_length
    c.input.tokenizer = tokenizer if tokenizer is not None else init_from
    c.input.batch_size = batch_size
    c.mesh = [("data", -1)]
    c.sharding_rules = [list(r) for r in (("batch", "data"), ("embed", "data"))] if fsdp else [["batch", "data"]]
    c.optimizer = "adamw"
    c.lr, c.wd, c.grad_clip = lr, 0.0, 1.0
    c.lr_schedule, c.warmup_ratio, c.warmup_epochs = "linear", warmup_ratio, 0
    c.total_epochs, c.cooldown_epochs = epochs, 0
    c.schedule_per_epoch = False
    c.label_smoothing = 0.0
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.compute_dtype = compute_dtype
    c.log_every, c.eval_every, c.checkpoint_every = 10, 0, 500
    return c


MFT_STAGES = ("fft", "mft")


def mft_config(*, stage: str, layers, keep: float = 0.9, subnet_mode: str = "both", mode: str = "topk",
               **lm_kwargs) -> ml_collections.ConfigDict:
    """Mask Fine-Tuning's two training stages on one recipe (:func:`lm_config`): ``"fft"`` trains every
    weight; ``"mft"`` starts from the FFT weights (``init_from``), masks the seven projections of
    ``layers`` (keeping ``keep`` of each matrix) and trains only the scores, with the same data,
    optimizer and schedule, as upstream."""
    if stage not in MFT_STAGES:
        raise ValueError(f"stage={stage!r}: expected one of {MFT_STAGES}")
    c = lm_config(**lm_kwargs)
    c.mft = ml_collections.ConfigDict(dict(layers=tuple(int(i) for i in layers), keep=keep, subnet_mode=subnet_mode,
                                           mode=mode, threshold_attn=0.0, threshold_mlp=0.0))
    if stage == "mft":
        c.task = "mft"
    return c
