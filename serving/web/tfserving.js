// A browser client of TF Serving's REST API (status, metadata, predict), as a user's own front
// end would write it: fetch, JSON, base64. No TensorFlow, no framework.
//
// The names below cross the process boundary; common/contract.py defines them once and
// tests/test_web_page.py checks that these copies agree with it.

export const MODEL_NAME = "mnist";
export const SIGNATURE_BYTES = "serving_bytes";
export const OUTPUT_DIGIT = "digit";
export const OUTPUT_PROBABILITIES = "probabilities";
export const OUTPUT_MNIST_IMAGE = "mnist_image";
export const DEFAULT_SERVER = "http://localhost:8501";

// TF Serving's own REST deadline in serving/compose.yaml (--rest_api_timeout_in_ms=30000).
const TIMEOUT_MS = 30000;
// A version picked from the status endpoint is trusted this long before asking again, so a
// newly loaded version answers within seconds without a status request per prediction.
const STATUS_MAX_AGE_MS = 5000;

/** A request that did not give an answer. `kind`: "unreachable" (no HTTP answer: server down,
 * wrong URL, or no CORS headers, which a page cannot tell apart), "server" (TF Serving answered
 * with an error; `message` is its own text), "protocol" (an answer this page cannot use). */
export class ServingError extends Error {
  constructor(message, { kind, status = 0 } = {}) {
    super(message);
    this.name = "ServingError";
    this.kind = kind;
    this.status = status;
  }
}

/** Settings from the page's query string: server, model, and at most one of version / label.
 * Returns {server, model, version, label} or throws Error naming the bad parameter. */
export function readSettings(search) {
  const params = new URLSearchParams(search);
  const serverText = (params.get("server") ?? DEFAULT_SERVER).trim();
  let url;
  try {
    url = new URL(serverText);
  } catch {
    throw new Error(`server=${serverText} is not a URL (expected e.g. ${DEFAULT_SERVER})`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new Error(`server=${serverText} must be an http:// or https:// URL`);
  }
  if (url.search || url.hash) {
    throw new Error(`server=${serverText} must not have a query or fragment`);
  }
  const model = (params.get("model") ?? MODEL_NAME).trim();
  // TF Serving's REST paths cannot carry a name with "/" or ":" (http_rest_api_handler.cc).
  if (!model || /[/:]/.test(model)) {
    throw new Error(`model=${model} must be a model name without "/" or ":"`);
  }
  const versionText = params.get("version");
  const label = params.get("label");
  if (versionText !== null && label !== null) {
    throw new Error("give version= or label=, not both");
  }
  let version = null;
  if (versionText !== null) {
    if (!/^[0-9]+$/.test(versionText) || Number(versionText) < 1) {
      throw new Error(`version=${versionText} must be a positive whole number`);
    }
    version = Number(versionText);
  }
  if (label !== null && (!label || /[/:]/.test(label))) {
    throw new Error(`label=${label} must be a label name without "/" or ":"`);
  }
  return { server: url.href.replace(/\/+$/, ""), model, version, label };
}

/** The base64 text of a Blob (what TF Serving's {"b64": ...} takes), without the data: prefix. */
export function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(reader.error ?? new Error("the picture could not be read"));
    reader.readAsDataURL(blob);
  });
}

export class TFServingClient {
  /** settings: {server, model, version|null, label|null} from readSettings. */
  constructor(settings) {
    this.settings = settings;
    this.picked = null; // {version, at}: the version predictions go to
    this.signatures = new Map(); // version -> {inputKey, outputs}
  }

  get modelUrl() {
    return `${this.settings.server}/v1/models/${encodeURIComponent(this.settings.model)}`;
  }

