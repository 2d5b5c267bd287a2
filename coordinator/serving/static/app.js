// The edgeshard classroom view: polls /v1/cluster once a second and draws the ring; streams chat answers.
// Plain JavaScript, no libraries, nothing from outside this server. Every figure comes from the /v1 API with
// the API key (when the server wants one) as a bearer header; the key lives in this tab's sessionStorage.
"use strict";

const POLL_MS = 1000;
const KEY = "edgeshard-api-key";
const $ = (id) => document.getElementById(id);

let previous = null;   // the last snapshot, with the time it was taken: figures are differences over a poll
let polling = null;
const history = [];    // the chat so far: {role, content}
let streaming = null;  // AbortController of the answer being streamed

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;  // textContent only: node names are data, never markup
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 && i ? 1 : 0)} ${units[i]}`;
}

function ms(v) { return v === undefined || v === null ? "–" : `${v < 10 ? v.toFixed(2) : v.toFixed(1)} ms`; }

// ---- login -------------------------------------------------------------------------------------------------
function askForKey(message) {
  stopPolling();
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("login-key").focus();
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("login-key").value.trim());
  $("login-key").value = "";
  $("login").hidden = true;
  startPolling();
});

$("forget-key").addEventListener("click", (ev) => {
  ev.preventDefault();
  sessionStorage.removeItem(KEY);
  location.reload();
});

// ---- the cluster -------------------------------------------------------------------------------------------
async function poll() {
  let info;
  try {
    const r = await fetch("/v1/cluster?max_age=0.5", { headers: headers(), cache: "no-store" });
    if (r.status === 401) {
      const had = sessionStorage.getItem(KEY);
      sessionStorage.removeItem(KEY);
      askForKey(had ? "That key was refused; try again." : "");
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    info = await r.json();
  } catch (e) {
    $("status").textContent = `cannot reach the server (${e.message}); retrying…`;
    $("status").className = "error";
    return;
  }
  $("forget-key").hidden = !sessionStorage.getItem(KEY);
  render(info, performance.now());
}

function startPolling() {
  if (polling) return;
  poll();
  polling = setInterval(poll, POLL_MS);
}

function stopPolling() {
  clearInterval(polling);
  polling = null;
}

function nodeKey(n, i) { return n.address || `${n.node}#${i}`; }

function render(info, now) {
  const eng = info.engine || {};
  const dt = previous ? (now - previous.now) / 1000 : 0;
  $("model").textContent = info.model || "";
  if (previous && dt > 0) {
    const made = (eng.generated_tokens || 0) - (previous.info.engine.generated_tokens || 0);
    $("tps").textContent = Math.max(0, made / dt).toFixed(1);
  }
  $("running").textContent = eng.running ?? "–";
  $("queued").textContent = eng.queued ?? "–";
  $("tokens").textContent = eng.generated_tokens ?? "–";
  const kv = (info.nodes || []).reduce((s, n) => s + (n.kv_bytes || 0), 0);
  $("kv").textContent = bytes(kv);
  const rec = info.recovery || {};
  $("state").textContent = rec.state || (info.nodes && info.nodes.length ? "serving" : "waiting");
  $("status").textContent = `updated ${new Date().toLocaleTimeString()}` +
    (info.mode ? ` · ${info.mode} mode` : "") + (rec.error ? ` · ${rec.error}` : "");
  $("status").className = "muted";

  const before = new Map();
  if (previous) (previous.info.nodes || []).forEach((n, i) => before.set(nodeKey(n, i), n));
  drawRing(info.nodes || [], before, rec.nodes || {}, info.context_length);
  drawRecoveries(rec.recoveries || []);
  previous = { info, now };
}

function drawRing(nodes, before, liveness, context) {
  const ring = $("ring");
  ring.replaceChildren();
  const total = nodes.length ? Math.max(...nodes.map((n) => n.end_layer || 0)) : 0;
  ring.append(el("div", "arrow", "⟶"));
  nodes.forEach((n, i) => {
    ring.append(nodeCard(n, before.get(nodeKey(n, i)), liveness[n.address], total));
    ring.append(el("div", "arrow", i === nodes.length - 1 ? "⟲" : "⟶"));
  });
  if (!nodes.length) ring.append(el("p", "muted", "No nodes yet: the server is looking for a plan that can run."));
}

