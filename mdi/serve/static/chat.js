// The chat page: streams replies from the server's v1/chat/completions (server-sent
// events read from fetch's ReadableStream), keeps the conversation, can stop a reply.
// No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
const keyField = $("api-key");
let model = null;          // the served model's id, from v1/models
let history = [];          // [{role, content}] of the conversation so far
let controller = null;     // AbortController of the reply being streamed

keyField.value = localStorage.getItem("mdi-api-key") || "";
keyField.addEventListener("change", () => { localStorage.setItem("mdi-api-key", keyField.value); loadModel(); });

function headers() {
  const h = {"Content-Type": "application/json"};
  if (keyField.value) h["Authorization"] = "Bearer " + keyField.value;
  return h;
}

async function errorText(resp) {
  try { const body = await resp.json(); return body.error ? body.error.message : JSON.stringify(body); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

async function loadModel() {
  try {
    const resp = await fetch("v1/models", {headers: headers()});
    if (!resp.ok) { $("model").textContent = "(" + await errorText(resp) + ")"; return; }
    model = (await resp.json()).data[0].id;
    $("model").textContent = model;
  } catch (e) { $("model").textContent = "(server unreachable)"; }
}

function bubble(cls, text) {
  const empty = $("empty");
  if (empty) empty.remove();
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  sendBtn.disabled = busy;
  stopBtn.disabled = !busy;
}

// Yields each SSE event's data (a string) from a fetch Response body.
async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
                        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

async function send(text) {
  if (!model) await loadModel();
  if (!model) { bubble("error", "No model: " + $("model").textContent); return; }
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant streaming", "");
  out.dataset.chunks = "0";
  let reply = "", finish = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({model, messages: history, stream: true,
                            max_tokens: Number($("max-tokens").value) || 200,
                            temperature: Number($("temperature").value)}),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const data of sseData(resp)) {
      if (data === "[DONE]") break;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      for (const choice of obj.choices || []) {
        if (choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          out.textContent = reply;
          out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
          log.scrollTop = log.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else bubble("error", String(e.message || e));
  } finally {
    controller = null;
    out.classList.remove("streaming");
    out.textContent = reply;
    if (finish && finish !== "stop") {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = finish === "length" ? "(token limit reached)" : "(" + finish + ")";
      out.appendChild(meta);
    }
    if (reply) history.push({role: "assistant", content: reply});
    else history.pop();    // nothing came back: let the user send that message again
    setBusy(false);
    input.focus();
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  log.innerHTML = '<p class="empty" id="empty">Send a message to start the conversation.</p>';
});
loadModel();
