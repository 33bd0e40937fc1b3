"""The built-in web chat over HTTP: `chitrakar run` with no Telegram token (the web chat, a
real worker, the tiny model), and what it refuses: no session, a forged CSRF token, another
person's image, oversized uploads. Each refusal has its status and leaves nothing stored."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image
from skimage import data as photographs
from sqlalchemy import func, select

from chitrakar.photos import MAX_DOWNLOAD_BYTES
from chitrakar.texts import text
from db.models import Job, WebMessage
from db.session import Store
from tests.support.stack import chitrakar_env, run_chitrakar
from tests.support.webchat import WebStack, WebUser, invite, web_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[WebStack]:
    data_dir = tmp_path_factory.mktemp("web")
    env = chitrakar_env(None, data_dir, tiny_model)
    with web_stack(env, data_dir) as stack:
        yield stack


@pytest.fixture(scope="module")
def asha(stack: WebStack) -> Iterator[WebUser]:
    user = WebUser(stack, "asha")
    yield user
    user.close()


@pytest.fixture(scope="module")
def ravi(stack: WebStack) -> Iterator[WebUser]:
    user = WebUser(stack, "ravi")
    yield user
    user.close()


def counts(stack: WebStack) -> tuple[int, int, int]:
    """Messages, jobs and kept selfie crops: what a refused request must not add to."""
    store = Store(stack.database_url)
    try:
        with store.unit_of_work() as uow:
            messages = uow.session.scalar(select(func.count()).select_from(WebMessage)) or 0
            jobs = uow.session.scalar(select(func.count()).select_from(Job)) or 0
    finally:
        store.dispose()
    inputs = stack.data_dir / "media" / "inputs"
    return messages, jobs, len(list(inputs.glob("*"))) if inputs.exists() else 0


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def a_result(user: WebUser, after: int = 0) -> object:
    return user.wait_for(lambda m: m.id > after and m.from_bot and bool(m.images))


def events_until_closed(stack: WebStack, user: WebUser, within: float = 30) -> list[str]:
    """The lines of a new event stream of `user`'s chat until the server ends it, or as far
    as they came in `within` seconds (the stream sends a keep-alive every 15)."""
    after = re.search(r'data-after="(\d+)"', user.http.get("/").text)
    assert after is not None
    until = time.monotonic() + within
    lines = []
    with (
        httpx.Client(base_url=stack.base, cookies=user.http.cookies, timeout=30) as client,
        client.stream("GET", "/events", params={"after": after.group(1)}) as events,
    ):
        for line in events.iter_lines():
            lines.append(line)
            if time.monotonic() > until:
                break
    return lines


def test_the_terminal_shows_the_web_chat_and_a_sign_in_link(stack: WebStack) -> None:
    log = (stack.data_dir / "run.log").read_text()
    assert f"Chitrakar's web chat: {stack.base}" in log
    assert f"Sign in as owner (once, within 24 h): {stack.base}/signin/" in log
    assert "Telegram: off" in log


def test_without_a_session_everything_is_refused_and_nothing_stored(stack: WebStack) -> None:
    before = counts(stack)
    with httpx.Client(base_url=stack.base, timeout=30) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 401
        assert "chitrakar users invite NAME" in page.text
        for path in ("/send", "/press", "/signout"):
            assert anonymous.post(path, data={"text": "/portrait a cat"}).status_code == 401
        for path in ("/events", "/images/1/0", "/export", "/grids/grid-0123456789abcdef.jpg"):
            assert anonymous.get(path).status_code == 401
        anonymous.cookies.set("chitrakar_session", "made-up")
        assert anonymous.get("/").status_code == 401
    assert counts(stack) == before


def test_a_sign_in_link_signs_in_once_with_a_safe_cookie(stack: WebStack) -> None:
    link = invite(stack, "meera")
    with httpx.Client(timeout=30) as browser:
        # Opening the link (a link preview, a scanner) does not use it up.
        assert browser.get(link).status_code == 200
        page = browser.get(link)
        assert page.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert page.headers["Referrer-Policy"] == "no-referrer"
        nonce = browser.cookies["chitrakar_signin"]
        # A form posted from elsewhere lacks this browser's nonce.
        assert browser.post(link, data={"nonce": "guess"}).status_code == 403
        signed_in = browser.post(link, data={"nonce": nonce})
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        assert "chitrakar_session=" in cookie
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
        assert browser.get(f"{stack.base}/").status_code == 200
        # Used: a second browser cannot sign in with it.
    # The access log shows the requests, not the link's secret (logs are read by others).
    log = stack.data_dir / "run.log"
    deadline = time.monotonic() + 10
    while '"POST /signin/(secret) HTTP/1.1" 303' not in log.read_text():
        assert time.monotonic() < deadline, "no access log line for the sign-in"
        time.sleep(0.1)
    assert link.rsplit("/", 1)[1] not in log.read_text()
    with httpx.Client(timeout=30) as other:
        other.get(link)
        again = other.post(link, data={"nonce": other.cookies["chitrakar_signin"]})
        assert again.status_code == 410
        assert "used already or has expired" in again.text
        unknown = f"{stack.base}/signin/{'A' * 43}"
        other.get(unknown)
        nonce = other.cookies["chitrakar_signin"]
        assert other.post(unknown, data={"nonce": nonce}).status_code == 410
        assert other.get(f"{stack.base}/signin/not-a-link").status_code == 404


def test_a_forged_csrf_token_is_refused_and_nothing_stored(stack: WebStack, asha: WebUser) -> None:
    before = counts(stack)
    assert asha.send("/portrait a forged request", csrf="not-the-token").status_code == 403
    assert asha.send("/portrait a forged request", csrf="").status_code == 403
    forged_press = asha.http.post("/press", data={"data": "a:1", "csrf": "x" * 43})
    assert forged_press.status_code == 403
    assert asha.http.post("/signout", data={"csrf": ""}).status_code == 403
    assert counts(stack) == before
    assert asha.http.get("/").status_code == 200  # still signed in


def test_oversized_uploads_are_refused_and_nothing_stored(stack: WebStack, asha: WebUser) -> None:
    before = counts(stack)
    # Over the server's body limit: refused while it arrives.
    huge = asha.send("/avatar watercolour", photo=b"\xff" * (22 * 1024 * 1024))
    assert huge.status_code == 413
    # Under the body limit but over the photo limit.
    large = asha.send("/avatar watercolour", photo=b"\xff" * (MAX_DOWNLOAD_BYTES + 1))
    assert large.status_code == 413
    assert "20 MB" in large.text
    long_line = asha.send("/portrait " + "x" * 5000)
    assert long_line.status_code == 413
    assert counts(stack) == before


def test_a_portrait_comes_back_with_buttons_and_only_its_owner_sees_it(
    stack: WebStack, asha: WebUser, ravi: WebUser
) -> None:
    assert (
        asha.send("/portrait a kite festival over old Ahmedabad --n 2 --seed 7").status_code == 200
    )
    asked = asha.wait_for(lambda m: not m.from_bot and m.text.startswith("/portrait a kite"))
    result = asha.wait_for(lambda m: m.from_bot and bool(m.images) and m.reply_to == asked.id)
    assert [image["index"] for image in result.images] == [0, 1]
    assert "Seed 7" in result.images[0]["caption"] and "Seed 8" in result.images[1]["caption"]
    job = result.images[0]["job"]
    labels = [label for row in result.buttons for label, _ in row]
    assert {"U1", "U2", "V1", "V2", "🔄 Again"} <= set(labels)
    # The status message showed the queue, then is removed once the images came (right after
    # the worker records the delivery).
    asha.wait_for(lambda m: m.from_bot and m.reply_to == asked.id and not m.images and m.deleted)

    mine = asha.http.get(f"/images/{job}/1")
    assert mine.status_code == 200 and mine.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(mine.content)).size == (64, 64)
    download = asha.http.get(f"/images/{job}/1?download=1")
    assert (
        download.headers["content-disposition"] == f'attachment; filename="chitrakar-{job}-2.png"'
    )
    assert "no-store" in mine.headers["cache-control"]
    # Someone else, signed in, guessing the URL: not found (not even "forbidden").
    assert ravi.http.get(f"/images/{job}/1").status_code == 404
    assert ravi.http.get(f"/images/{job}/0?download=1").status_code == 404
    assert asha.http.get(f"/images/{job}/2").status_code == 404
    # A button under Asha's result, pressed by Ravi: refused, nothing made.
    before = counts(stack)
    answer = ravi.press(f"a:{job}", under=result.id).json()
    assert answer["alert"] and answer["notice"] == text("en", "button.stale")
    assert counts(stack) == before


def test_a_job_whose_status_message_cannot_be_recorded_still_comes(stack: WebStack) -> None:
    """The database refuses to record the status message (here a trigger; in life a lock
    timeout, a dropped connection): the job, already taken in and charged, goes to the
    queue all the same and its result comes, with no "something went wrong"."""
    store = Store(stack.database_url)
    refuse = (
        "CREATE TRIGGER refuse_status_message BEFORE UPDATE OF status_message_id ON jobs "
        "WHEN NEW.status_message_id IS NOT NULL BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with store.engine.begin() as connection:
        connection.exec_driver_sql(refuse)
    nila = WebUser(stack, "nila")
    try:
        assert nila.send("/portrait a paper boat in the rain").status_code == 200
        asked = nila.wait_for(lambda m: not m.from_bot and m.text.startswith("/portrait a paper"))
        nila.wait_for(lambda m: m.from_bot and bool(m.images) and m.reply_to == asked.id)
        said = [m.text for m in nila.messages() if m.from_bot and m.reply_to == asked.id]
        assert text("en", "error.unexpected") not in said
    finally:
        nila.close()
        with store.engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER refuse_status_message")
        store.dispose()


def test_buttons_make_one_job_per_press_and_variations_arrive(asha: WebUser) -> None:
    asha.send("/portrait a lighthouse at dawn --seed 3")
    result = asha.wait_for(
        lambda m: m.from_bot and bool(m.images) and "Seed 3" in m.images[0]["caption"]
    )
    job = result.images[0]["job"]
    first = asha.press(f"v:{job}:0", under=result.id, press_id="press-0001").json()
    repeated = asha.press(f"v:{job}:0", under=result.id, press_id="press-0001").json()
    assert first["notice"].startswith("Queued.") and repeated["notice"] is None
    variation = asha.wait_for(
        lambda m: (
            m.from_bot and bool(m.images) and m.images[0]["job"] > job and m.reply_to == result.id
        )
    )
    later = [m for m in asha.messages() if m.from_bot and m.images and m.images[0]["job"] > job]
    assert [m.id for m in later] == [variation.id]  # one job for the press sent twice
    # A portrait offers no 📎; its upscale does.
    assert asha.press(f"p:{job}:0", under=result.id).json()["notice"] == text("en", "button.stale")
    assert asha.press(f"u:{job}:0", under=result.id).json()["notice"].startswith("Queued.")
    upscaled = asha.wait_for(
        lambda m: (
            m.from_bot
            and bool(m.images)
            and m.reply_to == result.id
            and "2×" in m.images[0]["caption"]
        )
    )
    big = upscaled.images[0]["job"]
    assert Image.open(io.BytesIO(asha.http.get(f"/images/{big}/0").content)).size == (128, 128)
    pick = asha.press(f"p:{big}:0", under=upscaled.id).json()
    assert pick["notice"] is None and not pick["alert"]
    attached = asha.wait_for(lambda m: m.attachment is not None and m.reply_to == upscaled.id)
    assert attached.attachment == {
        "href": f"/images/{big}/0?download=1",
        "name": f"chitrakar-{big}-1.png",
    }
    assert asha.press("u:999999:0", under=result.id).json()["notice"] == text("en", "button.stale")
    assert asha.press("not-a-button", under=result.id).json()["notice"] == text(
        "en", "button.invalid"
    )


def test_commands_get_the_same_answers_as_in_telegram(asha: WebUser) -> None:
    def reply_to(line: str, photo: bytes | None = None) -> str:
        assert asha.send(line, photo=photo).status_code == 200
        asked = asha.messages()[-2 if asha.messages()[-1].from_bot else -1]
        assert asked.text == ("📷 " if photo else "") + line.strip()
        return asha.wait_for(lambda m: m.from_bot and m.reply_to == asked.id).text

    assert reply_to("/quota").startswith("Credits left today:")
    assert reply_to("/privacy").startswith("What this bot stores")
    assert reply_to("/portrait").startswith(text("en", "error.prompt_missing"))
    assert reply_to("/avatar watercolour") == text("en", "web.avatar_how")
    assert reply_to("/nonsense") == text("en", "web.unknown_command", command="nonsense")
    assert reply_to("hello there") == text("en", "web.not_a_command")
    # Telegram's "reply to it with /avatar" cannot be done here: the web chat keeps no photo.
    selfie = jpeg(Image.new("RGB", (64, 64), "tan"))
    assert reply_to("my selfie", photo=selfie) == text("en", "web.avatar_how")
    # A portrait is made from words alone: the photo is not dropped unsaid.
    assert reply_to("/portrait a cat", photo=selfie) == text("en", "photo.portrait_takes_no_photo")
    assert reply_to("/settings") == text("en", "settings.groups_only")
    assert reply_to("/stats") == text("en", "admin.not_allowed")
    assert "--style" in reply_to("/help")


def test_an_avatar_from_an_uploaded_selfie(stack: WebStack, ravi: WebUser) -> None:
    before = counts(stack)
    cat = ravi.send("/avatar watercolour", photo=jpeg(Image.fromarray(photographs.chelsea())))
    assert cat.status_code == 200
    assert ravi.wait_for(lambda m: m.from_bot and m.text == text("en", "photo.no_face"))
    assert counts(stack)[1:] == before[1:]  # no job, no crop kept
    selfie = jpeg(Image.fromarray(photographs.astronaut()))
    assert ravi.send("/avatar watercolour --n 2", photo=selfie).status_code == 200
    shown = ravi.wait_for(lambda m: not m.from_bot and m.text == "📷 /avatar watercolour --n 2")
    album = ravi.wait_for(
        lambda m: m.from_bot and bool(m.images) and m.reply_to == shown.id, timeout=120
    )
    assert len(album.images) == 2 and "Watercolour" in album.images[0]["caption"]


def test_history_export_and_forget(stack: WebStack) -> None:
    user = WebUser(stack, "kiran")
    try:
        user.send("/portrait a banyan tree --seed 11")
        result = user.wait_for(lambda m: m.from_bot and bool(m.images))
        user.send("/history")
        page = user.wait_for(lambda m: m.from_bot and "a banyan tree" in m.text)
        resend = next(data for row in page.buttons for _, data in row if data.startswith("r:"))
        assert user.press(resend, under=page.id).json()["notice"] is None
        again = user.wait_for(
            lambda m: m.from_bot and m.images == [{"job": result.images[0]["job"], "index": 0}]
        )
        assert again.reply_to == page.id
        shown = user.http.get("/")
        assert shown.status_code == 200
        assert f'src="/images/{result.images[0]["job"]}/0"' in shown.text

        archive = user.http.get("/export")
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as opened:
            names = set(opened.namelist())
            transcript = json.loads(opened.read("messages.json"))
        assert {"jobs.json", "messages.json"} <= names
        assert any(n.startswith("results/") for n in names)
        assert any(m["text"] == "/portrait a banyan tree --seed 11" for m in transcript)

        user.send("/forget")
        confirm = user.wait_for(lambda m: m.from_bot and m.text == text("en", "forget.confirm"))
        data = next(d for row in confirm.buttons for _, d in row if d.endswith(":y"))
        with ThreadPoolExecutor(1) as pool:
            # The same chat open in another tab: told to start again, then its stream ends.
            other_tab = pool.submit(events_until_closed, stack, user)
            time.sleep(1)
            assert user.press(data, under=confirm.id).json()["reload"] is True
            assert "event: cleared" in other_tab.result()
        texts = [m.text for m in user.messages()]
        assert len(texts) == 1 and texts[0].startswith(
            "Done: everything stored about you is deleted"
        )
        assert user.http.get(f"/images/{result.images[0]['job']}/0").status_code == 404
    finally:
        user.close()


def test_admins_moderate_from_the_web_chat(stack: WebStack) -> None:
    owner, member = WebUser(stack, "owner", admin=True), WebUser(stack, "dev")
    try:
        owner.send("/stats")
        assert owner.wait_for(lambda m: m.from_bot and m.text.startswith("Today, since midnight"))
        owner.send(f"/ban {member.chat} spam")
        assert owner.wait_for(
            lambda m: m.from_bot and m.text == text("en", "admin.banned", user=member.chat)
        )
        member.send("/portrait anything")
        assert member.wait_for(lambda m: m.from_bot and m.text == text("en", "moderation.banned"))
        owner.send(f"/unban {member.chat}")
        owner.wait_for(
            lambda m: m.from_bot and m.text == text("en", "admin.unbanned", user=member.chat)
        )
        owner.send("/audit")
        audit = owner.wait_for(
            lambda m: m.from_bot and m.text.startswith(text("en", "admin.audit_header"))
        )
        assert "ban" in audit.text
    finally:
        owner.close()
        member.close()


def test_the_page_follows_its_own_chat_and_no_one_elses(
    stack: WebStack, asha: WebUser, ravi: WebUser
) -> None:
    """Server-sent events: what the bot says arrives on the open page, rendered; another
    person's page gets none of it."""
    after = re.search(r'data-after="(\d+)"', asha.http.get("/").text)
    assert after is not None
    marker = f"/portrait a marker {time.monotonic_ns()}"
    seen: list[str] = []

    def listen(user: WebUser, since: str, until: float) -> None:
        # A client of its own, closed with its sockets when the stream is left.
        with (
            httpx.Client(base_url=stack.base, cookies=user.http.cookies, timeout=5) as client,
            client.stream("GET", "/events", params={"after": since}) as events,
        ):
            for line in events.iter_lines():
                if line.startswith("data: "):
                    seen.append(f"{user.name}:{json.loads(line[6:])['html']}")
                if time.monotonic() > until:
                    return

    ravi_after = re.search(r'data-after="(\d+)"', ravi.http.get("/").text)
    assert ravi_after is not None
    until = time.monotonic() + 8
    with ThreadPoolExecutor(2) as pool:
        listening = [
            pool.submit(listen, asha, after.group(1), until),
            pool.submit(listen, ravi, ravi_after.group(1), until),
        ]
        time.sleep(1)
        asha.send(marker)
        for future in listening:
            with contextlib.suppress(httpx.ReadTimeout):
                future.result()
    assert any(s.startswith("asha:") and marker in s for s in seen)
    assert not any(s.startswith("ravi:") for s in seen)


