"""Proteus (ICLR 2025): distil a frozen foundation model's features into a smaller ViT, no labels.

    config.task = "proteus"
    config.model.name = "dinov2_vits14"              # the student (any DINOv2-style zoo ViT)
    config.proteus.teacher = "dinov2_vitb14"         # + teacher_weights (official .pth or a weights dir)

The official ``MetaArch`` (``pretrain/models_proteus_dinov2.py``), step for step:

* the student is wrapped with three heads, ``token_head``, ``fea_head``, ``patch_head``, each
  ``LayerNorm(d_student)`` (eps 1e-5) then ``Linear(d_student, d_teacher)``; they are trained and
  dropped again at export (:meth:`Proteus.unwrap`), so ``best/`` holds the plain backbone;
* masks (``collate_data_and_cast_aug`` with ``mask_first_n``): the first ``int(B * mask_probability)``
  images of the (micro-)batch get exactly ``int(N * mask_ratio)`` masked patches at uniformly random
  positions, the rest none; drawn on device from the step key;
* the teacher runs once on the crops (eval mode, no gradient, its state a non-donated constant of
  the step, bfloat16 with ``teacher_dtype="bfloat16"``); the student twice, with and without masks;
* with ``t_cls`` / ``t_patch`` the teacher's normed CLS and patch tokens and MSE the mean over all
  elements:

      token_loss = MSE(token_head(s_cls), t_cls)
      fea_loss   = MSE(cat[token_head(s_cls), fea_head(s_patch)], cat[t_cls, t_patch])   # CLS via token_head
      patch_loss = MSE(patch_head(s_masked_patch[mask]), t_patch[mask])                 # masked pass
      loss = l_token * token_loss + l_fea * fea_loss + l_patch * patch_loss

  (``tests/test_proteus.py`` reproduces every output of the golden ``proteus_losses`` fixture).

No labels are read: any image source works, the label column is ignored.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lib.layers.linear import Linear
from lib.layers.norm import LayerNorm
from lib.train.task import Task, Weighted, weighted


@dataclasses.dataclass(frozen=True)
class ProteusSettings:
    mask_ratio: float = 0.5           # masked share of a masked image's patches
    mask_probability: float = 0.5     # share of the batch (its first images) that is masked
    lambda_token: float = 1.0
    lambda_fea: float = 1.0
    lambda_patch: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"proteus.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"proteus.mask_probability must be in [0, 1], got {self.mask_probability}")


class ProteusHead(nnx.Module):
    """``LayerNorm(d)`` (eps 1e-5, ``nn.LayerNorm``'s default) then ``Linear(d, d_teacher)``."""

    def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.norm = LayerNorm(dim, epsilon=1e-5)
        self.fc = Linear(dim, out_dim, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.norm(x))


class ProteusStudent(nnx.Module):
    """The student with its three heads (what the train step differentiates); ``model(x)`` is the student's."""

    def __init__(self, student: nnx.Module, teacher_dim: int, *, rngs: nnx.Rngs):
        d = student.embed_dim
        self.student = student
        self.patch_head = ProteusHead(d, teacher_dim, rngs=rngs)
        self.token_head = ProteusHead(d, teacher_dim, rngs=rngs)
        self.fea_head = ProteusHead(d, teacher_dim, rngs=rngs)

    def __call__(self, x):
        return self.student(x)

    @staticmethod
    def torch_key_map(prefix: str) -> str | None:
        """MetaArch's keys (``student.backbone.*``, ``{patch,token,fea}_head.{0,1}``); teacher keys are not ours."""
        from lib.models.dinov2 import DinoVisionTransformer
        if prefix.startswith("teacher."):
            return None
        if prefix == "student.backbone":
            return "student"
        if prefix.startswith("student.backbone."):
            return "student." + DinoVisionTransformer.torch_key_map(prefix[len("student.backbone."):])
        m = re.fullmatch(r"(patch_head|token_head|fea_head)\.([01])", prefix)
        return f"{m.group(1)}.{'norm' if m.group(2) == '0' else 'fc'}" if m else None


def draw_masks(key: jax.Array, batch: int, num_patches: int, settings: ProteusSettings) -> jax.Array:
    """bool [batch, num_patches]: the first ``int(batch * mask_probability)`` rows have exactly
    ``int(num_patches * mask_ratio)`` True at uniformly random positions, the others none."""
    n_imgs, n_mask = int(batch * settings.mask_probability), int(num_patches * settings.mask_ratio)
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, num_patches)), axis=1), axis=1)
    return (ranks < n_mask) & (jnp.arange(batch)[:, None] < n_imgs)


