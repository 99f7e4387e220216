// wsrelay.js — browser client for wsrelay's `wsrelay.v1` protocol.
//
// One dependency-free ES module: `<script type=module>` or any bundler.
// Reconnects with exponential backoff and full jitter, resubscribes with
// the last offset seen (so channels with history lose nothing), buffers
// calls made while disconnected (bounded), and notices a dead network with
// its own pings. See README.md beside this file for the decisions.

const PROTOCOL = "wsrelay.v1";
const OPEN = 1;

// Error codes a retry will not fix: the subscription is dropped.
const FINAL_SUBSCRIBE_ERRORS = new Set(["forbidden", "bad_request", "not_found", "limit_exceeded", "not_supported", "too_large"]);

/** An error from wsrelay (its reply's `error.code`) or from the client itself. */
export class WsRelayError extends Error {
  constructor(code, message) {
    super(message || code);
    this.name = "WsRelayError";
    this.code = code;
  }
}

class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  once(event, fn) {
    const off = this.on(event, (...args) => {
      off();
      fn(...args);
    });
    return off;
  }
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }
  _emit(event, ...args) {
    for (const fn of [...(this._listeners.get(event) || [])]) {
      try {
        fn(...args);
      } catch (err) {
        // A throwing handler must not break the connection's bookkeeping;
        // report it the way an uncaught error in an event handler is.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }
}

/** One channel the app wants, kept across reconnects. */
export class Subscription extends Emitter {
  constructor(client, channel, since) {
    super();
    this.client = client;
    this.channel = channel;
    /** Last offset seen on this channel (opaque), or null. */
    this.offset = since ?? null;
    /** "pending" | "subscribed" | "failed" | "unsubscribed" */
    this.state = "pending";
    this._seen = new Set(); // offsets delivered since the last recovery: exact repeats are dropped
    this._seenOrder = [];
    this._retry = null;
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // the 'error' event reports it too
  }

  /** Who is subscribed to this channel (namespaces with `presence = true`). */
  presence(options) {
    return this.client.presence(this.channel, options);
  }

  /** Stops the subscription (also on the server, if connected). */
  unsubscribe() {
    this.client._unsubscribe(this);
  }

  _deliver(frame) {
    if (frame.offset != null) {
      if (this._seen.has(frame.offset)) return;
      this._seen.add(frame.offset);
      this._seenOrder.push(frame.offset);
      if (this._seenOrder.length > 512) this._seen.delete(this._seenOrder.shift());
      this.offset = frame.offset;
    }
    this._emit("message", frame.data, frame);
  }

  _subscribed(info) {
    if (this.state === "unsubscribed" || this.state === "failed") return;
    this.state = "subscribed";
    if (info.recovered === false && info.offset != null) this.offset = info.offset;
    this._resolveReady(info);
    this._emit("subscribed", info);
  }

  _failed(err) {
    this.state = "failed";
    this._rejectReady(err);
    this._emit("error", err);
  }
}

/**
 * A connection to wsrelay that reconnects by itself.
 *
 *   const relay = new WsRelay("/ws");
 *   relay.on("state", (s) => …);
 *   relay.subscribe("room:lobby", (data, frame) => …);
 *   relay.connect();
 */
export class WsRelay extends Emitter {
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = {
      token: null,
      WebSocket: globalThis.WebSocket,
      webSocketOptions: undefined,
      initialDelay: 500,
      maxDelay: 30000,
      maxFailedOpens: 10,
      connectTimeout: 10000,
      requestTimeout: 10000,
      pingInterval: 20000,
      pingTimeout: 10000,
      maxBuffered: 100,
      random: Math.random,
      ...options,
    };
    if (typeof this.options.WebSocket !== "function") {
      throw new TypeError("wsrelay: no WebSocket constructor (pass one as options.WebSocket, e.g. the `ws` package in Node)");
    }
    /** "idle" | "connecting" | "connected" | "disconnected" | "closed" */
    this.state = "idle";
    /** The welcome of the current connection: connection id, user, server-side channels. */
    this.connection = null;
    this.user = null;
    this.channels = [];
    this._subs = new Map();
    this._pending = new Map(); // request id -> {resolve, reject, timer, onReply}
    this._buffer = []; // calls made while disconnected
    this._nextId = 1;
    this._ws = null;
    this._attempt = 0; // backoff exponent
    this._failedOpens = 0; // connection attempts in a row that never got a welcome
    this._everConnected = false;
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._watchdog = null;
    this._lastFrame = 0;
    this._openedAt = 0;
    this._terminal = false; // disconnected for good: calls are rejected at once
    this._pingSentAt = 0;
    this._serverChannels = new Set(); // channels the last welcome said the server subscribed
    this._urlRecovery = true; // recover server-side channels through the URL (see _openUrl)
    this._onOnline = () => {
      if (this.state === "disconnected" && this._reconnectTimer) this._reconnectNow();
    };
  }

  /** Opens the connection (again, after a terminal disconnect or close()). */
  connect() {
    if (this.state === "connecting" || this.state === "connected") return this;
    this._attempt = 0;
    this._failedOpens = 0;
    this._terminal = false;
    globalThis.addEventListener?.("online", this._onOnline);
    this._open();
    return this;
  }

  /** Closes for good: no reconnect; buffered and pending calls are rejected. */
  close() {
    globalThis.removeEventListener?.("online", this._onOnline);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    const ws = this._ws;
    this._teardown();
    if (ws) ws.close(1000, "client closed");
    this._failAll(new WsRelayError("closed", "the client was closed"));
    this._setState("closed", { reason: "closed", willReconnect: false });
  }

  /**
   * Subscribes to `channel`, now and after every reconnect. Missed messages
   * are recovered where the channel keeps history: the `subscribed` event
   * after a reconnect says `recovered: true`, or `false` when the app must
   * reload the channel's state (also on a `gap` event).
   */
  subscribe(channel, handler, options = {}) {
    let sub = this._subs.get(channel);
    if (!sub) {
      sub = new Subscription(this, channel, options.since);
      this._subs.set(channel, sub);
      if (this.state === "connected") this._sendSubscribe(sub, false);
    }
    if (handler) sub.on("message", handler);
    return sub;
  }

  /** The subscription to `channel`, if any. */
  subscription(channel) {
    return this._subs.get(channel);
  }

  /** Publishes (where the namespace allows clients to): resolves to `{offset?}`. */
  publish(channel, data, options) {
    return this._request({ op: "publish", channel, data }, options);
  }

  /** Sends `data` to the app's message hook: resolves to the app's answer. */
  send(data, options) {
    return this._request({ op: "send", data }, options);
  }

  /** Resolves to `{count, clients: [{connection, user, info}]}` of a subscribed channel. */
  presence(channel, options) {
    return this._request({ op: "presence", channel }, options);
  }

  /** A round trip to the sidecar. */
  ping(options) {
    return this._request({ op: "ping" }, options);
  }

  // --- connecting ----------------------------------------------------------

  async _openUrl() {
    const base = globalThis.location ? globalThis.location.href : undefined;
    const url = new URL(this.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    let token = this.options.token;
    if (typeof token === "function") token = await token();
    if (token) url.searchParams.set("token", token);
    // Channels the server subscribed us to (connect hook, JWT) cannot be
    // recovered with a `subscribe … since` (they are subscribed already), but
    // the URL form can: `channel=…&since=…` is answered in the welcome.
    const recovering = [];
    if (this._urlRecovery) {
      for (const sub of this._subs.values()) {
        if (this._serverChannels.has(sub.channel) && sub.offset != null && sub.state !== "failed") {
          url.searchParams.append("channel", sub.channel);
          url.searchParams.append("since", sub.offset);
          recovering.push(sub.channel);
        }
      }
    }
    return { url: url.toString(), recovering };
  }

  async _open() {
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._setState("connecting", { attempt: this._failedOpens + 1 });
    const epoch = (this._epoch = (this._epoch || 0) + 1);
    let target;
    try {
      target = await this._openUrl();
    } catch (err) {
      if (epoch !== this._epoch || this.state !== "connecting") return;
      return this._lost({ code: 0, reason: `token: ${err && err.message}`, opened: false });
    }
    if (epoch !== this._epoch || this.state !== "connecting") return; // closed meanwhile
    let ws;
    try {
      const Ctor = this.options.WebSocket;
      ws = this.options.webSocketOptions ? new Ctor(target.url, PROTOCOL, this.options.webSocketOptions) : new Ctor(target.url, PROTOCOL);
    } catch (err) {
      return this._lost({ code: 0, reason: String(err && err.message), opened: false, final: true });
    }
    this._ws = ws;
    let errorText = "";
    let welcomed = false;
    this._connectTimer = setTimeout(() => {
      if (this._ws !== ws) return;
      this._abandon(ws);
      this._lost({ code: 0, reason: "connect timeout", opened: false });
    }, this.options.connectTimeout);
    ws.onerror = (e) => {
      // Browsers say nothing; Node's `ws` says "Unexpected server response: 401".
      errorText = (e && (e.message || (e.error && e.error.message))) || "";
    };
    ws.onmessage = (e) => {
      if (this._ws !== ws) return;
      this._lastFrame = Date.now();
      this._pingSentAt = 0;
      let frame;
      try {
        frame = JSON.parse(typeof e.data === "string" ? e.data : String(e.data));
      } catch {
        return;
      }
      if (!welcomed) {
        if (frame.op !== "welcome") return;
        welcomed = true;
        this._welcome(frame, target.recovering);
        return;
      }
      this._frame(frame);
    };
    ws.onclose = (e) => {
      if (this._ws !== ws) return;
      this._teardown();
      const status = /Unexpected server response: (\d{3})/.exec(errorText);
      this._lost({
        code: e.code,
        reason: e.reason || (status ? `HTTP ${status[1]}` : errorText),
        status: status ? Number(status[1]) : undefined,
        opened: welcomed,
        recovering: target.recovering,
      });
    };
  }

  _welcome(frame, recovering) {
    clearTimeout(this._connectTimer);
    const reconnected = this._everConnected;
    this._everConnected = true;
    this._openedAt = Date.now();
    this._failedOpens = 0;
    this._urlRecovery = true;
    this.connection = frame.connection;
    this.user = frame.user;
    this.channels = frame.channels || [];
    this._serverChannels = new Set(this.channels);
    this._lastFrame = Date.now();
    this._pingSentAt = 0;
    const tick = Math.max(100, Math.min(this.options.pingInterval, this.options.pingTimeout) / 4);
    this._watchdog = setInterval(() => this._checkAlive(), tick);
    this._setState("connected", { connection: this.connection, user: this.user, reconnected });
    this._emit("connected", { connection: this.connection, user: this.user, channels: this.channels, reconnected });
    const recovered = frame.recovered || {};
    for (const sub of this._subs.values()) {
      if (sub.state === "failed") continue;
      if (recovering.includes(sub.channel)) {
        this._recoveryStarts(sub);
        sub._subscribed({ recovered: recovered[sub.channel] === true, reconnected });
      } else if (this._serverChannels.has(sub.channel) && sub.offset == null) {
        sub._subscribed({ recovered: null, reconnected }); // subscribed by the server, nothing to recover
      } else {
        this._sendSubscribe(sub, reconnected);
      }
    }
    // Calls made while disconnected go out after the subscriptions, in order.
    const buffered = this._buffer.splice(0);
    for (const call of buffered) this._transmit(call);
  }

  _recoveryStarts(sub) {
    sub._seen.clear();
    sub._seenOrder.length = 0;
  }

  _sendSubscribe(sub, reconnected) {
    clearTimeout(sub._retry);
    const frame = { op: "subscribe", channel: sub.channel };
    const since = sub.offset;
    if (since != null) frame.since = since;
    this._request(frame, { timeout: this.options.requestTimeout, buffer: false }).then(
      (result) => {
        if (this._subs.get(sub.channel) !== sub) return;
        if (since != null) this._recoveryStarts(sub);
        sub._subscribed({
          recovered: since != null && result && typeof result.recovered === "boolean" ? result.recovered : null,
          offset: result ? result.offset : undefined,
          reconnected,
        });
      },
      (err) => {
        if (this._subs.get(sub.channel) !== sub) return;
        if (FINAL_SUBSCRIBE_ERRORS.has(err.code)) {
          this._subs.delete(sub.channel);
          sub._failed(err);
        } else if (err.code !== "disconnected" && err.code !== "closed") {
          // unavailable (broker down), rate_limited, a timeout: try again on this connection.
          sub._retry = setTimeout(() => {
            if (this.state === "connected" && this._subs.get(sub.channel) === sub) this._sendSubscribe(sub, reconnected);
          }, this._delay(3));
        }
      },
    );
  }

  _unsubscribe(sub) {
    clearTimeout(sub._retry);
    if (this._subs.get(sub.channel) === sub) this._subs.delete(sub.channel);
    if (sub.state === "unsubscribed") return;
    sub.state = "unsubscribed";
    if (this.state === "connected") this._request({ op: "unsubscribe", channel: sub.channel }, { buffer: false }).catch(() => {});
  }

  // --- frames ----------------------------------------------------------------

  _frame(frame) {
    switch (frame.op) {
      case "reply": {
        const call = this._pending.get(frame.id);
        if (!call) return;
        this._pending.delete(frame.id);
        clearTimeout(call.timer);
        if (frame.ok) call.resolve(frame.result);
        else call.reject(new WsRelayError(frame.error?.code || "internal", frame.error?.message));
        return;
      }
      case "message": {
        this._subs.get(frame.channel)?._deliver(frame);
        this._emit("message", frame);
        return;
      }
      case "join":
      case "leave": {
        const member = { connection: frame.connection, user: frame.user, info: frame.info };
        this._subs.get(frame.channel)?._emit(frame.op, member);
        this._emit(frame.op, { channel: frame.channel, ...member });
        return;
      }
      case "gap": {
        this._subs.get(frame.channel)?._emit("gap", { recovered: false });
        this._emit("gap", { channel: frame.channel, recovered: false });
        return;
      }
      case "subscribed":
      case "unsubscribed": {
        if (frame.op === "subscribed") this._serverChannels.add(frame.channel);
        else this._serverChannels.delete(frame.channel);
        this._emit(frame.op, { channel: frame.channel });
        return;
      }
      default:
        return; // a newer server's frame: ignore
    }
  }

  // --- requests --------------------------------------------------------------

  _request(frame, options = {}) {
    return new Promise((resolve, reject) => {
      if (this.state === "closed") return reject(new WsRelayError("closed", "the client was closed"));
      const timeoutMs = options.timeout ?? this.options.requestTimeout;
      const call = { frame, resolve, reject, timer: null, id: 0 };
      call.timer = setTimeout(() => {
        const at = this._buffer.indexOf(call);
        if (at >= 0) this._buffer.splice(at, 1);
        if (call.id) this._pending.delete(call.id);
        reject(new WsRelayError("timeout", `no reply to ${frame.op} within ${timeoutMs} ms`));
      }, timeoutMs);
      if (this.state === "connected") return this._transmit(call);
      if (options.buffer === false || this._terminal) {
        clearTimeout(call.timer);
        return reject(new WsRelayError("disconnected", "not connected"));
      }
      if (this._buffer.length >= this.options.maxBuffered) {
        clearTimeout(call.timer);
        return reject(new WsRelayError("buffer_full", `${this.options.maxBuffered} calls already wait for the connection`));
      }
      this._buffer.push(call);
    });
  }

  _transmit(call) {
    call.id = this._nextId++;
    this._pending.set(call.id, call);
    try {
      this._ws.send(JSON.stringify({ ...call.frame, id: call.id }));
    } catch (err) {
      this._pending.delete(call.id);
      clearTimeout(call.timer);
      call.reject(new WsRelayError("disconnected", String(err && err.message)));
    }
  }

  _failAll(err) {
    for (const call of this._buffer.splice(0)) {
      clearTimeout(call.timer);
      call.reject(err);
    }
    this._failPending(err);
  }

  _failPending(err) {
    // In flight when the connection went: it may or may not have been done,
    // and retrying could do it twice, so the caller decides.
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const call of pending) {
      clearTimeout(call.timer);
      call.reject(err);
    }
  }

  // --- liveness ----------------------------------------------------------------

  _checkAlive() {
    const ws = this._ws;
    if (!ws || this.state !== "connected") return;
    const now = Date.now();
    if (this._pingSentAt && now - this._pingSentAt >= this.options.pingTimeout) {
      // Nothing came back: the network (or the sidecar) is gone without a FIN.
      this._abandon(ws);
      this._lost({ code: 0, reason: "no answer to ping", opened: true });
      return;
    }
    if (!this._pingSentAt && now - this._lastFrame >= this.options.pingInterval) {
      this._pingSentAt = now;
      try {
        ws.send(JSON.stringify({ op: "ping", id: "watchdog" })); // any frame back clears it
      } catch {
        // the close event follows
      }
    }
  }

  // Stops listening to a socket that may take long to close (a dead network
  // delays the close handshake): the client moves on at once.
  _abandon(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close(4000, "unresponsive");
    } catch {
      // already closed
    }
    this._teardown();
  }

  _teardown() {
    clearTimeout(this._connectTimer);
    clearInterval(this._watchdog);
    this._watchdog = null;
    this._ws = null;
    this._pingSentAt = 0;
    for (const sub of this._subs.values()) clearTimeout(sub._retry);
  }

  // --- losing the connection ---------------------------------------------------

  _lost({ code, reason, status, opened, recovering = [], final = false }) {
    if (this.state === "closed") return;
    this._failPending(new WsRelayError("disconnected", `connection lost (${code || "no close code"})`));
    for (const sub of this._subs.values()) if (sub.state === "subscribed") sub.state = "pending";
    let delay = null;
    let why = reason || "";
    if (!opened) {
      this._failedOpens++;
      if (recovering.length > 0 && this._urlRecovery) {
        // Perhaps a URL channel was refused (403 for the whole upgrade): the
        // next attempt resubscribes those channels with frames instead.
        this._urlRecovery = false;
      }
      if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
        final = true; // refused: retrying gets the same answer
        why = `refused (HTTP ${status})`;
      } else {
        // A browser cannot see a 401/403: a refusal looks like a sidecar
        // that is down (a deploy, a restart). Giving up could strand a page
        // forever, so past maxFailedOpens it says so and keeps trying at the
        // backoff's slowest pace; close() gives up.
        if (this._failedOpens >= this.options.maxFailedOpens) {
          why = `refused or unreachable (${this._failedOpens} attempts)`;
        }
        delay = this._delay(this._attempt++);
      }
    } else if (code === 1008) {
      // Disconnected by the app, rate limited, or token expired: not blindly
      // again — except an expired token when we can fetch a fresh one.
      if (/token expired/i.test(reason) && typeof this.options.token === "function") {
        delay = this._delay(0);
      } else {
        final = true;
      }
    } else if (code === 1001) {
      this._attempt = 0;
      delay = this._delay(1); // this replica goes away: come back soon (spread over ~1 s)
    } else if (code === 1013) {
      this._attempt = Math.max(this._attempt, 3) + 1;
      delay = this._delay(this._attempt); // too slow or overloaded: back off further
    } else {
      // A connection that lived a while starts the backoff afresh; one cut
      // right after its welcome keeps climbing (no reconnect storm).
      const lived = Date.now() - this._openedAt;
      if (!opened || lived < 5000) this._attempt++;
      else this._attempt = 1;
      delay = this._delay(this._attempt - 1);
    }
    if (final) {
      this._failAll(new WsRelayError("disconnected", `disconnected: ${why}`));
      globalThis.removeEventListener?.("online", this._onOnline);
      this._terminal = true;
      this._setState("disconnected", { code, reason: why, willReconnect: false });
      return;
    }
    this._setState("disconnected", { code, reason: why, willReconnect: true, delay });
    this._reconnectTimer = setTimeout(() => this._open(), delay);
  }

  _reconnectNow() {
    clearTimeout(this._reconnectTimer);
    this._open();
  }

  /** Full jitter: uniform in [0, min(maxDelay, initialDelay · 2^n)]. */
  _delay(n) {
    const cap = Math.min(this.options.maxDelay, this.options.initialDelay * 2 ** Math.min(n, 30));
    return Math.floor(this.options.random() * cap);
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
    if (state !== "connected") this._emit(state, detail); // "connected" carries the welcome, below
  }
}

export default WsRelay;
