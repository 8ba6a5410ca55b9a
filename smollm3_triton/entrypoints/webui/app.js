// The chat page: asks the server what the model takes (/props), keeps conversations and
// settings in local storage, streams answers from /v1/chat/completions and stops them.
// Every handler is attached here (the page's policy allows no inline script or handler).

import {ApiError, getProps, streamChat} from "./api.js";
import * as store from "./store.js";
import {answerStats, el, messageView, renderSidebar, updateAnswer} from "./view.js";

const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];
const MAX_IMAGE_BYTES = 4 * 2 ** 20;         // the server takes 8 MiB bodies; base64 adds a third
const $ = (id) => document.getElementById(id);

const state = {
  props: null,                               // the server's /props, once it answered
  settings: store.loadSettings(),
  conversations: store.loadConversations(),
  currentId: null,
  attachments: [],                           // data: URLs for the next message
  controller: null,                          // the running request's AbortController
};

const current = () => state.conversations.find((c) => c.id === state.currentId);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function persist() {
  try {
    store.saveConversations(state.conversations);
  } catch (e) {
    showError(`This browser's storage refused the conversations (${e.message}); delete some conversations ` +
              "(images take the most room). The current page still holds them.");
  }
}

// ---------------------------------------------------------------- the server

async function connect() {
  try {
    state.props = await getProps(store.apiKey());
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      $("status").textContent = "The server needs an API key.";
      askKey(e.message);
    } else if (e instanceof ApiError && e.status === 503 && e.message === "Loading model") {
      $("status").textContent = "The server is loading the model…";
      setTimeout(connect, 1000);
    } else if (e instanceof ApiError) {
      showError(e.message);
    } else {
      $("status").textContent = `Cannot reach the server (${e.message}); trying again…`;
      setTimeout(connect, 2000);
    }
    return;
  }
  $("status").textContent = "";
  $("model-name").textContent = state.props.model;
  $("attach").hidden = !state.props.modalities.vision;
  $("thinking-toggle").hidden = !state.props.thinking;
  updateComposer();
}

function askKey(reason) {
  $("key-reason").textContent = reason;
  $("key-form").elements.key.value = "";
  if (!$("key-dialog").open) {
    $("key-dialog").returnValue = "";         // Escape closes it without changing the value: no stale "save"
    $("key-dialog").showModal();
  }
}

// ---------------------------------------------------------------- conversations

function newConversation() {
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  state.conversations.unshift({id, title: "New chat", messages: []});
  state.currentId = id;
  persist();
  renderAll();
}

function deleteConversation(id) {
  if (id === state.currentId && state.controller) state.controller.abort();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (!state.conversations.length) return newConversation();
  if (id === state.currentId) state.currentId = state.conversations[0].id;
  persist();
  renderAll();
}

function renderAll() {
  renderSidebar($("conversations"), state.conversations, state.currentId);
  const conversation = current();
  $("messages").replaceChildren(...conversation.messages.map(messageView));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function updateComposer() {
  const running = state.controller !== null;
  $("send").hidden = running;
  $("stop").hidden = !running;
  $("send").disabled = state.props === null;
}

// ---------------------------------------------------------------- one turn

function requestBody(messages) {
  const s = state.settings;
  const sent = s.system.trim() ? [{role: "system", content: s.system}] : [];
  for (const m of messages) {
    if (m.role === "assistant") {
      if (m.content) sent.push({role: "assistant", content: m.content});
    } else if (m.images?.length) {
      sent.push({role: "user", content: [...m.images.map((url) => ({type: "image_url", image_url: {url}})),
        {type: "text", text: m.content}]});
    } else {
      sent.push({role: "user", content: m.content});
    }
  }
  const body = {messages: sent, stream: true, stream_options: {include_usage: true},
    temperature: s.temperature, top_p: s.top_p};
  if (s.max_tokens !== "") body.max_tokens = s.max_tokens;
  if (s.seed !== "") body.seed = s.seed;
  if (state.props.thinking) body.chat_template_kwargs = {enable_thinking: s.thinking};
  return body;
}

async function send() {
  const text = $("prompt").value.trim();
  if ((!text && !state.attachments.length) || state.controller || !state.props) return;
  hideError();
  const conversation = current();
  const question = {role: "user", content: text, images: state.attachments};
  const answer = {role: "assistant", content: "", reasoning: ""};
  conversation.messages.push(question);
  if (conversation.title === "New chat") conversation.title = text.slice(0, 48) || "Image";
  const body = requestBody(conversation.messages);
  conversation.messages.push(answer);
  $("prompt").value = "";
  setAttachments([]);
  persist();
  renderAll();
  const view = $("messages").lastElementChild;
  updateAnswer(view, answer, true);
  state.controller = new AbortController();
  updateComposer();

  const started = performance.now();
  let first = null;
  let frame = 0;
  try {
    await streamChat(body, store.apiKey(), state.controller.signal, (chunk) => {
      if (chunk.usage) answer.usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) return;
      const delta = choice.delta ?? {};
      if (delta.reasoning_content) answer.reasoning += delta.reasoning_content;
      if (delta.content) answer.content += delta.content;
      if (first === null && (delta.reasoning_content || delta.content)) first = performance.now();
      if (choice.finish_reason) answer.finish = choice.finish_reason;
      if (!frame) {
        frame = requestAnimationFrame(() => {
          frame = 0;
          updateAnswer(view, answer, true);
          $("messages").scrollTop = $("messages").scrollHeight;
        });
      }
    });
    answer.stats = answerStats(answer.usage, started, first, performance.now());
  } catch (e) {
    if (e.name === "AbortError") {
      answer.stopped = true;
      answer.stats = answerStats(null, started, first, performance.now());
    } else if (answer.content || answer.reasoning) {
      answer.error = e.message;
      showError(e.message);
    } else {
      // Nothing came: take the turn back so that it can be changed and sent again.
      conversation.messages.splice(-2, 2);
      $("prompt").value = text;
      setAttachments(question.images);
      showError(e.message);
      if (e instanceof ApiError && e.status === 401) askKey(e.message);
    }
  } finally {
    cancelAnimationFrame(frame);
    delete answer.usage;
    state.controller = null;
    updateComposer();
    persist();
    renderAll();
  }
}

