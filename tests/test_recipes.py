"""Training recipes against the official scripts (README "Training recipes against the official
scripts"): config values, weight-decay groups and initial weights that the forward-pass parity
tests cannot see."""
import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs.coc import imagenet as coc_imagenet
from configs.efficientmod import imagenet as efficientmod_imagenet
from configs.fcvit import imagenet as fcvit_imagenet
from configs.pemn import digits as pemn_digits
from configs.starnet import imagenet as starnet_imagenet
from lib.train import optim


def _paths(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
IMAGENET_CONFIGS = [starnet_imagenet.get_config("variant=s1"), starnet_imagenet.get_config("variant=demonet_d12_w192_mul"),
                    efficientmod_imagenet.get_config("variant=xxs"), coc_imagenet.get_config("variant=tiny"),
                    fcvit_imagenet.get_config("variant=tiny")]


@pytest.mark.parametrize("config", IMAGENET_CONFIGS, ids=lambda c: c.model.name)
def test_imagenet_recipes_share_the_timm_script_defaults(config):
    """train.py defaults no official command overrides: seed 42, AdamW 0.9/0.999/1e-8 wd 0.05, no
    clipping, 300 + 10 epochs, 5 warmup epochs from 1e-6, per-epoch steps, RE 0.25, smoothing 0.1."""
    assert config.seed == 42
    assert (config.optimizer, config.wd, config.grad_clip) == ("adamw", 0.05, None)
    assert (config.total_epochs, config.cooldown_epochs, config.warmup_epochs, config.warmup_lr) == (300, 10, 5, 1e-6)
    assert config.schedule_per_epoch and config.input.reprob == 0.25 and config.label_smoothing == 0.1
    assert config.mixup.mixup_alpha == 0.8 and config.input.interpolation == "random"


def test_fcvit_lr_follows_the_readme_batch_rule():
    """FCViT README: lr = bs / 1024 * 1e-3 (global batch 8 x 128 = 1024 -> 1e-3)."""
    c = fcvit_imagenet.get_config("variant=b24")
    assert (c.input.batch_size, c.lr, c.min_lr) == (1024, 1e-3, 1e-6)
    c = fcvit_imagenet.get_config("variant=b48,batch=256")
    assert (c.input.batch_size, c.lr, c.model.kwargs.drop_path_rate) == (256, 2.5e-4, 0.2)


def test_demonet_imagenet_recipe():
    """Rewrite-the-Stars README: DemoNet ``-b 256 --lr 4e-3 --model-ema`` on 8 GPUs, script defaults
    otherwise (rand-m9 RandAugment, cutmix 1.0, min_lr 1e-5, EMA 0.9998, drop path 0)."""
    c = starnet_imagenet.get_config("variant=demonet_d12_w192_mul")
    assert c.model.name == "demonet_d12_w192_mul" and "drop_path_rate" not in c.model.kwargs
    assert (c.input.batch_size, c.lr, c.min_lr, c.ema_decay) == (2048, 4e-3, 1e-5, 0.9998)
    assert c.input.auto_augment == "rand-m9-mstd0.5-inc1" and c.mixup.cutmix_alpha == 1.0
    with pytest.raises(ValueError, match="unknown StarNet variant"):
        starnet_imagenet.get_config("variant=demonet_192_mul")


def test_pemn_digits_uses_the_official_optimizer_groups_and_loss():
    """PEMN ``train.py``: ``optim.AdamW(trainable params, weight_decay=wd)`` (no exempt group, so the
    BatchNorm affines are decayed) and ``nn.CrossEntropyLoss()`` (no label smoothing)."""
    for strategy in ("mask", "dense", "rp"):
        c = pemn_digits.get_config(f"strategy={strategy}")
        assert c.decay_1d_params is True and c.label_smoothing == 0.0 and c.wd == 5e-3
        assert c.mixup.mixup_alpha == c.mixup.cutmix_alpha == 0.0


# ------------------------------------------------------------------------------------------------
# weight-decay groups
# ------------------------------------------------------------------------------------------------
def _abstract_params(name):
    if name.startswith("starnet"):
        from projects.starnet.models import STARNET_VARIANTS, StarNet
        build = lambda: StarNet(*STARNET_VARIANTS[name], rngs=nnx.Rngs(0))  # noqa: E731
    elif name.startswith("efficientmod"):
        from projects.efficientmod.models import EfficientMod, variant_kwargs
        build = lambda: EfficientMod(**variant_kwargs(name), rngs=nnx.Rngs(0))  # noqa: E731
    elif name.startswith("coc"):
        from projects.coc.models import COC_VARIANTS, ContextCluster
        build = lambda: ContextCluster(**COC_VARIANTS[name], rngs=nnx.Rngs(0))  # noqa: E731
    elif name.startswith("fcvit"):
        from projects.fcvit.models import FCVIT_VARIANTS, FCViT
        build = lambda: FCViT(*FCVIT_VARIANTS[name][:3], rngs=nnx.Rngs(0))  # noqa: E731
    else:
        from projects.starnet.models import DemoNet
        build = lambda: DemoNet(64, 2, "mul", rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param))


