// Markdown to DOM nodes, for what the model writes. Every node is built with createElement
// and text nodes, never from an HTML string: a model that writes <script> or
// <img onerror=...> gets those characters shown as text. Links keep only http(s) and mailto
// addresses. An unclosed code fence (an answer still streaming) shows the code so far.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])\s+/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_URL = /^(https?:|mailto:)/i;

// One pass over a line's inline marks, first match wins:
//  1 a backslash-escaped punctuation character    2,3 a code span (its backticks, its text)
//  4 **strong**   5 __strong__   6 ~~struck~~   7 *emphasis*   8 _emphasis_
//  9,10 [label](url)   11 <https://autolink>
const INLINE = new RegExp([
  /\\([!-/:-@[-`{-~])/.source,
  /(`+)([^`]|[^`][\s\S]*?[^`])\2(?!`)/.source,
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,
  /\b__(?=\S)([\s\S]*?\S)__\b/.source,
  /~~(?=\S)([\s\S]*?\S)~~/.source,
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,
  /\b_(?=[^\s_])([\s\S]*?[^\s_])_\b/.source,
  /\[([^\]\n]+)\]\(\s*(\S+?)\s*\)/.source,
  /<(https?:\/\/[^\s>]+)>/.source,
].join("|"), "g");

/** Replace target's children with `text` rendered as Markdown. */
export function renderMarkdown(text, target) {
  const lines = text.split("\n").map((line) => line.replace(/^\t+/, (tabs) => "    ".repeat(tabs.length)));
  target.replaceChildren(...blocks(lines));
}

function el(tag, className, children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (typeof children === "string") node.textContent = children;
  else if (children) node.append(...children);
  return node;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
      const code = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) code.push(lines[i]);
      i++;
      out.push(codeBlock(code.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      out.push(el(`h${m[1].length}`, null, inline(m[2])));
      i++;
    } else if (RULE.test(line)) {
      out.push(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].replace(QUOTE, ""));
      out.push(el("blockquote", null, blocks(quoted)));
    } else if (ITEM.test(line)) {
      i = list(lines, i, out);
    } else if (line.includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
               TABLE_RULE.test(lines[i + 1])) {
      i = table(lines, i, out);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i])); i++) {
        para.push(lines[i]);
      }
      out.push(el("p", null, inline(para.join("\n"))));
    }
  }
  return out;
}

/** A list from lines[i] on, appended to out; -> the index after it. An item holds its
 * first line and the lines indented under it (nested lists, more paragraphs). A blank
 * line between items or inside one makes the list loose (CommonMark): its items'
 * paragraphs stay paragraphs; a tight list shows their text alone. */
function list(lines, i, out) {
  const first = ITEM.exec(lines[i]);
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  const items = [];
  let loose = false;
  while (i < lines.length && sameList(lines[i], ordered)) {
    const m = ITEM.exec(lines[i]);
    const indent = new RegExp(`^ {1,${m[0].length}}`);
    const item = [lines[i].slice(m[0].length)];
    for (i++; i < lines.length; i++) {
      if (!lines[i].trim() && i + 1 < lines.length && /^ {2,}\S/.test(lines[i + 1])) item.push("");
      else if (/^ {2,}\S/.test(lines[i])) item.push(lines[i].replace(indent, ""));
      else break;
    }
    loose ||= item.includes("");
    items.push(blocks(item));
    for (; i + 1 < lines.length && !lines[i].trim() && sameList(lines[i + 1], ordered); i++) loose = true;
  }
  for (const inner of items) {
    const li = el("li");
    if (!loose && inner.length && inner[0].tagName === "P") li.append(...inner.shift().childNodes);
    li.append(...inner);
    node.append(li);
  }
  out.push(node);
  return i;
}

function sameList(line, ordered) {
  const m = ITEM.exec(line);
  return m !== null && /\d/.test(m[2]) === ordered;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
}

function table(lines, i, out) {
  const head = el("tr", null, cells(lines[i]).map((cell) => el("th", null, inline(cell))));
  const rows = [];
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
    rows.push(el("tr", null, cells(lines[i]).map((cell) => el("td", null, inline(cell)))));
  }
  out.push(el("div", "table", [el("table", null, [el("thead", null, [head]), el("tbody", null, rows)])]));
  return i;
}

function codeBlock(code, lang) {
  const copy = el("button", "copy", "Copy");
  copy.type = "button";
  const bar = el("div", "code-bar", [el("span", "lang", lang || "code"), copy]);
  return el("div", "code-block", [bar, el("pre", null, [el("code", null, code)])]);
}

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) nodes.push(document.createTextNode(text.slice(last, m.index)));
    nodes.push(mark(m));
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

function mark(m) {
  if (m[1] !== undefined) return document.createTextNode(m[1]);
  if (m[3] !== undefined) return el("code", null, m[3]);
  if (m[4] !== undefined || m[5] !== undefined) return el("strong", null, inline(m[4] ?? m[5]));
  if (m[6] !== undefined) return el("del", null, inline(m[6]));
  if (m[7] !== undefined || m[8] !== undefined) return el("em", null, inline(m[7] ?? m[8]));
  const url = m[10] ?? m[11];
  if (!SAFE_URL.test(url)) return document.createTextNode(m[0]);
  const link = el("a", null, m[9] !== undefined ? inline(m[9]) : url);
  link.href = url;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  return link;
}
