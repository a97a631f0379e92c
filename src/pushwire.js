/* pushwire.js: the browser client of pushwire (SPEC section 8). No build
 * step, no dependencies, plain ES2017. Load it with
 * <script src="/pushwire.js"></script>; it defines window.PushwireClient
 * (also window.Pushwire.Client) and module.exports when there is one.
 *
 *   const c = new PushwireClient({ token, onNotice(notice, id) { ... } });
 *   c.start();
 *
 * It connects with `since` (empty on the first connect, the last id seen on
 * every reconnect) so the server wraps notices as {"id","notice"} and replays
 * what a dropped connection missed. The last id is kept in memory only, unless
 * the page passes `storage` (e.g. sessionStorage). */
(function (root) {
  "use strict";
  const noop = () => {};

  class PushwireClient {
    constructor(opts) {
      const o = Object.assign({
        url: null,          // ws(s)://host/ws; default: this page's host, path /ws
        token: null,        // JWT, sent as ?token= (browsers cannot set headers)
        getToken: null,     // optional () => token or Promise<token>, asked before each connect
        params: {},         // extra query parameters, e.g. { user: "42" } with --dev
        storage: null,      // optional Storage (sessionStorage) to keep the last id across reloads
        storageKey: "pushwire.lastId",
        baseDelay: 500, maxDelay: 30000, // backoff: full jitter in [0, min(max, base * 2^n)]
        stableAfter: 10000, // an open this long resets the backoff (not a flapping server)
        onNotice: noop, onRecovered: noop, onMissed: noop, onStatus: noop, onTokenExpired: noop,
      }, opts);
      this.opts = o;
      this.token = o.token;
      this.lastId = (o.storage && o.storage.getItem(o.storageKey)) || null;
      this.ws = null;
      this.attempt = 0;
      this.timer = null;
      this.running = false;
      this.expiredToken = undefined; // the token refused with 4001, never sent again
    }

    start() {
      if (this.running) return;
      this.running = true;
      this.attempt = 0;
      this._connect();
    }

    /** Closes for good (until start()); no reconnect. */
    stop() {
      this.running = false;
      clearTimeout(this.timer);
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close(1000);
      this.opts.onStatus("closed", { code: 1000, reason: "stopped", retryIn: null });
    }

    /** Hands a fresh token; resumes at once if a 4001 had stopped the client. */
    setToken(token) {
      this.token = token;
      if (this.running && !this.ws && this.expiredToken !== undefined) {
        clearTimeout(this.timer);
        this._connect();
      }
    }

    async _connect() {
      this.timer = null;
      let token = this.token;
      try {
        if (this.opts.getToken) token = this.token = await this.opts.getToken();
      } catch (e) {
        return this._retry({ code: 0, reason: "getToken failed: " + e });
      }
      if (!this.running || this.ws) return; // stopped, or started again, meanwhile
      if (this.expiredToken !== undefined && token === this.expiredToken) {
        // Same token that just expired: reconnecting would only earn another 4001.
        this.opts.onStatus("closed", { code: 4001, reason: "token expired", retryIn: null });
        return;
      }
      this.expiredToken = undefined;

      const u = new URL(this.opts.url || "/ws", root.location && root.location.href);
      if (u.protocol === "http:") u.protocol = "ws:";
      if (u.protocol === "https:") u.protocol = "wss:";
      for (const k of Object.keys(this.opts.params)) u.searchParams.set(k, this.opts.params[k]);
      if (token) u.searchParams.set("token", token);
      u.searchParams.set("since", this.lastId || ""); // URLSearchParams encodes the opaque id

      this.opts.onStatus("connecting", { url: u.href });
      let ws;
      try {
        ws = new WebSocket(u.href);
      } catch (e) {
        return this._retry({ code: 0, reason: String(e) });
      }
      this.ws = ws;
      let openedAt = 0;
      ws.onopen = () => {
        if (ws !== this.ws) return;
        openedAt = Date.now();
        this.opts.onStatus("open", {});
      };
      ws.onmessage = (e) => { if (ws === this.ws) this._frame(e.data); };
      // A refused upgrade (401, 403, 429, 503) looks like an immediate close
      // (usually 1006) to a browser: it takes the ordinary backoff below.
      ws.onclose = (e) => {
        if (ws !== this.ws) return; // an old socket, or stop() already reported it
        this.ws = null;
        if (openedAt && Date.now() - openedAt >= this.opts.stableAfter) this.attempt = 0;
        if (e.code === 4001) {
          this.expiredToken = token;
          this.opts.onStatus("closed", { code: e.code, reason: e.reason, retryIn: null });
          this.opts.onTokenExpired();
          // With getToken, ask it again (after a backoff) for a fresh one;
          // without it, wait for setToken().
          if (this.opts.getToken && this.running && !this.ws) this._retry(null);
          return;
        }
        // 1000, 1001 (shutdown), 1008 (slow consumer), 1011, 1006...: come back.
        this._retry({ code: e.code, reason: e.reason });
      };
    }

    _retry(why) {
      if (!this.running) return;
      const cap = Math.min(this.opts.maxDelay, this.opts.baseDelay * Math.pow(2, this.attempt));
      this.attempt = Math.min(this.attempt + 1, 30);
      // Full jitter: after a node restart its clients come back spread out,
      // not all in the same instant.
      const wait = Math.floor(Math.random() * cap);
      if (why) this.opts.onStatus("closed", Object.assign({ retryIn: wait }, why));
      this.timer = setTimeout(() => this._connect(), wait);
    }

    _frame(text) {
      let v;
      try { v = JSON.parse(text); } catch (e) { v = undefined; }
      // A published notice always has a routing field; the server's own
      // frames (envelope, status) never do.
      const own = v !== null && typeof v === "object" && !Array.isArray(v) &&
        !("userId" in v || "userIds" in v || "broadcast" in v);
      if (own && typeof v.recovered === "boolean" && !("notice" in v)) {
        this.opts.onRecovered({ recovered: v.recovered, replayed: v.replayed || 0 });
        if (!v.recovered) this.opts.onMissed(); // the page refetches its state
        // The last id is kept even then: it may be unknown to the server, but
        // an empty since would claim "nothing to recover" and hide later gaps.
        return;
      }
      if (own && "notice" in v) {
        const id = typeof v.id === "string" ? v.id : null; // no id: a plain PUBLISH
        if (id !== null) {
          this.lastId = id;
          if (this.opts.storage) this.opts.storage.setItem(this.opts.storageKey, id);
        }
        return this.opts.onNotice(v.notice, id, rawNotice(text, id, v.notice));
      }
      // Not an envelope: a server that ignored `since`, or a --resync-notice.
      this.opts.onNotice(v === undefined ? text : v, null, text);
    }
  }

  /** The published bytes as the server wrapped them: {"id":ID,"notice":RAW}. */
  function rawNotice(text, id, notice) {
    const head = (id === null ? '{' : '{"id":' + JSON.stringify(id) + ',') + '"notice":';
    if (text.startsWith(head) && text.endsWith("}")) return text.slice(head.length, -1);
    return JSON.stringify(notice); // another layout: same JSON, maybe not the same bytes
  }

  root.PushwireClient = PushwireClient;
  root.Pushwire = { Client: PushwireClient };
  if (typeof module === "object" && module.exports) module.exports = PushwireClient;
})(typeof window !== "undefined" ? window : globalThis);
