// The server's API as the page uses it: /props (what the model takes) and
// /v1/chat/completions streamed as server-sent events. Addresses are relative to the page.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

function headers(key) {
  const out = {"Content-Type": "application/json"};
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function failure(response) {
  let message = `the server answered ${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (typeof body?.error?.message === "string") message = body.error.message;
  } catch {
    // not JSON: the status line is all there is to say
  }
  return new ApiError(response.status, message);
}

export async function getProps(key) {
  const response = await fetch("props", {headers: headers(key)});
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** POST the chat request and call onChunk(chunk) for each streamed chunk until
 * `data: [DONE]`. Aborting `signal` closes the connection (the server then drops the
 * sequence) and rejects with an AbortError. An error frame rejects with an ApiError. */
export async function streamChat(body, key, signal, onChunk) {
  const response = await fetch("v1/chat/completions", {method: "POST", headers: headers(key),
    body: JSON.stringify(body), signal});
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (!data) continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code ?? 500, chunk.error.message ?? "the stream failed");
      onChunk(chunk);
    }
  }
  throw new ApiError(0, "the server closed the stream before it ended ([DONE] never came)");
}
