"""The web chat in a real headless browser (Playwright driving Debian's Chromium), on a phone's
screen: sign in, ask for a portrait and watch it being made, press a button, upload a selfie,
and a second person who cannot open the first one's images."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as photographs

from bot.web.server import STREAM_REFUSED_RETRY_MS, STREAMS_PER_ACCOUNT
from chitrakar.texts import text
from tests.support.stack import chitrakar_env
from tests.support.webchat import WebStack, WebUser, invite, web_stack

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")

PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}
# Results take a few seconds on two CPU cores with the tiny model.
WAIT_MS = 90_000
IMAGE_SIZE = 256
LAN_NAME = "chitrakar.lan"


def chromium_path() -> str:
    path = os.environ.get("CHITRAKAR_TEST_CHROMIUM") or shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("Chromium is not installed")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    data_dir = tmp_path_factory.mktemp("web-browser")
    # Bigger images and more steps than elsewhere, so that progress shows for a while (about
    # 0.6 s on 2 cores: over two of the web feed's polls) before the result replaces it.
    env = chitrakar_env(
        None, data_dir, Path("unused"), default_steps="30", image_size=str(IMAGE_SIZE)
    )
    # As a new user runs it: no model configured, so the worker makes the tiny demo model.
    del env["CHITRAKAR_MODEL"]
    with web_stack(env, data_dir) as stack:
        yield stack


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path(),
            args=[
                "--no-sandbox",
                "--disable-dev-shm-usage",
                # A name that is not this machine's: plain http to it is no secure context, as
                # for a phone opening the chat at a LAN address.
                f"--host-resolver-rules=MAP {LAN_NAME} 127.0.0.1",
            ],
        )
        yield launched
        launched.close()


def signed_in_page(browser: object, stack: WebStack, name: str, **context: object) -> object:
    page = browser.new_context(**PHONE, **context).new_page()  # type: ignore[attr-defined]
    page.goto(invite(stack, name))
    page.click("#sign-in")
    page.wait_for_selector("#composer")
    return page


def send(page: object, line: str) -> None:
    page.fill("#text", line)  # type: ignore[attr-defined]
    page.press("#text", "Enter")  # type: ignore[attr-defined]


def test_sign_in_ask_watch_progress_see_the_image_and_press_again(
    browser: object, stack: WebStack
) -> None:
    expect = playwright_api.expect
    page = signed_in_page(browser, stack, "lata")
    expect(page.locator("#demo-banner")).to_contain_text("Demo model")
    # The link is used: the address bar no longer holds it, and it cannot be used again.
    assert page.url == f"{stack.base}/"

    send(page, "/portrait a cinematic portrait of a grandmother in a Kerala saree --seed 5")
    expect(page.locator(".msg.me").last).to_have_text(
        "/portrait a cinematic portrait of a grandmother in a Kerala saree --seed 5"
    )
    # Progress, live on the status message, then the image in its place.
    expect(
        page.locator(".msg.bot", has_text=re.compile(r"Creating your image… \d+%"))
    ).to_be_visible(timeout=WAIT_MS)
    result = page.locator(".msg.bot", has=page.locator("img"))
    expect(result).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator(".msg.bot", has_text="Creating your image")).to_have_count(0)
    image = result.locator("img")
    expect(image).to_have_js_property("naturalWidth", IMAGE_SIZE)
    expect(result).to_contain_text(f"Seed 5 · 30 steps · {IMAGE_SIZE}×{IMAGE_SIZE}")
    download = result.locator("a.download")
    assert download.get_attribute("href").endswith("?download=1")

    result.get_by_role("button", name="🔄 Again").click()
    expect(page.locator("#notice")).to_contain_text("Queued.")
    expect(page.locator(".msg.bot", has=page.locator("img"))).to_have_count(2, timeout=WAIT_MS)
    # The page, reloaded, shows the same conversation from the store.
    page.reload()
    expect(page.locator(".msg.bot", has=page.locator("img"))).to_have_count(2)
    page.context.close()


def test_an_avatar_from_a_photo_upload(browser: object, stack: WebStack, tmp_path: Path) -> None:
    expect = playwright_api.expect
    page = signed_in_page(browser, stack, "arjun")
    selfie = tmp_path / "selfie.jpg"
    Image.fromarray(photographs.astronaut()).save(selfie, quality=90)
    page.set_input_files("#gallery", str(selfie))
    expect(page.locator("#attached")).to_contain_text("selfie.jpg")
    assert page.input_value("#text") == "/avatar "
    page.fill("#text", "/avatar watercolour --n 2 --steps 4")
    page.click("#send")
    expect(page.locator(".msg.me").last).to_have_text("📷 /avatar watercolour --n 2 --steps 4")
    expect(page.locator("#attached")).to_be_hidden()
    album = page.locator(".msg.bot", has=page.locator("img"))
    expect(album.locator("img")).to_have_count(2, timeout=WAIT_MS)
    expect(album).to_contain_text("Watercolour")
    page.context.close()


def test_a_second_person_cannot_open_the_first_ones_images(
    browser: object, stack: WebStack
) -> None:
    expect = playwright_api.expect
    owner = signed_in_page(browser, stack, "nila")
    send(owner, "/portrait a monsoon street in Mumbai --steps 4")
    image = owner.locator(".msg.bot img").first
    expect(image).to_be_visible(timeout=WAIT_MS)
    src = image.get_attribute("src")
    assert src is not None and src.startswith("/images/")
    assert owner.request.get(f"{stack.base}{src}").status == 200

    other = signed_in_page(browser, stack, "vikram")
    response = other.goto(f"{stack.base}{src}")
    assert response is not None and response.status == 404
    # And without a session at all.
    anonymous = browser.new_context(**PHONE).new_page()  # type: ignore[attr-defined]
    response = anonymous.goto(f"{stack.base}{src}")
    assert response is not None and response.status == 401
    for page in (owner, other, anonymous):
        page.context.close()


def test_the_page_speaks_hindi_to_a_hindi_browser(browser: object, stack: WebStack) -> None:
    expect = playwright_api.expect
    page = signed_in_page(browser, stack, "savitri", locale="hi-IN")
    expect(page.locator("#send")).to_have_text(text("hi", "web.send"))
    send(page, "/quota")
    expect(page.locator(".msg.bot").last).to_contain_text("आज बचे क्रेडिट")
    page.context.close()


def test_forget_in_one_tab_empties_the_others_and_a_tab_too_many_is_told_why(
    browser: object, stack: WebStack
) -> None:
    expect = playwright_api.expect
    first = signed_in_page(browser, stack, "meera")
    send(first, "/quota")
    expect(first.locator(".msg.bot")).to_have_count(1)
    second = first.context.new_page()
    second.goto(f"{stack.base}/")
    expect(second.locator(".msg.me")).to_have_text("/quota")

    send(first, "/forget")
    first.get_by_role("button", name=text("en", "button.forget_yes")).click()
    # The other tab starts again from what is left: the answer to /forget, and no /quota.
    expect(second.locator(".msg.me")).to_have_count(0)
    expect(second.locator(".msg.bot")).to_have_text([re.compile("^Done: everything stored")])

    first.context.close()

    # A tab too many: the account's streams all taken (by a script here), the page says why.
    user = WebUser(stack, "kavya")
    with contextlib.ExitStack() as streams:
        for _ in range(STREAMS_PER_ACCOUNT):
            stream = streams.enter_context(user.http.stream("GET", "/events"))
            assert next(stream.iter_lines()) == "retry: 3000"
        context = browser.new_context(**PHONE)  # type: ignore[attr-defined]
        context.add_cookies(
            [{"name": n, "value": v, "url": stack.base} for n, v in user.http.cookies.items()]
        )
        tab = context.new_page()
        tab.goto(f"{stack.base}/")
        notice = text("en", "web.too_many_tabs", seconds=STREAM_REFUSED_RETRY_MS // 1000)
        expect(tab.locator("#notice")).to_have_text(notice)
        context.close()
    user.close()


def test_buttons_work_on_a_plain_http_address_of_the_network(
    browser: object, stack: WebStack
) -> None:
    """A phone on the same network opens http://<the machine's address>:8080, where the page
    is no secure context (no crypto.randomUUID): presses still go."""
    expect = playwright_api.expect
    page = browser.new_context(**PHONE).new_page()  # type: ignore[attr-defined]
    page.goto(invite(stack, "ritu").replace("127.0.0.1", LAN_NAME))
    page.click("#sign-in")
    page.wait_for_selector("#composer")
    assert page.evaluate("window.isSecureContext") is False
    send(page, "/forget")
    page.get_by_role("button", name=text("en", "button.forget_no")).click()
    expect(page.locator("#notice")).to_have_text(text("en", "forget.kept"))
    page.context.close()