def test_a_hostile_prompt_is_shown_as_text(asha: WebUser) -> None:
    hostile = '/portrait <script>alert("x")</script><img src=x onerror=alert(1)>'
    asha.send(hostile)
    asha.answer_to(hostile)
    page = asha.http.get("/").text
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page


def test_cancel_stops_the_job_and_gives_the_credits_back(stack: WebStack) -> None:
    user = WebUser(stack, "gopal")
    try:
        slow = "/portrait a very slow painting --steps 50 --n 4"
        user.send(slow)
        status = user.answer_to(slow)
        user.send("/cancel")
        user.wait_for(lambda m: m.from_bot and m.text.startswith("Cancelled 1 job(s)"))
        user.wait_for(lambda m: m.id == status.id and m.text == text("en", "cancel.status"))
        time.sleep(2)  # a late progress edit from the worker must not cover it
        [shown] = [m for m in user.messages() if m.id == status.id]
        assert shown.text == text("en", "cancel.status")
        user.send("/quota")
        assert user.wait_for(
            lambda m: m.from_bot and m.text.startswith("Credits left today: 20 of 20")
        )
    finally:
        user.close()


def test_signing_out_or_being_revoked_ends_the_session_and_its_stream(stack: WebStack) -> None:
    user = WebUser(stack, "isha")
    try:
        with user.http.stream("GET", "/events", timeout=30) as events:
            signed_out = user.http.post("/signout", data={"csrf": user.csrf})
            assert signed_out.status_code == 303
            assert "Max-Age=0" in signed_out.headers["set-cookie"]
            started = time.monotonic()
            for _ in events.iter_lines():
                pass  # the server ends the stream within its recheck interval
            assert time.monotonic() - started < 20
        assert user.http.get("/").status_code == 401
    finally:
        user.close()

    again = WebUser(stack, "isha")
    try:
        assert again.http.get("/").status_code == 200
        result = run_chitrakar("users", "revoke", "isha", env=stack.env, cwd=stack.data_dir)
        assert result.returncode == 0 and "signed out everywhere" in result.stdout
        assert again.http.get("/").status_code == 401
    finally:
        again.close()
    nobody = run_chitrakar("users", "revoke", "nobody", env=stack.env, cwd=stack.data_dir)
    assert nobody.returncode == 1


