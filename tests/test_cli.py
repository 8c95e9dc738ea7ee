"""lib.train.cli: a command line that cannot run ends as one ``error: ...`` line and exit status 2.

The parsing is tested in-process (``cli.parse_args`` with a fresh set of flags each call); two
subprocess runs check the whole path through ``absl.app.run``: an unknown key while parsing, and a
``loop.ConfigError`` raised by ``run`` (the batch not dividing the 2 CPU devices).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.train import cli

# ml-collections loads the config file with SourceFileLoader.load_module(), deprecated in Python 3.12.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "configs/starnet/digits.py"


def parse(*args, config=DIGITS, workdir="w"):
    argv = ["train.py"]
    if config is not None:
        argv += ["--config", config]
    if workdir is not None:
        argv += ["--workdir", workdir]
    return cli.parse_args(argv + list(args))


def error(*args, **kw) -> str:
    with pytest.raises(cli.CommandLineError) as info:
        parse(*args, **kw)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_overrides_parse():
    config, workdir = parse("--config.lr=0.1", "--config.input.batch_size=16", "--config.input.scale=(0.5,1.0)",
                            "--config.grad_clip=1.0", "--config.init_from=x.pth", "--noconfig.schedule_per_epoch",
                            "--config.model.name=starnet_s1", config=DIGITS + ":variant=s1,epochs=3")
    assert workdir == "w"
    assert (config.lr, config.input.batch_size, config.input.scale) == (0.1, 16, (0.5, 1.0))
    assert (config.grad_clip, config.init_from, config.schedule_per_epoch) == (1.0, "x.pth", False)
    assert (config.model.name, config.total_epochs) == ("starnet_s1", 3)
    assert parse()[0].lr == 4e-3                  # a fresh set of flags each call: nothing carried over


@pytest.mark.parametrize("args, expected", [
    (["--config.learning_rate=1"], "unknown config key 'learning_rate'; did you mean: lr?"),
    (["--config.input.batchsize=8"], "unknown config key 'input.batchsize'; did you mean: input.batch_size?"),
    (["--config.batch_size=8"], "unknown config key 'batch_size'; did you mean: input.batch_size?"),
    (["--noconfig.eval_onyl"], "unknown config key 'eval_onyl'; did you mean: eval_only"),
    (["--config.mixup.zzz=1"], "unknown config key 'mixup.zzz'; the keys of mixup are: cutmix_alpha, mixup_alpha, "
                               "prob, switch_prob"),
    (["--config.lr.x=1"], "unknown config key 'lr.x': 'lr' is 0.004, not a group of keys"),
])
def test_unknown_config_key(args, expected):
    assert error(*args).startswith(expected)


@pytest.mark.parametrize("args, expected", [
    (["--config.lr=abc"], "bad value 'abc' for config key 'lr': expected a float like 0.004"),
    (["--config.input.batch_size=1.5"], "bad value '1.5' for config key 'input.batch_size': expected an int like 64"),
    (["--config.eval_only=maybe"], "bad value 'maybe' for config key 'eval_only': expected a bool like False"),
    (["--num_processes=two"], "--num_processes=two: invalid literal for int()"),
])
def test_bad_value(args, expected):
    assert error(*args).startswith(expected)


def test_config_file_errors():
    assert error(config="no/such/file.py").startswith("config file 'no/such/file.py' does not exist")
    assert error(config="configs").startswith("config file 'configs' is not a file")
    assert error(config=DIGITS + ":varient=s1") == (
        f"--config {DIGITS}:varient=s1: unknown config argument 'varient'; "
        "known: ['epochs', 'image_size', 'runlocal', 'variant']")
    assert error(config=DIGITS + ":epochs=x").startswith(f"--config {DIGITS}:epochs=x: invalid literal for int()")


def test_missing_and_unknown_flags():
    assert error(workdir=None).startswith("--workdir is required")
    assert error(config=None).startswith("--config is required")
    assert error("--config.lr=1", config=None).startswith("--config.lr needs --config")
    assert error("--workdri=x").startswith("Unknown command line flag 'workdri'. Did you mean: workdir")
    assert error("extra").startswith("unexpected argument 'extra'")


def test_config_error_from_run_exits_2_other_errors_propagate(capsys):
    from lib.train import loop

    def bad_config(config, workdir):
        raise loop.ConfigError("input.batch_size=7 must divide by 2")

    with pytest.raises(SystemExit) as info:
        cli.call_run(bad_config, None, "w")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: input.batch_size=7 must divide by 2\n"

    def broken(config, workdir):
        raise ValueError("a bug, not a config error")

    with pytest.raises(ValueError, match="a bug"):
        cli.call_run(broken, None, "w")
    assert cli.call_run(lambda c, w: {"acc": 1.0}, None, "w") == {"acc": 1.0}


def _train(tmp_path, *args, **env):
    return subprocess.run([sys.executable, "-m", "projects.starnet.train", "--config", DIGITS,
                           "--workdir", str(tmp_path / "w"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_cli_unknown_key_is_one_line_exit_2(tmp_path):
    proc = _train(tmp_path, "--config.learning_rate=1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: unknown config key 'learning_rate'; did you mean: lr?"
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_cli_config_error_from_run_is_one_line_exit_2(tmp_path):
    proc = _train(tmp_path, "--config.input.batch_size=7", JAX_NUM_CPU_DEVICES="2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: input.batch_size=7 must divide by the data-parallel size 2")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
