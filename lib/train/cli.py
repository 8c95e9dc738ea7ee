"""The command line shared by every project's ``train.py``: ``--config``, ``--workdir``, overrides.

``--config path.py:arg`` loads an ml-collections ``get_config(arg)``; ``--config.key=value``
overrides any entry. For multi-host runs, ``jax.distributed.initialize`` is called when
``--coordinator`` is given or the environment of a cluster (TPU pod, SLURM, Open MPI) is detected by
JAX. Before JAX starts, glibc's malloc is told to keep freed memory (``lib/host_malloc.py``;
``--noretain_freed_memory`` to keep glibc's defaults): on CPU this makes the train step about 25%
faster.

A command line that cannot run (an unknown flag or config key, a missing config file, a value of
the wrong type, a bad ``:arg``, a missing ``--config``/``--workdir``, or a
:class:`lib.train.loop.ConfigError` from ``run``) ends with one line on stderr, ``error: ...``,
and exit status 2 (the parsing errors before JAX starts or the workdir is touched). Any other
exception is a bug or a runtime failure and propagates with its traceback. :func:`parse_args` is the parsing on its own.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

_OVERRIDE = re.compile(r"^--?(?:no)?config\.")          # as ml_collections finds the overrides
_PLAIN_KEY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_ARTICLE = {"int": "an int", "float": "a float", "bool": "a bool", "string": "a string",
            "tuple": "a tuple"}


class CommandLineError(Exception):
    """The command line cannot run; shown as one ``error: ...`` line, exit status 2."""


def _define_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None) -> None:
    """The flags of ``train.py``; ``argv`` is where ml-collections looks for ``--config.*``
    overrides (``None``: ``sys.argv``, the command line :func:`absl.app.run` parses)."""
    config_flags.DEFINE_config_file("config", None, "Training config file (path.py[:arg]).",
                                    flag_values=flag_values, lock_config=True,
                                    sys_argv=None if argv is None else list(argv))
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go (resumes if it has a "
                        "checkpoint).", flag_values=flag_values)
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator).",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).",
                         flag_values=flag_values)
    flags.DEFINE_bool("retain_freed_memory", True, "Keep freed host memory for reuse instead of returning "
                      "it to the kernel (lib/host_malloc.py); must be decided before JAX starts.",
                      flag_values=flag_values)


_define_flags(FLAGS, None)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _keys(config) -> list[str]:
    """Every dotted key of ``config``, groups included (``input``, ``input.batch_size``, ...)."""
    out = []
    for k, v in config.items():
        out.append(k)
        if isinstance(v, ml_collections.ConfigDict):
            out += [f"{k}.{sub}" for sub in _keys(v)]
    return out


def _walk(config, key: str):
    """Follow dotted ``key`` into ``config``: ``(parts found, node reached)``."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return i, node
        node = node[part]
    return len(parts), node


def _lookup(config, key: str):
    """``(True, value)`` when dotted ``key`` names an entry of ``config``, else ``(False, None)``."""
    if not isinstance(config, ml_collections.ConfigDict) or not _PLAIN_KEY.match(key):
        return False, None
    i, node = _walk(config, key)
    return (True, node) if i == len(key.split(".")) else (False, None)


def _unknown_key_message(key: str, config) -> str | None:
    """``None`` when ``key`` (dotted) names an entry of ``config``, else what to print, with the
    close matches (difflib, as :func:`lib.zoo.model_info`) or else the keys that do exist."""
    parts = key.split(".")
    i, node = _walk(config, key)
    if i == len(parts):
        return None
    group = ".".join(parts[:i])                   # the deepest part that exists
    if i and not isinstance(node, ml_collections.ConfigDict):
        return f"unknown config key {key!r}: {group!r} is {node!r}, not a group of keys"
    prefix, level, leaf = group + "." if group else "", node, parts[i]
    close = [prefix + k for k in difflib.get_close_matches(leaf, list(level.keys()), n=3, cutoff=0.6)]
    words = [w for w in leaf.split("_") if w]
    acronym = "".join(w[0] for w in words)
    if len(words) > 1 and acronym in level:       # learning_rate -> lr
        close.append(prefix + acronym)
    if i == len(parts) - 1:                       # batch_size -> input.batch_size
        close += [k for k in _keys(config) if k.rsplit(".", 1)[-1] == leaf]
    else:                                         # inputs.batch_size -> input.batch_size
        close = difflib.get_close_matches(key, _keys(config), n=3, cutoff=0.8) + close
    close = list(dict.fromkeys(close))[:4]
    if close:
        hint = f"did you mean: {', '.join(close)}?"
    else:
        hint = f"the keys of {group or 'the config'} are: {', '.join(sorted(level.keys()))}"
    return f"unknown config key {key!r}; {hint}"


