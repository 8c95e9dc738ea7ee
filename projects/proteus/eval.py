"""Frozen-feature evaluation of a DINOv2-style backbone (a Proteus student or a DINOv2 teacher).

    python -m projects.proteus.eval --model dinov2_vits14 --weights proteus_vits14.safetensors \\
        --data imagefolder:/data/flowers --protocols logreg,knn,linear
    python -m projects.proteus.eval --model dinov2_vits14 --weights W --data tfds:cifar10 --val-split test
    python -m projects.proteus.eval --model dinov2_tiny --weights ../shared/golden/checkpoints/dinov2_tiny_pretrain.pth \\
        --data digits --image-size 56

Features come from ``lib.probe.extract`` (eval transform: resize, center crop, ImageNet
normalisation) for ``--train-split`` and ``--val-split`` (and ``--test-split`` for the logistic
regression's refit-then-test step). Protocols (``lib.probe``): ``linear`` (DINOv2's grid: lr x last
1/4 blocks x +avgpool), ``logreg`` (C = 1/wd, wd in logspace(-6, 5, 45); ``--wds N`` thins the grid),
``knn`` (k in 10, 20, 100, 200, T = 0.07). Prints one JSON object (``--json`` also writes it).
"""
from __future__ import annotations

import argparse
import json


def input_config(data: str, *, image_size: int, batch_size: int = 256):
    from lib import data as data_lib
    cfg = data_lib.default_input_config()
    kind, _, where = data.partition(":")
    if kind == "digits":
        cfg.dataset, cfg.crop_pct = "digits", 1.0
    elif kind == "tfds":
        cfg.dataset, cfg.name = "tfds", where
    elif kind == "imagefolder":
        cfg.dataset, cfg.data_dir = "imagefolder", where
    else:
        raise ValueError(f"--data must be digits, tfds:NAME or imagefolder:DIR, got {data!r}")
    cfg.image_size, cfg.batch_size = image_size, batch_size
    return cfg


def evaluate(model, cfg, *, protocols=("logreg", "knn", "linear"), train_split="train", val_split=None,
             test_split=None, wds=None, linear_epochs=10, batch_size=256) -> dict:
    import numpy as np
    from lib import probe
    val_split = val_split or ("val" if cfg.dataset == "imagefolder" else "validation")
    train = probe.extract(model, cfg, split=train_split, batch_size=batch_size)
    val = probe.extract(model, cfg, split=val_split, batch_size=batch_size)
    test = probe.extract(model, cfg, split=test_split, batch_size=batch_size) if test_split else None
    out = {"train_examples": len(train.labels), "val_examples": len(val.labels)}
    for p in protocols:
        if p == "logreg":
            grid = probe.FINE_GRAINED_WDS if not wds else tuple(float(w) for w in np.logspace(-6, 5, wds))
            r = probe.logistic_regression(train, val, test, wds=grid)
            out["logreg"] = {k: v for k, v in r.items() if k != "grid"}
        elif p == "knn":
            out["knn"] = probe.knn(train, val)
        elif p == "linear":
            r = probe.linear_probe(train, val, epochs=linear_epochs)
            out["linear"] = {"top1": r["top1"], "best": r["best"]}
        else:
            raise ValueError(f"unknown protocol {p!r}; choose from linear, logreg, knn")
    return out


def main(argv=None):
    from lib import zoo
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--kwargs", default="{}", help="JSON constructor overrides, e.g. '{\"img_size\": 224}'")
    p.add_argument("--weights", default="", help="official .pth, exported .safetensors or a weights directory")
    p.add_argument("--data", required=True, help="digits | tfds:NAME | imagefolder:DIR")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default=None)
    p.add_argument("--test-split", default=None)
    p.add_argument("--protocols", default="logreg,knn,linear")
    p.add_argument("--wds", type=int, default=0, help="logreg grid size (0: the official 45)")
    p.add_argument("--linear-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    kwargs = json.loads(a.kwargs)
    model = (zoo.create_model(a.model, abstract=True, **kwargs) if a.weights else zoo.create_model(a.model, **kwargs))
    if a.weights:
        zoo.load_pretrained(model, a.weights)
    cfg = input_config(a.data, image_size=a.image_size, batch_size=a.batch_size)
    out = evaluate(model, cfg, protocols=a.protocols.split(","), train_split=a.train_split, val_split=a.val_split,
                   test_split=a.test_split, wds=a.wds, linear_epochs=a.linear_epochs, batch_size=a.batch_size)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
