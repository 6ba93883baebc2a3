// Talking to the bkg gateway through the server extension: REST under /bkg/api/, the WebSocket at /bkg/ws.
// Jupyter's own authentication covers both; the browser never holds a bkg key.
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface ITelemetry {
  cpu_percent: number;
  rss_bytes: number;
  uptime_s: number;
  requests: number;
  requests_per_min: number;
  errors: number;
  last_error: string | null;
  latency_p50_ms: number | null;
  latency_p95_ms: number | null;
  queue_depth: number;
  in_flight: number;
}

export interface IPlugin {
  id: string;
  name: string;
  version: string;
  description: string;
  state: string;
  reason: string | null;
  mode: string;
  uptime_s: number;
  telemetry: ITelemetry;
}

export class BkgError extends Error {
  constructor(
    message: string,
    public status: number,
    public field: string | null = null
  ) {
    super(message);
  }
}

const settings = ServerConnection.makeSettings();

export function apiUrl(path: string): string {
  return URLExt.join(settings.baseUrl, 'bkg', 'api', path);
}

/** Send a request to the gateway; raise BkgError with the gateway's message and field on a 4xx / 5xx. */
export async function request<T = any>(path: string, init: RequestInit = {}): Promise<T> {
  if (init.body && !(init.headers as any)?.['Content-Type']) {
    init.headers = { ...(init.headers || {}), 'Content-Type': 'application/json' };
  }
  const response = await ServerConnection.makeRequest(apiUrl(path), init, settings);
  const text = await response.text();
  let data: any = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = text;
  }
  if (!response.ok) {
    const err = data && data.error ? data.error : { message: text || response.statusText };
    throw new BkgError(err.message, response.status, err.field || null);
  }
  return data as T;
}

/** Raw fetch through Jupyter's connection settings (streams: the caller reads the body). */
export function rawFetch(path: string, init: RequestInit): Promise<Response> {
  init.headers = { ...(init.headers || {}), 'Content-Type': 'application/json' };
  return ServerConnection.makeRequest(apiUrl(path), init, settings);
}

type Listener = (msg: any) => void;

/**
 * The gateway's WebSocket, through the server extension. Reconnects by itself (every 2 s) after the gateway
 * or the lab server restarts; `onOpen` listeners run on every (re)connect so panels can refetch.
 */
export class Live {
  private ws: WebSocket | null = null;
  private listeners = new Set<Listener>();
  private openers = new Set<() => void>();
  private topics = new Set<string>(['status', 'telemetry']);
  private closed = false;
  connected = false;

  constructor() {
    this.connect();
  }

  private connect(): void {
    if (this.closed) {
      return;
    }
    const url = URLExt.join(settings.wsUrl, 'bkg', 'ws');
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      this.connected = true;
      for (const key of this.topics) {
        const [topic, plugin] = key.split('|');
        ws.send(JSON.stringify({ action: 'sub', topic, plugin: plugin || undefined }));
      }
      this.openers.forEach(fn => fn());
    };
    ws.onmessage = ev => {
      let msg: any;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      this.listeners.forEach(fn => fn(msg));
    };
    ws.onclose = () => {
      this.connected = false;
      this.listeners.forEach(fn => fn({ type: 'disconnected' }));
      window.setTimeout(() => this.connect(), 2000);
    };
  }

  subscribe(topic: string, plugin?: string): void {
    const key = plugin ? `${topic}|${plugin}` : topic;
    this.topics.add(key);
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ action: 'sub', topic, plugin }));
    }
  }

  listen(fn: Listener): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  onOpen(fn: () => void): () => void {
    this.openers.add(fn);
    return () => this.openers.delete(fn);
  }

  dispose(): void {
    this.closed = true;
    this.ws?.close();
  }
}

export function formatBytes(n: number): string {
  if (!n) {
    return '–';
  }
  const units = ['B', 'KB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function formatUptime(s: number): string {
  if (!s) {
    return '–';
  }
  if (s < 60) {
    return `${Math.round(s)}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
  }
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') {
      node.className = v;
    } else {
      node.setAttribute(k, v);
    }
  }
  for (const c of children) {
    node.append(c);
  }
  return node;
}
