// Calls to the service: one JSON error shape, and the API key asked for once when an endpoint answers 401.
const KEY_STORE = "acestep.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.error_code) || "http_" + status;
    this.retryable = Boolean(body && body.retryable);
  }
}

let askForKey = async () => null; // replaced by the page: (reason) => Promise<string|null>
let pendingAsk = null; // several calls refused at once share one question

export function onKeyNeeded(fn) { askForKey = fn; }
export function storedKey() { return sessionStorage.getItem(KEY_STORE) || ""; }
export function forgetKey() { sessionStorage.removeItem(KEY_STORE); }

async function newKey(refusedKey) {
  if (!pendingAsk) {
    const reason = refusedKey ? "That key was refused; check it and try again." : "This service needs its API key.";
    pendingAsk = askForKey(reason).finally(() => { pendingAsk = null; });
  }
  const key = await pendingAsk;
  if (key) sessionStorage.setItem(KEY_STORE, key);
  return key;
}

// fetch() with the key; on 401 asks for it and retries; a non-2xx answer throws ApiError.
export async function call(path, { method = "GET", body, accept = "application/json", signal } = {}) {
  for (;;) {
    const headers = new Headers({ Accept: accept });
    const key = storedKey();
    if (key) headers.set("X-API-Key", key);
    const resp = await fetch(path, { method, body, headers, signal });
    if (resp.status === 401) {
      const again = await newKey(key);
      if (again) continue;
      throw new ApiError(401, await resp.json().catch(() => null));
    }
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => ({ error: resp.statusText })));
    return resp;
  }
}

export async function callJson(path, options) {
  return (await call(path, options)).json();
}

// The download name the service chose (Content-Disposition), or a fallback.
export function fileName(resp, fallback) {
  const header = resp.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(header);
  return match ? decodeURIComponent(match[1]) : fallback;
}
