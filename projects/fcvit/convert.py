"""Key map from the official FCViT checkpoints (ma-xu/FCViT ``models/fcvit.py``) to our module paths.

Only module paths are mapped; leaf names (``weight`` -> ``kernel``/``scale``, BatchNorm statistics)
and tensor layouts (OIHW -> HWIO, 1x1 conv -> linear) are handled by ``lib.convert.torch_to_nnx``.

Upstream ``network`` is a flat ``ModuleList`` ``[stage0, reducer, stage1, reducer, stage2,
reducer, stage3]``; here each reducer belongs to the stage it feeds (``stages.{i}.downsample``).
"""
from __future__ import annotations

import re

_NETWORK_ITEM = re.compile(r"^network\.(\d+)(\..*)?$")
_BLOCK = re.compile(r"^\.(\d+)(\..*)?$")
# The token mixer's ``fc1``/``fc2`` are ``nn.Sequential(conv, GELU, conv)``: items 0 and 2.
_SEQUENTIAL_FC = re.compile(r"^\.token_mixer\.(fc[12])\.([02])$")
_BN_PARTS = {"proj": "conv", "norm": "bn"}   # OverlapPatchEmbed -> ConvBN


def _conv_bn(rest: str) -> str | None:
    part = rest.lstrip(".")
    return _BN_PARTS.get(part)


def fcvit_key_map(prefix: str) -> str | None:
    """``patch_embed.{proj,norm}`` -> ``stem.{conv,bn}``; ``network.{2i}.{j}`` -> ``stages.i.blocks.j``
    (``token_mixer.fc1.0``/``.2`` -> ``token_mixer.fc1.fc1``/``.fc2``); ``network.{2i+1}.{proj,norm}``
    -> ``stages.{i+1}.downsample.{conv,bn}``; ``norm`` -> ``norm``; ``head`` -> ``head.fc``."""
    if prefix.startswith("patch_embed."):
        part = _conv_bn(prefix[len("patch_embed"):])
        return f"stem.{part}" if part else None
    if prefix == "norm":
        return "norm"
    if prefix == "head":
        return "head.fc"
    m = _NETWORK_ITEM.match(prefix)
    if not m:
        return None
    index, rest = int(m.group(1)), m.group(2) or ""
    if index % 2:                                    # a reducer between stages
        part = _conv_bn(rest)
        return f"stages.{index // 2 + 1}.downsample.{part}" if part else None
    b = _BLOCK.match(rest)
    if not b:
        return None
    block, inner = int(b.group(1)), b.group(2) or ""
    fc = _SEQUENTIAL_FC.match(inner)
    if fc:
        inner = f".token_mixer.{fc.group(1)}.{'fc1' if fc.group(2) == '0' else 'fc2'}"
    return f"stages.{index // 2}.blocks.{block}{inner}"
