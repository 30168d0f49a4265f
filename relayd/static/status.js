// relayd status page: counters from /status.json (polled), messages from /ws?format=json.
// No framework, no build step. Everything received is shown with textContent only:
// device data is untrusted.
"use strict";

(() => {
  const POLL_MS = 2000; // how often /status.json is read
  const WINDOW_MS = 60000; // sparklines show the last minute
  const TAIL_MAX = 200; // lines kept in the live tail
  const SHOW_MAX = 2000; // characters of one message shown
  const TOKEN_KEY = "relayd.token"; // sessionStorage only: gone when the tab closes
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const el = {
    state: $("state"), uptime: $("uptime"), clients: $("clients"), version: $("version"),
    notice: $("notice"), form: $("token-form"), tokenInput: $("token-input"),
    tokenError: $("token-error"), portsSection: $("ports-section"),
    tailSection: $("tail-section"), body: $("ports-body"), noPorts: $("no-ports"),
    filter: $("port-filter"), pause: $("pause"), clear: $("clear"), announce: $("announce"),
    tailState: $("tail-state"), tail: $("tail"),
  };

  const page = {
    token: readToken(),
    asking: false,
    pollTimer: 0,
    ports: new Map(), // port -> {row, cells, last, samples}
    ws: null,
    wsRetryAt: 0,
    wsFailures: 0,
    filter: "",
    paused: false,
    pending: [], // envelopes not rendered yet (at most TAIL_MAX)
    missed: 0, // lines that arrived while paused
    flushQueued: false,
  };

  // Token (token mode): kept in sessionStorage only (gone with the tab), never in the URL bar.

  function readToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null;
    }
  }

  function storeToken(token) {
    page.token = token;
    try {
      if (token === null) sessionStorage.removeItem(TOKEN_KEY);
      else sessionStorage.setItem(TOKEN_KEY, token);
    } catch {
      // storage disabled: keep the token in memory for this page only
    }
  }

  function askToken(error) {
    storeToken(null);
    closeSocket();
    page.asking = true;
    el.tokenError.textContent = error;
    el.form.hidden = false;
    el.portsSection.hidden = true;
    el.tailSection.hidden = true;
    setNotice("");
    el.tokenInput.focus();
  }

  el.form.addEventListener("submit", (event) => {
    event.preventDefault(); // never submitted: the token must not end up in a URL
    const token = el.tokenInput.value.trim();
    if (!token) return;
    el.tokenInput.value = "";
    storeToken(token);
    page.asking = false;
    el.form.hidden = true;
    el.portsSection.hidden = false;
    el.tailSection.hidden = false;
    poll();
  });

  // Status: /status.json every POLL_MS; rates from counter deltas.

  function setNotice(text) {
    if (el.notice.textContent !== text) el.notice.textContent = text;
  }

  function schedulePoll(ms) {
    clearTimeout(page.pollTimer);
    page.pollTimer = setTimeout(poll, ms);
  }

  async function poll() {
    clearTimeout(page.pollTimer);
    if (page.asking) return;
    const headers = { Accept: "application/json" };
    if (page.token) headers.Authorization = "Bearer " + page.token;
    let status;
    try {
      const resp = await fetch("/status.json", { headers, cache: "no-store" });
      if (resp.status === 401) {
        askToken(page.token ? "That token was not accepted. Enter another one." : "");
        return;
      }
      if (!resp.ok) throw new Error("/status.json answered " + resp.status);
      status = await resp.json();
    } catch (err) {
      setNotice("relayd is not reachable (" + err.message + "); retrying.");
      el.state.textContent = "unreachable";
      el.state.className = "bad";
      schedulePoll(POLL_MS);
      return;
    }
    setNotice("");
    render(status);
    ensureSocket();
    if (!document.hidden) schedulePoll(POLL_MS);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(page.pollTimer);
    else poll();
  });

  const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

  function formatRate(value) {
    if (value > 0 && value < 10) return value.toFixed(1);
    return numberFormat.format(value);
  }

  function formatBytes(value) {
    const units = ["B", "kB", "MB", "GB"];
    let i = 0;
    while (value >= 1000 && i < units.length - 1) {
      value /= 1000;
      i += 1;
    }
    return (i && value < 10 ? value.toFixed(1) : numberFormat.format(value)) + " " + units[i];
  }

  function formatUptime(seconds) {
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + (s % 60) + " s";
    return s + " s";
  }

  function text(node, value) {
    const str = String(value);
    if (node.textContent !== str) node.textContent = str;
  }

  function render(status) {
    text(el.state, status.state);
    el.state.className = status.state === "ready" ? "ok" : "warn";
    text(el.uptime, formatUptime(status.uptime_s));
    text(el.clients, status.ws_clients);
    text(el.version, status.version);
    const now = performance.now();
    const seen = new Set();
    for (const p of status.ports) {
      seen.add(p.port);
      let entry = page.ports.get(p.port);
      if (!entry) {
        entry = makeRow(p.port);
        page.ports.set(p.port, entry);
      }
      updateRow(entry, p, now);
      el.body.append(entry.row); // keeps the server's order (by port)
    }
    for (const [port, entry] of page.ports) {
      if (!seen.has(port)) {
        entry.row.remove();
        page.ports.delete(port);
      }
    }
    el.noPorts.hidden = status.ports.length > 0;
    updateFilter(status.ports);
  }

  const COLUMNS = [
    ["port", "Port"], ["name", "Name"], ["kind", "Kind"], ["state", "State"],
    ["connections", "Connections"], ["mps", "Messages/s"], ["bps", "Bytes/s"],
  ];

  function makeRow(port) {
    const row = document.createElement("tr");
    row.dataset.port = String(port);
    const cells = {};
    for (const [key, label] of COLUMNS) {
      const cell = document.createElement(key === "port" ? "th" : "td");
      if (key === "port") cell.scope = "row";
      cell.className = key;
      cell.dataset.label = label;
      row.append(cell);
      cells[key] = cell;
    }
    for (const key of ["mps", "bps"]) {
      const value = document.createElement("span");
      value.className = "value";
      const total = document.createElement("span");
      total.className = "total";
      const spark = document.createElementNS(SVG_NS, "svg");
      spark.setAttribute("class", "spark");
      spark.setAttribute("viewBox", "0 0 60 20");
      spark.setAttribute("preserveAspectRatio", "none");
      spark.setAttribute("aria-hidden", "true");
      spark.setAttribute("focusable", "false");
      const base = document.createElementNS(SVG_NS, "line");
      base.setAttribute("class", "base");
      for (const [name, value] of [["x1", "0"], ["y1", "19"], ["x2", "60"], ["y2", "19"]]) {
        base.setAttribute(name, value);
      }
      const line = document.createElementNS(SVG_NS, "polyline");
      spark.append(base, line);
      cells[key].append(spark, value, total);
      cells[key + "Value"] = value;
      cells[key + "Total"] = total;
      cells[key + "Line"] = line;
    }
    return { row, cells, last: null, samples: [] };
  }

  function updateRow(entry, p, now) {
    const c = entry.cells;
    text(c.port, p.port);
    text(c.name, p.name ?? "");
    text(c.kind, p.kind ?? "listen");
    text(c.state, p.state ?? "listening");
    text(c.connections, p.connections);
    const last = entry.last;
    if (last && p.messages_received >= last.messages && p.bytes_received >= last.bytes) {
      const dt = (now - last.t) / 1000;
      if (dt > 0) {
        entry.samples.push({
          t: now,
          mps: (p.messages_received - last.messages) / dt,
          bps: (p.bytes_received - last.bytes) / dt,
        });
      }
    } else if (last) {
      entry.samples = []; // counters went back: the port was removed and added again
    }
    entry.last = { t: now, messages: p.messages_received, bytes: p.bytes_received };
    while (entry.samples.length && now - entry.samples[0].t > WINDOW_MS) entry.samples.shift();
    const latest = entry.samples.length ? entry.samples[entry.samples.length - 1] : null;
    text(c.mpsValue, latest ? formatRate(latest.mps) : "…");
    text(c.bpsValue, latest ? formatBytes(latest.bps) + "/s" : "…");
    text(c.mpsTotal, numberFormat.format(p.messages_received) + " total");
    text(c.bpsTotal, formatBytes(p.bytes_received) + " total");
    drawSpark(c.mpsLine, entry.samples, "mps", now);
    drawSpark(c.bpsLine, entry.samples, "bps", now);
  }

  function drawSpark(line, samples, key, now) {
    let max = 0;
    for (const s of samples) max = Math.max(max, s[key]);
    const points = samples.map((s) => {
      const x = 60 - (now - s.t) / 1000;
      const y = max > 0 ? 19 - (s[key] / max) * 18 : 19;
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    line.setAttribute("points", points.join(" "));
  }

  function updateFilter(ports) {
    const wanted = new Map(ports.map((p) => [String(p.port), portLabel(p.port, p.name)]));
    for (const option of Array.from(el.filter.options)) {
      if (option.value && !wanted.has(option.value)) option.remove();
    }
    const have = new Set(Array.from(el.filter.options, (o) => o.value));
    for (const [value, label] of wanted) {
      if (!have.has(value)) el.filter.add(new Option(label, value));
    }
    if (page.filter && !wanted.has(page.filter)) setFilter(""); // that port is gone
  }

  // Live tail: /ws?format=json, like any other client, but written to in batches of
  // 250 ms: a person reads no faster, and relayd then writes to the page a few times
  // a second instead of on every message.

  function wsUrl() {
    const url = new URL("/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("format", "json");
    url.searchParams.set("batch_ms", "250");
    if (page.filter) url.searchParams.set("port", page.filter);
    if (page.token) url.searchParams.set("access_token", page.token); // browsers cannot set headers
    return url.href;
  }

  function ensureSocket() {
    if (page.ws || page.asking || Date.now() < page.wsRetryAt) return;
    const ws = new WebSocket(wsUrl());
    page.ws = ws;
    setTailState("connecting");
    ws.onopen = () => {
      page.wsFailures = 0;
      setTailState(page.paused ? "paused" : "live");
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      let envelope;
      try {
        envelope = JSON.parse(event.data);
      } catch {
        return;
      }
      receive(envelope);
    };
    ws.onclose = (event) => {
      if (page.ws !== ws) return; // replaced on purpose
      page.ws = null;
      page.wsFailures += 1;
      page.wsRetryAt = Date.now() + Math.min(1000 * 2 ** page.wsFailures, 15000);
      const reason = event.reason ? ": " + event.reason : "";
      setTailState("disconnected (" + event.code + reason + "); reconnecting");
      if (event.code === 1008) poll(); // token expired or revoked: find out now
    };
  }

  function closeSocket() {
    const ws = page.ws;
    page.ws = null;
    if (ws) ws.close(1000);
  }

  function setTailState(state) {
    let label = state;
    if (page.paused) {
      label = "paused, " + page.missed + " new line" + (page.missed === 1 ? "" : "s");
    }
    text(el.tailState, label);
  }

  function receive(envelope) {
    page.pending.push(envelope);
    if (page.pending.length > TAIL_MAX) page.pending.splice(0, page.pending.length - TAIL_MAX);
    if (page.paused) {
      page.missed += 1;
      setTailState("paused");
    } else if (!page.flushQueued) {
      page.flushQueued = true;
      requestAnimationFrame(flush); // at most one DOM update per frame, none in a hidden tab
    }
  }

  // Control characters and bidirectional overrides could disguise what a device sent.
  const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

  function hexOf(code, width) {
    return code.toString(16).padStart(width, "0");
  }

  function portLabel(port, name) {
    return name ? port + " " + name : String(port);
  }

  function visible(str) {
    const cut = str.length > SHOW_MAX ? str.slice(0, SHOW_MAX) : str;
    const shown = cut.replace(HIDDEN, (ch) => "\\u" + hexOf(ch.charCodeAt(0), 4));
    if (str.length <= SHOW_MAX) return shown;
    return shown + " … (" + (str.length - SHOW_MAX) + " more characters)";
  }

  function binary(b64) {
    let raw;
    try {
      raw = atob(b64);
    } catch {
      return "(binary)";
    }
    let bytes = "";
    for (let i = 0; i < Math.min(raw.length, 32); i += 1) {
      bytes += hexOf(raw.charCodeAt(i), 2) + " ";
    }
    return "(binary, " + raw.length + " bytes) " + bytes + (raw.length > 32 ? "…" : "");
  }

  function span(className, value) {
    const node = document.createElement("span");
    node.className = className;
    node.textContent = value;
    return node;
  }

  function lineFor(envelope) {
    const item = document.createElement("li");
    item.dataset.port = String(envelope.port);
    const when = new Date(envelope.ts);
    const time = isNaN(when)
      ? ""
      : when.toTimeString().slice(0, 8) + "." + String(when.getMilliseconds()).padStart(3, "0");
    const stamp = span("ts", time);
    if (typeof envelope.ts === "string") stamp.title = envelope.ts;
    const where = portLabel(envelope.port, envelope.name);
    const data = typeof envelope.data === "string"
      ? visible(envelope.data)
      : binary(String(envelope.data_b64 ?? ""));
    item.append(
      stamp, span("port", where), span("peer", String(envelope.peer ?? "")), span("data", data),
    );
    return item;
  }

  function flush() {
    page.flushQueued = false;
    if (page.paused || !page.pending.length) return;
    const tail = el.tail;
    const atBottom = tail.scrollHeight - tail.scrollTop - tail.clientHeight < 24;
    const fragment = document.createDocumentFragment();
    for (const envelope of page.pending) fragment.append(lineFor(envelope));
    page.pending = [];
    tail.append(fragment);
    while (tail.childElementCount > TAIL_MAX) tail.firstElementChild.remove();
    if (atBottom) tail.scrollTop = tail.scrollHeight;
  }

  function setFilter(value) {
    page.filter = value;
    el.filter.value = value;
    // Lines of other ports no longer belong; the server filters what comes next.
    for (const item of Array.from(el.tail.children)) {
      if (value && item.dataset.port !== value) item.remove();
    }
    page.pending = page.pending.filter((e) => !value || String(e.port) === value);
    closeSocket();
    page.wsRetryAt = 0;
    ensureSocket();
  }

  el.filter.addEventListener("change", () => setFilter(el.filter.value));

  el.pause.addEventListener("click", () => {
    page.paused = !page.paused;
    el.pause.setAttribute("aria-pressed", String(page.paused));
    el.pause.textContent = page.paused ? "Resume" : "Pause";
    page.missed = 0;
    setTailState(page.ws && page.ws.readyState === WebSocket.OPEN ? "live" : "connecting");
    if (!page.paused) flush();
  });

  el.clear.addEventListener("click", () => {
    el.tail.replaceChildren();
    page.pending = [];
    page.missed = 0;
    setTailState(page.ws ? "live" : "connecting");
  });

  el.announce.addEventListener("change", () => {
    // Off by default: a busy port would flood a screen reader.
    el.tail.setAttribute("aria-live", el.announce.checked ? "polite" : "off");
  });

  poll();
})();
