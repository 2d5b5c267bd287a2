"""The classroom view in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
driven by Playwright opens `/` of a real server and reads what a student would see.

- over a LocalCluster of two node processes with an API key: without the key the page shows a login form and
  nothing of the cluster (and the API refuses the page's requests); with it, every node with its layer range,
  figures that change while a generation runs, and a chat message typed into the page streamed back;
- over the in-process server with no key: the page opens straight onto the ring.

Skips (with the reason) when chromium or playwright is missing; never runs `playwright install`.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading

import httpx
import pytest
from test_metrics import scrape, value

# $EDGESHARD_CHROMIUM picks another binary (chromium-browser, google-chrome)
CHROMIUM = os.environ.get("EDGESHARD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "classroom-key-7f3a"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    # the page may talk to its own server only: anything else would be an outside fetch
    outside: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith(("http://127.0.0.1", "data:")) else outside.append(r.url),
    )
    page.outside = outside
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not outside, f"the page fetched from outside its server: {outside}"


def node_cards(page) -> list[dict]:
    return page.eval_on_selector_all(
        ".node",
        "cards => cards.map(c => ({node: c.dataset.node, layers: c.dataset.layers, text: c.innerText}))",
    )


def figure(page, node: str, name: str) -> str:
    return page.inner_text(f'.node[data-node="{node}"] [data-figure="{name}"]')


def chat(page, text: str, max_tokens: int) -> str:
    """Type a message into the page, send it with Enter, and return the streamed answer (checked to arrive
    in pieces: the answer is visible while it is still streaming)."""
    page.fill("#chat-max", str(max_tokens))
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")
    answer = page.locator(".msg.assistant").last
    # a partial answer on screen before the stream ended
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return m && m.dataset.state === 'streaming' && m.textContent.length > 0; }",
        timeout=120_000,
        polling=10,
    )
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg.assistant, .msg.error')].pop();"
        " return m && m.dataset.state !== 'streaming'; }",
        timeout=180_000,
    )
    assert answer.get_attribute("data-state") == "done", page.inner_text("#chat-log")
    return answer.inner_text()


@pytest.fixture(scope="module")
def keyed_cluster(smollm2_path):
    from edgeshard.coordinator.sdk.local_cluster import LocalCluster

    with LocalCluster(model="smollm2-135m", nodes=2, api_key=KEY, max_running=4) as cluster:
        yield cluster


@pytest.mark.slow
def test_dashboard_over_a_cluster_with_an_api_key(keyed_cluster, page, tmp_path):
    url = keyed_cluster.url
    # without the key: the login form, no node, and the API refuses what the page asks
    refused: list[int] = []
    page.on("response", lambda r: refused.append(r.status) if "/v1/cluster" in r.url else None)
    page.goto(url + "/")
    page.wait_for_selector("#login:not([hidden])", timeout=15_000)
    assert node_cards(page) == [] and 401 in refused
    assert httpx.get(url + "/v1/cluster").status_code == 401
    assert httpx.get(url + "/metrics").status_code == 401
    # a wrong key is refused and asked for again
    page.fill("#login-key", "wrong")
    page.click("#login-form button")
    page.wait_for_function("() => document.getElementById('login-error').textContent.includes('refused')")
    assert node_cards(page) == []

    # the right key: every node of the plan, in order, with its layer range
    page.fill("#login-key", KEY)
    page.click("#login-form button")
    page.wait_for_selector(".node", timeout=30_000)
    plan = keyed_cluster.plan
    cards = node_cards(page)
    assert [(c["node"], c["layers"]) for c in cards] == [
        (p["node"], f"{p['start_layer']}-{p['end_layer']}") for p in plan
    ]
    for c, p in zip(cards, plan, strict=True):
        assert f"layers {p['start_layer']}–{p['end_layer'] - 1}" in c["text"] and p["address"] in c["text"]
        assert "cores" in c["text"] and p["quant"] in c["text"]

    # the figures move while a generation runs (started from outside the page, as another student would)
    last = plan[-1]["node"]
    steps_before = figure(page, last, "steps")
    tokens_before = page.inner_text("#tokens")
    done = threading.Event()

    def generate():
        try:
            httpx.post(
                url + "/v1/completions",
                headers={"Authorization": f"Bearer {KEY}"},
                json={"prompt": "Count to fifty:", "max_tokens": 40, "ignore_eos": True, "temperature": 0},
                timeout=300,
            )
        finally:
            done.set()

    threading.Thread(target=generate, daemon=True).start()
    page.wait_for_function(
        "([node, before]) => document.querySelector(`.node[data-node='${node}'] [data-figure='steps']`)"
        ".textContent !== before",
        arg=[last, steps_before],
        timeout=60_000,
    )
    page.wait_for_function("(b) => document.getElementById('tokens').textContent !== b", arg=tokens_before)
    assert done.wait(300)
    page.wait_for_function(
        "(n) => Number(document.getElementById('tokens').textContent) >= n",
        arg=int(tokens_before) + 40,
        timeout=15_000,
    )

    # /metrics (with the key) agrees with /v1/cluster node by node, now that the cluster is idle
    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(url + "/v1/cluster", headers=auth, timeout=30).json()
    metrics = scrape(url, headers=auth)
    for n in info["nodes"]:
        labels = {"node": n["node"], "address": n["address"]}
        assert value(metrics, "edgeshard_node_up", **labels) == 1
        assert value(metrics, "edgeshard_node_layers", **labels) == n["end_layer"] - n["start_layer"]
        assert value(metrics, "edgeshard_node_steps_total", **labels) == n["steps"] > 0
        compute = value(metrics, "edgeshard_node_compute_seconds_total", **labels)
        assert compute == pytest.approx(n["compute_ms"] / 1000, abs=1e-6) and compute > 0
    assert value(metrics, "edgeshard_completion_tokens_total") == info["engine"]["generated_tokens"]

    # a chat message typed into the page streams an answer
    answer = chat(page, "What is the capital of France?", max_tokens=24)
    assert answer.strip()
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    if os.environ.get("EDGESHARD_SCREENSHOT"):
        shutil.copy(tmp_path / "dashboard.png", os.environ["EDGESHARD_SCREENSHOT"])

    # a node dies: within seconds the page stops showing it as up (down, or re-placed away by recovery)
    os.kill(keyed_cluster.processes.procs[-1].pid, signal.SIGKILL)
    page.wait_for_function(
        "(n) => !document.querySelector(`.node[data-node='${n}']:not(.down)`)", arg=last, timeout=20_000
    )
    down = {"node": last, "address": plan[-1]["address"]}
    assert value(scrape(url, headers=auth), "edgeshard_node_up", **down) == 0
    if os.environ.get("EDGESHARD_SCREENSHOT"):
        page.screenshot(path=os.environ["EDGESHARD_SCREENSHOT"].replace(".png", "-down.png"), full_page=True)


def test_dashboard_open_server(api_server, page):
    """No key set: the page opens onto the ring (one in-process stage holding every layer) and chats."""
    page.goto(api_server.url + "/")
    page.wait_for_selector(".node", timeout=30_000)
    assert page.is_hidden("#login")
    cards = node_cards(page)
    assert [(c["node"], c["layers"]) for c in cards] == [("local", "0-30")]
    assert "layers 0–29 (30 of 30)" in cards[0]["text"]
    assert chat(page, "Say hello.", max_tokens=8).strip()


def test_assets_are_shipped_and_locked_down(api_server):
    """The page and its assets come from the package, with a same-origin-only CSP; nothing else is served."""
    for path, kind in (
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ):
        r = httpx.get(api_server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert b"http://" not in r.content and b"https://" not in r.content  # no outside URL at all
    assert httpx.get(api_server.url + "/static/../http_api.py").status_code == 404
    assert httpx.get(api_server.url + "/static/metrics.py").status_code == 404
