// vmfleet's browser view: the fleet's hosts and instances, kept current from GET /events,
// and the log stream of the instance that is clicked. A plain script: no build step.
//
// Auth: every API route wants "Authorization: Bearer <token>". EventSource cannot send
// headers, so both event streams are read with fetch() and a ReadableStream reader, which
// can. The token comes from the URL fragment (#token=..., which browsers never send to a
// server; it is removed from the address bar at once) or from the form, lives in this
// tab's sessionStorage, and is sent only in that header, only to this origin.
"use strict";

(() => {
  const TOKEN_KEY = "vmfleet.token";
  const HOSTS_REFRESH_MS = 5000;
  const RECONNECT_MAX_MS = 15000;
  const LOG_TAIL = 200;
  const MAX_LOG_LINES = 5000;
  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}
  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const fleet = { hosts: new Map(), instances: new Map(), selected: null };
  let token = null;
  let session = null; // AbortController: everything done with the current token
  let logStream = null; // AbortController of the open log stream

  // -- token ---------------------------------------------------------------------------------

  function tokenFromFragment() {
    if (!location.hash) return null;
    const value = new URLSearchParams(location.hash.slice(1)).get("token");
    if (value === null) return null;
    history.replaceState(null, "", location.pathname + location.search);
    return value.trim() || null;
  }

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (value) {
        sessionStorage.setItem(TOKEN_KEY, value);
        connect(value);
      }
    });
    $("logout").addEventListener("click", () => logout(""));
    $("logs-close").addEventListener("click", closeLogs);
    $("logs-source").addEventListener("change", () => {
      if (fleet.selected) openLogs(fleet.selected);
    });
    const fromFragment = tokenFromFragment();
    if (fromFragment) sessionStorage.setItem(TOKEN_KEY, fromFragment);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) connect(saved);
    else showLogin("");
  }

  function connect(value) {
    token = value;
    if (session) session.abort();
    session = new AbortController();
    const signal = session.signal;
    $("login").hidden = true;
    $("fleet").hidden = false;
    $("logout").hidden = false;
    setStatus("connecting…");
    followEvents(signal).catch((err) => failed(err, signal));
    refreshHostsForever(signal).catch((err) => failed(err, signal));
  }

  function failed(err, signal) {
    if (signal.aborted) return;
    if (err instanceof AuthError) logout(err.message);
    else setStatus("error: " + err.message, true);
  }

  function logout(message) {
    if (session) session.abort();
    session = null;
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    closeLogs();
    fleet.hosts.clear();
    fleet.instances.clear();
    render();
    showLogin(message);
  }

  function showLogin(message) {
    $("fleet").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message ? "The gateway refused the token: " + message : "";
    setStatus("not connected");
    $("token").focus();
  }

  // -- the API -------------------------------------------------------------------------------

  async function request(path, signal, accept, extraHeaders = {}) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: accept, ...extraHeaders },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
      signal,
    });
    if (response.ok) return response;
    let code = String(response.status);
    let message = response.statusText;
    try {
      const body = await response.json();
      code = body.code || code;
      message = body.message || message;
    } catch (_) {
      // not the API's JSON error: keep the status line
    }
    if (response.status === 401) throw new AuthError(message);
    throw new ApiError(response.status, code, code + ": " + message);
  }

  async function getJSON(path, signal) {
    return (await request(path, signal, "application/json")).json();
  }

  // Reads one text/event-stream response to its end, calling onEvent({id, data}) for each
  // event (the HTML standard's parsing rules; comments such as keep-alives are skipped).
  async function readEvents(response, onEvent) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    let lastId = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (data.length) onEvent({ id: lastId, data: data.join("\n") });
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let fieldValue = colon < 0 ? "" : line.slice(colon + 1);
        if (fieldValue.startsWith(" ")) fieldValue = fieldValue.slice(1);
        if (field === "data") data.push(fieldValue);
        else if (field === "id" && !fieldValue.includes("\0")) lastId = fieldValue;
      }
    }
  }

  function sleep(ms, signal) {
    if (signal.aborted) return Promise.reject(signal.reason);
    return new Promise((resolve, reject) => {
      const aborted = () => {
        clearTimeout(timer);
        reject(signal.reason);
      };
      const timer = setTimeout(() => {
        signal.removeEventListener("abort", aborted);
        resolve();
      }, ms);
      signal.addEventListener("abort", aborted, { once: true });
    });
  }

  // An AbortController that is aborted with `signal`, and lets go of it once aborted.
  function child(signal) {
    const controller = new AbortController();
    if (signal.aborted) {
      controller.abort();
      return controller;
    }
    const forward = () => controller.abort();
    signal.addEventListener("abort", forward, { once: true });
    controller.signal.addEventListener("abort", () => signal.removeEventListener("abort", forward));
    return controller;
  }

  // -- the fleet -----------------------------------------------------------------------------

  // The event stream first, then the snapshot: events that arrive while the snapshot loads
  // wait in the response body and are applied after it, so none is lost. A dropped stream
  // is reopened after the last event it delivered (Last-Event-ID), with a fresh snapshot.
  async function followEvents(signal) {
    let lastEventId = null;
    let delay = 1000;
    while (!signal.aborted) {
      const attempt = child(signal);
      try {
        const headers = lastEventId === null ? {} : { "Last-Event-ID": lastEventId };
        const response = await request("/events", attempt.signal, "text/event-stream", headers);
        await loadSnapshot(attempt.signal);
        setStatus("live");
        delay = 1000;
        await readEvents(response, (event) => {
          if (event.id !== null) lastEventId = event.id;
          applyEvent(JSON.parse(event.data));
          renderSoon();
        });
        setStatus("the event stream ended; reconnecting…", true);
      } catch (err) {
        if (signal.aborted || err instanceof AuthError) throw err;
        setStatus("lost the gateway (" + err.message + "); reconnecting…", true);
      } finally {
        attempt.abort();
      }
      await sleep(delay, signal);
      delay = Math.min(delay * 2, RECONNECT_MAX_MS);
    }
  }

  async function loadSnapshot(signal) {
    const [hosts, instances] = await Promise.all([
      getJSON("/hosts", signal),
      getJSON("/instances", signal),
    ]);
    setHosts(hosts);
    setInstances(instances);
    render();
  }

  // Host capacity is not in the event stream: read it as often as hosts heartbeat. When a
  // host comes or goes, instance states change without an event (a gateway shows the
  // instances of an unreachable host as Unknown), so the instances are read again too.
  async function refreshHostsForever(signal) {
    for (;;) {
      await sleep(HOSTS_REFRESH_MS, signal);
      try {
        const before = hostIds();
        setHosts(await getJSON("/hosts", signal));
        if (hostIds() !== before) setInstances(await getJSON("/instances", signal));
        render();
      } catch (err) {
        if (signal.aborted || err instanceof AuthError) throw err;
        // the event stream's loop reports outages
      }
    }
  }

  function hostIds() {
    return [...fleet.hosts.keys()].sort().join(",");
  }

  function setHosts(list) {
    fleet.hosts = new Map(list.map((host) => [host.id, host]));
  }

  function setInstances(list) {
    fleet.instances = new Map(list.map((instance) => [instance.id, instance]));
  }

  function applyEvent(event) {
    const id = event.instance_id;
    if (event.deleted) {
      fleet.instances.delete(id);
      return;
    }
    const known = fleet.instances.get(id);
    if (known) {
      known.state = event.state;
      known.state_error = event.error ?? null;
      known.host = event.host;
      if (event.name) known.name = event.name;
      if (event.health) known.health_status = { ...(known.health_status || {}), status: event.health };
      // A transition may set or clear the exit code, count a restart or move the expiry:
      // those are in the record, not the event.
      if (event.kind !== "health") fillInstance(id, session.signal);
      return;
    }
    fleet.instances.set(id, {
      id, name: event.name, host: event.host, state: event.state,
      state_error: event.error ?? null, image: "", created_at: null,
    });
    fillInstance(id, session.signal);
  }

  // A new instance's event names it; its record has the rest (image, creation time, exit
  // code, health, restarts, expiry). The state stays the one the events say.
  async function fillInstance(id, signal) {
    try {
      const record = await getJSON("/instances/" + encodeURIComponent(id), signal);
      const current = fleet.instances.get(id);
      if (!current) return;
      fleet.instances.set(id, { ...record, state: current.state, state_error: current.state_error });
      render();
    } catch (err) {
      if (!signal.aborted && err instanceof AuthError) logout(err.message);
      // anything else (404: deleted meanwhile) leaves the row as the event made it
    }
  }

  // -- logs ----------------------------------------------------------------------------------

  function openLogs(id) {
    if (logStream) logStream.abort();
    fleet.selected = id;
    render();
    const record = fleet.instances.get(id);
    $("logs").hidden = false;
    $("logs-title").textContent = (record && record.name ? record.name : id) + " (" + id.slice(0, 12) + ")";
    const lines = $("logs-lines");
    lines.textContent = "";
    const source = $("logs-source").value;
    const controller = child(session.signal);
    logStream = controller;
    setLogsStatus("connecting…");
    const path = "/instances/" + encodeURIComponent(id) + "/logs?follow=true&tail=" + LOG_TAIL +
      "&source=" + encodeURIComponent(source);
    (async () => {
      const response = await request(path, controller.signal, "text/event-stream");
      setLogsStatus("following " + source + " (last " + LOG_TAIL + " lines, then new ones)");
      await readEvents(response, (event) => appendLine(lines, JSON.parse(event.data)));
      setLogsStatus("the log stream ended (the instance is gone, or the gateway stopped)");
    })().catch((err) => {
      if (controller.signal.aborted) return;
      if (err instanceof AuthError) logout(err.message);
      else setLogsStatus("error: " + err.message);
    });
  }

  function appendLine(pre, line) {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(line + "\n");
    while (pre.childNodes.length > MAX_LOG_LINES) pre.firstChild.remove();
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  function closeLogs() {
    if (logStream) logStream.abort();
    logStream = null;
    fleet.selected = null;
    $("logs").hidden = true;
    $("logs-lines").textContent = "";
    render();
  }

  function setLogsStatus(text) {
    $("logs-status").textContent = text;
  }

  // -- rendering (text only: nothing from the API is ever parsed as HTML) --------------------

  function setStatus(text, bad = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", bad);
  }

  function cell(row, text, className) {
    const td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function emptyRow(body, columns, text) {
    const row = body.insertRow();
    row.className = "empty";
    const td = row.insertCell();
    td.colSpan = columns;
    td.textContent = text;
  }

  let renderTimer = null;

  // A burst of events (a drain putting a host's instances in standby) renders once.
  function renderSoon() {
    if (renderTimer === null) renderTimer = setTimeout(render, 30);
  }

  function render() {
    clearTimeout(renderTimer);
    renderTimer = null;
    renderHosts();
    renderInstances();
  }

  function renderHosts() {
    const body = $("hosts").tBodies[0];
    body.replaceChildren();
    const hosts = [...fleet.hosts.values()].sort((a, b) => a.id.localeCompare(b.id));
    $("host-count").textContent = "(" + hosts.length + ")";
    if (!hosts.length) emptyRow(body, 8, "no live host");
    for (const host of hosts) {
      const row = body.insertRow();
      row.dataset.hostId = host.id;
      cell(row, host.id, "mono");
      cell(row, host.drained ? "drained" : "ready", host.drained ? "drained" : "");
      cell(row, host.accel || "");
      cell(row, String(host.instances ?? 0), "num");
      cell(row, (host.vcpus_allocated ?? 0) + " / " + (host.vcpus_total ?? 0), "num");
      cell(row, bytes(host.memory_allocated_bytes) + " / " + bytes(host.memory_total_bytes), "num");
      cell(row, bytes(host.disk_free_bytes) + " of " + bytes(host.disk_total_bytes), "num");
      cell(row, Object.entries(host.labels || {}).map(([k, v]) => k + "=" + v).join(", "));
    }
  }

  function renderInstances() {
    const body = $("instances").tBodies[0];
    const focused = body.contains(document.activeElement) ? document.activeElement.dataset.instanceId : null;
    body.replaceChildren();
    const instances = [...fleet.instances.values()].sort(
      (a, b) => (a.name || "").localeCompare(b.name || "") || a.id.localeCompare(b.id));
    $("instance-count").textContent = "(" + instances.length + ")";
    if (!instances.length) emptyRow(body, 10, "no instance");
    for (const instance of instances) {
      const row = body.insertRow();
      row.dataset.instanceId = instance.id;
      row.dataset.state = instance.state;
      row.tabIndex = 0;
      if (instance.id === fleet.selected) row.className = "selected";
      row.addEventListener("click", () => openLogs(instance.id));
      row.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          openLogs(instance.id);
        }
      });
      cell(row, instance.name || "");
      cell(row, instance.id.slice(0, 12), "mono").title = instance.id;
      cell(row, instance.image || "");
      const state = document.createElement("span");
      state.className = "state state-" + instance.state;
      state.textContent = instance.state;
      if (instance.state_error) state.title = instance.state_error;
      row.insertCell().append(state);
      supervisionCells(row, instance);
      cell(row, instance.host || "", "mono");
      cell(row, age(instance.created_at), "num");
      if (instance.id === focused) row.focus();
    }
  }

  // Health, exit code, restarts and expiry: empty where the instance has none to show.
  function supervisionCells(row, instance) {
    const health = instance.health_status?.status;
    const shown = health && health !== "disabled" ? health : "";
    const healthCell = cell(row, shown, "health" + (shown ? " health-" + shown : ""));
    if (instance.health_status?.last_error) healthCell.title = instance.health_status.last_error;
    const exit = cell(row, instance.exit_code == null ? "" : String(instance.exit_code), "num exit");
    if (instance.exit_message) exit.title = instance.exit_message;
    const restarts = cell(row, restartsText(instance.restart_status), "restarts");
    if (instance.restart_status?.last_reason) restarts.title = instance.restart_status.last_reason;
    const expires = cell(row, instance.expires_at ? until(instance.expires_at) : "", "num expires");
    if (instance.expires_at) expires.title = instance.expires_at;
    cell(row, autoStandbyText(instance.auto_standby), "num standby");
  }

  // The policy: "after 30s" (idle that long, the instance goes to standby), "off", or "".
  function autoStandbyText(policy) {
    if (!policy) return "";
    return policy.enabled ? "after " + policy.idle_timeout : "off";
  }

  function restartsText(status) {
    if (!status) return "";
    if (status.blocked_reason) return status.attempts + " (blocked: " + status.blocked_reason + ")";
    if (status.next_attempt_at) return status.attempts + " (next in " + until(status.next_attempt_at) + ")";
    return String(status.attempts);
  }

  // "in 5m" style, or "expired"/"now" once the time has passed.
  function until(timestamp) {
    const seconds = (Date.parse(timestamp) - Date.now()) / 1000;
    if (!(seconds > 0)) return "now";
    return "in " + span(seconds);
  }

  function span(seconds) {
    if (seconds < 60) return Math.floor(seconds) + "s";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m";
    if (seconds < 86400) return Math.floor(seconds / 3600) + "h";
    return Math.floor(seconds / 86400) + "d";
  }

  function bytes(n) {
    if (!n) return "0";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (n >= 10 || i === 0 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
  }

  function age(timestamp) {
    if (!timestamp) return "";
    return span(Math.max(0, (Date.now() - Date.parse(timestamp)) / 1000));
  }

  start();
})();