def test_odd_requests_get_a_clear_refusal_not_an_error(stack: WebStack, asha: WebUser) -> None:
    assert asha.http.get("/images/99999999999999999999/0").status_code == 404
    with asha.http.stream("GET", "/events", params={"after": "9" * 40}) as events:
        assert events.status_code == 200  # read from the start, not an error
    refused = asha.http.post(
        "/send",
        data={"text": "/quota"},
        headers={"X-CSRF-Token": b"t\xf6k\xe9n", "X-Requested-With": b"fetch"},
    )
    assert refused.status_code == 403
    huge_under = asha.press("h:1:1", under=10**30).json()
    assert huge_under["alert"] and huge_under["notice"] == text("en", "button.not_yours")
    with httpx.Client(base_url=stack.base, timeout=10) as browser:
        assert browser.get("/signin/..%2Fsignout").status_code == 404
        assert browser.get("/signin/short").status_code == 404


def test_without_javascript_forms_still_work(asha: WebUser) -> None:
    """A plain form post (no script): back to the chat page, the answer in the chat."""
    sent = asha.http.post("/send", data={"text": "/quota", "csrf": asha.csrf})
    assert sent.status_code == 303 and sent.headers["location"] == "/"
    pressed = asha.http.post("/press", data={"data": "s:anime", "under": "", "csrf": asha.csrf})
    assert pressed.status_code == 303
    assert asha.wait_for(
        lambda m: m.from_bot and m.text == text("en", "button.style_set", name="Anime")
    )