def _sq(a, b):
    return jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))


def proteus_terms(model: ProteusStudent, images: jax.Array, masks: jax.Array, t_cls: jax.Array,
                  t_patch: jax.Array, settings: ProteusSettings = ProteusSettings()) -> dict[str, jax.Array]:
    """Per-example terms whose batch means are the official losses exactly, and the student tokens.

    ``token`` [B]: ``sum_d err^2 / D``; ``fea`` [B]: over the 1 + N tokens; ``patch`` [B]: each
    image's squared error on its masked patches, scaled so that the batch mean is the MSE over all
    masked rows of the batch (``B / (n_masked_rows * D)``).
    """
    # both passes as one batch [masked; unmasked] (each image attends only to itself, as upstream's
    # nested-tensor pass over the list of two crops)
    b = images.shape[0]
    both = model.student.forward_features(jnp.concatenate([images, images]),
                                          jnp.concatenate([masks, jnp.zeros_like(masks)]))
    masked = {k: both[k][:b] for k in ("x_norm_patchtokens",)}
    unmasked = {k: both[k][b:] for k in ("x_norm_clstoken", "x_norm_patchtokens")}
    s_cls = model.token_head(unmasked["x_norm_clstoken"])
    s_patch = model.fea_head(unmasked["x_norm_patchtokens"])
    s_masked = model.patch_head(masked["x_norm_patchtokens"])
    b, n, d = t_patch.shape
    token = jnp.mean(_sq(s_cls, t_cls), axis=-1)
    fea = (jnp.sum(_sq(s_cls, t_cls), -1) + jnp.sum(_sq(s_patch, t_patch), (1, 2))) / ((1 + n) * d)
    m = masks.astype(jnp.float32)
    n_rows = jnp.sum(m)
    patch = jnp.sum(_sq(s_masked, t_patch) * m[..., None], (1, 2)) * b / jnp.maximum(n_rows * d, 1.0)
    return {"token": token, "fea": fea, "patch": patch,
            "loss": settings.lambda_token * token + settings.lambda_fea * fea + settings.lambda_patch * patch,
            "student.x_norm_clstoken": unmasked["x_norm_clstoken"],
            "student.x_norm_patchtokens": unmasked["x_norm_patchtokens"],
            "student_masked.x_norm_patchtokens": masked["x_norm_patchtokens"]}