# The PyTorch parameters timm's ``param_groups_weight_decay`` exempts (ndim <= 1 or ``.bias``; no
# model here defines ``no_weight_decay()``), by their name in this port.
EXEMPT = {"starnet_s1": {"bias", "scale"},
          "demonet": {"bias", "scale", "gamma"},
          "efficientmod_xxs": {"bias", "scale", "gamma_1"},
          "coc_tiny": {"bias", "scale", "layer_scale_1", "layer_scale_2", "sim_alpha", "sim_beta"},
          "fcvit_tiny": {"bias", "scale", "layer_scale_1", "layer_scale_2", "rescale_weight", "rescale_bias"}}


@pytest.mark.parametrize("name", sorted(EXEMPT))
def test_decay_mask_exempts_exactly_the_timm_no_decay_group(name):
    params = _paths(_abstract_params(name))
    mask = _paths(optim.decay_mask(_abstract_params(name)))
    exempt = {p for p, decayed in mask.items() if not decayed}
    assert {p.rsplit("/", 1)[-1] for p in exempt} == EXEMPT[name]
    assert all(params[p].ndim == 1 for p in exempt)
    assert {p.rsplit("/", 1)[-1] for p in mask if mask[p]} == {"kernel"}           # conv + linear weights
    assert all(jax.tree.leaves(optim.decay_mask(_abstract_params(name), decay_1d_params=True)))


# ------------------------------------------------------------------------------------------------
# initial weights (training from scratch)
# ------------------------------------------------------------------------------------------------
def _torch_default(kernel, bias):
    """PyTorch's nn.Conv2d / nn.Linear default: kernel and bias U(+-1/sqrt(fan_in))."""
    bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
    for w in (kernel, bias):
        if w is not None:
            assert 0.8 * bound < np.abs(w).max() <= bound * (1 + 1e-6), (w.shape, bound)  # float32 draws


def _trunc_normal(kernel, bias):
    """The models' ``_init_weights``: trunc_normal(std .02) (absolute bounds +-2), zero bias."""
    assert kernel.std() == pytest.approx(0.02, rel=0.15) and abs(kernel.mean()) < 0.004, kernel.shape
    assert bias is None or not np.any(bias)


# model: (layer-scale leaf, its upstream init, whether convs keep torch's default, path regex of
# the 2-D kernels that do too: CoC's cluster f / v / proj are 1x1 nn.Conv2d upstream)
INIT = {"starnet_s050": (None, None, True, None),
        "efficientmod_xxs": ("gamma_1", 1e-4, True, None),
        "coc_tiny": ("layer_scale_1", 1e-5, True, r"token_mixer/(f|v|proj)$"),
        "demonet": ("gamma", 1e-6, False, None)}


@pytest.mark.parametrize("name", sorted(INIT))
def test_initial_weights_follow_the_upstream_init_weights(name):
    """Convs (and CoC's 1x1 cluster convs) keep PyTorch's default init, as upstream's
    ``isinstance(m, nn.Linear or nn.Conv2d)`` only matches nn.Linear (DemoNet uses the tuple, so its
    convs are trunc_normal too); linears incl. the classifier trunc_normal(.02) with zero bias;
    norms 1 / 0; layer scales at the upstream value."""
    if name == "demonet":
        from projects.starnet.models import DemoNet
        model = DemoNet(64, 2, "mul", rngs=nnx.Rngs(0))
    elif name.startswith("starnet"):
        from projects.starnet.models import STARNET_VARIANTS, StarNet
        model = StarNet(*STARNET_VARIANTS[name], rngs=nnx.Rngs(0))
    elif name.startswith("efficientmod"):
        from projects.efficientmod.models import EfficientMod, variant_kwargs
        model = EfficientMod(**variant_kwargs(name), rngs=nnx.Rngs(0))
    else:
        from projects.coc.models import COC_VARIANTS, ContextCluster
        model = ContextCluster(**COC_VARIANTS[name], rngs=nnx.Rngs(0))
    params = {k: np.asarray(v, np.float64) for k, v in _paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
    scale_leaf, scale_init, torch_convs, torch_2d = INIT[name]
    layers = {p.rsplit("/", 1)[0] for p in params if p.endswith("/kernel")}
    assert "head/fc" in layers
    for layer in layers:
        kernel = params[layer + "/kernel"]
        torch_init = (torch_convs and kernel.ndim == 4) or bool(torch_2d and re.search(torch_2d, layer))
        (_torch_default if torch_init else _trunc_normal)(kernel, params.get(layer + "/bias"))
    norms = {p.rsplit("/", 1)[0] for p in params if p.endswith("/scale")}
    assert norms and all(np.all(params[n + "/scale"] == 1) and not np.any(params[n + "/bias"]) for n in norms)
    if scale_leaf:
        scales = [v for p, v in params.items() if p.endswith("/" + scale_leaf)]
        assert scales and all(np.allclose(v, scale_init, rtol=1e-6) for v in scales)
