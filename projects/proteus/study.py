"""The paper's claims at toy scale, offline: a teacher trained here on digits, students distilled from it.

    python -m projects.proteus.study --out runs/proteus_study --seeds 3

1. Teacher: a DINOv2-style ViT (28x28, patch 7, dim 64, depth 4) trained with labels on digits
   (classification, 30 epochs), its class token then frozen.
2. Objective ablation (paper Table: token only / + feature / + patch): students (dim 32, depth 2)
   distilled without labels with lambda_fea and lambda_patch switched on in turn, over seeds.
3. Dataset bias (the paper's argument for features over logits, in miniature): students distilled
   from the same teacher with its features (Proteus, all three losses) or with its logits (soft
   KD, alpha 1: no labels) on three kinds of proxy data: all digits, digits 0-4 only, and grey crops
   of scikit-learn's two sample photographs (the paper's single-image proxy); probed on 5-9, the
   classes the 0-4 students never saw, and on all ten.

Every student and the teacher are probed the same way (``lib.probe``, final normed CLS): logistic
regression over a C grid (select on half of the validation split, score on the other half) and
weighted k-NN (k=10). Random-init students are the floor. Prints a table and writes ``results.json``
(and, with ``--table``, the rows the README and the notebook show). ``--arms`` runs some arms only;
finished runs are reused, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lib.stats import mean_std

TEACHER = dict(img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=4, init_values=1.0)
STUDENT = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2, init_values=1.0)
OBJECTIVES = {"token": (1.0, 0.0, 0.0), "token+fea": (1.0, 1.0, 0.0), "token+fea+patch": (1.0, 1.0, 1.0)}
FIVE_TO_NINE = (5, 6, 7, 8, 9)
# arm -> (what is distilled: an objective of OBJECTIVES or "logits", proxy data: "digits" | "digits0-4" | "photos")
ARMS = {
    "token": ("token", "digits"), "token+fea": ("token+fea", "digits"), "token+fea+patch": ("token+fea+patch", "digits"),
    "features_0-4": ("token+fea+patch", "digits0-4"), "logits_0-4": ("logits", "digits0-4"),
    "logits_all": ("logits", "digits"),
    "features_photos": ("token+fea+patch", "photos"), "logits_photos": ("logits", "photos"),
}
# (probe, arm, label) rows of the table; the arms' order is the order they run in
ROWS = [("all digits", "token", "token only"), ("all digits", "token+fea", "token + feature"),
        ("all digits", "token+fea+patch", "token + feature + patch"),
        ("digits 5-9", "token+fea+patch", "features, on all digits"),
        ("digits 5-9", "logits_all", "logits, on all digits"),
        ("digits 5-9", "features_0-4", "features, on digits 0-4"), ("digits 5-9", "logits_0-4", "logits, on digits 0-4"),
        ("digits 5-9", "features_photos", "features, on photo crops"),
        ("digits 5-9", "logits_photos", "logits, on photo crops"),
        ("all digits", "features_photos", "features, on photo crops"),
        ("all digits", "logits_photos", "logits, on photo crops")]


def teacher_config(epochs: int):
    import ml_collections
    from configs import common
    c = common.digits_config(model="dinov2_tiny", image_size=28, epochs=epochs, lr=2e-3, warmup_epochs=2)
    c.model.kwargs = ml_collections.ConfigDict(TEACHER)
    c.mesh = [("data", 1)]
    c.log_every, c.checkpoint_every, c.eval_every = 100, 0, 0
    return c


def _proxy_data(c, data: str):
    if data == "digits0-4":
        c.input.train_classes = (0, 1, 2, 3, 4)
    elif data == "photos":   # grey 32x32 crops, then the same random 50-100% crops to 28 as for digits
        c.input.dataset, c.input.grayscale = "photos", True
    elif data != "digits":
        raise ValueError(f"unknown proxy data {data!r}")
    return c


def student_config(teacher_dir: str, objective: str, seed: int, epochs: int, data: str = "digits"):
    """A student distilled from the teacher's features (Proteus, ``objective``'s lambdas)."""
    import ml_collections
    from configs.proteus import digits
    c = digits.get_config(f"epochs={epochs},lr=2e-3")
    c.seed = seed
    c.mesh = [("data", 1)]
    c.model.kwargs = ml_collections.ConfigDict(STUDENT)
    c.proteus.teacher_kwargs = ml_collections.ConfigDict(dict(TEACHER, num_classes=10))
    c.proteus.teacher_weights = teacher_dir
    c.proteus.lambda_token, c.proteus.lambda_fea, c.proteus.lambda_patch = OBJECTIVES[objective]
    c.log_every, c.checkpoint_every, c.eval_every = 100, 0, 0
    return _proxy_data(c, data)


def logit_student_config(teacher_dir: str, seed: int, epochs: int, data: str = "digits"):
    """The same student and recipe distilled from the teacher's logits instead: soft KD with alpha 1
    (no label term) and tau 1, a classifier head on the student's class token."""
    import ml_collections
    c = student_config(teacher_dir, "token", seed, epochs, data)
    c.task, c.num_classes = "classification", 10
    del c.proteus
    c.distill.teacher, c.distill.teacher_weights = "dinov2_tiny", teacher_dir
    c.distill.teacher_kwargs = ml_collections.ConfigDict(TEACHER)
    c.distill.alpha, c.distill.tau = 1.0, 1.0
    return c


