"""The CPU one Bot API call costs the calling process, with python-telegram-bot's own HTTP
client (httpx) and with the aiohttp client the bot and the workers use
(chitrakar/bot_api_http.py).

    PYTHONPATH=. .venv/bin/python bench/bot_api_client.py [--calls 1000] [--runs 5]

Each run sends `--calls` status messages (`sendMessage` replying to a command, as the bot's
acknowledgement does) through `Bot.send_message` to the Bot API emulator on loopback, once per
client, the clients alternating. The emulator runs in its own thread; the figure is the CPU
time of the calling thread only (`time.thread_time`), so python-telegram-bot's own work
(building the request, parsing the answered message) is in both, the emulator's in neither.
Prints the median of the runs per client as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from telegram import Bot, ReplyParameters
from telegram.request import BaseRequest, HTTPXRequest

from chitrakar.bot_api_http import AiohttpRequest
from tests.support.botapi import BotApiEmulator

CLIENTS = {"httpx (python-telegram-bot's)": HTTPXRequest, "aiohttp (Chitrakar's)": AiohttpRequest}


async def per_call(emulator: BotApiEmulator, request: BaseRequest, calls: int) -> dict[str, float]:
    user = emulator.user(901)
    chat = emulator.private_chat(user)
    asked = emulator.send_text(chat, user, "/portrait a lighthouse at dawn")
    reply = ReplyParameters(asked["message_id"], allow_sending_without_reply=True)
    status = "Queued. Your place in line: 1"
    bot = Bot(emulator.token, base_url=emulator.base_url, request=request)
    async with bot:
        for _ in range(100):  # warm-up: connections, caches
            await bot.send_message(chat["id"], status, reply_parameters=reply)
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(calls):
            await bot.send_message(chat["id"], status, reply_parameters=reply)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return {"cpu_us": 1e6 * cpu / calls, "wall_us": 1e6 * wall / calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    emulator = BotApiEmulator().start()
    seen: dict[str, list[dict[str, float]]] = {name: [] for name in CLIENTS}
    try:
        for _ in range(args.runs):
            for name, client in CLIENTS.items():
                seen[name].append(asyncio.run(per_call(emulator, client(), args.calls)))
    finally:
        emulator.stop()
    report: dict[str, Any] = {"calls": args.calls, "runs": args.runs}
    for name, runs in seen.items():
        report[name] = {
            "cpu_us_per_call": round(statistics.median(r["cpu_us"] for r in runs), 1),
            "wall_us_per_call": round(statistics.median(r["wall_us"] for r in runs), 1),
            "cpu_us_each_run": [round(r["cpu_us"], 1) for r in runs],
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
