"""lib.hub: hub ids resolved through a huggingface_hub cache laid out on disk by hand (no network),
and the vision zoo's timm weights loaded through a hub id."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from lib import hub

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "checkpoints" / "llama_tiny_hf"
SHA = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(cache: Path, repo: str, files: dict, *, sha: str = SHA, ref: str | None = "main") -> Path:
    """The huggingface_hub cache layout: ``models--org--name/blobs/<hash>`` holds the bytes,
    ``snapshots/<sha>/<file>`` are relative symlinks to them, ``refs/<ref>`` holds the sha."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / sha
    for name, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, Path) else content
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs" / digest).write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / digest, link.parent))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache.mkdir(parents=True)
    return cache


def test_local_paths_are_returned_as_they_are(tmp_path):
    assert hub.resolve(TINY) == TINY
    assert hub.resolve(str(TINY / "config.json")) == TINY / "config.json"
    assert hub.resolve(TINY, filename="config.json") == TINY / "config.json"
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a hub"):
        hub.resolve(tmp_path / "nope")
    assert not hub.is_repo_id("./org/name") and not hub.is_repo_id(str(TINY)) and not hub.is_repo_id("word")
    assert hub.is_repo_id("org/name") and hub.is_repo_id("hf-hub:timm/starnet_s1.in1k") and hub.is_repo_id("org/n@v1")
    assert hub.is_repo_id("org/name-GGUF/model.Q4_1.gguf") and not hub.is_repo_id("org/name/../x")


def test_cached_repository_resolves_offline(offline_cache, tmp_path):
    files = {p.name: p for p in sorted(TINY.iterdir())}
    snap = lay_out_cache(offline_cache, "golden/llama-tiny", files)
    assert hub.cache_dir() == offline_cache                      # HF_HOME as set now, not at import
    got = hub.resolve("golden/llama-tiny")
    assert got == snap and sorted(p.name for p in got.iterdir()) == sorted(files)
    assert (got / "config.json").read_bytes() == (TINY / "config.json").read_bytes()   # through the blob symlink
    assert hub.resolve("hf-hub:golden/llama-tiny", filename="tokenizer.json") == snap / "tokenizer.json"
    assert hub.resolve("golden/llama-tiny", revision=SHA) == snap                     # a commit sha, no ref
    assert hub.resolve(f"golden/llama-tiny@{SHA}") == snap
    assert hub.resolve("golden/llama-tiny", allow_patterns=["*.safetensors", "config.json"]) == snap
    # an explicit cache directory works without the environment
    other = tmp_path / "elsewhere"
    snap2 = lay_out_cache(other, "org/gguf-only", {"model.Q8_0.gguf": b"GGUF"}, ref="v1")
    assert hub.resolve("org/gguf-only", revision="v1", filename="model.Q8_0.gguf", cache=other) == snap2 / "model.Q8_0.gguf"
    assert hub.resolve("org/gguf-only/model.Q8_0.gguf@v1", cache=other) == snap2 / "model.Q8_0.gguf"   # a file of a repo


def test_missing_repository_or_file_says_what_and_downloads_nothing(offline_cache, monkeypatch):
    lay_out_cache(offline_cache, "golden/llama-tiny", {"config.json": TINY / "config.json"})
    with pytest.raises(hub.HubNotCachedError) as info:
        hub.resolve("org/absent")
    msg = str(info.value)
    assert "'org/absent'" in msg and "HF_HUB_OFFLINE" in msg and str(offline_cache) in msg
    with pytest.raises(hub.HubNotCachedError, match=r"model\.safetensors in snapshot .* HF_HUB_OFFLINE"):
        hub.resolve("golden/llama-tiny", filename="model.safetensors")
    with pytest.raises(hub.HubNotCachedError, match=r"\*\.safetensors"):
        hub.resolve("golden/llama-tiny", allow_patterns="*.safetensors")
    with pytest.raises(hub.HubNotCachedError, match="revision v9"):
        hub.resolve("golden/llama-tiny", revision="v9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(hub.HubNotCachedError, match=r"download=False"):
        hub.resolve("org/absent", download=False)
    # downloads allowed but failing (no network here): the same error, with the cause
    import huggingface_hub
    real = huggingface_hub.snapshot_download
    attempts = []

    def no_network(repo_id, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        attempts.append(repo_id)
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(hub.HubNotCachedError, match=r"download failed \(ConnectionError: no network\)"):
        hub.resolve("org/absent")
    assert attempts == ["org/absent"]


def test_gguf_file_of_a_cached_repository(offline_cache, tmp_path):
    """``org/name/file.gguf`` resolves to that file, so ``llama.from_pretrained`` takes GGUF repos."""
    import json

    from safetensors.numpy import load_file

    from lib.models.llama.gguf import GGUFCheckpoint, write_gguf
    sd = {k: v for f in sorted(TINY.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    write_gguf(tmp_path / "tiny.gguf", json.loads((TINY / "config.json").read_text()), sd, types="Q8_0")
    lay_out_cache(offline_cache, "golden/llama-tiny-GGUF", {"llama-tiny.Q8_0.gguf": tmp_path / "tiny.gguf"})
    path = hub.resolve("golden/llama-tiny-GGUF/llama-tiny.Q8_0.gguf")
    assert path.suffix == ".gguf" and GGUFCheckpoint(path).config["hidden_size"] == 64


def test_timm_weights_through_a_hub_id(offline_cache, golden, golden_dir):
    """``create_model(..., weights="hf-hub:timm/...")`` reads the cached model.safetensors (timm's
    key names) through the same strict torch-key-map path as a local file."""
    from safetensors.numpy import save_file

    from lib import zoo
    spec = golden.load(golden_dir / "starnet_s050_224.json")
    state_dict = golden.state_dict(spec)
    blob = offline_cache.parent / "model.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(blob))
    lay_out_cache(offline_cache, "timm/starnet_s050.test", {"model.safetensors": blob, "config.json": b"{}"})
    model = zoo.create_model("starnet_s050", abstract=True)     # filled by the loader: no init compiled
    report = zoo.load_pretrained(model, "hf-hub:timm/starnet_s050.test")
    assert report.ok and len(report.loaded) == len([k for k in state_dict if "num_batches" not in k])
    kernel = np.asarray(model.head.fc.kernel.get_value())
    np.testing.assert_array_equal(kernel, state_dict["head.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.stem.conv.kernel.get_value()),
                                  state_dict["stem.0.conv.weight"].transpose(2, 3, 1, 0))
    with pytest.raises(hub.HubNotCachedError, match="timm/starnet_s1.in1k"):
        zoo.load_pretrained(zoo.create_model("starnet_s1", abstract=True), "hf-hub:timm/starnet_s1.in1k")