function nodeCard(n, prev, live, total) {
  const state = live ? live.state : n.status === "unreachable" ? "down" : "up";
  const down = n.status === "unreachable" || state === "down" || state === "dead";
  const card = el("div", `node${down ? " down" : state !== "up" ? " suspect" : ""}`);
  card.dataset.node = n.node;
  card.dataset.layers = `${n.start_layer}-${n.end_layer}`;
  const head = el("div", "name", n.name || n.node);
  head.append(el("span", "badge", down ? "down" : state));
  card.append(head);
  card.append(el("div", "addr", n.address || "in the server's process"));
  const layers = el("div", "layers",
    `layers ${n.start_layer}–${n.end_layer - 1} (${n.end_layer - n.start_layer}${total ? ` of ${total}` : ""})`);
  card.append(layers);

  // recent figures: differences since the last poll; before any new step, the averages since loading
  let util = n.utilization, compute = n.compute_ms_per_step, network = n.network_ms_per_step;
  const steps = prev && n.steps !== undefined ? n.steps - prev.steps : 0;
  if (prev && steps > 0 && n.compute_ms !== undefined) {
    compute = (n.compute_ms - prev.compute_ms) / steps;
    if (n.network_ms !== undefined) network = (n.network_ms - prev.network_ms) / steps;
  }
  if (prev && n.wall_ms !== undefined && n.wall_ms > prev.wall_ms) {
    util = (n.compute_ms - prev.compute_ms) / (n.wall_ms - prev.wall_ms);
  }
  const bar = el("div", "bar");
  const fill = el("div");
  fill.style.width = `${Math.round(100 * Math.min(1, Math.max(0, util || 0)))}%`;
  bar.append(fill);
  card.append(bar);

  const dl = el("dl");
  const row = (k, v, name) => {
    const dd = el("dd", null, v);
    if (name) dd.dataset.figure = name;
    dl.append(el("dt", null, k), dd);
  };
  row("busy", util === undefined ? "–" : `${Math.round(100 * util)} %`, "utilization");
  row("compute / step", ms(compute), "compute");
  row("network / step", ms(network), "network");
  row("queue / step", ms(n.queue_ms_per_step), "queue");
  row("steps", n.steps ?? "–", "steps");
  row("sequences", n.sessions ?? "–", "sessions");
  row("KV in use", n.kv_budget ? `${bytes(n.kv_bytes)} / ${bytes(n.kv_budget)}` : bytes(n.kv_bytes), "kv");
  if (n.arch) row("CPU", `${n.arch} · ${n.cores} cores · ${n.torch_threads} thr`);
  if (n.memory_total) row("memory", `${bytes(n.memory_free)} free / ${bytes(n.memory_total)}`);
  row("format", n.quant || "–");
  if (n.kernels) row("kernels", n.kernels.split(" (")[0]);
  card.append(dl);
  if (n.error) {
    const err = el("p", "node-error", n.error);
    err.title = n.error;
    card.append(err);
  }
  if (n.kernels) card.title = `${n.kernels}\n${n.platform || ""}`;
  return card;
}

function drawRecoveries(events) {
  const box = $("recoveries");
  box.replaceChildren();
  events.slice(-3).forEach((e) => {
    const who = (e.nodes || []).join(", ") || e.cause;
    box.append(el("div", null, `recovery: ${who} failed (${e.cause}) → ${e.outcome}` +
      (e.pause_ms !== undefined ? ` after ${(e.pause_ms / 1000).toFixed(1)} s` : "")));
  });
}

// ---- chat --------------------------------------------------------------------------------------------------
function addMessage(role, text) {
  const m = el("div", `msg ${role}`, text);
  $("chat-log").append(m);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return m;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.dataset.state = "streaming";
  streaming = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  let answer = "";
  let finish = null;
  const started = performance.now();
  let tokens = 0;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ messages: history, stream: true, max_tokens: Number($("chat-max").value) || 256, stream_options: { include_usage: true } }),
      signal: streaming.signal,
    });
    if (r.status === 401) { askForKey("The server wants an API key."); throw new Error("no API key"); }
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            out.textContent = answer;
            $("chat-log").scrollTop = $("chat-log").scrollHeight;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    history.push({ role: "assistant", content: answer });
    const secs = (performance.now() - started) / 1000;
    out.append(el("span", "meta", `${tokens} tokens in ${secs.toFixed(1)} s` +
      (finish === "length" ? " (stopped at the length limit)" : "")));
    out.dataset.state = "done";
  } catch (e) {
    history.pop();  // the question goes unanswered: leave it out of the next request
    out.className = "msg error";
    out.textContent = (answer ? answer + "\n" : "") + (e.name === "AbortError" ? "(stopped)" : `error: ${e.message}`);
    out.dataset.state = "error";
  } finally {
    streaming = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || streaming) return;
  $("chat-input").value = "";
  send(text);
});

$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("chat-form").requestSubmit();
  }
});

$("chat-stop").addEventListener("click", () => streaming && streaming.abort());
$("chat-clear").addEventListener("click", () => { history.length = 0; $("chat-log").replaceChildren(); });

startPolling();