// ---------------------------------------------------------------- images

function setAttachments(urls) {
  state.attachments = urls;
  $("attachments").replaceChildren(...urls.map((url, i) => {
    const image = el("img", "thumb");
    image.src = url;
    image.alt = `attachment ${i + 1}`;
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.dataset.index = String(i);
    remove.setAttribute("aria-label", `Remove attachment ${i + 1}`);
    const box = el("div", "attachment");
    box.append(image, remove);
    return box;
  }));
}

function addImages(files) {
  if (!state.props?.modalities.vision) {
    showError("This model takes no images (it is not a vision model).");
    return;
  }
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) {
      showError(`${file.name || "The pasted file"} is not a PNG, JPEG or WebP image (${file.type || "unknown type"}).`);
    } else if (file.size > MAX_IMAGE_BYTES) {
      showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB; images up to 4 MiB are sent.`);
    } else {
      const reader = new FileReader();
      reader.addEventListener("load", () => setAttachments([...state.attachments, reader.result]));
      reader.addEventListener("error", () => showError(`${file.name} could not be read: ${reader.error}`));
      reader.readAsDataURL(file);
    }
  }
}

const imageFiles = (items) => [...items].filter((item) => item.kind === "file" && item.type.startsWith("image/"))
  .map((item) => item.getAsFile());

// ---------------------------------------------------------------- settings and copying

function openSettings() {
  const form = $("settings-form").elements;
  for (const name of ["system", "temperature", "top_p", "max_tokens", "seed"]) form[name].value = state.settings[name];
  form.api_key.value = store.apiKey();
  $("settings").returnValue = "";
  $("settings").showModal();
}

function saveSettings() {
  const form = $("settings-form").elements;
  const integer = (value) => (value === "" ? "" : Math.trunc(Number(value)));
  state.settings = {...state.settings, system: form.system.value, temperature: Number(form.temperature.value),
    top_p: Number(form.top_p.value), max_tokens: integer(form.max_tokens.value), seed: integer(form.seed.value)};
  store.saveSettings(state.settings);
  const keyChanged = form.api_key.value !== store.apiKey();
  store.setApiKey(form.api_key.value);
  if (keyChanged || state.props === null) connect();
}

async function copyText(text) {
  if (navigator.clipboard) return navigator.clipboard.writeText(text);
  // No Clipboard API outside a secure context (http on another host): the older command.
  const area = el("textarea");
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  if (!copied) throw new Error("the browser refused to copy");
}

function copyCode(button) {
  const code = button.closest(".code-block").querySelector("code").textContent;
  copyText(code).then(() => { button.textContent = "Copied"; }, () => { button.textContent = "Copy failed"; })
    .finally(() => setTimeout(() => { button.textContent = "Copy"; }, 1500));
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("new-chat").addEventListener("click", () => newConversation());
  $("conversations").addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.classList.contains("delete")) {
      deleteConversation(button.dataset.id);
    } else {
      state.currentId = button.dataset.id;
      renderAll();
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("thinking").checked = state.settings.thinking;
  $("thinking").addEventListener("change", () => {
    state.settings.thinking = $("thinking").checked;
    store.saveSettings(state.settings);
  });
  $("open-settings").addEventListener("click", openSettings);
  $("settings").addEventListener("close", () => {
    if ($("settings").returnValue === "save") saveSettings();
  });
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue === "save") {
      store.setApiKey($("key-form").elements.key.value);
      connect();
    }
  });
  $("messages").addEventListener("click", (event) => {
    const button = event.target.closest("button.copy");
    if (button) copyCode(button);
  });
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", () => {
    addImages($("file-input").files);
    $("file-input").value = "";
  });
  $("attachments").addEventListener("click", (event) => {
    const button = event.target.closest("button.remove");
    if (button) setAttachments(state.attachments.filter((_, i) => i !== Number(button.dataset.index)));
  });
  $("prompt").addEventListener("paste", (event) => {
    const files = imageFiles(event.clipboardData?.items ?? []);
    if (files.length) {
      event.preventDefault();
      addImages(files);
    }
  });
  // A file dropped anywhere would otherwise replace the page with the file.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    const files = imageFiles(event.dataTransfer?.items ?? []);
    if (files.length) addImages(files);
  });
}

function start() {
  wire();
  if (state.conversations.length) {
    state.currentId = state.conversations[0].id;
    renderAll();
  } else {
    newConversation();
  }
  for (const problem of store.problems) showError(problem);
  updateComposer();
  connect();
}

start();
