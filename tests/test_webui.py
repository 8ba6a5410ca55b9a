"""The chat page at `/`, as a person uses it: Debian's chromium (headless, driven by
playwright) against real servers on 127.0.0.1, the real SmolLM2-135M among them.
Oracles: the same request sent straight to /v1/chat/completions (the page must show what
the API answers), the browser's own DOM and dialogs (model text must never become live
HTML), Python's HTML parser (no inline script or handler), the wheel pip builds, eslint.
Each state is saved as a screenshot into build/screenshots/ (git-ignored), or into the folder
SMOLLM3_SCREENSHOTS names: the copies in docs/screenshots/ (two shown in the README) were
written with SMOLLM3_SCREENSHOTS=docs/screenshots."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from smollm3_triton import Runtime  # noqa: E402
from tests.helpers.serve_util import (  # noqa: E402
    SMOLLM3_TEMPLATE,
    ScriptedRunner,
    metric,
    metrics_once_idle,
    running_server,
    tiny_folder,
)

ROOT = Path(__file__).resolve().parents[1]
WEBUI = ROOT / "smollm3_triton" / "entrypoints" / "webui"
SCREENSHOTS = ROOT / os.environ.get("SMOLLM3_SCREENSHOTS", "build/screenshots")
CHROMIUM = "/usr/bin/chromium"
# This machine's network is closed: nothing in the background may try to reach out.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 960, "height": 600}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STEP_S = 30            # the longest wait for any one thing in the page (an answer included)


def needs(ok: bool, what: str):
    """Something .ci/run installs: missing in CI is a failure, elsewhere a skip that says how."""
    if not ok:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(what)


# ---------------------------------------------------------------- servers and browser

def tiny_server(folder, **options):
    return running_server(lambda: Runtime.load(folder, device="cpu", backend="torch", max_seq_len=2048), **options)


@pytest.fixture(scope="module")
def one_thread():
    """The real model runs on one torch thread: the browser and the event loop share two
    cores, and two spinning torch threads beside them slow every step tenfold."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def smollm2_server(path, one_thread, **options):
    load = lambda: Runtime.load(path, device="cpu", max_seq_len=2048, threads=one_thread)  # noqa: E731
    return running_server(load, served_model_name="SmolLM2-135M-Instruct", **options)


@pytest.fixture(scope="module")
def smollm2(smollm2_path, one_thread):
    with smollm2_server(smollm2_path, one_thread) as (base, _):
        yield base


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("webui"), "llama")


@pytest.fixture(scope="module")
def browser():
    needs(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    with sync_api.sync_playwright() as p:
        # playwright gives each launch a fresh, empty --user-data-dir of its own
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Page:
    """A fresh browser context (empty local storage) on one server, and what it logged."""

    def __init__(self, browser, base: str):
        self.base = base
        self.context = browser.new_context(viewport=VIEWPORT)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        self.context.set_default_timeout(STEP_S * 1000)
        self.page = self.context.new_page()
        self.console_errors, self.page_errors, self.dialogs, self.requests = [], [], [], []
        self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and self.requests.append(r))

    def open(self, model: str | None = None):
        self.page.goto(self.base + "/")
        if model is not None:
            self.page.wait_for_function("name => document.getElementById('model-name').textContent === name", arg=model)
        return self

    def settings(self, **values):
        self.page.click("#open-settings")
        for name, value in values.items():
            self.page.fill(f"#settings-form [name={name}]", str(value))
        self.page.click("#save-settings")
        self.page.wait_for_selector("#settings", state="hidden")

    def send(self, text: str):
        self.page.fill("#prompt", text)
        self.page.click("#send")

    def wait_answer(self):
        """Until the send button is back (the stream ended), then the last answer's view."""
        self.page.wait_for_selector("#send:not([hidden])")
        return self.page.locator(".message.assistant").last

    def body(self, i: int = -1) -> dict:
        return json.loads(self.requests[i].post_data)

    def stored(self) -> list:
        return json.loads(self.page.evaluate("localStorage.getItem('smollm3.conversations')"))

    def shot(self, name: str):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser):
    pages = []

    def make(base: str, model: str | None = None) -> Page:
        pages.append(Page(browser, base).open(model))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def api_answer(base: str, body: dict, key: str | None = None) -> dict:
    """The same request sent straight to the API, not streamed: the page's oracle."""
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=STEP_S)
    assert reply.status_code == 200, reply.text
    return reply.json()


