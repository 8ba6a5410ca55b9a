// How conversations look: the side panel's list and each message. The user's text is
// shown as typed (text nodes); the model's answer through the Markdown renderer, its
// reasoning as text in a collapsible "thinking" block.

import {renderMarkdown} from "./markdown.js";

const MIN_DECODE_S = 0.05;

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The side panel: one entry per conversation, each with a delete button. */
export function renderSidebar(list, conversations, currentId) {
  list.replaceChildren(...conversations.map((conversation) => {
    const open = el("button", "open", conversation.title);
    open.type = "button";
    open.dataset.id = conversation.id;
    const remove = el("button", "delete", "×");
    remove.type = "button";
    remove.dataset.id = conversation.id;
    remove.title = `Delete “${conversation.title}”`;
    remove.setAttribute("aria-label", remove.title);
    const item = el("li", conversation.id === currentId ? "current" : null);
    item.append(open, remove);
    return item;
  }));
}

export function messageView(message) {
  const view = el("article", `message ${message.role}`);
  if (message.role === "user") {
    for (const url of message.images ?? []) {
      const image = el("img", "thumb");
      image.src = url;
      image.alt = "attached image";
      view.append(image);
    }
    view.append(el("div", "text", message.content));
  } else {
    view.append(el("div", "content"), el("div", "meta"));
    updateAnswer(view, message, false);
  }
  return view;
}

/** Bring an answer's view up to date with its message (called as the stream comes in). */
export function updateAnswer(view, message, streaming) {
  let thinking = view.querySelector(".thinking");
  if (message.reasoning && !thinking) {
    thinking = el("details", "thinking");
    thinking.append(el("summary"), el("div", "reasoning"));
    thinking.open = streaming;                   // watch it think; closed once the answer starts
    view.prepend(thinking);
  }
  if (thinking) {
    const thinkingNow = streaming && !message.content;
    thinking.querySelector("summary").textContent = thinkingNow ? "Thinking…" : "Thoughts";
    thinking.querySelector(".reasoning").textContent = message.reasoning;
    if (streaming && message.content && thinking.dataset.closed !== "yes") {
      thinking.open = false;
      thinking.dataset.closed = "yes";
    }
  }
  renderMarkdown(message.content, view.querySelector(".content"));
  view.classList.toggle("streaming", streaming);
  view.querySelector(".meta").textContent = streaming ? "" : describe(message);
  view.classList.toggle("failed", Boolean(message.error));
}

function describe(message) {
  if (message.error) return `Failed: ${message.error}`;
  const parts = [];
  if (message.stopped) parts.push(`stopped after ${message.stats.seconds.toFixed(1)} s`);
  const s = message.stats;
  if (s?.completion_tokens !== undefined) {
    parts.push(`${s.completion_tokens} tokens`);
    if (s.tokens_per_second !== null) parts.push(`${s.tokens_per_second.toFixed(1)} tokens/s`);
    parts.push(`prompt ${s.prompt_tokens} tokens`);
    if (s.first_token_seconds !== null) parts.push(`first token after ${s.first_token_seconds.toFixed(2)} s`);
  }
  if (message.finish === "length") parts.push("cut at the max tokens setting");
  return parts.join(" · ");
}

/** Timing of one answer: tokens/s counts the tokens after the first over the time after
 * the first (llama-server's "predicted per second"); the first token's wait is apart.
 * Chunks that reach the page in one read share one timestamp: below MIN_DECODE_S of
 * streaming the rate is not measurable and is left out rather than shown absurd. */
export function answerStats(usage, started, first, ended) {
  const stats = {seconds: (ended - started) / 1000};
  if (!usage) return stats;
  const n = usage.completion_tokens;
  const decode = first === null ? 0 : (ended - first) / 1000;
  return {...stats, completion_tokens: n, prompt_tokens: usage.prompt_tokens,
    first_token_seconds: first === null ? null : (first - started) / 1000,
    tokens_per_second: n > 1 && decode >= MIN_DECODE_S ? (n - 1) / decode : null};
}