class _ConfigFileParser(flags.ArgumentParser):
    """ml-collections' ``--config`` parser, with its errors made :class:`CommandLineError`: a missing
    file, ``get_config`` failing (a bad ``:arg``), and an override of a key the config lacks."""

    def __init__(self, inner, argv: Sequence[str]):
        self.inner, self.argv = inner, argv
        self.config = None

    def flag_type(self):
        return self.inner.flag_type()

    def parse(self, argument):
        path = argument.split(":", 1)[0]
        if not os.path.isfile(path):
            what = "is not a file" if os.path.exists(path) else "does not exist"
            raise CommandLineError(f"config file {path!r} {what} (--config path.py[:arg], relative to "
                                   f"{os.getcwd()})")
        try:
            config = self.inner.parse(argument)
        except (TypeError, ValueError) as e:      # ml-collections re-raises get_config's with a traceback
            cause = e.__context__ or e
            kind = "" if isinstance(cause, ValueError) else f"{type(cause).__name__}: "
            raise CommandLineError(f"--config {argument}: {kind}{_one_line(cause)}") from cause
        if not isinstance(config, ml_collections.ConfigDict):
            error = getattr(config, "__dict__", {}).get("_error")   # ml-collections' deferred OSError
            if config is None or error is not None:
                raise CommandLineError(f"--config {argument}: "
                                       + (_one_line(error) if error else "get_config() returned None"))
            return config
        self.config = config
        for arg in flags.FLAGS.read_flags_from_files(list(self.argv), force_gnu=False):
            if _OVERRIDE.match(arg):
                key = arg.split("=", 1)[0].split(".", 1)[1]
                message = _unknown_key_message(key, config) if _PLAIN_KEY.match(key) else None
                if message:
                    raise CommandLineError(message)
        return config


def _bad_value_message(error: flags.IllegalFlagValueError, flag_values, config) -> str:
    message = _one_line(error)
    m = re.match(r"flag --([^=\s]+)=", message)
    if not m:
        return message
    name = m.group(1)
    cause = error.__context__
    reason = _one_line(cause) if cause is not None else ""
    if not name.startswith("config.") or not reason or not message.endswith(": " + reason):
        return message.removeprefix("flag ")
    value = message[m.end():-len(reason) - 2]
    kind = flag_values[name].flag_type() if name in flag_values else "?"
    expected = _ARTICLE.get(kind, kind)
    key = name.split(".", 1)[1]
    found, current = _lookup(config, key)
    like = f" like {current!r}" if found and current is not None else ""
    if len(cause.args) > 1 and isinstance(cause.args[0], str):     # absl's bool parser: (message, value)
        reason = _one_line(cause.args[0])
    return f"bad value {value!r} for config key {key!r}: expected {expected}{like} ({reason})"


def parse_args(argv: Sequence[str], flag_values: flags.FlagValues | None = None):
    """Parse a ``train.py`` command line (``argv[0]`` is the program); returns ``(config, workdir)``.

    Raises :class:`CommandLineError` for any command line that cannot run. ``flag_values``: where
    the flags are defined and parsed; by default a fresh set (so this can be called repeatedly, in
    tests); :func:`main` passes absl's ``FLAGS`` with ``argv`` = ``sys.argv``.
    """
    if flag_values is None:
        flag_values = flags.FlagValues()
        _define_flags(flag_values, argv)
    config_flag = flag_values["config"]
    parser = config_flag.parser = _ConfigFileParser(getattr(config_flag.parser, "inner", config_flag.parser),
                                                    argv)
    config_given = any(re.match(r"^--?config(=|$)", a) for a in argv[1:])
    try:
        rest = flag_values(list(argv))
    except flags.UnrecognizedFlagError as e:
        if e.flagname.startswith("config.") and not config_given:
            raise CommandLineError(f"--{e.flagname} needs --config (path.py[:arg]) to override") from None
        raise CommandLineError(_one_line(e)) from None
    except flags.IllegalFlagValueError as e:
        raise CommandLineError(_bad_value_message(e, flag_values, parser.config)) from None
    except flags.Error as e:
        raise CommandLineError(_one_line(e)) from None
    except TypeError as e:                          # ml-collections setting an override's value
        raise CommandLineError(_one_line(e)) from None
    if len(rest) > 1:
        raise CommandLineError(f"unexpected argument {rest[1]!r} (every option is a flag: --config, "
                               "--workdir, --config.key=value, ...)")
    if flag_values["config"].value is None:
        raise CommandLineError("--config is required: the training config file, path.py[:arg]")
    if not flag_values["workdir"].value:
        raise CommandLineError("--workdir is required: where checkpoints, metrics and logs go")
    return flag_values["config"].value, flag_values["workdir"].value


def _exit(error: Exception):
    """Print ``error: <message>`` as one line on stderr; exit with status 2 (a usage error)."""
    sys.stdout.flush()
    print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
    sys.exit(2)


def _main(config, workdir, run):
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
    call_run(run, config, workdir)


def call_run(run, config, workdir):
    """``run(config, workdir)``, with a :class:`lib.train.loop.ConfigError` ending the program as one
    ``error: ...`` line and exit status 2; any other exception propagates with its traceback."""
    try:
        return run(config, workdir)
    except Exception as e:
        loop = sys.modules.get("lib.train.loop")    # loaded if it raised its ConfigError
        if loop is not None and isinstance(e, loop.ConfigError):
            _exit(e)
        raise


def main(run=None):
    """Parse flags and call ``run(config, workdir)`` (default: ``lib.train.loop.run``)."""
    if run is None:
        from lib.train.loop import run
    parsed = []

    def flags_parser(argv):
        try:
            parsed.append(parse_args(argv, FLAGS))
        except CommandLineError as e:
            _exit(e)
        return argv[:1]

    app.run(lambda argv: _main(*parsed[0], run), flags_parser=flags_parser)