  /** GET or POST `url`; the parsed JSON answer, or a ServingError. */
  async request(url, body) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    let response;
    try {
      // A string body goes as text/plain, which makes this a "simple" CORS request: no
      // preflight round trip. TF Serving reads the body as JSON whatever its Content-Type.
      response = await fetch(url, body === undefined
        ? { signal: controller.signal, cache: "no-store" }
        : { method: "POST", body, signal: controller.signal, cache: "no-store" });
    } catch (err) {
      clearTimeout(timer);
      if (err.name === "AbortError") {
        throw new ServingError(`TF Serving at ${this.settings.server} did not answer within ${TIMEOUT_MS / 1000} s.`,
          { kind: "unreachable" });
      }
      throw new ServingError(
        `Cannot reach TF Serving at ${this.settings.server}. Start it with "make serve" (or "make demo", ` +
        `which also serves this page). A server that is running must allow this page's requests: ` +
        `start TF Serving with --rest_api_enable_cors_support=true.`, { kind: "unreachable" });
    }
    let text;
    try {
      text = await response.text();
    } finally {
      clearTimeout(timer);
    }
    let json = null;
    try {
      json = JSON.parse(text);
    } catch {
      // not JSON: reported below
    }
    if (!response.ok) {
      const message = json && typeof json.error === "string" ? json.error : text.trim().slice(0, 500);
      throw new ServingError(message || `HTTP ${response.status}`, { kind: "server", status: response.status });
    }
    if (json === null || typeof json !== "object") {
      throw new ServingError(`${url} answered something that is not a JSON object: ${text.slice(0, 200)}`,
        { kind: "protocol", status: response.status });
    }
    return json;
  }

  /** The version predictions go to: the one asked for (version=), the one a label names
   * (label=), else the highest AVAILABLE version, as TF Serving itself picks by default.
   * Asks the status endpoint again after STATUS_MAX_AGE_MS, or when `refresh`. */
  async version({ refresh = false } = {}) {
    const { version, label, model } = this.settings;
    if (version !== null) {
      return version;
    }
    if (!refresh && this.picked && performance.now() - this.picked.at < STATUS_MAX_AGE_MS) {
      return this.picked.version;
    }
    const url = label ? `${this.modelUrl}/labels/${encodeURIComponent(label)}` : this.modelUrl;
    const status = await this.request(url);
    const versions = status.model_version_status;
    if (!Array.isArray(versions)) {
      throw new ServingError(`${url} answered without model_version_status`, { kind: "protocol" });
    }
    const available = versions.filter((v) => v.state === "AVAILABLE").map((v) => Number(v.version));
    if (available.length === 0) {
      const states = versions.map((v) => `version ${v.version}: ${v.state}` +
        (v.status?.error_message ? ` (${v.status.error_message})` : "")).join("; ");
      throw new ServingError(`Model ${model}${label ? ` label ${label}` : ""} has no AVAILABLE version yet` +
        (states ? ` (${states})` : ""), { kind: "server" });
    }
    this.picked = { version: Math.max(...available), at: performance.now() };
    return this.picked.version;
  }

  /** The serving_bytes signature of `version` from the metadata endpoint: {inputKey, outputs}. */
  async signature(version) {
    if (this.signatures.has(version)) {
      return this.signatures.get(version);
    }
    const url = `${this.modelUrl}/versions/${version}/metadata`;
    const metadata = await this.request(url);
    const defs = metadata?.metadata?.signature_def?.signature_def;
    if (!defs || typeof defs !== "object") {
      throw new ServingError(`${url} answered without signature_def`, { kind: "protocol" });
    }
    const def = defs[SIGNATURE_BYTES];
    if (!def) {
      throw new ServingError(`Model ${this.settings.model} version ${version} has no ${SIGNATURE_BYTES} ` +
        `signature (it has: ${Object.keys(defs).join(", ")}); this page sends encoded pictures to it.`,
        { kind: "server" });
    }
    const inputs = Object.keys(def.inputs ?? {});
    if (inputs.length !== 1) {
      throw new ServingError(`${SIGNATURE_BYTES} of version ${version} has inputs ${inputs.join(", ")}; ` +
        "this page needs exactly one (the encoded picture)", { kind: "protocol" });
    }
    const found = { inputKey: inputs[0], outputs: Object.keys(def.outputs ?? {}) };
    this.signatures.set(version, found);
    return found;
  }

  /** Send one encoded picture (base64 text) to serving_bytes. Returns {version, outputs,
   * roundTripMs}: outputs maps each output name to its value for this picture. A version
   * that went away between status and predict (404) is looked up again once. */
  async predict(base64, { retry = true } = {}) {
    const version = await this.version();
    const { inputKey } = await this.signature(version);
    const body = JSON.stringify({
      signature_name: SIGNATURE_BYTES,
      instances: [{ [inputKey]: { b64: base64 } }],
    });
    const started = performance.now();
    let answer;
    try {
      answer = await this.request(`${this.modelUrl}/versions/${version}:predict`, body);
    } catch (err) {
      if (retry && err.kind === "server" && err.status === 404 && this.settings.version === null) {
        this.picked = null;
        return this.predict(base64, { retry: false });
      }
      throw err;
    }
    const roundTripMs = performance.now() - started;
    const row = Array.isArray(answer.predictions) ? answer.predictions[0] : undefined;
    if (!row || typeof row !== "object" || !(OUTPUT_PROBABILITIES in row)) {
      throw new ServingError(`The answer has no ${OUTPUT_PROBABILITIES}: ${JSON.stringify(answer).slice(0, 200)}`,
        { kind: "protocol" });
    }
    return { version, outputs: row, roundTripMs };
  }
}
