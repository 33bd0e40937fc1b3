from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.stack import run_chitrakar


def test_run_with_neither_a_token_nor_the_web_chat_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env["CHITRAKAR_DATA_DIR"] = str(tmp_path / "data")
    env["CHITRAKAR_WEB_CHAT"] = "false"
    result = run_chitrakar("run", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "CHITRAKAR_TELEGRAM_TOKEN is not set and the web chat is off" in result.stderr
    assert "@BotFather" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_invalid_setting_is_named_in_one_line_for_every_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env.update(CHITRAKAR_DATA_DIR=str(tmp_path / "data"), CHITRAKAR_DEVICE="tpu")
    env.update(CHITRAKAR_TELEGRAM_WEBHOOK_SECRET="kept-out" * 40, CHITRAKAR_WEB_PORT="0")
    # `plan` reads no setting, yet a mistyped one is still reported, not a traceback.
    result = run_chitrakar("plan", "--gpu-mem", "8GiB", "--model", "sdxl", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "chitrakar: invalid settings:",
        "  CHITRAKAR_TELEGRAM_WEBHOOK_SECRET: Value should have at most 256 items after "
        "validation, not 320",
        "  CHITRAKAR_WEB_PORT: Input should be greater than or equal to 1",
        "  CHITRAKAR_DEVICE: String should match pattern '^(auto|cpu|mps|cuda(:\\d+)?)$'",
    ]
    assert "kept-out" not in result.stderr  # a secret's value is never printed


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env.update(CHITRAKAR_DATA_DIR=str(tmp_path / "data"), HF_HUB_OFFLINE="1", **extra)
    return env


def test_plan_checks_the_gpus_compute_capability_when_given(tmp_path: Path) -> None:
    args = ("plan", "--gpu-mem", "11GiB", "--model", "sdxl")
    unchecked = run_chitrakar(*args, env=_env(tmp_path), cwd=tmp_path)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "Compute capability not checked: give --capability" in unchecked.stdout
    assert re.search(r"^bf16\s+yes\s", unchecked.stdout, re.MULTILINE)
    # An RTX 2080 Ti: 11 GiB, compute capability 7.5.
    turing = run_chitrakar(*args, "--capability", "7.5", env=_env(tmp_path), cwd=tmp_path)
    assert turing.returncode == 0, turing.stderr
    assert re.search(r"^bf16\s+cannot run\s", turing.stdout, re.MULTILINE)
    assert re.search(r"^gpu\s+no\s+11\.5 GiB \(fp16\)", turing.stdout, re.MULTILINE)
    assert "Checked against compute capability 7.5." in turing.stdout
    bad = run_chitrakar(*args, "--capability", "turing", env=_env(tmp_path), cwd=tmp_path)
    assert bad.returncode == 2 and "cannot read 'turing' as a compute capability" in bad.stderr


def test_tco_takes_the_throughput_at_batch_one_unless_told(tmp_path: Path) -> None:
    costs: tuple[str, ...] = ("--hourly-rent", "2", "--power-watts", "700")
    costs += ("--electricity-price", "8", "--utilisation", "0.005")
    measured = ("--model", "sdxl", "--preset", "fp16", "--device", "H200", *costs)
    # SDXL fp16 on the H200: 2.313 s an image at batch 1, 1.245 at batch 4.
    lone = run_chitrakar("tco", *measured, env=_env(tmp_path), cwd=tmp_path)
    assert lone.returncode == 0, lone.stderr
    assert "throughput: 0.432 images/s, sdxl fp16 at batch 1," in lone.stdout
    assert "batch 1 as a lone job runs (--batch N for another)" in lone.stdout
    assert "Self-hosting at 0.5% utilisation" in lone.stdout
    full = run_chitrakar("tco", *measured, "--batch", "4", env=_env(tmp_path), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    assert "throughput: 0.803 images/s, sdxl fp16 at batch 4," in full.stdout
    missing = run_chitrakar("tco", *measured, "--batch", "8", env=_env(tmp_path), cwd=tmp_path)
    assert missing.returncode == 1
    assert "at batch 8; measured at batch 1, 2, 4" in missing.stderr
    both = run_chitrakar(
        "tco", "--images-per-second", "1", "--batch", "4", *costs, env=_env(tmp_path), cwd=tmp_path
    )
    assert both.returncode == 1
    assert "give --images-per-second or a measurement (--batch), not both" in both.stderr


def test_bench_refuses_a_preset_name_the_table_refuses_before_loading_the_model(
    tmp_path: Path,
) -> None:
    presets = tmp_path / "presets.toml"
    presets.write_text('[presets.my_cpu]\ndescription = "mine"\ndtype = "float32"\n')
    env = _env(tmp_path, CHITRAKAR_PRESETS_FILE=str(presets), CHITRAKAR_DEVICE="cpu")
    benchmarks = tmp_path / "B.md"
    benchmarks.write_text("# B\n")
    args = ("bench", "--model", str(tmp_path / "no-model"), "--preset", "my_cpu", "--size", "64")
    recorded = (*args, "--record", str(benchmarks), "--table", str(tmp_path / "m.jsonl"))
    result = run_chitrakar(*recorded, env=env, cwd=tmp_path)
    assert result.returncode == 1
    # Not "model folder ... does not exist": the name is checked before the model loads.
    assert result.stderr.strip().splitlines()[-1] == (
        "cannot benchmark: preset 'my_cpu' must be lower-case words joined by '-'"
    )
    # Without --record nothing is written under that name: the model is what is missing.
    unrecorded = run_chitrakar(*args, env=env, cwd=tmp_path)
    assert unrecorded.returncode == 1 and "does not exist" in unrecorded.stderr


STOPS_SLOWLY = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finishing its job\n"
    "print('ready', flush=True)\n"
    "time.sleep({seconds})\n"
)


def _stopping_child(seconds: float) -> subprocess.Popen[bytes]:
    """A child told to stop that takes `seconds` to (SIGTERM ignored meanwhile)."""
    child = subprocess.Popen(
        [sys.executable, "-c", STOPS_SLOWLY.format(seconds=seconds)], stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    child.send_signal(signal.SIGTERM)
    return child


def _wait_with_ctrl_c_after(child: subprocess.Popen[bytes], *seconds: float) -> None:
    from chitrakar.cli import _wait_or_kill

    timers = [threading.Timer(s, os.kill, (os.getpid(), signal.SIGINT)) for s in seconds]
    for timer in timers:
        timer.start()
    try:
        _wait_or_kill(child, "worker", 60)
    finally:
        for timer in timers:
            timer.cancel()
        assert child.stdout is not None
        child.stdout.close()


def test_ctrl_c_while_a_child_stops_says_how_to_kill_it_and_waits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run` never ends before its worker (a quick restart would find it still running)."""
    child = _stopping_child(2)
    _wait_with_ctrl_c_after(child, 0.5)
    assert child.returncode == 0  # stopped on its own
    assert "Stopping the worker; Ctrl-C again to kill it." in capsys.readouterr().err


def test_a_second_ctrl_c_while_a_child_stops_kills_it() -> None:
    child = _stopping_child(60)
    _wait_with_ctrl_c_after(child, 0.5, 1.0)
    assert child.returncode == -signal.SIGKILL


def test_a_database_out_of_reach_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env["CHITRAKAR_DATA_DIR"] = str(tmp_path / "data")
    # Nothing listens on port 1; the password must not be printed.
    env["CHITRAKAR_DATABASE_URL"] = "postgresql+psycopg://app:s3cret@127.0.0.1:1/chitrakar"
    result = run_chitrakar("users", "list", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith(
        "chitrakar: cannot use the database at postgresql+psycopg://app:***@127.0.0.1:1/chitrakar: "
    )
    assert "s3cret" not in result.stderr
