"""Proteus on ImageNet-1K (the paper's recipe): a DINOv2 teacher distilled into a smaller ViT/14, no labels.

    python -m projects.proteus.train --config configs/proteus/imagenet.py:student=s --workdir DIR \\
        --config.proteus.teacher_weights=dinov2_vitb14_pretrain.pth

``student`` picks the paper's pair: ti <- S, s <- B, b <- L, l <- g (DINOv2 teachers, ``teacher=``
overrides). Recipe (``pretrain/main.py`` defaults + ``run_pretrain.sh``, the paper's batch): global
batch 1024, AdamW lr 5e-4 x batch/512, wd 0.05, cosine over 300 epochs with 5 warmup epochs from
1e-6 and min lr 1e-5 (+ timm's 10 cooldown epochs), RandAugment rand-m9-mstd0.5-inc1, RandomErasing
0.25, no mixup or cutmix, EMA 0.99996 kept (evaluation uses the non-EMA weights), 224 crops;
masks: the first half of each batch, 50% of its patches. The teacher runs in bfloat16 (upstream:
fp16 autocast). ``runlocal``: a few steps at 56x56 with tiny random models (no weights needed).
"""
import ml_collections

from configs import common

# student -> (student zoo model, DINOv2 teacher), Proteus Table 1 / Table 3; Ti from S is inferred
PAIRS = {"ti": ("dinov2_vitti14", "dinov2_vits14"), "s": ("dinov2_vits14", "dinov2_vitb14"),
         "b": ("dinov2_vitb14", "dinov2_vitl14"), "l": ("dinov2_vitl14", "dinov2_vitg14")}


def proteus_section(teacher: str, **kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        teacher=teacher, teacher_weights="", teacher_kwargs=ml_collections.ConfigDict(), teacher_dtype="bfloat16",
        mask_ratio=0.5, mask_probability=0.5, lambda_token=1.0, lambda_fea=1.0, lambda_patch=1.0,
        abstract_teacher=False) | kw)


def get_config(arg=None):
    arg = common.parse_arg(arg, student="s", teacher="", batch_size=1024, runlocal=False)
    if arg.student not in PAIRS:
        raise ValueError(f"student must be one of {sorted(PAIRS)}, got {arg.student!r}")
    student, teacher = PAIRS[arg.student]
    c = common.imagenet_config(model=student, batch_size=arg.batch_size, lr=5e-4 * arg.batch_size / 512,
                               min_lr=1e-5, auto_augment="rand-m9-mstd0.5-inc1", cutmix_alpha=0.0,
                               ema_decay=0.99996, runlocal=arg.runlocal)
    c.task = "proteus"
    c.proteus = proteus_section(arg.teacher or teacher)
    # the student at the training resolution, as MetaArch builds it (img_size=224; the hub's 518 is the teacher's)
    c.model.kwargs = ml_collections.ConfigDict(dict(img_size=224))
    c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
    c.label_smoothing = 0.0                   # no labels are read
    c.input.reprob = 0.25
    if arg.runlocal:                          # tiny random models: runs anywhere, no weights
        c.model.name = "dinov2_tiny"
        c.model.kwargs = ml_collections.ConfigDict(dict(embed_dim=32))
        c.proteus.teacher = "dinov2_tiny"
        c.proteus.teacher_dtype = "float32"
        c.input.image_size = 56
    return c
