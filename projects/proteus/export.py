"""Export a trained Proteus student as a plain DINOv2 backbone with the official key names.

    python -m projects.proteus.export --model dinov2_vits14 --weights WORKDIR/best --out proteus_vits14.safetensors

``--weights`` is a ``zoo.save_weights`` directory (a run's ``best/``: the student without its heads)
or any checkpoint ``zoo.load_pretrained`` reads. The output (``.safetensors``, or ``.npz``) has the
keys and layouts of ``dinov2_vit*14_pretrain.pth`` (``cls_token``, ``pos_embed``, ``mask_token``,
``patch_embed.proj.weight`` [O, I, kh, kw], ``blocks.N.attn.qkv.weight`` [out, in], ...), so
``zoo.load_torch_weights`` and the official PyTorch model (``load_state_dict``) both take it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def export_backbone(model, out: str | Path) -> dict[str, np.ndarray]:
    from lib.models.dinov2 import official_state_dict
    if hasattr(model, "student"):       # a wrapped ProteusStudent: drop the heads
        model = model.student
    sd = official_state_dict(model)
    out = Path(out)
    if out.suffix == ".npz":
        np.savez(out, **sd)
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(out))
    return sd


def main(argv=None):
    from lib import zoo
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the student's zoo name, e.g. dinov2_vits14")
    p.add_argument("--kwargs", default="{}", help="JSON constructor overrides used in training, e.g. '{\"img_size\": 224}'")
    p.add_argument("--weights", required=True)
    p.add_argument("--out", required=True, help=".safetensors or .npz")
    a = p.parse_args(argv)
    model = zoo.create_model(a.model, weights=a.weights, **json.loads(a.kwargs))
    sd = export_backbone(model, a.out)
    print(f"wrote {len(sd)} tensors ({sum(v.size for v in sd.values()):,} values) to {a.out}")


if __name__ == "__main__":
    main()
