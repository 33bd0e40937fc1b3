// The web chat page: send forms without reloading, and show each message as it changes
// (server-sent events). Every form also works without this script.
"use strict";
(() => {
  const body = document.body;
  const csrf = body.dataset.csrf;
  const maxUpload = Number(body.dataset.maxUpload);
  const list = document.getElementById("messages");
  const composer = document.getElementById("composer");
  const input = document.getElementById("text");
  const pickers = [document.getElementById("photo"), document.getElementById("gallery")];
  const attached = document.getElementById("attached");
  const notice = document.getElementById("notice");
  let noticeTimer = 0;

  const show = (words, sticky) => {
    notice.textContent = words;
    notice.hidden = !words;
    clearTimeout(noticeTimer);
    if (words && !sticky) noticeTimer = setTimeout(() => { notice.hidden = true; }, 6000);
  };
  const atBottom = () => window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  const toBottom = () => window.scrollTo(0, document.body.scrollHeight);

  const post = async (url, form) => {
    const response = await fetch(url, {
      method: "POST",
      body: form,
      headers: { "X-CSRF-Token": csrf, "X-Requested-With": "fetch" },
      credentials: "same-origin",
    });
    if (response.status === 401) { location.reload(); return null; }
    if (!response.ok) {
      show((await response.text()) || body.dataset.textFailed, true);
      return null;
    }
    return response.json();
  };

  // The composer: a line, perhaps with a photo.
  const chosen = () => pickers.find((p) => p.files && p.files.length);
  const clearPhoto = () => { pickers.forEach((p) => { p.value = ""; }); attached.hidden = true; };
  pickers.forEach((picker) => picker.addEventListener("change", () => {
    const file = picker.files && picker.files[0];
    if (!file) return;
    pickers.filter((p) => p !== picker).forEach((p) => { p.value = ""; });
    if (file.size > maxUpload) { show(body.dataset.textTooLarge, true); clearPhoto(); return; }
    document.getElementById("attached-name").textContent = "📷 " + file.name;
    attached.hidden = false;
    if (!input.value.trim()) input.value = "/avatar ";
    input.focus();
  }));
  document.getElementById("detach").addEventListener("click", clearPhoto);

  let sending = false;
  composer.addEventListener("submit", async (event) => {
    event.preventDefault();
    // Enter pressed twice while a line is on its way sends it once.
    if (sending) return;
    const form = new FormData();
    form.append("text", input.value);
    const picker = chosen();
    if (picker) form.append("photo", picker.files[0]);
    if (!input.value.trim() && !picker) return;
    const sendButton = document.getElementById("send");
    sending = true;
    sendButton.disabled = true;
    try {
      if (await post("/send", form)) { input.value = ""; clearPhoto(); show(""); }
    } catch (error) {
      show(body.dataset.textOffline, true);
    } finally {
      sending = false;
      sendButton.disabled = false;
      input.focus();
    }
  });
  input.addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter starts a new line (phones' keyboards send with their key).
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  document.querySelectorAll(".chip").forEach((chip) => chip.addEventListener("click", () => {
    input.value = chip.dataset.command + " ";
    input.focus();
  }));

  // A press's own id: 32 hex digits. (crypto.randomUUID exists only on https and localhost;
  // a phone on the same network opens the chat over plain http.)
  const pressId = () => Array.from(
    crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")
  ).join("");

  // Buttons under messages: one press each (a double tap makes one job).
  list.addEventListener("click", (event) => {
    const reveal = event.target.closest(".reveal");
    if (reveal) { reveal.parentElement.classList.remove("spoiler"); reveal.remove(); }
  });
  list.addEventListener("submit", async (event) => {
    const form = event.target.closest("form.buttons");
    if (!form) return;
    event.preventDefault();
    const button = event.submitter;
    if (!button || button.disabled) return;
    const data = new FormData(form);
    data.set("data", button.value);
    data.set("press", pressId());
    button.disabled = true;
    try {
      const answer = await post("/press", data);
      if (answer && answer.reload) { location.reload(); return; }
      if (answer && answer.notice) show(answer.notice, answer.alert);
    } catch (error) {
      show(body.dataset.textOffline, true);
    } finally {
      setTimeout(() => { button.disabled = false; }, 1500);
    }
  });

  // New and changed messages, as they happen.
  const place = (id, html, deleted) => {
    const old = document.getElementById("m-" + id);
    if (deleted) { if (old) old.remove(); return; }
    const holder = document.createElement("div");
    holder.innerHTML = html;
    const fresh = holder.firstElementChild;
    if (old) { old.replaceWith(fresh); return; }
    const empty = list.querySelector(".empty");
    if (empty) empty.remove();
    // In id order: a late event must not put an old message last.
    const later = [...list.querySelectorAll(".msg")].find((m) => Number(m.dataset.id) > id);
    list.insertBefore(fresh, later || null);
  };
  // The browser reconnects a dropped stream by itself, resuming after the last event; a
  // refused reconnect (the server restarting behind a proxy) closes it for good, so then the
  // page opens a new one, waiting longer each time. Signed out: the page shows why.
  let after = body.dataset.after;
  let retry = 1000;
  let refused = "";
  const follow = () => {
    const events = new EventSource("/events?after=" + after);
    events.addEventListener("open", () => {
      retry = 1000;
      if (refused && notice.textContent === refused) show("");
    });
    // Too many tabs open: the server says so, and the browser asks again later by itself.
    events.addEventListener("notice", (event) => {
      refused = JSON.parse(event.data).text;
      show(refused, true);
    });
    // The chat was deleted (/forget, perhaps in another tab): start again from nothing.
    events.addEventListener("cleared", () => { events.close(); location.reload(); });
    events.addEventListener("message", (event) => {
      const stick = atBottom();
      const change = JSON.parse(event.data);
      place(change.id, change.html, change.deleted);
      if (event.lastEventId) after = event.lastEventId;
      if (stick) toBottom();
      if (notice.textContent === body.dataset.textOffline) show("");
    });
    events.addEventListener("error", async () => {
      if (events.readyState !== EventSource.CLOSED) return;
      show(body.dataset.textOffline, true);
      try {
        const page = await fetch("/", { method: "HEAD", credentials: "same-origin" });
        if (page.status === 401) { location.reload(); return; }
      } catch (error) { /* offline: try again below */ }
      setTimeout(follow, retry);
      retry = Math.min(retry * 2, 30000);
    });
  };
  follow();
  toBottom();
})();
