"""The shape the design promises: bot and workers never import each other, the shared package
imports neither, and the bot process never loads torch or diffusers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("bot", {"workers", "torch", "diffusers", "transformers"}),
        ("workers", {"bot"}),
        ("db", {"bot", "workers", "telegram", "celery", "torch"}),
    ],
)
def test_packages_keep_to_their_side(package: str, forbidden: set[str]) -> None:
    assert imported_packages(package) & forbidden == set()


def test_the_shared_package_imports_bot_and_workers_only_in_the_cli() -> None:
    for path in (ROOT / "chitrakar").rglob("*.py"):
        if path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text("utf-8"))
        modules = {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        } | {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        # The one exception: the HTTP client both sides' python-telegram-bot uses.
        allowed = {"telegram"} if path.name == "bot_api_http.py" else set()
        assert modules & {"bot", "workers", "torch", "telegram"} - allowed == set(), path.name


def modules_loaded(setup: str, data_dir: Path, *names: str) -> list[str]:
    """Which of `names` a fresh interpreter has loaded after running `setup` (which may use
    `data_dir`)."""
    report = f"print(sorted(m for m in {names!r} if m in sys.modules))"
    probe = f"import sys\ndata_dir = sys.argv[1]\n{setup}\n{report}\n"
    result = subprocess.run(
        [sys.executable, "-c", probe, str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    return list(ast.literal_eval(result.stdout.strip()))


def test_the_bot_process_does_not_load_torch(tmp_path: Path) -> None:
    setup = (
        "from chitrakar.config import Settings\n"
        "from bot.app import build_application\n"
        "build_application(Settings(telegram_token='1:x', data_dir=data_dir))"
    )
    assert modules_loaded(setup, tmp_path, "torch", "diffusers", "transformers", "workers") == []


def test_the_web_chat_does_not_load_torch_the_workers_or_telegram(tmp_path: Path) -> None:
    setup = (
        "from chitrakar.config import Settings\n"
        "from bot.bootstrap import bootstrap\n"
        "from bot.server import build_http_app\n"
        "settings = Settings(data_dir=data_dir)\n"
        "build_http_app(settings, bootstrap(settings), None)"
    )
    heavy = ("torch", "diffusers", "transformers", "workers", "telegram")
    assert modules_loaded(setup, tmp_path, *heavy) == []


def test_the_bot_loads_the_brokers_client_at_start_not_on_the_first_command(
    tmp_path: Path,
) -> None:
    """redis-py takes 0.1 s or more to import: the first command would wait for it. (The
    port is closed: the warm-up logs that it cannot connect and goes on.)"""
    setup = (
        "from chitrakar.config import Settings\n"
        "from bot.bootstrap import bootstrap\n"
        "services = bootstrap(Settings(data_dir=data_dir, broker_url='redis://127.0.0.1:9/0'))\n"
    )
    assert modules_loaded(setup, tmp_path, "redis") == []
    assert modules_loaded(setup + "services.warm_up()\n", tmp_path, "redis") == ["redis"]
