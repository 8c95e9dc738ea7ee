"""benchmarks/throughput.py on the tests' tiny StarNet: one JSON line per run, with every key.

``--conv-impl xla``: the CPU fast path's train step takes ~1.6x longer to compile (the tiny
model's gradient: 4.7 s against 2.9 s), and these tests check the harness, not the convolutions.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ is not an installed package
from benchmarks import throughput  # noqa: E402

TINY = ["--model", "test_starnet_tiny", "--batch-size", "8", "--resolution", "32", "--steps", "2",
        "--warmup", "1", "--num-classes", "10", "--conv-impl", "xla"]
KEYS = {"framework", "model", "mode", "batch", "resolution", "dtype", "devices", "threads", "num_params",
        "images_per_s", "median_step_ms", "compile_s", "first_call_s", "xla_peak_bytes", "rss_peak_mib",
        "backend", "device_kind", "jax", "flax", "loadavg", "other_cpu_pct", "own_cpu_cores"}


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_infer_and_train_json_lines(capsys):
    rows = throughput.main(TINY + ["--mode", "infer,train"])
    printed = _lines(capsys)
    assert printed == rows and [r["mode"] for r in rows] == ["infer", "train"]
    for row in rows:
        assert KEYS <= row.keys(), KEYS - row.keys()
        assert row["model"] == "test_starnet_tiny" and row["batch"] == 8 and row["resolution"] == 32
        assert row["images_per_s"] > 0 and row["median_step_ms"] > 0 and row["num_params"] > 0
        assert row["backend"] == "cpu" and row["devices"] == 1 and row["dtype"] == "float32"
    assert rows[1]["xla_alias_bytes"] > 0          # the train state is donated
    assert rows[1]["final_loss"] > 0


def test_train_a_subset_reports_what_it_trained(capsys):
    (row,) = throughput.main(TINY + ["--mode", "train", "--trainable", "^head/"])
    assert row["trainable"] == ["^head/"] and 0 < row["trained_params"] < row["num_params"]
    assert row["trained_params"] == 64 * 10 + 10         # the classifier: 64 features (8 x 2^3) -> 10
    assert row["final_loss"] > 0


def test_sharded_over_two_devices(capsys):   # conftest simulates 8 CPU devices
    (row,) = throughput.main(TINY + ["--mode", "infer", "--devices", "2"])
    assert row["devices"] == 2 and row["images_per_s"] > 0 and row["conv_impl"] == "xla"


def test_vs_timm_without_torch_env_reports_instead_of_failing(tmp_path, capsys):
    rows = throughput.main(["--model", "test_starnet_tiny", "--batch-size", "2", "--resolution", "32",
                            "--steps", "1", "--warmup", "0", "--num-classes", "10", "--vs-timm",
                            "--torch-python", str(tmp_path / "missing" / "python")])
    jax_row, torch_row, ratio = rows
    assert jax_row["images_per_s"] > 0
    assert "no timm counterpart" in torch_row["error"]
    assert ratio["jax_images_per_s"] == jax_row["images_per_s"]


def test_ratios():
    jax_row = {"model": "starnet_s1", "mode": "infer", "batch": 32, "resolution": 224, "dtype": "float32",
               "images_per_s": 100.0}
    out = throughput.ratios(jax_row, [{"variant": "eager", "images_per_s": 50.0},
                                      {"variant": "compile", "error": "no compiler"}])
    assert out["jax_over_timm_eager"] == 2.0 and out["jax_over_timm_compiled"] is None


def test_remat_reported_not_crashing(capsys):
    (row,) = throughput.main(TINY + ["--mode", "infer", "--remat"])
    assert row.get("remat") == "unsupported" or row["images_per_s"] > 0


def test_all_zoo_smoke_check(capsys):
    rows = throughput.main(["--all-zoo", "demonet_2d_*"])     # the 2-D toys: points in, no images
    assert [r["model"] for r in rows] == ["demonet_2d_mul", "demonet_2d_sum"]
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 and r["resolution"] is None for r in rows)


def test_op_profile_groups_the_step_by_op_kind(capsys):
    args = [a for a in TINY if a not in ("--conv-impl", "xla")] + ["--mode", "infer", "--conv-impl", "fast",
                                                                  "--profile", "1"]
    (row,) = throughput.main(args)
    report = row["op_profile"]
    # The tiny StarNet on the CPU fast path: 1x1 convs as matmuls, depthwise convs as shifted taps,
    # the stem and downsamplers as XLA convolutions.
    assert {"matmul", "shifted taps", "convolution"} <= report["by_category_ms"].keys()
    assert report["total_ms"] > 0 and abs(sum(report["by_category_ms"].values()) - report["total_ms"]) < 1
    assert report["top_ops"] and all(op["ms"] >= 0 and "f32[" in op["shape"] for op in report["top_ops"])
    assert "op time per step" in capsys.readouterr().err


def test_op_profile_counts_a_loop_body_once_not_again_as_the_loop():
    import jax
    import jax.numpy as jnp
    from benchmarks import op_profile

    def f(x):
        return jax.lax.fori_loop(0, 20, lambda i, y: jnp.sin(y @ x) + y, x)
    x = jnp.ones((64, 64)) / 64
    compiled = jax.jit(f).lower(x).compile()
    compiled(x).block_until_ready()
    report = op_profile.profile(compiled, lambda: compiled(x), steps=2)
    assert report["by_category_ms"].get("matmul", 0) > 0
    assert not [op for op in report["top_ops"] if op["op"].startswith("while")]   # its body is counted already


def test_llm_benchmark_tiny_train_and_decode(tmp_path, capsys):
    """benchmarks/llm.py on the tiny GQA decoder: a train row and a decode row with every key, and
    --vs-torch without a PyTorch interpreter reported instead of failing."""
    from benchmarks import llm
    rows = llm.main(["--model", "llama_tiny_gqa", "--batch-size", "2", "--seq-len", "16", "--decode-batch", "2",
                     "--prompt-len", "4", "--new-tokens", "3", "--steps", "1", "--warmup", "0", "--no-prefill",
                     "--vs-torch", "--torch-python", str(tmp_path / "missing" / "python")])
    assert _lines(capsys) == rows
    train, torch_train, train_ratio, decode, _, decode_ratio = rows
    for row, tokens in ((train, 2 * 16), (decode, 2 * 3)):
        assert {"tokens_per_s", "mean_step_ms", "compile_s", "first_call_s", "xla_peak_bytes", "other_cpu_pct",
                "num_params", "jax"} <= row.keys()
        assert row["model"] == "llama_tiny_gqa" and row["num_params"] > 0 and row["compile_s"] > 0
        assert abs(row["tokens_per_s"] - tokens / (row["mean_step_ms"] / 1000)) <= 0.01 * row["tokens_per_s"] + 0.1
    assert train["mode"] == "train" and train["remat"] == "none" and train["final_loss"] > 0
    assert train["xla_alias_bytes"] > 0                      # the train state is donated
    assert decode["mode"] == "decode" and decode["new_tokens"] == 3 and "prefill_ms" not in decode
    assert "not found" in torch_train["error"] and train_ratio["jax_over_torch_eager"] is None
    assert decode_ratio["jax_tokens_per_s"] == decode["tokens_per_s"]


def test_proteus_split_reports_every_part(capsys):
    """benchmarks/proteus_split.py on the tiny DINOv2 at its 56 px: a row per part with its share of
    the step, and the summary line (no timing assertions)."""
    from benchmarks import proteus_split
    rows = proteus_split.main(["--student", "dinov2_tiny", "--teacher", "dinov2_tiny", "--resolution", "56",
                               "--batch-size", "2", "--steps", "1", "--warmup", "0", "--ema-decay", "0"])
    assert _lines(capsys) == rows
    *parts, summary = rows
    assert [r["part"] for r in parts] == ["step", "teacher", "student_step", "student_grad"]
    for row in parts:
        assert KEYS - {"mode"} <= row.keys(), KEYS - row.keys()
        assert row["model"] == "dinov2_tiny" and row["teacher"] == "dinov2_tiny" and row["batch"] == 2
        assert row["median_step_ms"] > 0 and row["share_of_step"] > 0 and row["teacher_img_size"] == 56
    step, _, student_step, _ = parts
    assert step["share_of_step"] == 1.0 and step["final_loss"] > 0 and student_step["final_loss"] > 0
    assert step["xla_alias_bytes"] > 0                       # the train state is donated
    assert summary["summary"] == "proteus_split" and summary["step_ms"] == step["median_step_ms"]
    assert {"teacher_share", "student_step_share", "student_grad_share", "unaccounted_ms"} <= summary.keys()
