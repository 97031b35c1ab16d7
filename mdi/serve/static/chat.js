// The chat page: streams replies from the server's v1/chat/completions (server-sent
// events read from fetch's ReadableStream), renders them as Markdown (markdown.js:
// DOM nodes, never HTML), keeps the conversation in localStorage so that it survives
// a reload, can stop a reply. No build step, no dependencies.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const log = $("log"), input = $("input"), sendBtn = $("send"), stopBtn = $("stop");
  const settings = window.mdiSettings, markdown = window.mdiMarkdown;
  const STORE = "mdi-chat";   // {version, messages: [{role, content, note?, failed?}], settings}
  let model = null;           // the served model's id, from v1/models
  let history = [];           // the conversation: completed turns only
  let controller = null;      // AbortController of the reply being streamed
  let frame = 0;              // the pending animation frame that renders the streamed text
  let epoch = 0;              // counts "new conversation"s: a reply to an older one is dropped

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify({version: 1, messages: history, settings: settings.state()}));
    } catch (e) {
      $("model").title = "the conversation could not be kept in this browser: " + e.message;
    }
  }

  function load() {
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(STORE)); } catch (e) { /* none or unreadable */ }
    if (!saved || typeof saved !== "object") return;
    settings.restore(saved.settings);
    history = (Array.isArray(saved.messages) ? saved.messages : []).filter((m) => m
      && (m.role === "user" || m.role === "assistant") && typeof m.content === "string");
    for (const m of history) {
      const div = bubble(m.role);
      fill(div, m.role, m.content);
      if (typeof m.note === "string") note(div, m.note, Boolean(m.failed));
    }
  }

  function headers() {
    const h = {"Content-Type": "application/json"};
    if (settings.key()) h["Authorization"] = "Bearer " + settings.key();
    return h;
  }

  async function errorText(resp) {
    try { const body = await resp.json(); return body.error ? body.error.message : JSON.stringify(body); }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  async function loadModel() {
    try {
      const resp = await fetch("v1/models", {headers: headers()});
      if (!resp.ok) {
        $("model").textContent = "(" + await errorText(resp) + ")";
        if (resp.status === 401) settings.reveal();   // where the key goes
        return;
      }
      model = (await resp.json()).data[0].id;
      $("model").textContent = model;
    } catch (e) { $("model").textContent = "(server unreachable)"; }
  }

  function showEmpty() {
    const p = log.appendChild(document.createElement("p"));
    p.className = "empty";
    p.id = "empty";
    p.textContent = "Send a message to start the conversation.";
  }

  function nearBottom() { return log.scrollHeight - log.scrollTop - log.clientHeight < 60; }

  function bubble(cls) {
    const empty = $("empty");
    if (empty) empty.remove();
    const div = log.appendChild(document.createElement("div"));
    div.className = "msg " + cls;
    div.appendChild(document.createElement("div")).className = "content";
    log.scrollTop = log.scrollHeight;
    return div;
  }

  // The user's own text is shown as typed; the model's is rendered as Markdown.
  function fill(div, role, text) {
    const content = div.querySelector(".content");
    if (role === "assistant") content.replaceChildren(markdown.render(text));
    else content.textContent = text;
  }

  function note(div, text, failed) {
    const span = div.appendChild(document.createElement("span"));
    span.className = failed ? "meta failed" : "meta";
    span.textContent = text;
  }

  function thinking(div) {
    const box = div.querySelector(".content").appendChild(document.createElement("span"));
    box.className = "thinking";
    box.setAttribute("role", "status");
    const dots = box.appendChild(document.createElement("span"));
    dots.className = "dots";
    for (let i = 0; i < 3; i++) dots.appendChild(document.createElement("i"));
    box.appendChild(document.createTextNode("thinking…"));
  }

  function setState(state) {   // idle | thinking (no token yet) | streaming
    document.body.dataset.state = state;
    sendBtn.disabled = state !== "idle";
    stopBtn.disabled = state === "idle";
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

  // Streams one reply into `out`; returns {reply, finish, error}.
  async function stream(out, body) {
    let reply = "", finish = null, error = null;
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), signal: controller.signal, body: JSON.stringify(body)});
      if (!resp.ok) throw new Error(await errorText(resp));
      for await (const data of sseData(resp)) {
        if (data === "[DONE]") break;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message);
        for (const choice of obj.choices || []) {
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            setState("streaming");
            const text = reply;   // rendered at most once a frame: a long reply re-renders whole
            cancelAnimationFrame(frame);
            frame = requestAnimationFrame(() => {
              const follow = nearBottom();
              fill(out, "assistant", text);
              if (follow) log.scrollTop = log.scrollHeight;
            });
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else if (e instanceof TypeError) error = "the connection to the server failed (" + e.message + ")";
      else error = String(e.message || e);
    }
    cancelAnimationFrame(frame);
    return {reply, finish, error};
  }

  async function send(text, opts) {
    if (!model) await loadModel();
    const asked = bubble("user");
    fill(asked, "user", text);
    const out = bubble("assistant");
    controller = new AbortController();
    setState("thinking");
    const started = epoch;
    let result = {reply: "", finish: null, error: "no model: " + $("model").textContent};
    if (model) {
      thinking(out);
      history.push({role: "user", content: text});
      const messages = (opts.system ? [{role: "system", content: opts.system}] : [])
        .concat(history.map((m) => ({role: m.role, content: m.content})));
      result = await stream(out, Object.assign({model, messages, stream: true}, opts.values));
      if (!result.reply) history.pop();
    }
    const {reply, finish, error} = result;
    controller = null;
    setState("idle");
    if (started !== epoch) return;
    if (reply) {
      fill(out, "assistant", reply);
      const turn = {role: "assistant", content: reply};
      if (error) Object.assign(turn, {note: "(error: " + error + ")", failed: true});
      else if (finish && finish !== "stop")
        turn.note = finish === "length" ? "(token limit reached)" : "(" + finish + ")";
      if (turn.note) note(out, turn.note, turn.failed);
      history.push(turn);
      save();
    } else {   // nothing came back: no empty bubble, and the message can be sent again
      out.className = error ? "msg error" : "msg notice";
      out.querySelector(".content").textContent = error
        || (finish === "stopped" ? "Stopped before the reply began." : "The model's reply was empty.");
      note(out, "Your message is back in the input box.", false);
      asked.classList.add("unsent");
      if (!input.value.trim()) input.value = text;
    }
    log.scrollTop = log.scrollHeight;
    input.focus();
  }

  function grow() {   // the input grows with its text, up to a limit (then it scrolls)
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, 200) + "px";
  }

  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    const opts = settings.read();
    if (opts.error) return;   // shown next to its field; the text stays in the input
    input.value = "";
    grow();
    send(text, opts);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("form").requestSubmit(); }
  });
  input.addEventListener("input", grow);
  stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    epoch++;
    history = [];
    log.replaceChildren();
    showEmpty();
    save();
    input.focus();
  });
  settings.onChange(save);
  settings.onKeyChange(loadModel);
  load();
  if (!history.length) showEmpty();
  log.scrollTop = log.scrollHeight;
  loadModel();
})();
