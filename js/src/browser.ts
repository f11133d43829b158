/**
 * The browser's implementations of the interfaces `session.ts` needs: the HTTP auth API over
 * `fetch`, the shared store over `localStorage`, the tab channel over `BroadcastChannel`, and the
 * origin-wide lock over Web Locks. Each degrades to a per-page equivalent where the API is
 * missing (an old browser, a sandboxed iframe, private mode without storage), so the client
 * still works in one tab.
 */

import { TetherError } from "./errors.js";
import type {
  AuthHttp,
  LockRunner,
  SharedStore,
  StoredState,
  TabChannel,
  TabMessage,
  TokenResponse,
} from "./session.js";

/** Milliseconds one HTTP auth request may take before it counts as a network failure. */
export const DEFAULT_HTTP_TIMEOUT_MS = 10_000;

/**
 * The HTTP base URL of a deployment named by its `/sync` URL: `ws://h:8000/sync` →
 * `http://h:8000`, `wss://h/app/sync` → `https://h/app`.
 */
export function httpBaseUrl(syncUrl: string): string {
  const url = new URL(syncUrl);
  if (url.protocol === "ws:") url.protocol = "http:";
  else if (url.protocol === "wss:") url.protocol = "https:";
  let path = url.pathname.replace(/\/+$/, "");
  if (path.endsWith("/sync")) path = path.slice(0, -"/sync".length);
  return `${url.protocol}//${url.host}${path}`;
}

