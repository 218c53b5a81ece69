"""`kvsqueeze ui`: its API (Starlette's test client) and the page in a real browser (headless Chromium + Playwright).

The browser test needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` package (its driver only:
no browser is downloaded); `.ci/run` installs both (scripts/setup-browser.sh). Where either is missing, it is skipped
with the reason. KVSQUEEZE_SCREENSHOT=docs/ui.png saves the page as the docs show it.
"""

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="starlette is not installed: pip install 'kvsqueeze[ui]'")
from starlette.testclient import TestClient  # noqa: E402

from kvsqueeze import cli, methods  # noqa: E402
from kvsqueeze.ui import create_app  # noqa: E402

CHROMIUM = os.environ.get("KVSQUEEZE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "How many bay leaves does the lighthouse keeper's secret fish stew recipe use?"
pytestmark = pytest.mark.bundled


@pytest.fixture(scope="module")
def client(bundled):
    return TestClient(create_app(*bundled))


def events(response) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in response.text.splitlines() if line.startswith("data: ")]


def test_the_page_and_its_script_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text
    assert "api/compress" in client.get("/static/app.js").text


def test_options_offer_the_methods_that_run_without_calibration(client):
    options = client.get("/api/options").json()
    names = [m["name"] for m in options["methods"]]
    assert options["default_method"] in names and "snapkv" in names and "qfilter" not in names
    assert "kivi-4" in options["quantizers"]
    assert "lighthouse keeper" in options["demo_document"]


def test_compress_reports_bytes_and_what_each_layer_and_head_kept(client):
    text = "The orchard behind the mill grows pears. The miller's dog is called Biscuit. " * 8
    data = client.post("/api/compress", json={"text": text, "method": "streaming_llm", "ratio": 0.5}).json()
    assert data["layers"] == 30 and data["kv_heads"] == 3 and len(data["kept"]) == 30
    n = len(data["tokens"])
    assert all(len(head) == n and set(head) <= {"0", "1"} for layer in data["kept"] for head in layer)
    held = sum(head.count("1") for layer in data["kept"] for head in layer)
    assert held / (30 * 3 * n) == pytest.approx(0.5, abs=0.02) == pytest.approx(data["kept_share"], abs=0.02)
    assert data["kept"][0][0].startswith("1111") and data["kept"][0][0].endswith("1111")  # sinks and recent tokens
    assert data["bytes"]["compressed"] == pytest.approx(0.5 * data["bytes"]["full"], rel=0.05)
    assert "".join(token["text"] for token in data["tokens"]).count("Biscuit") == 8

    answers = events(client.post("/api/ask", json={"id": data["id"], "question": "What is the dog called?",
                                                   "max_new_tokens": 8}))
    for side in ("full", "compressed"):
        assert [e for e in answers if e["side"] == side][-1]["done"]
        assert "".join(e.get("text", "") for e in answers if e["side"] == side).strip()


def test_quantized_bytes_are_those_of_the_packed_tensors(client):
    data = client.post("/api/compress", json={"text": "A short note about a red kite. " * 80, "method": "none",
                                              "quantizer": "kivi-2"}).json()
    assert data["quantizer"]["name"] == "kivi"  # KIVI keeps its last 128 tokens in full precision, packs the rest
    assert data["bytes"]["compressed"] < 0.5 * data["bytes"]["full"]
    assert all(set(head) == {"1"} for layer in data["kept"] for head in layer)  # nothing evicted


@pytest.mark.parametrize("body, message", [
    ({"text": " ", "method": "snapkv"}, "empty"),
    ({"text": "some text", "method": "no_such"}, "unknown method"),
    ({"text": "some text", "ratio": 1.5}, "ratio"),
    ({"text": "some text", "ratio": "half"}, "ratio is a number"),
    ({"text": "some text", "quantizer": "zip-3"}, "unknown quantizer"),
])
def test_bad_input_gets_a_clear_error(client, body, message):
    response = client.post("/api/compress", json=body)
    assert response.status_code == 400 and message in response.json()["error"]


def test_asking_an_unknown_document_or_nothing(client):
    assert "no longer held" in client.post("/api/ask", json={"id": "nope", "question": "Why?"}).json()["error"]
    response = client.post("/api/compress", content=b"not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]


def test_the_app_can_be_mounted_under_a_prefix():
    """A larger server (kvsqueeze serve) mounts the page; every URL the page uses is relative."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = TestClient(Starlette(routes=[Mount("/ui", app=create_app(model=object(), tokenizer=None))]))
    assert outer.get("/ui", follow_redirects=False).headers["location"].endswith("/ui/")
    assert outer.get("/ui/").status_code == outer.get("/ui/static/app.js").status_code == 200
    assert outer.get("/ui/api/options").json()["default_method"] == methods.DEFAULT
    script = outer.get("/ui/static/app.js").text
    assert 'fetch("/' not in script and "fetch('/" not in script  # no absolute URL


def test_kvsqueeze_ui_is_a_command():
    assert cli.parser().parse_args(["ui", "--port", "8123"]).port == 8123


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(bundled):
    """The page served by uvicorn on a free local port, in a thread, for the length of the module."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(*bundled), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                         "(pip install playwright; .ci/run installs it)")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def test_the_page_compresses_the_demo_document_and_answers_twice(served, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    failures = []
    page.on("pageerror", lambda error: failures.append(str(error)))
    page.goto(served)
    page.wait_for_selector("#method option[value=snapkv]", state="attached")
    page.click("#demo")
    assert "lighthouse keeper" in page.input_value("#document")
    page.select_option("#method", "snapkv")
    page.fill("#ratio", "0.5")
    page.click("#compress")
    page.wait_for_selector("#heatmap span.tok", timeout=180_000)

    tokens = page.locator("#heatmap span.tok")
    assert tokens.count() > 3000  # the demo document, token by token, over its chat template
    colours = page.eval_on_selector_all("#heatmap span.tok",
                                        "spans => new Set(spans.map(s => s.style.background)).size")
    assert colours >= 2  # kept and evicted tokens look different
    assert "%" in page.inner_text("#bytes") and "MB" in page.inner_text("#bytes")
    assert page.eval_on_selector("#grid", "c => c.width") > 100
    page.select_option("#view", "13")  # one layer, by heads
    assert "KV heads of layer 13" in page.inner_text("#grid-caption")
    page.select_option("#view", "all")

    page.fill("#question", QUESTION)
    page.fill("#max-new-tokens", "24")
    page.click("#ask")
    page.wait_for_selector("#answer-full.done", timeout=180_000)
    page.wait_for_selector("#answer-compressed.done", timeout=180_000)
    for side in ("full", "compressed"):
        assert page.inner_text(f"#answer-{side} .text").strip()
    assert not failures, failures
    page.locator("#heatmap").evaluate("box => box.scrollTop = box.scrollHeight * 0.55")  # where the fact is
    screenshot = Path(os.environ.get("KVSQUEEZE_SCREENSHOT") or tmp_path / "ui.png")
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    page.close()
