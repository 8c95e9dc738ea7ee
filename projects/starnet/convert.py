"""Key maps from the official PyTorch checkpoints (Rewrite-the-Stars, timm) to our module paths.

Only module paths are mapped; leaf names and tensor layouts are handled by
``lib.convert.torch_to_nnx`` for every project alike.
"""
from __future__ import annotations

import re

_STAGE_ITEM = re.compile(r"^stages\.(\d+)\.(\d+)(\..*)?$")


def starnet_key_map(prefix: str) -> str | None:
    """``stem.0.conv`` -> ``stem.conv``; ``stages.i.0`` (downsampler) -> ``stages.i.downsample``;
    ``stages.i.j`` (j >= 1) -> ``stages.i.blocks.(j-1)``; ``head`` -> ``head.fc``."""
    if prefix.startswith("stem.0."):
        return "stem." + prefix[len("stem.0."):]
    m = _STAGE_ITEM.match(prefix)
    if m:
        stage, item, rest = int(m.group(1)), int(m.group(2)), m.group(3) or ""
        where = "downsample" if item == 0 else f"blocks.{item - 1}"
        return f"stages.{stage}.{where}{rest}"
    if prefix == "norm":
        return "norm"
    if prefix == "head":
        return "head.fc"
    return None


def demonet_key_map(prefix: str) -> str | None:
    """``stem``, ``blocks.i.*`` unchanged; ``norm`` -> ``head.norm``; ``head`` -> ``head.fc``."""
    if prefix == "stem" or prefix.startswith("blocks."):
        return prefix
    if prefix == "norm":
        return "head.norm"
    if prefix == "head":
        return "head.fc"
    return None