def test_styles_list_then_preview_grid_then_a_default_style(stack: WebStack) -> None:
    user = WebUser(stack, "tara")
    try:
        user.send("/styles")
        listing = user.wait_for(lambda m: m.from_bot and m.text.startswith("Styles."))
        assert any(d == "s:madhubani" for row in listing.buttons for _, d in row)
        # A preview per style: the slowest job here.
        grid = user.wait_for(
            lambda m: m.from_bot and bool(m.images) and "grid" in m.images[0], timeout=240
        )
        # The chat's page shows it (a message without a caption renders too).
        page = user.http.get("/")
        assert page.status_code == 200 and f'src="/grids/{grid.images[0]["grid"]}"' in page.text
        served = user.http.get(f"/grids/{grid.images[0]['grid']}")
        assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
        # Percent-encoded, so that the client does not resolve it away before sending.
        assert user.http.get("/grids/..%2Fchitrakar.db").status_code == 404
        assert user.http.get("/grids/..%2F..%2Fchitrakar.db").status_code == 404
        assert user.http.get("/grids/grid-0000000000000000.jpg").status_code == 404
        # Made once: the next /styles answers at once with the grid, and no new job.
        user.send("/styles")
        user.wait_for(lambda m: m.from_bot and m.id > grid.id and bool(m.images))
        answer = user.press("s:madhubani", under=grid.id).json()
        assert "Madhubani" in answer["notice"]
        user.send("/portrait a peacock --steps 4")
        result = user.wait_for(lambda m: m.from_bot and bool(m.images) and "job" in m.images[0])
        assert "madhubani" in result.images[0]["caption"]
    finally:
        user.close()
