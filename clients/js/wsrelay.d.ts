// Types for wsrelay.js (the wsrelay.v1 browser client).

export type State = "idle" | "connecting" | "connected" | "disconnected" | "closed";

export interface Options {
  /** `?token=` for JWT auth; a function is called again before every (re)connect. Omit for cookies. */
  token?: string | null | (() => string | null | Promise<string | null>);
  /** WebSocket constructor (default: globalThis.WebSocket; in Node 20, pass the `ws` package). */
  WebSocket?: new (url: string, protocols?: string | string[], options?: unknown) => WebSocket;
  /** Third argument of the constructor (Node's `ws`: headers such as a cookie). */
  webSocketOptions?: unknown;
  /** Backoff: a delay is uniform in [0, min(maxDelay, initialDelay · 2^n)] (full jitter). Default 500 ms. */
  initialDelay?: number;
  /** Default 30 000 ms. */
  maxDelay?: number;
  /** Connection attempts in a row without a welcome after which the `disconnected` state says "refused or unreachable" (a browser cannot tell a 401 from a sidecar that is down); the client keeps trying at the backoff's pace until close(). Default 10. */
  maxFailedOpens?: number;
  /** From opening the socket to the welcome. Default 10 000 ms. */
  connectTimeout?: number;
  /** Default timeout of publish / send / presence / ping, counted from the call. Default 10 000 ms. */
  requestTimeout?: number;
  /** Silence after which the client pings (`{"op":"ping"}`). Default 20 000 ms. */
  pingInterval?: number;
  /** No frame this long after a ping: the connection is dropped and reopened. Default 10 000 ms. */
  pingTimeout?: number;
  /** Calls kept while disconnected; more are rejected with `buffer_full`. Default 100. */
  maxBuffered?: number;
  /** Random source of the jitter (tests). */
  random?: () => number;
}

export interface RequestOptions {
  timeout?: number;
}

/** Codes: wsrelay's (`forbidden`, `bad_request`, `not_found`, `unavailable`, …) and the client's (`timeout`, `disconnected`, `buffer_full`, `closed`). */
export class WsRelayError extends Error {
  code: string;
}

export interface Member {
  connection: string;
  user: string | null;
  info: unknown;
}

export interface MessageFrame<T = unknown> {
  op: "message";
  channel: string;
  data: T;
  offset?: string;
}

export interface StateEvent {
  state: State;
  /** disconnected: why (close reason, `refused (HTTP 401)`, `no answer to ping`, …). */
  reason?: string;
  code?: number;
  willReconnect?: boolean;
  /** ms until the next attempt */
  delay?: number;
  connection?: string;
  user?: string | null;
  reconnected?: boolean;
  attempt?: number;
}

export interface Welcome {
  connection: string;
  user: string | null;
  /** Channels the server subscribed this connection to (connect hook, JWT, URL). */
  channels: string[];
  reconnected: boolean;
}

export interface SubscribedEvent {
  /** true: nothing missed; false: reload the channel's state; null: nothing to recover from (first subscribe, or no offset seen yet). */
  recovered: boolean | null;
  offset?: string;
  reconnected: boolean;
}

type Off = () => void;

export class Subscription {
  readonly channel: string;
  /** Last offset seen (opaque). */
  offset: string | null;
  state: "pending" | "subscribed" | "failed" | "unsubscribed";
  /** Resolves at the first successful subscribe; rejects with a WsRelayError if refused. */
  ready: Promise<SubscribedEvent>;
  on(event: "message", fn: (data: any, frame: MessageFrame) => void): Off;
  on(event: "subscribed", fn: (e: SubscribedEvent) => void): Off;
  on(event: "gap", fn: (e: { recovered: false }) => void): Off;
  on(event: "join" | "leave", fn: (m: Member) => void): Off;
  on(event: "error", fn: (e: WsRelayError) => void): Off;
  once(event: string, fn: (...args: any[]) => void): Off;
  off(event: string, fn: (...args: any[]) => void): void;
  presence(options?: RequestOptions): Promise<{ count: number; clients?: Member[] }>;
  unsubscribe(): void;
}

export class WsRelay {
  constructor(url: string, options?: Options);
  readonly url: string;
  state: State;
  connection: string | null;
  user: string | null;
  channels: string[];
  connect(): this;
  close(): void;
  subscribe(channel: string, handler?: (data: any, frame: MessageFrame) => void, options?: { since?: string | null }): Subscription;
  subscription(channel: string): Subscription | undefined;
  publish(channel: string, data: unknown, options?: RequestOptions): Promise<{ offset?: string } | undefined>;
  send<T = unknown>(data: unknown, options?: RequestOptions): Promise<T>;
  presence(channel: string, options?: RequestOptions): Promise<{ count: number; clients?: Member[] }>;
  ping(options?: RequestOptions): Promise<void>;
  on(event: "state", fn: (e: StateEvent) => void): Off;
  on(event: "connecting", fn: (e: { attempt: number }) => void): Off;
  on(event: "connected", fn: (e: Welcome) => void): Off;
  on(event: "disconnected", fn: (e: { code: number; reason: string; willReconnect: boolean; delay?: number }) => void): Off;
  on(event: "closed", fn: (e: { reason: string }) => void): Off;
  on(event: "message", fn: (frame: MessageFrame) => void): Off;
  on(event: "join" | "leave", fn: (e: Member & { channel: string }) => void): Off;
  on(event: "gap", fn: (e: { channel: string; recovered: false }) => void): Off;
  on(event: "subscribed" | "unsubscribed", fn: (e: { channel: string }) => void): Off;
  once(event: string, fn: (...args: any[]) => void): Off;
  off(event: string, fn: (...args: any[]) => void): void;
}

export default WsRelay;
