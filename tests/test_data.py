"""Tests of lib.data: sources, timm-style transforms, grain pipelines and Mixup/CutMix.

Everything is offline and small: scikit-learn's digits, synthetic sources whose label is the
example's index (so shards and orders can be checked exactly), generated image folders, mocked
TFDS data and a tiny ArrayRecord TFDS dataset built on disk without TensorFlow.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lib import data
from lib.data import sources, transforms


class IndexSource:
    """``n`` random uint8 images of varied sizes; the label of example ``i`` is ``i``."""

    def __init__(self, n: int, seed: int = 0, min_size: int = 8, max_size: int = 24):
        rng = np.random.default_rng(seed)
        self._images = [rng.integers(0, 256, (int(rng.integers(min_size, max_size)),
                                              int(rng.integers(min_size, max_size)), 3), dtype=np.uint8)
                        for _ in range(n)]

    def __len__(self):
        return len(self._images)

    def __getitem__(self, i):
        return {"image": self._images[i], "label": i}


def small_cfg(**overrides):
    cfg = data.default_input_config()
    cfg.image_size = 16
    cfg.num_threads = 2
    cfg.prefetch = 2
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------------------------------------------------
# Sources

def test_digits_source_split_is_fixed_and_disjoint():
    train, val = sources.DigitsSource("train"), sources.DigitsSource("validation")
    assert (len(train), len(val)) == (1497, 300)
    assert not set(train.indices) & set(val.indices)
    assert len(set(train.indices) | set(val.indices)) == 1797
    np.testing.assert_array_equal(val.indices, sources.DigitsSource("validation").indices)
    example = train[0]
    assert example["image"].shape == (8, 8, 3) and example["image"].dtype == np.uint8
    assert example["image"].max() <= 255 and 0 <= example["label"] < 10
    with pytest.raises(ValueError, match="splits"):
        sources.DigitsSource("test")


def test_digits_pipeline_shapes_dtypes_labels():
    cfg = small_cfg(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    train = data.make_pipeline(cfg, train=True, batch_size=32, seed=0, process_index=0, process_count=1)
    assert (train.num_examples, train.steps_per_epoch, train.num_classes) == (1497, 1497 // 32, 10)
    batch = next(iter(train))
    assert batch["image"].shape == (32, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0 and batch["label"].max() < 10
    np.testing.assert_array_equal("valid" not in batch, True)
    assert np.isfinite(batch["image"]).all()
    val = data.make_pipeline(cfg, train=False, batch_size=128, seed=0, process_index=0, process_count=1)
    assert (val.num_examples, len(val)) == (300, 3)
    assert sum(b["valid"].sum() for b in val) == 300


def test_photo_crops_are_fixed_per_index_and_grey_on_request():
    train, val = sources.SamplePhotoCrops("train"), sources.SamplePhotoCrops("validation")
    assert (len(train), len(val), train.num_classes) == (1500, 300, 2)
    a, b = train[7], train[7]
    np.testing.assert_array_equal(a["image"], b["image"])          # a fixed crop, not a fresh draw per read
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
    assert [train[i]["label"] for i in range(4)] == [0, 1, 0, 1]    # the photo it comes from
    assert not np.array_equal(train[0]["image"], val[0]["image"])   # the splits draw other crops
    grey = sources.SamplePhotoCrops("train", grayscale=True)[7]["image"]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    assert not np.array_equal(a["image"][..., 0], a["image"][..., 2])
    with pytest.raises(ValueError, match="photos has splits"):
        sources.SamplePhotoCrops("test")
    cfg = small_cfg(dataset="photos", grayscale=True)
    pipe = data.make_pipeline(cfg, train=True, batch_size=16, seed=0, process_index=0, process_count=1)
    batch = next(iter(pipe))
    assert pipe.num_examples == 1500 and batch["image"].shape == (16, 16, 16, 3)
    pixels = batch["image"] * np.asarray(cfg.std) + np.asarray(cfg.mean)   # undo the normalisation
    np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)  # grey crops stay grey


def test_train_classes_keep_only_those_labels_in_the_training_split():
    cfg = small_cfg(train_classes=(0, 1, 2, 3, 4))
    train = data.make_pipeline(cfg, train=True, batch_size=32, seed=0, process_index=0, process_count=1)
    full = sources.DigitsSource("train")
    assert train.num_examples == sum(full[i]["label"] < 5 for i in range(len(full)))
    labels = np.concatenate([b["label"] for b in take(iter(train), train.steps_per_epoch)])
    assert labels.max() == 4 and set(labels) == {0, 1, 2, 3, 4}
    val = data.make_pipeline(cfg, train=False, batch_size=100, seed=0, process_index=0, process_count=1)
    assert val.num_examples == 300 and max(int(b["label"].max()) for b in val) == 9   # evaluation: all classes
    with pytest.raises(ValueError, match=r"train_classes=\(11,\): no training example"):
        data.make_pipeline(small_cfg(train_classes=(11,)), train=True, batch_size=32, seed=0,
                           process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------
# Pipelines: sharding, determinism, resume, padding

def test_process_shards_are_disjoint_and_cover_the_split():
    cfg, src = small_cfg(), IndexSource(21)
    seen = []
    for p in range(2):
        pipe = data.make_pipeline(cfg, train=False, batch_size=4, seed=0, process_index=p, process_count=2,
                                  source=src)
        labels = np.concatenate([b["label"][b["valid"] > 0] for b in pipe])
        assert len(pipe) == 3   # ceil(ceil(21 / 2) / 4) on both processes
        seen.append(set(labels.tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(21))

    train_seen = []
    for p in range(2):
        pipe = data.make_pipeline(cfg, train=True, batch_size=5, seed=0, process_index=p, process_count=2,
                                  source=src)
        assert (pipe.num_examples, pipe.steps_per_epoch) == (10, 2)  # equal shards: 21 // 2
        labels = np.concatenate([b["label"] for b in take(iter(pipe), 2)]).tolist()
        assert len(set(labels)) == 10   # one epoch sees each example of the shard once
        train_seen.append(set(labels))
    assert not train_seen[0] & train_seen[1]


def test_same_seed_same_batches_different_seed_different():
    cfg, src = small_cfg(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5), IndexSource(40)
    make = functools.partial(data.make_pipeline, cfg, train=True, batch_size=8, process_index=0, process_count=1,
                             source=src)
    a, b, c = take(iter(make(seed=3)), 3), take(iter(make(seed=3)), 3), take(iter(make(seed=4)), 3)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_from_iterator_state_gives_identical_batches():
    cfg, src = small_cfg(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5), IndexSource(30)
    make = functools.partial(data.make_pipeline, cfg, train=True, batch_size=8, seed=1, process_index=0,
                             process_count=1, source=src)
    it = iter(make())
    take(it, 2)
    state = it.get_state()
    uninterrupted = take(it, 5)   # 3 batches per epoch: this crosses into epochs 2 and 3
    resumed = iter(make())        # a fresh pipeline, as after a restart
    resumed.set_state(state)
    assert_batches_equal(uninterrupted, take(resumed, 5))

    # Each epoch is reshuffled and re-augmented.
    epochs = take(iter(make()), 6)
    assert not np.array_equal(epochs[0]["label"], epochs[3]["label"])
    first, second = epochs[0], [b for b in epochs[3:6] if epochs[0]["label"][0] in b["label"]][0]
    j = int(np.flatnonzero(second["label"] == first["label"][0])[0])
    assert not np.array_equal(first["image"][0], second["image"][j])


def test_eval_pass_is_ordered_and_padded_with_a_validity_mask():
    cfg, src = small_cfg(), IndexSource(10)
    pipe = data.make_pipeline(cfg, train=False, batch_size=4, seed=0, process_index=0, process_count=1,
                              source=src)
    batches = list(pipe)
    assert len(batches) == len(pipe) == 3 and pipe.num_examples == 10
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(valid, [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:10], np.arange(10))
    np.testing.assert_array_equal(batches[-1]["image"][2:], 0.0)
    assert_batches_equal(batches, list(pipe))   # a second pass is identical


class SideDataSource(IndexSource):
    """IndexSource whose examples also carry side data a task may attach (any keys, any shapes)."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "tokens": np.full((3,), i + 1, np.int32), "soft": np.float32(i + 0.5)}


