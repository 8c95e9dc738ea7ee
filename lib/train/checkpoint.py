"""Resumable checkpoints with orbax: the whole train state plus the data iterator.

A checkpoint holds params, optimizer state, BatchNorm statistics and RNG stream state (``rest``),
the EMA, the step and the grain iterator position, so a resumed run continues exactly where the
interrupted one stopped. Restoring goes straight into the (sharded) layout of the current run,
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
    def __init__(self, directory: Path, *, max_to_keep: int = 3, save_every: int = 0, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=asynchronous))
        self.save_every = save_every

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        if step in self.manager.all_steps():
            return False
        state, regenerable = masked.split_regenerable(state)  # frozen weights rebuilt from a seed: only recorded
        items = {"state": ocp.args.StandardSave(state)}
        if regenerable:
            items["frozen"] = ocp.args.JsonSave(masked.frozen_manifest(regenerable))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, state, data_iterator=None):
        """Restore the newest readable checkpoint into ``state``'s shapes and shardings.

        Returns ``(state, step)``, or ``(None, None)`` when there is no checkpoint.
        """
        state, regenerable = masked.split_regenerable(state)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(target)}
            if regenerable:
                items["frozen"] = ocp.args.JsonRestore()
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                kept = self._set_aside(step)
                log.warning("checkpoint at step %d in %s is unreadable (%s: %s); it was moved to %s (nothing is "
                            "deleted) and an earlier one is tried", step, self.directory, type(e).__name__, e, kept)
                continue
            if regenerable:  # outside the try: a mismatch is an error, not an unreadable checkpoint
                masked.check_frozen_manifest(restored["frozen"], masked.frozen_manifest(regenerable))
            return masked.merge_regenerable(restored["state"], regenerable), step
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
