"""Resumable checkpoints with orbax: the whole train state plus the data iterator.

A checkpoint holds the trained params, optimizer state, BatchNorm statistics and RNG stream state
(``rest``), the EMA, the step and the grain iterator position, so a resumed run continues exactly
where the interrupted one stopped. Frozen state (``lib.train.step.split_model``) is not rewritten
into every checkpoint: a manifest records where it came from (model, seed, ``init_from``, or a
weight seed and strategy) and each array's shape, dtype and sha256; the run rebuilds it the same
way and a restore first checks it against the manifest (a mismatch is an error and changes nothing). Restoring goes straight into the (sharded) layout of the current run,
which may use another mesh than the run that saved it. An unreadable latest checkpoint falls
back to the previous one with a warning; nothing is ever deleted on failure.
"""
from __future__ import annotations

import logging
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from lib.layers import masked

log = logging.getLogger(__name__)


class Checkpointer:
    """``frozen``: the run's frozen state (its manifest is written with every checkpoint and checked
    on restore); ``origin``: a JSON-able description of where it comes from, shown on a mismatch."""

    def __init__(self, directory: Path, *, max_to_keep: int = 3, save_every: int = 0, asynchronous: bool = True,
                 frozen=None, origin: dict | None = None):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=asynchronous))
        self.save_every = save_every
        self.frozen, self.origin = frozen, origin or {}
        self._manifest = None

    def frozen_manifest(self) -> dict | None:
        """Computed once (the frozen state never changes); None when there is no frozen state."""
        if self._manifest is None and self.frozen is not None and jax.tree.leaves(self.frozen):
            self._manifest = {"origin": self.origin, "weights": masked.frozen_manifest({"frozen": self.frozen})}
        return self._manifest

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if self.frozen_manifest():
            items["frozen"] = ocp.args.JsonSave(self.frozen_manifest())
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _check_frozen(self, step: int) -> None:
        """Before anything is restored: the checkpoint's frozen manifest equals this run's."""
        saved = {}
        if (Path(self.manager.directory) / str(step) / "frozen").exists():
            saved = self.manager.restore(step, args=ocp.args.Composite(frozen=ocp.args.JsonRestore()))["frozen"]
        current = self.frozen_manifest() or {}
        try:
            masked.check_frozen_manifest(saved.get("weights", {}), current.get("weights", {}))
        except masked.FrozenWeightMismatch as e:
            raise masked.FrozenWeightMismatch(
                f"{e}\n  checkpoint {self.directory}/{step} was written by a run built from "
                f"{saved.get('origin', {})}; this run is built from {current.get('origin', {})}") from None

    def restore_latest(self, state, data_iterator=None):
        """Restore the newest readable checkpoint into ``state``'s shapes and shardings.

        Returns ``(state, step)``, or ``(None, None)`` when there is no checkpoint. Raises
        :class:`lib.layers.masked.FrozenWeightMismatch` (restoring nothing) when the checkpoint was
        trained over other frozen weights than this run's.
        """
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                self._check_frozen(step)
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except masked.FrozenWeightMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                kept = self._set_aside(step)
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s); it was moved to %s (nothing is "
                            "deleted) and an earlier one is tried", step, self.directory, type(e).__name__, e, kept)
                continue
            return restored["state"], step
        return None, None

    def _set_aside(self, step: int) -> Path:
        """Rename an unreadable step directory so training can write that step again."""
        path = Path(self.manager.directory) / str(step)
        kept = path.with_name(f"{step}.unreadable")
        if jax.process_index() == 0 and path.exists():
            n = 1
            while kept.exists():
                kept, n = path.with_name(f"{step}.unreadable{n}"), n + 1
            path.rename(kept)
        self.manager.reload()
        return kept

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
