"""Task-side code that runs inside the train step: Mixup/CutMix (timm semantics) and the classification losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.tasks import losses, mixup

# ------------------------------------------------------------------------------------------------
# Mixup / CutMix

@pytest.fixture(autouse=True)
def _allow_transfers():
    # These checks compare device results with numpy on purpose; a conftest may set
    # jax_transfer_guard='disallow' for the rest of the suite.
    with jax.transfer_guard("allow"):
        yield


# Jitted once per hyper-parameter set (they are static): eager dispatch of the many small ops
# would dominate the test time.
mix = jax.jit(mixup.mixup_cutmix, static_argnames=("num_classes", "mixup_alpha", "cutmix_alpha", "prob",
                                                  "switch_prob", "label_smoothing"))


def _constant_batch(b=8, h=16, w=16):
    # Example i is the constant image i, with label i: pixel values reveal where they came from.
    images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, h, w, 3))
    return images, jnp.arange(b)


def test_mixup_cutmix_targets_and_identity():
    images, labels = _constant_batch()
    same, targets = mix(jax.random.key(0), images, labels, num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0,
                        label_smoothing=0.1)
    np.testing.assert_array_equal(same, images)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 0], 1 - 0.1 + 0.01, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 1], 0.01, rtol=1e-6)
    same, _ = mix(jax.random.key(0), images, labels, num_classes=10, prob=0.0)
    np.testing.assert_array_equal(same, images)
    for seed in range(5):
        _, targets = mix(jax.random.key(seed), images, labels, num_classes=10)
        assert targets.dtype == jnp.float32 and targets.shape == (8, 10)
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)


def test_mixup_matches_its_targets():
    images, labels = _constant_batch()
    mixed, targets = mix(jax.random.key(1), images, labels, num_classes=8, mixup_alpha=0.8, cutmix_alpha=0.0,
                         label_smoothing=0.0)
    lam = targets[0, 0]
    assert 0 < lam < 1
    expected = lam * images + (1 - lam) * images[::-1]
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-5)


def test_cutmix_lam_is_the_unpasted_area():
    images, labels = _constant_batch(h=20, w=24)
    for seed in range(8):
        mixed, targets = mix(jax.random.key(seed), images, labels, num_classes=8, mixup_alpha=0.0,
                             cutmix_alpha=1.0, label_smoothing=0.0)
        kept = float(jnp.mean(mixed[0] == images[0]))       # pixels of example 0 still its own
        pasted = float(jnp.mean(mixed[0] == images[-1]))    # pixels pasted from the flipped batch
        np.testing.assert_allclose(targets[0, 0], kept, atol=1e-6)
        np.testing.assert_allclose(targets[0, 7], pasted, atol=1e-6)
        np.testing.assert_allclose(kept + pasted, 1.0, atol=1e-6)


def test_mixup_cutmix_is_jittable():
    images, labels = _constant_batch()
    eager = mixup.mixup_cutmix(jax.random.key(2), images, labels, num_classes=10)
    jitted = mix(jax.random.key(2), images, labels, num_classes=10)
    np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-5, atol=1e-6)
    kinds = set()
    for seed in range(12):   # the on-device switch takes both branches
        mixed, _ = mix(jax.random.key(seed), images, labels, num_classes=10)
        # CutMix keeps some pixels exactly; mixup changes every pixel of example 0 unless lam == 1.
        kinds.add("cutmix" if bool((mixed[0] == images[0]).any()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


