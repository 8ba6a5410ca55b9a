// What the page keeps in this browser's local storage: the settings, the API key and the
// conversations. A stored item that cannot be read is replaced by the default, and the
// page says so (`problems`): it is never dropped in silence.

const SETTINGS = "smollm3.settings";
const CONVERSATIONS = "smollm3.conversations";
const API_KEY = "smollm3.apiKey";

export const DEFAULT_SETTINGS = {system: "", temperature: 0.6, top_p: 0.95, max_tokens: "", seed: "", thinking: true};

/** Messages for the page to show: stored items that could not be read. */
export const problems = [];

function read(name, fallback, valid) {
  const text = localStorage.getItem(name);
  if (text === null) return fallback;
  try {
    const value = JSON.parse(text);
    if (valid(value)) return value;
  } catch {
    // reported below, as a value of the wrong shape is
  }
  problems.push(`The stored ${name} could not be read and was reset.`);
  return fallback;
}

export function loadSettings() {
  const stored = read(SETTINGS, {}, (v) => v !== null && typeof v === "object" && !Array.isArray(v));
  return {...DEFAULT_SETTINGS, ...stored};
}

export function saveSettings(settings) {
  localStorage.setItem(SETTINGS, JSON.stringify(settings));
}

const isConversation = (c) => c !== null && typeof c === "object" && typeof c.id === "string" &&
  typeof c.title === "string" && Array.isArray(c.messages);

export function loadConversations() {
  return read(CONVERSATIONS, [], (v) => Array.isArray(v) && v.every(isConversation));
}

/** Throws (QuotaExceededError) when the browser's storage is full: the caller says so. */
export function saveConversations(conversations) {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(conversations));
}

export function apiKey() {
  return localStorage.getItem(API_KEY) ?? "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(API_KEY, key);
  else localStorage.removeItem(API_KEY);
}
