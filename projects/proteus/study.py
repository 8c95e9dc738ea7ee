"""The paper's claims at toy scale, offline: a teacher trained here on digits, students distilled from it.

    python -m projects.proteus.study --out runs/proteus_study --seeds 3

1. Teacher: a DINOv2-style ViT (28x28, patch 7, dim 64, depth 4) trained with labels on digits
   (classification, 30 epochs), its class token then frozen.
2. Objective ablation (paper Table: token only / + feature / + patch): students (dim 32, depth 2)
   distilled without labels with lambda_fea and lambda_patch switched on in turn, over seeds.
3. Held-out classes (the dataset-bias argument in miniature): students distilled on images of
   digits 0-4 only, probed on 5-9 (and on all ten).

Every student and the teacher are probed the same way (``lib.probe``, final normed CLS): logistic
regression over a C grid (select on half of the validation split, score on the other half) and
weighted k-NN (k=10). Random-init students are the floor. Prints a table and writes ``results.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TEACHER = dict(img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=4, init_values=1.0)
STUDENT = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, init_values=1.0)
OBJECTIVES = {"token": (1.0, 0.0, 0.0), "token+fea": (1.0, 1.0, 0.0), "token+fea+patch": (1.0, 1.0, 1.0)}


def teacher_config(epochs: int):
    import ml_collections
    from configs import common
    c = common.digits_config(model="dinov2_tiny", image_size=28, epochs=epochs, lr=2e-3, warmup_epochs=2)
    c.model.kwargs = ml_collections.ConfigDict(TEACHER)
    c.mesh = [("data", 1)]
    c.log_every, c.checkpoint_every, c.eval_every = 100, 0, 0
    return c


def student_config(teacher_dir: str, objective: str, seed: int, epochs: int, train_classes=()):
    import ml_collections
    from configs.proteus import digits
    c = digits.get_config(f"epochs={epochs},lr=2e-3")
    c.seed = seed
    c.mesh = [("data", 1)]
    c.model.kwargs = ml_collections.ConfigDict(STUDENT)
    c.proteus.teacher_kwargs = ml_collections.ConfigDict(dict(TEACHER, num_classes=10))
    c.proteus.teacher_weights = teacher_dir
    c.proteus.lambda_token, c.proteus.lambda_fea, c.proteus.lambda_patch = OBJECTIVES[objective]
    c.proteus.train_classes = tuple(train_classes)
    c.log_every, c.checkpoint_every, c.eval_every = 100, 0, 0
    return c


def probe_model(model, classes=None) -> dict:
    from lib import probe
    from projects.proteus.eval import input_config
    cfg = input_config("digits", image_size=28, batch_size=500)
    train = probe.extract(model, cfg, split="train", batch_size=500)
    val = probe.extract(model, cfg, split="validation", batch_size=500)
    if classes is not None:
        keep = lambda f: probe.FeatureSet(*(a[np.isin(f.labels, classes)] for a in (f.cls, f.avgpool, f.labels)))
        train, val = keep(train), keep(val)
    half = len(val.labels) // 2      # select C on one half of the validation split, score on the other
    sel = probe.FeatureSet(val.cls[:half], val.avgpool[:half], val.labels[:half])
    test = probe.FeatureSet(val.cls[half:], val.avgpool[half:], val.labels[half:])
    lr = probe.logistic_regression(train, sel, test, wds=tuple(np.logspace(-4, 2, 7)), max_iter=300)
    return {"logreg": lr["test_top1"], "knn10": probe.knn(train, val, ks=(10,))["top1"]}


def train(config, workdir: Path) -> dict:
    """Train through the generic loop; the final weights (the unwrapped model) go to ``workdir/final``."""
    from lib import zoo
    from lib.train import loop
    r = loop.setup(config, workdir)
    log = loop._MetricsLog(r)
    try:
        loop.train(r, log)
        result = loop.final_evaluation(r)
    finally:
        r.checkpointer.close()
        log.close()
    zoo.save_weights(r.model(), workdir / "final")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=20)
    a = p.parse_args(argv)
    import lib.tasks.proteus  # noqa: F401
    from lib import zoo
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"teacher": {}, "random": [], "objectives": {k: [] for k in OBJECTIVES}, "held_out": []}
    teacher_dir = out / "teacher"
    if not (teacher_dir / "final").exists():
        results["teacher"]["val_top1"] = train(teacher_config(a.teacher_epochs), teacher_dir)["top1"]
        (teacher_dir / "final_top1.json").write_text(json.dumps(results["teacher"]["val_top1"]))
    elif (teacher_dir / "final_top1.json").exists():
        results["teacher"]["val_top1"] = json.loads((teacher_dir / "final_top1.json").read_text())
    teacher = zoo.create_model("dinov2_tiny", weights=str(teacher_dir / "final"), num_classes=10, **TEACHER)
    results["teacher"].update(all=probe_model(teacher), five_to_nine=probe_model(teacher, classes=[5, 6, 7, 8, 9]))
    for seed in range(a.seeds):
        rand = zoo.create_model("dinov2_tiny", rngs=seed, **STUDENT)
        results["random"].append({**probe_model(rand), "five_to_nine": probe_model(rand, classes=[5, 6, 7, 8, 9])})
        for objective in OBJECTIVES:
            wd = out / f"{objective}_s{seed}"
            if not (wd / "final").exists():
                train(student_config(str(teacher_dir / "final"), objective, seed, a.student_epochs), wd)
            student = zoo.create_model("dinov2_tiny", weights=str(wd / "final"), **STUDENT)
            results["objectives"][objective].append({**probe_model(student),
                                                     "five_to_nine": probe_model(student, classes=[5, 6, 7, 8, 9])})
        wd = out / f"held_out_s{seed}"
        if not (wd / "final").exists():
            train(student_config(str(teacher_dir / "final"), "token+fea+patch", seed, a.student_epochs,
                                 train_classes=(0, 1, 2, 3, 4)), wd)
        student = zoo.create_model("dinov2_tiny", weights=str(wd / "final"), **STUDENT)
        results["held_out"].append({"all": probe_model(student),
                                    "five_to_nine": probe_model(student, classes=[5, 6, 7, 8, 9])})
        (out / "results.json").write_text(json.dumps(results, indent=1))

    def ms(rows, key):
        v = np.array([r[key] for r in rows])
        return f"{100 * v.mean():.1f} +- {100 * v.std():.1f}"
    print(f"teacher: {results['teacher']}")
    print("| student | logreg top-1 | kNN-10 top-1 |\n|---|---|---|")
    print(f"| random init | {ms(results['random'], 'logreg')} | {ms(results['random'], 'knn10')} |")
    for k, rows in results["objectives"].items():
        print(f"| {k} | {ms(rows, 'logreg')} | {ms(rows, 'knn10')} |")
    print(f"| random init, probed on 5-9 | {ms([r['five_to_nine'] for r in results['random']], 'logreg')} | "
          f"{ms([r['five_to_nine'] for r in results['random']], 'knn10')} |")
    full = results["objectives"]["token+fea+patch"]
    print(f"| distilled on all, probed on 5-9 | {ms([r['five_to_nine'] for r in full], 'logreg')} | "
          f"{ms([r['five_to_nine'] for r in full], 'knn10')} |")
    ho = results["held_out"]
    print(f"| distilled on 0-4, probed on 5-9 | {ms([r['five_to_nine'] for r in ho], 'logreg')} | "
          f"{ms([r['five_to_nine'] for r in ho], 'knn10')} |")
    print(f"| distilled on 0-4, probed on all | {ms([r['all'] for r in ho], 'logreg')} | "
          f"{ms([r['all'] for r in ho], 'knn10')} |")
    return results


if __name__ == "__main__":
    main()