def test_side_data_passes_through_both_pipelines_and_eval_padding_covers_every_key():
    cfg, src = small_cfg(), SideDataSource(10)
    val = list(data.make_pipeline(cfg, train=False, batch_size=4, seed=0, process_index=0, process_count=1,
                                  source=src))
    tokens = np.concatenate([b["tokens"] for b in val])
    np.testing.assert_array_equal(tokens[:10, 0], np.arange(1, 11))
    np.testing.assert_array_equal(tokens[10:], 0)                      # padding: zeros of the same shape
    assert tokens.dtype == np.int32 and val[-1]["soft"].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b["valid"] for b in val]), [1] * 10 + [0] * 2)
    train = next(iter(data.make_pipeline(cfg, train=True, batch_size=4, seed=0, process_index=0, process_count=1,
                                         source=src)))
    np.testing.assert_array_equal(train["tokens"][:, 0], train["label"] + 1)   # rides with its own example
    assert "valid" not in train


def test_multiprocess_workers_give_the_same_batches():
    cfg, src = small_cfg(), IndexSource(24)
    make = functools.partial(data.make_pipeline, train=True, batch_size=4, seed=0, process_index=0,
                             process_count=1, source=src)
    expected = take(iter(make(cfg)), 4)
    it = iter(make(small_cfg(num_workers=2)))
    try:
        assert_batches_equal(expected, take(it, 4))
    finally:
        it.close()


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="input.dataset"):
        data.make_pipeline(small_cfg(dataset="cifar"), train=True, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_pipeline(small_cfg(), train=True, batch_size=0, seed=0)
    missing = tmp_path / "no_such_dir"
    for kind in ("tfds", "imagefolder"):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            data.make_pipeline(small_cfg(dataset=kind, name="mnist", data_dir=str(missing)), train=True,
                               batch_size=8, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="RandAugment"):
        data.make_pipeline(small_cfg(auto_augment="rand-q9"), train=True, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.make_pipeline(small_cfg(), train=True, batch_size=8, seed=0, process_index=0, process_count=1,
                           source=IndexSource(7))


# ------------------------------------------------------------------------------------------------
# Transforms

@pytest.mark.parametrize("width,height", [(64, 48), (8, 8), (400, 20), (20, 400), (1, 1)])
def test_random_resized_crop_stays_inside_the_image(width, height):
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = transforms.random_resized_crop_params(width, height, rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    img = Image.new("RGB", (width, height))
    for interpolation in ("bilinear", "bicubic", "random"):
        out = transforms.random_resized_crop(img, 24, rng, interpolation=interpolation)
        assert out.size == (24, 24)


def test_random_resized_crop_falls_back_to_a_center_crop():
    # In a 400x20 image no crop of >= 90% of the area has an aspect ratio within [3/4, 4/3], so
    # all 10 tries fail and the center crop clamped to the largest ratio (4/3) is used.
    top, left, h, w = transforms.random_resized_crop_params(400, 20, np.random.default_rng(0), scale=(0.9, 1.0))
    assert (h, w) == (20, round(20 * 4 / 3)) and top == 0 and left == (400 - w) // 2


def test_rand_augment_parsing():
    ra = transforms.RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.magnitude_std, ra.num_layers, ra.prob) == (9, 0.5, 2, 0.5)
    assert ra.ops == transforms.RAND_INCREASING_OPS
    ra = transforms.RandAugment.from_string("rand-n3-m5-p1.0-mmax8", fill=(1, 2, 3), interpolation="bilinear")
    assert (ra.num_layers, ra.magnitude, ra.prob, ra.magnitude_max, ra.fill) == (3, 5, 1.0, 8, (1, 2, 3))
    assert ra.ops == transforms.RAND_OPS
    assert transforms.RandAugment.from_string("rand-m9-mstd101").magnitude_std == math.inf
    for bad in ("augmix-m5", "rand-x9", "rand-m", "rand-m9-", "randm9", "rand-inc"):
        with pytest.raises(ValueError):
            transforms.RandAugment.from_string(bad)


def test_rand_augment_ops_run_and_change_the_image():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    for name in (*transforms.RAND_OPS, *transforms.RAND_INCREASING_OPS):   # every op, every level
        for magnitude in (0, 5, 10):
            ra = transforms.RandAugment(ops=(name,), num_layers=1, magnitude=magnitude, prob=1.0)
            out = ra(img, np.random.default_rng(1))
            assert out.size == img.size and out.mode == "RGB"
    ra = transforms.RandAugment.from_string("rand-m9-mstd0.5-inc1-p1.0")
    changed = [not np.array_equal(np.asarray(ra(img, np.random.default_rng(s))), np.asarray(img))
               for s in range(10)]
    assert sum(changed) >= 8


def test_random_erasing_replaces_one_rectangle():
    x = np.zeros((32, 32, 3), np.float32)
    out = transforms.random_erasing(x.copy(), np.random.default_rng(0), prob=1.0, mode="pixel")
    rows, cols = np.nonzero((out != 0).any(-1))
    assert rows.size > 0
    box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert (box != 0).all()   # a filled rectangle of noise, zeros elsewhere
    area = box.shape[0] * box.shape[1] / (32 * 32)
    assert 0.01 < area < 0.45
    np.testing.assert_array_equal(transforms.random_erasing(x.copy(), np.random.default_rng(0), prob=0.0), x)


@pytest.mark.parametrize("size,crop_pct,resized", [(224, 0.875, 256), (224, 0.9, 248), (224, 1.0, 224),
                                                   (16, 0.875, 18)])
def test_eval_resize_and_center_crop(size, crop_pct, resized):
    assert transforms.eval_resize_size(size, crop_pct) == resized
    img = Image.new("RGB", (400, 300))
    scaled = transforms.resize_shorter_side(img, resized)
    assert scaled.size == (int(resized * 400 / 300), resized)
    out = transforms.EvalTransform(size, crop_pct)({"image": np.asarray(img), "label": 3})
    assert out["image"].shape == (size, size, 3) and out["label"] == 3 and "valid" not in out
    with pytest.raises(ValueError):
        transforms.eval_resize_size(224, 0.0)


def test_normalize_matches_the_formula():
    x = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = transforms.normalize(x, mean, std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x / 255.0 - np.array(mean)) / np.array(std), atol=1e-5)


def test_center_crop_takes_the_middle():
    array = np.zeros((10, 10, 3), np.uint8)
    array[3:7, 3:7] = 255
    assert (np.asarray(transforms.center_crop(Image.fromarray(array), 4)) == 255).all()


def test_to_pil_accepts_grey_rgba_and_encoded_bytes(tmp_path):
    assert transforms.to_pil(np.zeros((5, 6), np.uint8)).mode == "RGB"
    assert transforms.to_pil(np.zeros((5, 6, 1), np.uint8)).size == (6, 5)
    assert transforms.to_pil(np.zeros((5, 6, 4), np.uint8)).mode == "RGB"
    Image.new("L", (7, 3)).save(tmp_path / "g.png")
    assert transforms.to_pil((tmp_path / "g.png").read_bytes()).size == (7, 3)
    with pytest.raises(ValueError):
        transforms.to_pil(np.zeros((5, 6, 3), np.float32))


# ------------------------------------------------------------------------------------------------
# Image folders

from conftest import IMAGE_FOLDER_CLASSES as CLASSES  # noqa: E402


def test_image_folder_pipeline(image_folder):
    root, counts = image_folder
    cfg = small_cfg(dataset="imagefolder", data_dir=str(root), auto_augment="rand-m9-mstd0.5-inc1",
                    interpolation="random", reprob=0.25)
    src = sources.ImageFolderSource(root, "train")
    assert src.classes == list(CLASSES) and len(src) == 4 * counts["train"]
    train = data.make_pipeline(cfg, train=True, batch_size=16, seed=0, process_index=0, process_count=1)
    assert train.num_classes == 4 and train.num_examples == 160 and train.steps_per_epoch == 10
    batches = take(iter(train), 10)
    assert all(b["image"].shape == (16, 16, 16, 3) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(np.bincount(labels, minlength=4), [40] * 4)   # one full epoch
    val = data.make_pipeline(cfg, train=False, batch_size=16, seed=0, process_index=0, process_count=1)
    assert val.num_examples == 40 and len(val) == 3
    val_labels = np.concatenate([b["label"][b["valid"] > 0] for b in val])
    np.testing.assert_array_equal(val_labels, np.repeat(np.arange(4), 10))   # sorted class order


def test_image_folder_errors(tmp_path, image_folder):
    root, _ = image_folder
    missing = tmp_path / "missing_root"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sources.ImageFolderSource(missing, "train")
    with pytest.raises(FileNotFoundError, match="<split>/<class>"):
        sources.ImageFolderSource(root, "test")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        sources.ImageFolderSource(tmp_path / "empty", "train")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "train" / "a.png")
    with pytest.raises(ValueError, match="class sub-directories"):
        sources.ImageFolderSource(tmp_path / "flat", "train")
    with pytest.raises(ValueError, match="not among"):
        sources.ImageFolderSource(root, "val", classes=["ant"])


# ------------------------------------------------------------------------------------------------
# TFDS (ArrayRecord, no TensorFlow)

def test_tfds_mock_data_with_random_image_shapes():
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = small_cfg(dataset="tfds", name="imagenet2012", auto_augment="rand-m9-mstd0.5-inc1")
    with tfds.testing.mock_data(num_examples=24):
        shapes = {sources.TfdsSource("imagenet2012", "train")[i]["image"].shape for i in range(8)}
        assert len(shapes) > 1   # mocked images have random sizes: the resize path is exercised
        train = data.make_pipeline(cfg, train=True, batch_size=6, seed=0, process_index=1, process_count=2)
        assert (train.num_examples, train.steps_per_epoch, train.num_classes) == (12, 2, 1000)
        batch = next(iter(train))
        assert batch["image"].shape == (6, 16, 16, 3) and batch["label"].max() < 1000
        val = data.make_pipeline(cfg, train=False, batch_size=5, seed=0, process_index=0, process_count=1)
        assert sum(b["valid"].sum() for b in val) == 24 and len(val) == 5
        grey = data.make_pipeline(small_cfg(dataset="tfds", name="mnist"), train=False, batch_size=8, seed=0,
                                  process_index=0, process_count=1)
        assert next(iter(grey))["image"].shape == (8, 16, 16, 3)   # 28x28x1 -> RGB


def test_tfds_array_record_dataset_built_on_disk(tiny_tfds_dir):
    tmp_path = tiny_tfds_dir
    cfg = small_cfg(dataset="tfds", name="tiny_shapes", data_dir=str(tmp_path))
    val = data.make_pipeline(cfg, train=False, batch_size=4, seed=0, process_index=0, process_count=1)
    assert (val.num_examples, val.num_classes, len(val)) == (7, 3, 2)
    labels = np.concatenate([b["label"][b["valid"] > 0] for b in val])
    np.testing.assert_array_equal(np.bincount(labels, minlength=3), [3, 2, 2])
    train = data.make_pipeline(cfg, train=True, batch_size=4, seed=0, process_index=0, process_count=1)
    assert train.steps_per_epoch == 4 and next(iter(train))["image"].shape == (4, 16, 16, 3)
    with pytest.raises(FileNotFoundError, match="tfds build no_such_dataset"):
        data.make_pipeline(small_cfg(dataset="tfds", name="no_such_dataset", data_dir=str(tmp_path)),
                           train=True, batch_size=4, seed=0, process_index=0, process_count=1)
