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
        assert modules & {"bot", "workers", "torch", "telegram"} == set(), path.name


def test_the_bot_process_does_not_load_torch(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from chitrakar.config import Settings\n"
        "from bot.app import build_application\n"
        "build_application(Settings(telegram_token='1:x', data_dir=sys.argv[1]))\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'workers')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.stdout.strip() == "[]"


def test_the_web_chat_does_not_load_torch_or_the_workers(tmp_path: Path) -> None:
    probe = (
        "import sys\n"
        "from chitrakar.config import Settings\n"
        "from bot.bootstrap import bootstrap\n"
        "from bot.server import build_http_app\n"
        "settings = Settings(data_dir=sys.argv[1])\n"
        "build_http_app(settings, bootstrap(settings), None)\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'workers', 'telegram')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.stdout.strip() == "[]"
