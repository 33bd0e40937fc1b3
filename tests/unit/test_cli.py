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