class Proteus(Task):
    """The Proteus objective on the task interface (no labels); see the module docstring."""

    best = ("loss", "min")
    trainable = nnx.Param

    def __init__(self, teacher: nnx.Module, settings: ProteusSettings = ProteusSettings(), *, mesh=None,
                 sharding_rules=()):
        if not hasattr(teacher, "forward_features") or not hasattr(teacher, "patch_size"):
            raise ValueError(f"the Proteus teacher must be a DINOv2-style ViT, got {type(teacher).__name__}")
        self.settings = settings
        # on a mesh, both ViTs keep their token activations split over the batch axis (FSDP/data parallel)
        axis = dict(sharding_rules).get("batch")
        self.token_sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
                               if mesh is not None and axis and mesh.shape.get(axis, 1) > 1 else None)
        self.teacher_dim, self.patch_size = teacher.embed_dim, teacher.patch_size
        teacher.eval()
        self.teacher_graphdef, self.teacher_state = nnx.split(teacher)

    def constants(self):
        return self.teacher_state

    def wrap(self, model, rngs):
        if getattr(model, "patch_size", None) != self.patch_size:
            raise ValueError(f"the student's patch size {getattr(model, 'patch_size', None)} differs from the "
                             f"teacher's {self.patch_size}: Proteus matches their patch tokens one to one")
        return ProteusStudent(model, self.teacher_dim, rngs=rngs)

    def unwrap(self, wrapped):
        return wrapped.student

    def teacher_tokens(self, images, consts):
        teacher = nnx.merge(self.teacher_graphdef, consts)
        teacher.token_sharding = self.token_sharding
        out = teacher.forward_features(images.astype(teacher.dtype or images.dtype))
        t_cls = jax.lax.stop_gradient(out["x_norm_clstoken"]).astype(jnp.float32)
        return t_cls, jax.lax.stop_gradient(out["x_norm_patchtokens"]).astype(jnp.float32)

    def _terms(self, model, images, key, consts):
        t_cls, t_patch = self.teacher_tokens(images, consts)
        masks = draw_masks(key, images.shape[0], t_patch.shape[1], self.settings)
        model.student.token_sharding = self.token_sharding    # merged inside the step: a static attribute
        return proteus_terms(model, images, masks, t_cls, t_patch, self.settings)

    def loss(self, model, batch, key, consts) -> tuple[Weighted, dict[str, Weighted]]:
        terms = self._terms(model, batch["image"], jax.random.fold_in(key, 3), consts)
        return weighted(terms["loss"]), {f"{k}_loss": weighted(terms[k]) for k in ("token", "fea", "patch")}

    def evaluate(self, model, batch, consts) -> dict[str, Weighted]:
        # masks from a fixed key: the same masks at every evaluation; padded rows weigh 0
        terms = self._terms(model, batch["image"], jax.random.key(0), consts)
        valid = batch.get("valid")
        return {"loss": weighted(terms["loss"], valid),
                **{f"{k}_loss": weighted(terms[k], valid) for k in ("token", "fea", "patch")}}


def load_teacher(name: str, weights: str | None = None, *, dtype: str = "float32", kwargs: dict | None = None,
                 mesh=None, sharding_rules=(), abstract: bool = False) -> nnx.Module:
    """A zoo ViT in eval mode as the teacher; ``dtype="bfloat16"`` stores and runs it in bfloat16
    (LayerNorm and softmax statistics stay float32)."""
    from lib import zoo
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"proteus.teacher_dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    kw = dict(kwargs or {})
    if dtype == "bfloat16":
        kw.update(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    # with weights, shapes suffice: the strict load fills every array (no initialisation to compile)
    teacher = zoo.create_model(name, rngs=0, mesh=mesh, sharding_rules=sharding_rules,
                               abstract=abstract or bool(weights), **kw)
    if weights:
        zoo.load_pretrained(teacher, weights, strict=True)
    teacher.eval()
    return teacher


def settings_from(config) -> ProteusSettings:
    p = config.get("proteus") or {}
    return ProteusSettings(mask_ratio=float(p.get("mask_ratio", 0.5)),
                           mask_probability=float(p.get("mask_probability", 0.5)),
                           lambda_token=float(p.get("lambda_token", 1.0)), lambda_fea=float(p.get("lambda_fea", 1.0)),
                           lambda_patch=float(p.get("lambda_patch", 1.0)))


def from_config(config, *, mesh=None, sharding_rules=()) -> Proteus:
    """``config.proteus``: ``teacher`` (zoo name), ``teacher_weights``, ``teacher_kwargs``,
    ``teacher_dtype``, ``mask_ratio``, ``mask_probability``, ``lambda_{token,fea,patch}``.
    Every setting is checked here, before any compilation."""
    p = config.get("proteus")
    if not p or not p.get("teacher"):
        raise ValueError("task 'proteus' needs config.proteus.teacher (a zoo ViT, e.g. dinov2_vitb14)")
    settings = settings_from(config)
    teacher = load_teacher(p.teacher, p.get("teacher_weights") or None, dtype=p.get("teacher_dtype", "float32"),
                           kwargs=dict(p.get("teacher_kwargs", {})), mesh=mesh, sharding_rules=sharding_rules,
                           abstract=bool(p.get("abstract_teacher", False)))
    size = config.input.get("image_size", 224)
    if size % teacher.patch_size:
        raise ValueError(f"input.image_size={size} is not a multiple of the patch size {teacher.patch_size}")
    return Proteus(teacher, settings, mesh=mesh, sharding_rules=sharding_rules)


def _register() -> None:
    from lib.tasks import register_task
    register_task("proteus", from_config)


_register()
