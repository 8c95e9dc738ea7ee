"""The command line shared by every project's ``train.py``: ``--config``, ``--workdir``, overrides.

``--config path.py:arg`` loads an ml-collections ``get_config(arg)``; ``--config.key=value``
overrides any entry (unknown keys are rejected by ml-collections before anything runs). For
multi-host runs, ``jax.distributed.initialize`` is called when ``--coordinator`` is given or the
environment of a cluster (TPU pod, SLURM, Open MPI) is detected by JAX. Before JAX starts, glibc's
malloc is told to keep freed memory (``lib/host_malloc.py``; ``--noretain_freed_memory`` to keep
glibc's defaults): on CPU this makes the train step about 25% faster.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (path.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (resumes if it has a checkpoint).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
flags.DEFINE_bool("retain_freed_memory", True, "Keep freed host memory for reuse instead of returning "
                  "it to the kernel (lib/host_malloc.py); must be decided before JAX starts.")
flags.mark_flags_as_required(["config", "workdir"])


def _main(argv, run):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.retain_freed_memory:
        from lib import host_malloc
        host_malloc.retain_freed_memory()
    import jax
    if FLAGS.coordinator:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize()
    run(FLAGS.config, FLAGS.workdir)


def main(run=None):
    """Parse flags and call ``run(config, workdir)`` (default: ``lib.train.loop.run``)."""
    if run is None:
        from lib.train.loop import run
    app.run(lambda argv: _main(argv, run))