def arm_config(arm: str, teacher_dir: str, seed: int, epochs: int):
    objective, data = ARMS[arm]
    if objective == "logits":
        return logit_student_config(teacher_dir, seed, epochs, data)
    return student_config(teacher_dir, objective, seed, epochs, data)


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


def ms(rows, key):
    """Mean and sample std (over seeds) of a probe's top-1, in %."""
    return mean_std([100 * r[key] for r in rows])


def table(results) -> list[dict]:
    """The rows the README and the notebook show (mean and std over seeds, in %)."""
    out = []
    t = results["teacher"]
    for probe, key in (("all digits", "all"), ("digits 5-9", "five_to_nine")):
        out.append({"probe": probe, "features": "teacher", **{m: round(100 * t[key][m], 1) for m in ("logreg", "knn10")},
                    "logreg_std": None, "knn10_std": None})
        out.append(_row(probe, "random-init student", [r[key] for r in results["random"]]))
        out.extend(_row(probe, label, [r[key] for r in results["arms"][arm]])
                   for p, arm, label in ROWS if p == probe and results["arms"].get(arm))
    return out


def _row(probe, label, rows):
    (lr, lr_std), (kn, kn_std) = ms(rows, "logreg"), ms(rows, "knn10")
    return {"probe": probe, "features": label, "logreg": round(lr, 1), "logreg_std": round(lr_std, 1),
            "knn10": round(kn, 1), "knn10_std": round(kn_std, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-epochs", type=int, default=20)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--table", help="also write the table's rows (with the command and setup) to this JSON file")
    a = p.parse_args(argv)
    arms = [x for x in a.arms.split(",") if x]
    if unknown := sorted(set(arms) - set(ARMS)):
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    import lib.tasks.proteus  # noqa: F401
    from lib import zoo
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"teacher": {}, "random": [], "arms": {arm: [] for arm in arms}}
    teacher_dir = out / "teacher"
    if not (teacher_dir / "final").exists():
        results["teacher"]["val_top1"] = train(teacher_config(a.teacher_epochs), teacher_dir)["top1"]
        (teacher_dir / "final_top1.json").write_text(json.dumps(results["teacher"]["val_top1"]))
    elif (teacher_dir / "final_top1.json").exists():
        results["teacher"]["val_top1"] = json.loads((teacher_dir / "final_top1.json").read_text())
    teacher = zoo.create_model("dinov2_tiny", weights=str(teacher_dir / "final"), num_classes=10, **TEACHER)
    results["teacher"].update(all=probe_model(teacher), five_to_nine=probe_model(teacher, classes=FIVE_TO_NINE))
    for seed in range(a.seeds):
        rand = zoo.create_model("dinov2_tiny", rngs=seed, **STUDENT)
        results["random"].append({"all": probe_model(rand), "five_to_nine": probe_model(rand, classes=FIVE_TO_NINE)})
        for arm in arms:
            wd = out / f"{arm}_s{seed}"
            if not (wd / "final").exists():
                train(arm_config(arm, str(teacher_dir / "final"), seed, a.student_epochs), wd)
            heads = {"num_classes": 10} if ARMS[arm][0] == "logits" else {}
            student = zoo.create_model("dinov2_tiny", weights=str(wd / "final"), **STUDENT, **heads)
            results["arms"][arm].append({"all": probe_model(student),
                                         "five_to_nine": probe_model(student, classes=FIVE_TO_NINE)})
        (out / "results.json").write_text(json.dumps(results, indent=1))

    rows = table(results)
    print(f"teacher: {results['teacher']}")
    print("| probed on | features | logreg top-1 | kNN-10 top-1 |\n|---|---|---|---|")
    for r in rows:
        cell = lambda m: f"{r[m]:.1f}" if r[f"{m}_std"] is None else f"{r[m]:.1f} +- {r[f'{m}_std']:.1f}"
        print(f"| {r['probe']} | {r['features']} | {cell('logreg')} | {cell('knn10')} |")
    if a.table:
        setup = (f"teacher: DINOv2-style ViT {TEACHER} trained with labels on digits for {a.teacher_epochs} epochs "
                 f"(val top-1 {100 * results['teacher'].get('val_top1', float('nan')):.1f}%); students {STUDENT} "
                 f"distilled without labels for {a.student_epochs} epochs from its features (Proteus) or its logits "
                 "(soft KD, alpha 1, tau 1) on all digits, digits 0-4, or grey crops of the two sample photographs; "
                 "probed on the final normed CLS: logistic regression (C chosen on half of the 300 validation "
                 "digits, scored on the other half) and kNN-10; std: sample std over seeds")
        Path(a.table).write_text(json.dumps({
            "command": "python -m projects.proteus.study --out runs/proteus_study --seeds " + str(a.seeds),
            "setup": setup, "seeds": a.seeds,
            "metrics": {"logreg": "logistic-regression top-1 (%)", "knn10": "kNN-10 top-1 (%)"},
            "rows": rows}, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