/** The default `/sync` URL: this page's origin (http → ws, https → wss) + `/sync`. */
export function defaultSyncUrl(): string {
  const location = (globalThis as { location?: Location }).location;
  if (location === undefined) throw new TypeError("no page location: pass `url`");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/sync`;
}

/** The HTTP auth API (§2) over `fetch`. In cookie mode (§5 rule 10) every request carries the
 * cookie (`credentials: "include"`) and `Tether-CSRF: 1`, and sign-in/up ask for the cookie. */
export class FetchAuthHttp implements AuthHttp {
  constructor(
    readonly baseUrl: string,
    private readonly cookie: boolean,
    private readonly fetchImpl: typeof fetch = globalThis.fetch.bind(globalThis),
    private readonly timeoutMs = DEFAULT_HTTP_TIMEOUT_MS,
  ) {}

  signIn(email: string, password: string, cookie: boolean): Promise<TokenResponse> {
    return this.tokens("/auth/signin", { email, password, ...(cookie ? { cookie: true } : {}) });
  }

  signUp(email: string, password: string, cookie: boolean): Promise<TokenResponse> {
    return this.tokens("/auth/signup", { email, password, ...(cookie ? { cookie: true } : {}) });
  }

  refresh(refreshToken: string | null, retryKey: string | null): Promise<TokenResponse> {
    const body: Record<string, unknown> =
      refreshToken === null ? { cookie: true } : { refreshToken };
    if (retryKey !== null) body["retryKey"] = retryKey;
    return this.tokens("/auth/refresh", body);
  }

  async signOut(accessToken: string, everywhere: boolean): Promise<void> {
    await this.post(everywhere ? "/auth/signout-all" : "/auth/signout", null, accessToken);
  }

  private async tokens(path: string, body: Record<string, unknown>): Promise<TokenResponse> {
    const data = await this.post(path, body, null);
    if (
      typeof data !== "object" ||
      data === null ||
      typeof (data as TokenResponse).accessToken !== "string" ||
      typeof (data as TokenResponse).expiresAt !== "number"
    ) {
      throw new TetherError("unavailable", `${path} answered without tokens`);
    }
    return data as TokenResponse;
  }

  private async post(path: string, body: unknown, bearer: string | null): Promise<unknown> {
    const headers: Record<string, string> = {};
    if (body !== null) headers["Content-Type"] = "application/json";
    if (bearer !== null) headers["Authorization"] = `Bearer ${bearer}`;
    if (this.cookie) headers["Tether-CSRF"] = "1";
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), this.timeoutMs);
    let response: Response;
    try {
      response = await this.fetchImpl(this.baseUrl + path, {
        method: "POST",
        headers,
        body: body === null ? null : JSON.stringify(body),
        credentials: this.cookie ? "include" : "same-origin",
        signal: abort.signal,
      });
    } catch (error) {
      throw new TetherError("network", `${path}: ${error instanceof Error ? error.message : String(error)}`);
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 204) return null;
    let data: unknown = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (response.ok) return data;
    const fields = (typeof data === "object" && data !== null ? data : {}) as Record<string, unknown>;
    const code =
      typeof fields["error"] === "string"
        ? fields["error"]
        : response.status >= 500
          ? "unavailable"
          : "invalid_request";
    const retryAfter = Number(response.headers.get("Retry-After"));
    throw new TetherError(
      code,
      typeof fields["message"] === "string" ? fields["message"] : `${path}: HTTP ${response.status}`,
      undefined,
      Number.isFinite(retryAfter) && retryAfter > 0 ? retryAfter : undefined,
    );
  }
}

/** The shared store in `localStorage` (in memory where storage is unavailable). */
export class LocalStorageStore implements SharedStore {
  private memory: StoredState | null = null;

  constructor(
    readonly key: string,
    private readonly storage: Storage | null = safeLocalStorage(),
  ) {}

  load(): StoredState | null {
    if (this.storage === null) return this.memory;
    try {
      const raw = this.storage.getItem(this.key);
      if (raw === null) return null;
      const value: unknown = JSON.parse(raw);
      return typeof value === "object" && value !== null && typeof (value as StoredState).userId === "string"
        ? (value as StoredState)
        : null;
    } catch {
      return this.memory;
    }
  }

  save(state: StoredState | null): void {
    this.memory = state;
    if (this.storage === null) return;
    try {
      if (state === null) this.storage.removeItem(this.key);
      else this.storage.setItem(this.key, JSON.stringify(state));
    } catch {
      // Quota or a disabled store: the memory copy serves this tab.
    }
  }
}

function safeLocalStorage(): Storage | null {
  try {
    const storage = (globalThis as { localStorage?: Storage }).localStorage;
    return storage ?? null;
  } catch {
    return null; // some browsers throw on access when storage is disabled
  }
}

/** The tab channel over `BroadcastChannel` (a silent one where it is missing). */
export class BroadcastTabChannel implements TabChannel {
  private readonly channel: BroadcastChannel | null;

  constructor(name: string) {
    this.channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(name) : null;
  }

  post(message: TabMessage): void {
    this.channel?.postMessage(message);
  }

  onMessage(listener: (message: TabMessage) => void): void {
    this.channel?.addEventListener("message", (event: MessageEvent) => {
      const data: unknown = event.data;
      if (typeof data === "object" && data !== null && typeof (data as TabMessage).type === "string") {
        listener(data as TabMessage);
      }
    });
  }

  close(): void {
    this.channel?.close();
  }
}

/**
 * The origin-wide lock: Web Locks where available (released by the browser when its holder's
 * page goes away), else a promise mutex that serialises this page only. The work under it is
 * bounded (HTTP requests time out), so a hung refresh cannot hold every tab's lock for ever.
 */
export function webLockRunner(): LockRunner {
  const locks = (globalThis as { navigator?: { locks?: LockManager } }).navigator?.locks;
  if (locks !== undefined && typeof locks.request === "function") {
    return <T>(name: string, fn: () => Promise<T>) =>
      locks.request(name, { mode: "exclusive" }, () => fn()) as Promise<T>;
  }
  return promiseMutex();
}

/** A per-page mutex with the same shape as {@link webLockRunner}. */
export function promiseMutex(): LockRunner {
  const tails = new Map<string, Promise<unknown>>();
  return <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    const before = tails.get(name) ?? Promise.resolve();
    const run = before.then(fn, fn);
    tails.set(
      name,
      run.then(
        () => undefined,
        () => undefined,
      ),
    );
    return run;
  };
}

/** A random `retryKey` (32 URL-safe characters, 192 bits). */
export function randomRetryKey(): string {
  const bytes = new Uint8Array(24);
  crypto.getRandomValues(bytes);
  let text = "";
  for (const b of bytes) text += String.fromCharCode(b);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_");
}

/** A random `clientId` for one client (one tab's page). */
export function randomClientId(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  return randomRetryKey();
}
