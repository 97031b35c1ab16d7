// Markdown to DOM nodes for the chat page. The model's text is untrusted: every piece
// of it becomes a text node or textContent, never parsed as HTML, and a
// link gets an href only when it parses as an absolute http(s) URL.
// The subset chat models write: paragraphs (single newlines kept as line breaks),
// headings, fenced code blocks (an unclosed fence runs to the end, as while a reply
// streams), lists nested by indentation, block quotes, rules; inline code, bold,
// italics, [links](url), <url> and bare URLs, backslash escapes.
"use strict";
window.mdiMarkdown = (function () {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const PUNCT = /[!-/:-@[-`{-~]/;
  const BARE_URL = /^https?:\/\/[^\s<>"'`]+/;
  const TRAILING = /[.,;:!?'")\]]+$/;   // sentence punctuation after a bare URL is not part of it

  function el(tag) { return document.createElement(tag); }

  function render(text) {
    const frag = document.createDocumentFragment();
    blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), frag);
    return frag;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  function blocks(lines, parent) {
    let i = 0, m;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      if ((m = FENCE.exec(line))) { i = fence(lines, i, m, parent); continue; }
      if ((m = HEADING.exec(line))) {
        const h = parent.appendChild(el("h" + m[1].length));
        inline(m[2] || "", h);
        i++;
        continue;
      }
      if (RULE.test(line)) { parent.appendChild(el("hr")); i++; continue; }
      if (QUOTE.test(line)) {
        const quoted = [];
        for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) quoted.push(m[1]);
        blocks(quoted, parent.appendChild(el("blockquote")));
        continue;
      }
      if (ITEM.test(line)) { i = list(lines, i, parent); continue; }
      const para = [line.trim()];
      for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) para.push(lines[i].trim());
      inline(para.join("\n"), parent.appendChild(el("p")));
    }
  }

  function fence(lines, i, m, parent) {
    const mark = m[1];
    const close = new RegExp("^ {0,3}" + (mark[0] === "`" ? "`" : "~") + "{" + mark.length + ",}\\s*$");
    const body = [];
    for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
    const pre = parent.appendChild(el("pre"));
    const code = pre.appendChild(el("code"));
    if (/^[\w+#.-]{1,20}$/.test(m[2])) code.dataset.lang = m[2];   // shown by CSS attr(): text only
    code.textContent = body.join("\n");
    return i + 1;
  }

  const indentOf = (line) => line.length - line.trimStart().length;

  // Items share the first item's indentation and kind (ordered or not); deeper lines
  // belong to the item above (sub-lists, continued text), dedented to its content column.
  function list(lines, i, parent) {
    const first = ITEM.exec(lines[i]);
    const indent = first[1].length, ordered = /\d/.test(first[2]);
    const root = parent.appendChild(el(ordered ? "ol" : "ul"));
    if (ordered && parseInt(first[2], 10) !== 1) root.start = parseInt(first[2], 10);
    let m;
    while (i < lines.length && (m = ITEM.exec(lines[i])) && m[1].length === indent
           && /\d/.test(m[2]) === ordered) {
      const column = indent + m[2].length + 1, body = [m[3]];
      for (i++; i < lines.length; i++) {
        const line = lines[i];
        if (!line.trim()) {   // a blank line ends the item unless deeper text follows
          if (i + 1 < lines.length && lines[i + 1].trim() && indentOf(lines[i + 1]) > indent) {
            body.push("");
            continue;
          }
          break;
        }
        if (indentOf(line) > indent) body.push(line.slice(Math.min(indentOf(line), column)));
        else if (!startsBlock(line)) body.push(line.trim());   // a lazy continuation line
        else break;
      }
      blocks(body, root.appendChild(el("li")));
    }
    return i;
  }

  function safeUrl(text) {
    try {
      const url = new URL(text);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;   // relative, or not a URL at all
    }
  }

  function link(parent, href, label, asText) {
    const a = parent.appendChild(el("a"));
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    if (asText) a.textContent = label;
    else inline(label, a, true);
  }

  // The index just past the bracket that closes the one at `open`, or -1.
  function closing(text, open, left, right) {
    for (let depth = 0, j = open; j < text.length; j++) {
      if (text[j] === "\\") j++;
      else if (text[j] === left) depth++;
      else if (text[j] === right && --depth === 0) return j + 1;
    }
    return -1;
  }

  // Emphasis closed by `mark` after `from`: the closing index, or -1. The text inside
  // may not start or end with a space; "_" does not work inside words (snake_case).
  function emphasisEnd(text, from, mark) {
    if (!text[from] || /\s/.test(text[from])) return -1;
    for (let j = text.indexOf(mark, from + 1); j > 0; j = text.indexOf(mark, j + 1)) {
      if (mark.length === 1 && text[j + 1] === mark) { j++; continue; }   // a bold pair inside
      if (mark.length === 2 && text[j + 2] === mark[0]) j++;   // ***x***: the last two close the bold
      if (/\s/.test(text[j - 1])) continue;
      if (mark[0] === "_" && /\w/.test(text[j + mark.length] || "")) continue;
      return j;
    }
    return -1;
  }

  function inline(text, parent, inLink) {
    let buf = "", i = 0;
    const flush = () => { if (buf) parent.appendChild(document.createTextNode(buf)); buf = ""; };
    const put = (node) => { flush(); return parent.appendChild(node); };
    while (i < text.length) {
      const c = text[i], rest = text.slice(i);
      let m, end;
      if (c === "\\" && PUNCT.test(text[i + 1] || "")) { buf += text[i + 1]; i += 2; continue; }
      if (c === "`") {
        const ticks = /^`+/.exec(rest)[0];
        const close = new RegExp("(^|[^`])" + ticks + "(?!`)").exec(text.slice(i + ticks.length));
        if (close) {
          const inner = text.slice(i + ticks.length, i + ticks.length + close.index + close[1].length);
          put(el("code")).textContent = /^ .*[^ ].* $/s.test(inner) ? inner.slice(1, -1) : inner;
          i += ticks.length * 2 + inner.length;
        } else { buf += ticks; i += ticks.length; }
        continue;
      }
      if ((c === "*" || c === "_") && !(c === "_" && /\w/.test(text[i - 1] || ""))) {
        const mark = text[i + 1] === c ? c + c : c;
        if ((end = emphasisEnd(text, i + mark.length, mark)) > 0) {
          inline(text.slice(i + mark.length, end), put(el(mark.length === 2 ? "strong" : "em")), inLink);
          i = end + mark.length;
          continue;
        }
      }
      if (!inLink && c === "[" && (end = closing(text, i, "[", "]")) > 0 && text[end] === "(") {
        const stop = closing(text, end, "(", ")");
        const target = stop > 0 ? text.slice(end + 1, stop - 1).trim().replace(/\s+"[^"]*"$/, "") : "";
        const href = safeUrl(target.replace(/^<(.*)>$/, "$1"));
        if (href) {
          flush();
          link(parent, href, text.slice(i + 1, end - 1), false);
          i = stop;
          continue;
        }
      }
      if (!inLink && c === "<" && (m = /^<(https?:\/\/[^\s<>]+)>/.exec(rest)) && safeUrl(m[1])) {
        flush();
        link(parent, safeUrl(m[1]), m[1], true);
        i += m[0].length;
        continue;
      }
      if (!inLink && c === "h" && !/\w/.test(text[i - 1] || "") && (m = BARE_URL.exec(rest))) {
        const url = m[0].replace(TRAILING, "");
        if (safeUrl(url)) {
          flush();
          link(parent, safeUrl(url), url, true);
          i += url.length;
          continue;
        }
      }
      buf += c;
      i++;
    }
    flush();
  }

  return {render};
})();
