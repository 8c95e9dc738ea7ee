"""Official EfficientMod checkpoints (ma-xu/EfficientMod) -> our module paths, and a one-time converter.

The key map renames module paths only; leaf names and layouts are handled by
``lib.convert.torch_to_nnx`` for every project alike. Our modules mirror the PyTorch ones, so
all but two paths are unchanged:

* ``layers.i.blocks.j.mlp.context_layer.context_list.0`` -> ``...context_layer.dwconv`` (upstream
  keeps a list of context convs; every released model has exactly one);
* ``head`` -> ``head.fc`` (our classifier head also owns the pooling).

Convert an official checkpoint once into our own format (EMA weights with ``--ema``)::

    python -m projects.efficientmod.convert efficientMod_s.pth.tar weights/efficientmod_s \\
        --model efficientmod_s --ema
"""
from __future__ import annotations

import argparse
import re

_CONTEXT_CONV = re.compile(r"^(layers\.\d+\.blocks\.\d+\.mlp\.context_layer)\.context_list\.0$")
_MIRRORED = re.compile(r"^(patch_embed|layers|norm)(\.|$)")


def efficientmod_key_map(prefix: str) -> str | None:
    """Torch module path -> NNX module path (``None``: not part of the model)."""
    m = _CONTEXT_CONV.match(prefix)
    if m:
        return f"{m.group(1)}.dwconv"
    if prefix == "head":
        return "head.fc"
    if _MIRRORED.match(prefix):
        return prefix
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert an official EfficientMod checkpoint (no torch needed).")
    parser.add_argument("source", help=".pth/.pth.tar/.safetensors/.npz checkpoint")
    parser.add_argument("dest", help="new directory for the converted weights (zoo.save_weights format)")
    parser.add_argument("--model", required=True, help="zoo name, e.g. efficientmod_s")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema)")
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    from lib import zoo
    model = zoo.create_model(args.model, num_classes=args.num_classes, abstract=True)
    report = zoo.load_torch_weights(model, args.source, use_ema=args.ema)
    path = zoo.save_weights(model, args.dest)
    print(f"{len(report.loaded)} tensors from {args.source} -> {path} "
          f"({zoo.count_params(model):,} parameters{', EMA' if args.ema else ''})")


if __name__ == "__main__":
    main()
