from __future__ import annotations

import os
from pathlib import Path

from tests.support.stack import run_chitrakar


def test_run_without_a_token_says_what_to_set(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHITRAKAR_")}
    env["CHITRAKAR_DATA_DIR"] = str(tmp_path / "data")
    result = run_chitrakar("run", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "CHITRAKAR_TELEGRAM_TOKEN is not set" in result.stderr
    assert "@BotFather" in result.stderr
    assert "Traceback" not in result.stderr
