from __future__ import annotations

import os
from pathlib import Path

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