# The rate is left out where the tokens after the first streamed in under MIN_DECODE_S (view.js).
STATS = re.compile(r"(\d+) tokens(?: · ([\d.]+) tokens/s)? · prompt (\d+) tokens · first token after [\d.]+ s")
MIN_DECODE_S = 0.05


# ---------------------------------------------------------------- the files and their headers

def test_page_files_headers_and_policy(llama_folder):
    """Content types, the CSP, revalidation by ETag; every file the page names is served;
    no inline script or handler, no address outside the server; the page is public while
    the API needs the key; --no-webui (webui=False) leaves only the API."""
    with tiny_server(llama_folder, api_key="k") as (base, _):
        page = httpx.get(base + "/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        again = httpx.get(base + "/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304 and again.content == b""

        tags = _Tags()
        tags.feed(page.text)
        assert tags.handlers == [] and tags.inline_scripts == 0, (tags.handlers, tags.inline_scripts)
        linked = [a["src"] for t, a in tags.seen if t == "script"] + [a["href"] for t, a in tags.seen if t == "link"]
        modules = {m for f in WEBUI.glob("*.js") for m in re.findall(r'from "\./([\w.]+)"', f.read_text())}
        assert modules and set(linked) >= {"webui/app.js", "webui/style.css"}
        types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
        for name in [*linked, *(f"webui/{m}" for m in modules)]:
            r = httpx.get(f"{base}/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == types[Path(name).suffix], name
            assert r.headers["content-security-policy"] == CSP
        for f in [*WEBUI.glob("*.js"), *WEBUI.glob("*.css"), *WEBUI.glob("*.html")]:
            assert not re.search(r"(https?:)?//[\w-]+\.[\w.-]+/", f.read_text()), f"{f.name} names another host"

        assert httpx.get(base + "/webui/nothing.js").status_code == 404
        assert httpx.get(base + "/webui/index.html").status_code == 404
        refused = httpx.get(base + "/props")
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        props = httpx.get(base + "/props", headers={"Authorization": "Bearer k"}).json()
        assert props == {"model": "tiny", "max_model_len": 2048, "modalities": {"vision": False}, "thinking": False}

    with tiny_server(llama_folder, webui=False) as (base, _):
        assert httpx.get(base + "/").status_code == 404
        assert httpx.get(base + "/webui/app.js").status_code == 404
        assert httpx.get(base + "/props").status_code == 200


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.seen, self.handlers, self.inline_scripts, self._in_script = [], [], 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.seen.append((tag, attrs))
        self.handlers += [f"{tag} {name}" for name in attrs if name.startswith("on")]
        self._in_script = tag == "script"
        if tag == "script" and "src" not in attrs:
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1


def test_wheel_carries_the_page(tmp_path):
    """An editable install reads the source folder; only a built wheel shows the page ships."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("smollm3_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"smollm3_triton/entrypoints/webui/{f.name}" for f in WEBUI.iterdir()}
    assert shipped and shipped <= names, shipped - names


def test_javascript_passes_eslint():
    eslint = ROOT / "node_modules" / ".bin" / "eslint"
    needs(eslint.exists(), "eslint is not installed: npm ci (in the repo root)")
    run = subprocess.run([str(eslint), "smollm3_triton/entrypoints/webui"], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # The config applies to the page's folder: an HTML string there is refused.
    bad = subprocess.run([str(eslint), "--stdin", "--stdin-filename", "smollm3_triton/entrypoints/webui/x.js"],
                         input="export function f(node, text) { node.innerHTML = text; }\n", check=False, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "model text must never be parsed as HTML" in bad.stdout, bad.stdout + bad.stderr


# The renderer's subset of CommonMark + GFM tables and strikethrough, with raw HTML off (a
# model's HTML is text). Not in the subset: indented code blocks, setext headings, lazy
# continuation lines, reference links (an answer streams; these are rare in model text).
MARKDOWN_CASES = [
    "# Title\n\nSome *em*, _em_, **strong**, __strong__, `code` and ~~gone~~.\nNext line.",
    "- one\n- two\n  - nested *deep*\n- three\n\n1. a\n2. b\n\n3. three",
    "* loose\n\n* list\n\ntext\n\n1. first\n\n   second paragraph\n2. next\n   1. inner",
    "> quoted **bold**\n> more\n\n---\n\n## Sub ##",
    "```py\nx = 1 < 2 and y > 3 & z\n\n  indented\n```\n\n~~~\nplain\n~~~",
    "| a | b |\n|---|---|\n| 1 | `2` |\n| *x* | y |",
    "[link](https://example.org/a?b=c&d=e) <https://x.org/> [bad](javascript:alert(1))",
    "snake_case_name and 2 * 3 * 4, \\*not em\\*, ``a `tick` b``",
    "Look: <img src=x onerror=alert(1)> and <script>alert(2)</script> <b>bold?</b>",
    "Para one\n- list right after\n\n```\nunclosed fence, still streaming",
]


def commonmark(text: str) -> str:
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"]).render(text)
    return _normal(html.replace("<hr />", "<hr>").replace("<s>", "<del>").replace("</s>", "</del>"))


def _normal(html: str) -> str:
    """Newlines next to tags are layout, not content (markdown-it writes them, the DOM not)."""
    return re.sub(r"\s*\n\s*(?=<)|(?<=>)\s*\n\s*", "", html)


def ours_as_commonmark(html: str) -> str:
    """Our extras undone: the code block's bar and copy button, the table's scroll box, the
    link's target and rel."""
    html = re.sub(r'<div class="code-block"><div class="code-bar"><span class="lang">([^<]*)</span>'
                  r'<button class="copy" type="button">Copy</button></div><pre><code>(.*?)</code></pre></div>',
                  lambda m: f'<pre><code{"" if m[1] == "code" else f" class=language-{m[1]}"}>{m[2]}</code></pre>',
                  html, flags=re.S)
    html = html.replace(' target="_blank" rel="noopener noreferrer"', "")
    return _normal(re.sub(r'<div class="table">(.*?)</div>', r"\1", html, flags=re.S).replace(
        "class=language-", 'class="language-').replace('language-py>', 'language-py">'))


@pytest.fixture(scope="module")
def tiny(llama_folder):
    with tiny_server(llama_folder) as (base, _):
        yield base


def test_markdown_renders_as_commonmark(tiny, open_page):
    """The page's renderer (run in the browser) builds the DOM that markdown-it (CommonMark,
    raw HTML off) writes for the same text, for each construct of its subset."""
    p = open_page(tiny, "tiny")
    rendered = p.page.evaluate("""async cases => {
        const {renderMarkdown} = await import('./webui/markdown.js');
        return cases.map(text => { const box = document.createElement('div'); renderMarkdown(text, box);
                                   return box.innerHTML; });
    }""", MARKDOWN_CASES)
    for text, html in zip(MARKDOWN_CASES, rendered):
        expected = commonmark(text)
        if text.endswith("still streaming"):       # CommonMark runs an unclosed fence to the end too
            assert ours_as_commonmark(html) == expected.replace("streaming\n", "streaming"), text
        else:
            assert ours_as_commonmark(html) == expected, text
    assert p.console_errors == [] and p.page_errors == []


# ---------------------------------------------------------------- the real SmolLM2-135M

def test_chat_streams_and_finishes(smollm2, open_page):
    p = open_page(smollm2, "SmolLM2-135M-Instruct")
    page = p.page
    assert page.is_hidden("#attach") and page.is_hidden("#thinking-toggle")   # a text model, no thinking mode
    p.settings(temperature=0, max_tokens=48)
    p.send("What is the capital of France?")
    # Text on screen while the answer is still streaming, then the end.
    page.wait_for_function("() => { const a = document.querySelector('.message.assistant.streaming .content');"
                           " return a && a.textContent.length > 0; }")
    p.shot("streaming")
    answer = p.wait_answer()
    p.shot("chat")

    expected = api_answer(smollm2, p.body())
    stored = p.stored()[0]["messages"][-1]
    assert stored["content"] == expected["choices"][0]["message"]["content"]
    assert "Paris" in answer.locator(".content").inner_text()
    stats = STATS.search(answer.locator(".meta").inner_text())
    assert stats, answer.locator(".meta").inner_text()
    usage = expected["usage"]
    assert (int(stats[1]), int(stats[3])) == (usage["completion_tokens"], usage["prompt_tokens"])
    # The rate shown is (tokens - 1) / the time after the first token, or absent when that time
    # is too short to measure (a quiet machine can stream a short answer in one read).
    timing = stored["stats"]
    decode = timing["seconds"] - timing["first_token_seconds"]
    if decode >= MIN_DECODE_S + 1e-6:
        assert stats[2] is not None and float(stats[2]) == pytest.approx((int(stats[1]) - 1) / decode, rel=0.01, abs=0.06)
    elif decode < MIN_DECODE_S - 1e-6:
        assert stats[2] is None, (answer.locator(".meta").inner_text(), decode)
    assert p.body()["stream"] is True and p.body()["stream_options"] == {"include_usage": True}
    assert p.console_errors == [] and p.page_errors == []


def test_settings_are_sent_kept_and_conversations_listed(smollm2, open_page):
    """Temperature 0 from the settings gives the same answer twice; the settings outlive a
    reload; conversations are listed, kept, switched and deleted."""
    p = open_page(smollm2, "SmolLM2-135M-Instruct")
    page = p.page
    p.settings(system="You are a helpful assistant.", temperature=0, top_p=0.5, max_tokens=24, seed=7)
    page.reload()
    page.click("#open-settings")
    form = {n: page.input_value(f"#settings-form [name={n}]") for n in ("system", "temperature", "top_p",
                                                                          "max_tokens", "seed")}
    assert form == {"system": "You are a helpful assistant.", "temperature": "0", "top_p": "0.5",
                    "max_tokens": "24", "seed": "7"}
    p.shot("settings")
    page.click("#settings button[value=cancel]")

    p.send("Name three colours.")
    first = p.wait_answer().locator(".content").inner_text()
    page.click("#new-chat")
    p.send("Name three colours.")
    second = p.wait_answer().locator(".content").inner_text()
    assert first and first == second
    for i in (0, 1):
        body = p.body(i)
        assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (0, 0.5, 24, 7)
        assert body["messages"] == [{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": "Name three colours."}]

    page.reload()
    assert page.locator("#conversations li").count() == 2
    page.click("#conversations li:nth-child(2) .open")
    assert page.locator(".message.assistant .content").inner_text() == first
    page.click("#conversations li:nth-child(1) .delete")
    assert page.locator("#conversations li").count() == 1 and len(p.stored()) == 1
    assert p.console_errors == [] and p.page_errors == []


def test_stop_midway_frees_the_sequence(smollm2, open_page):
    p = open_page(smollm2, "SmolLM2-135M-Instruct")
    page = p.page
    p.settings(temperature=0, max_tokens=1500)
    before = metric(httpx.get(smollm2 + "/metrics").text, "smollm3:generation_tokens_total")
    p.send("Write a very long story about a dragon who learns to paint.")
    page.wait_for_function("() => { const a = document.querySelector('.message.assistant.streaming .content');"
                           " return a && a.textContent.length > 40; }")
    page.click("#stop")
    answer = p.wait_answer()
    assert answer.locator(".meta").inner_text().startswith("stopped after")
    p.shot("stopped")

    m = metrics_once_idle(smollm2, within_s=10)  # the disconnect aborts the sequence within a step
    assert metric(m, "smollm3:generation_tokens_total") - before < 1500
    assert p.stored()[0]["messages"][-1]["stopped"] is True
    assert p.console_errors == [] and p.page_errors == []


def test_api_key_is_asked_for_and_sent(smollm2_path, one_thread, open_page):
    with smollm2_server(smollm2_path, one_thread, api_key="sesame") as (base, _):
        without = httpx.get(base + "/props").json()["error"]["message"]
        p = open_page(base)
        page = p.page
        page.wait_for_selector("#key-dialog[open]")
        assert page.inner_text("#key-reason") == without
        p.shot("api-key")
        page.fill("#key-form [name=key]", "wrong")
        page.click("#save-key")
        page.wait_for_function("() => document.getElementById('key-reason').textContent.startsWith('Incorrect')")
        assert page.is_visible("#key-dialog")
        page.fill("#key-form [name=key]", "sesame")
        page.click("#save-key")
        page.wait_for_function("() => document.getElementById('model-name').textContent === "
                               "'SmolLM2-135M-Instruct'")
        p.settings(temperature=0, max_tokens=8)
        p.send("Hello!")
        answer = p.wait_answer()
        assert p.requests[-1].headers["authorization"] == "Bearer sesame"
        expected = api_answer(base, p.body(), key="sesame")["choices"][0]["message"]["content"]
        assert p.stored()[0]["messages"][-1]["content"] == expected and answer.locator(".content").inner_text()
        assert p.page_errors == []        # (the 401s are logged by the browser as failed loads)


# ---------------------------------------------------------------- a random SmolVLM

def png(seed: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


def test_vision_model_takes_images(tmp_path, open_page):
    """The image button shows for a vision model; file picker, paste and drop each attach an
    image; one is removed; the answer equals the API's to the same request."""
    from tests.helpers import vision_export as V

    folder = V.save_vlm_folder(V.random_vlm(seed=0), tmp_path / "smolvlm")
    with tiny_server(folder, served_model_name="smolvlm-tiny") as (base, _):
        p = open_page(base, "smolvlm-tiny")
        page = p.page
        assert page.is_visible("#attach") and page.is_hidden("#thinking-toggle")
        p.settings(temperature=0, max_tokens=12)
        with page.expect_file_chooser() as chooser:
            page.click("#attach")
        chooser.value.set_files({"name": "a.png", "mimeType": "image/png", "buffer": png(1)})
        for target, event, seed in (("#prompt", "paste", 2), ("document", "drop", 3)):
            page.evaluate("""([target, kind, b64]) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const data = new DataTransfer();
                data.items.add(new File([bytes], 'x.png', {type: 'image/png'}));
                const node = target === 'document' ? document : document.querySelector(target);
                const init = {bubbles: true, cancelable: true};
                node.dispatchEvent(kind === 'paste' ? new ClipboardEvent('paste', {...init, clipboardData: data})
                                                    : new DragEvent('drop', {...init, dataTransfer: data}));
            }""", [target, event, base64.b64encode(png(seed)).decode()])
        page.wait_for_function("() => document.querySelectorAll('#attachments img').length === 3")
        page.click("#attachments .attachment:nth-child(2) .remove")           # the pasted one
        assert page.locator("#attachments img").count() == 2

        with page.expect_file_chooser() as chooser:
            page.click("#attach")
        chooser.value.set_files({"name": "b.gif", "mimeType": "image/gif", "buffer": png(4, "P", "GIF")})
        page.wait_for_selector("#error:not([hidden])")
        assert "b.gif is not a PNG, JPEG or WebP image" in page.inner_text("#error")

        p.send("What is in these pictures?")
        answer = p.wait_answer()
        p.shot("vision")
        parts = p.body()["messages"][0]["content"]
        urls = [part["image_url"]["url"] for part in parts if part["type"] == "image_url"]
        assert urls == [f"data:image/png;base64,{base64.b64encode(png(s)).decode()}" for s in (1, 3)]
        assert parts[-1] == {"type": "text", "text": "What is in these pictures?"}
        expected = api_answer(base, p.body())["choices"][0]["message"]["content"]
        assert p.stored()[0]["messages"][-1]["content"] == expected
        assert answer.locator(".meta").inner_text() and page.locator(".message.user img").count() == 2
        assert p.console_errors == [] and p.page_errors == []


# ---------------------------------------------------------------- what a model writes is untrusted

HOSTILE = ("<think>\nIs <b>this</b> safe?\n</think>\nLook: <img src=x onerror=alert(1)> and "
           "<script>window.pwned = 1; alert(2)</script>\n\n```html\n<script>alert(3)</script>\n```\n\n"
           "[click](javascript:alert(4)) **done**")


def test_model_html_is_shown_as_text_and_runs_nothing(tmp_path, open_page):
    """A scripted SmolLM3 answer with <img onerror>, <script> and a javascript: link: shown
    as text, nothing runs; the reasoning sits in a collapsible block; the thinking toggle is
    sent; the code block's copy button copies the code; a server error is shown."""
    folder = tiny_folder(tmp_path, "smollm3", template=SMOLLM3_TEMPLATE)
    with tiny_server(folder, served_model_name="smollm3-tiny") as (base, app):
        rt = app.state.smollm3.runtime

        def script(text):
            ids = rt.tokenizer.encode(text) + [rt.tokenizer.token_to_id("<|im_end|>")]
            rt.engine.runner.forward = ScriptedRunner(rt.model, ids)

        p = open_page(base, "smollm3-tiny")
        page = p.page
        assert page.is_visible("#thinking-toggle") and page.is_checked("#thinking")
        p.settings(temperature=0, max_tokens=200)
        script(HOSTILE)
        p.send("Show me some HTML.")
        answer = p.wait_answer()

        content = answer.locator(".content")
        text = content.inner_text()
        assert "Look: <img src=x onerror=alert(1)> and <script>window.pwned = 1; alert(2)</script>" in text
        assert "[click](javascript:alert(4))" in text and content.locator("strong").inner_text() == "done"
        assert page.locator("#messages img, #messages script, #messages b, #messages a").count() == 0
        assert content.locator("pre code").inner_text() == "<script>alert(3)</script>"
        assert page.evaluate("window.pwned") is None and p.dialogs == []

        thinking = answer.locator("details.thinking")
        assert thinking.locator(".reasoning").text_content() == "Is <b>this</b> safe?"   # closed: not rendered
        assert not thinking.evaluate("d => d.open")
        thinking.locator("summary").click()
        assert thinking.evaluate("d => d.open")
        content.locator(".copy").click()
        page.wait_for_function("() => document.querySelector('.copy').textContent === 'Copied'")
        assert page.evaluate("navigator.clipboard.readText()") == "<script>alert(3)</script>"
        p.shot("untrusted")
        assert p.body()["chat_template_kwargs"] == {"enable_thinking": True}

        page.uncheck("#thinking")
        script("Just the answer.")
        p.send("And now?")
        answer = p.wait_answer()
        assert p.body()["chat_template_kwargs"] == {"enable_thinking": False}
        assert answer.locator(".content").inner_text() == "Just the answer."
        assert answer.locator("details.thinking").count() == 0
        assert page.evaluate("window.pwned") is None and p.dialogs == []
        assert p.console_errors == [] and p.page_errors == []

        p.settings(max_tokens=100000)
        p.send("Too long?")
        page.wait_for_selector("#error:not([hidden])")
        refused = httpx.post(base + "/v1/chat/completions", json=p.body(), timeout=STEP_S)
        assert refused.status_code == 400
        assert page.inner_text("#error") == refused.json()["error"]["message"]
        assert page.input_value("#prompt") == "Too long?"        # the turn is given back to change and resend
        p.shot("error")
