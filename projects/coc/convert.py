"""Key maps from the Context-Cluster PyTorch checkpoints to our module paths, and the upgrade of
the old (pre-May-2023) checkpoints.

Only module paths are mapped here; leaf names and tensor layouts (1x1 conv -> linear, OIHW -> HWIO)
are handled by ``lib.convert.torch_to_nnx`` for every project alike.

Old checkpoints (issues #2, #17, #31 upstream) differ from the current ones in three ways, and were
trained with a different aggregation:

* the token mixer's convs were ``fc1`` / ``fc2`` / ``fc_v``. In the old ``Cluster.__init__``,
  ``fc1 = Conv2d(dim, heads*head_dim)`` feeds the similarity (``x = self.fc1(x)``), ``fc2 =
  Conv2d(heads*head_dim, out_dim)`` is applied last, ``fc_v = Conv2d(dim, heads*head_dim)`` gives
  the values. So ``fc1 -> f``, ``fc2 -> proj``, ``fc_v -> v`` (fc2 is also the only one whose shape
  fits ``proj`` whenever heads*head_dim != dim; f and v have the same shape, only the code tells
  them apart);
* the channel MLP was two 1x1 convs: weights ``[O, I, 1, 1]`` instead of ``[O, I]``;
* the model kept its position channels in a ``fea_pos`` buffer (recomputed now; dropped);
* the aggregation divided by the number of assigned points (``mask.sum``) instead of the summed
  similarities: load them into a model built with ``normalize="point_count"``.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lib.convert import torch_to_nnx

_BLOCK = re.compile(r"^network\.(\d+)\.(\d+)(\..*)?$")
_REDUCER = re.compile(r"^network\.(\d+)\.proj$")
_FEATURE_NORM = re.compile(r"^norm(\d+)$")
_OLD_MIXER = re.compile(r"^(.*\.token_mixer)\.(fc1|fc2|fc_v)\.(weight|bias)$")
OLD_MIXER_NAMES = {"fc1": "f", "fc2": "proj", "fc_v": "v"}
_log = logging.getLogger(__name__)


def coc_key_map(prefix: str) -> str | None:
    """``patch_embed.proj`` unchanged; ``network.{2i}.{j}`` -> ``stages.i.blocks.j`` (its ``mlp`` ->
    ``channel_mixer``); ``network.{2i+1}.proj`` -> ``stages.{i+1}.downsample.proj``; ``norm``;
    ``head`` -> ``head.fc``; the dense backbones' ``norm{0,2,4,6}`` -> ``feature_norms.{0..3}``."""
    if prefix == "patch_embed.proj" or prefix == "norm":
        return prefix
    if prefix == "head":
        return "head.fc"
    m = _BLOCK.match(prefix)
    if m and int(m.group(1)) % 2 == 0:
        rest = m.group(3) or ""
        if rest == ".mlp" or rest.startswith(".mlp."):
            rest = ".channel_mixer" + rest[len(".mlp"):]
        return f"stages.{int(m.group(1)) // 2}.blocks.{m.group(2)}{rest}"
    m = _REDUCER.match(prefix)
    if m and int(m.group(1)) % 2 == 1:
        return f"stages.{(int(m.group(1)) + 1) // 2}.downsample.proj"
    m = _FEATURE_NORM.match(prefix)
    if m and int(m.group(1)) % 2 == 0:
        return f"feature_norms.{int(m.group(1)) // 2}"
    return None


def upgrade_old_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """An old-format CoC state_dict in the current format (see the module docstring): token mixer
    ``fc1/fc2/fc_v -> f/proj/v``, 4-D MLP weights squeezed to 2-D, ``fea_pos`` dropped.

    The weights are unchanged, but they were trained with the point-count normalisation: use them
    in a model created with ``normalize="point_count"``.
    """
    out = {}
    for key, value in state_dict.items():
        if key.rpartition(".")[2] == "fea_pos":
            continue
        m = _OLD_MIXER.match(key)
        if m:
            key = f"{m.group(1)}.{OLD_MIXER_NAMES[m.group(2)]}.{m.group(3)}"
        value = np.asarray(value)
        if ".mlp.fc" in key and key.endswith(".weight") and value.ndim == 4:
            if value.shape[2:] != (1, 1):
                raise torch_to_nnx.WeightConversionError(f"{key}: expected a 1x1 conv MLP weight, got {value.shape}")
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def load_old_torch_weights(model, source: str | Path | Mapping[str, Any], *, strict: bool = True,
                           use_ema: bool = False) -> torch_to_nnx.ConversionReport:
    """Load an old (pre-May-2023) Context-Cluster checkpoint into ``model`` (the old-key
    counterpart of ``lib.zoo.load_torch_weights``). Warns when ``model`` does not use the
    point-count normalisation those checkpoints were trained with."""
    obj = torch_to_nnx.read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict = upgrade_old_state_dict(torch_to_nnx.unwrap_state_dict(obj, use_ema=use_ema))
    message = ("old Context-Cluster checkpoints were trained with the point-count normalisation "
               "(mask.sum, before upstream commit 3ccb0b6)")
    if getattr(model, "normalize", None) != "point_count":
        warnings.warn(f"{message}, but this model uses normalize={getattr(model, 'normalize', None)!r}: "
                      f"create it with normalize='point_count' to reproduce their accuracy", stacklevel=2)
    else:
        _log.info("%s; the model uses it too", message)
    return torch_to_nnx.assign_state_dict(model, state_dict, coc_key_map, strict=strict)
