// The chat page's settings panel: the system prompt and the sampling fields. An empty
// sampling field means "the model's default": the request leaves it out and the server
// applies the checkpoint's own. A value that is not valid is shown as an error next to
// its field (never silently dropped) and keeps the message from being sent.
// The API key is kept in sessionStorage (this tab, across reloads), never in
// localStorage; chat.js stores the rest, with the conversation, in localStorage.
"use strict";
window.mdiSettings = (function () {
  const $ = (id) => document.getElementById(id);
  const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i;
  const FIELDS = [   // the request's field, the input's id, its label, the check (null: fine)
    {name: "max_tokens", id: "max-tokens", label: "max tokens",
     check: (v) => Number.isInteger(v) && v >= 1 ? null : "must be a whole number from 1 up"},
    {name: "temperature", id: "temperature", label: "temperature",
     check: (v) => v >= 0 && v <= 2 ? null : "must be from 0 to 2"},
    {name: "top_p", id: "top-p", label: "top p",
     check: (v) => v > 0 && v <= 1 ? null : "must be more than 0 and at most 1"},
  ];
  const KEY = "mdi-api-key";
  const panel = $("settings"), system = $("system"), key = $("api-key");
  let onChange = () => {};

  try {
    localStorage.removeItem(KEY);   // an earlier version of this page kept the key there
    key.value = sessionStorage.getItem(KEY) || "";
  } catch (e) { /* storage disabled: the key lives as long as the page */ }

  function parse(field) {
    const raw = $(field.id).value.trim();
    if (!raw) return {value: undefined, error: null};
    let error = null;
    if (/^\d*,\d+$/.test(raw)) error = `"${raw}" is not a number; write ${raw.replace(",", ".")}`;
    else if (!NUMBER.test(raw)) error = `"${raw}" is not a number`;
    else error = field.check(Number(raw));
    return {value: Number(raw), error: error && `${error} (empty: the model's default)`};
  }

  function show(field) {
    const result = parse(field), input = $(field.id);
    $(field.id + "-error").textContent = result.error || "";
    input.classList.toggle("invalid", Boolean(result.error));
    if (result.error) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
    return result;
  }

  function summary() {
    const parts = system.value.trim() ? ["system prompt"] : [];
    for (const f of FIELDS) if ($(f.id).value.trim()) parts.push(`${f.label} ${$(f.id).value.trim()}`);
    $("settings-summary").textContent = parts.length ? parts.join(" · ") : "model defaults";
  }

  // The request's settings: {system, values: {max_tokens?, temperature?, top_p?}, error}.
  // With an error, the panel opens and the first wrong field gets the focus.
  function read() {
    const values = {};
    let error = null;
    for (const f of FIELDS) {
      const r = show(f);
      if (r.error && !error) {
        error = r.error;
        panel.open = true;
        $(f.id).focus();
      } else if (r.value !== undefined) values[f.name] = r.value;
    }
    return {system: system.value.trim(), values, error};
  }

  // What the page keeps across reloads (the key is not part of it).
  function state() {
    const fields = {};
    for (const f of FIELDS) fields[f.id] = $(f.id).value;
    return {system: system.value, fields, open: panel.open};
  }

  function restore(saved) {
    if (!saved || typeof saved !== "object") return;
    if (typeof saved.system === "string") system.value = saved.system;
    for (const f of FIELDS) {
      const v = saved.fields && saved.fields[f.id];
      if (typeof v === "string") $(f.id).value = v;
      show(f);
    }
    panel.open = Boolean(saved.open);
    summary();
  }

  for (const f of FIELDS) $(f.id).addEventListener("input", () => { show(f); summary(); onChange(); });
  system.addEventListener("input", () => { summary(); onChange(); });
  panel.addEventListener("toggle", () => onChange());
  summary();

  return {
    read, state, restore,
    key: () => key.value,
    reveal: () => { panel.open = true; },
    onChange: (fn) => { onChange = fn; },
    onKeyChange: (fn) => key.addEventListener("change", () => {
      try { sessionStorage.setItem(KEY, key.value); } catch (e) { /* kept in the field only */ }
      fn();
    }),
  };
})();
