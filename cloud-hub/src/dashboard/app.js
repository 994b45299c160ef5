// fieldsync hub dashboard: vanilla JS over /api/v1, no build step, nothing
// fetched from outside the hub. The bearer token is kept in localStorage
// (key "fieldsync.token"); live updates come from the SSE stream
// /api/v1/events?access_token=... (EventSource cannot send headers).
"use strict";

const TOKEN_KEY = "fieldsync.token";
const app = document.getElementById("app");
let token = null;
let events = null;
let renderSeq = 0;

// A token in the URL (?token=..., or #token=... as `testbed up` prints it,
// which never reaches a server log) is stored, then removed from the
// address bar.
(function takeTokenFromUrl() {
  const params = new URLSearchParams(location.search);
  const fromQuery = params.get("token");
  const m = location.hash.match(/^#token=([^&]+)$/);
  const t = fromQuery || (m && decodeURIComponent(m[1]));
  if (t) {
    localStorage.setItem(TOKEN_KEY, t);
    history.replaceState(null, "", location.pathname + (m ? "#/" : location.hash));
  }
})();

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "—";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function fmtValue(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? `${status} ${body.code}: ${body.message}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, opts = {}) {
  const headers = { Authorization: `Bearer ${token}` };
  if (opts.body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method: opts.method || "GET",
    headers,
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
  });
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) {
    if (res.status === 401) showLogin("The token was refused (unknown or revoked).");
    throw new ApiError(res.status, body);
  }
  return body;
}

// Every item of a paginated list (up to `maxPages` pages of 500).
async function apiAll(path, maxPages = 20) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < maxPages; i++) {
    const sep = path.includes("?") ? "&" : "?";
    const url = `${path}${sep}limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
    const page = await api(url);
    items.push(...page.items);
    if (!page.next_cursor) break;
    cursor = page.next_cursor;
  }
  return items;
}

function showLogin(msg) {
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = msg || "";
  app.dataset.state = "login";
}

function setLive(on) {
  const el = document.getElementById("live");
  el.textContent = on ? "live" : "offline";
  el.className = `live ${on ? "on" : "off"}`;
}

let refreshTimer = null;
function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => render(), 300);
}

function connectEvents() {
  if (events) events.close();
  if (!window.EventSource) return;
  events = new EventSource(`/api/v1/events?access_token=${encodeURIComponent(token)}`);
  events.onopen = () => setLive(true);
  events.onerror = () => setLive(false);
  for (const kind of ["alarm", "command", "rollout", "device", "lagged"]) {
    events.addEventListener(kind, scheduleRefresh);
  }
  events.onmessage = scheduleRefresh;
}

// ---------- views ----------

function statusBadge(s) {
  const cls = { succeeded: "ok", failed: "bad", refused: "bad", expired: "warn", superseded: "warn", pending: "", delivered: "ok" }[s] ?? "";
  return `<span class="badge ${cls}">${esc(s)}</span>`;
}

function alarmRows(alarms, canAck = true) {
  if (!alarms.length) return `<p class="muted" id="no-alarms">No alarms.</p>`;
  return `<table id="alarms"><thead><tr><th>Severity</th><th>Site</th><th>Device</th><th>Message</th><th>Raised</th><th>State</th><th></th></tr></thead><tbody>${
    alarms.map((a) => {
      const sev = a.alarm.severity;
      const cls = sev === "critical" ? "bad" : sev === "warning" ? "warn" : "";
      const state = a.alarm.acked_by
        ? `<span class="badge ok acked">acknowledged by ${esc(a.alarm.acked_by)}</span>`
        : a.alarm.cleared_at ? `<span class="badge">cleared</span>` : `<span class="badge bad">active</span>`;
      const ack = canAck && !a.alarm.acked_by
        ? `<input class="reason" placeholder="reason" value="seen on dashboard"> <button class="ack" data-id="${esc(a.id)}">Acknowledge</button>`
        : "";
      return `<tr data-alarm="${esc(a.id)}"><td><span class="badge ${cls}">${esc(sev)}</span></td>
        <td><a href="#/site/${esc(a.tenant)}/${esc(a.site)}">${esc(a.tenant)}/${esc(a.site)}</a></td>
        <td><a href="#/device/${esc(`${a.tenant}:${a.site}:${a.alarm.device}`)}">${esc(a.alarm.device)}</a></td>
        <td>${esc(a.alarm.message)} <span class="muted">(${esc(a.alarm.metric)} = ${fmtValue(a.alarm.value)})</span></td>
        <td>${fmtTime(a.alarm.raised_at)}</td><td>${state}</td><td>${ack}</td></tr>`;
    }).join("")
  }</tbody></table>`;
}

function wireAck(root) {
  for (const b of root.querySelectorAll("button.ack")) {
    b.addEventListener("click", async () => {
      const reason = b.parentElement.querySelector("input.reason").value.trim() || "acknowledged on the dashboard";
      b.disabled = true;
      try {
        await api(`/api/v1/alarms/${encodeURIComponent(b.dataset.id)}/ack`, { method: "POST", body: { reason } });
        await render();
      } catch (e) {
        b.disabled = false;
        b.insertAdjacentHTML("afterend", `<span class="error">${esc(e.message)}</span>`);
      }
    });
  }
}

async function viewOverview() {
  const [health, sites, alarms, devices] = await Promise.all([
    api("/api/v1/health"),
    apiAll("/api/v1/sites"),
    apiAll("/api/v1/alarms?active=true"),
    apiAll("/api/v1/devices"),
  ]);
  const unacked = alarms.filter((a) => !a.alarm.acked_by).length;
  const bySite = {};
  for (const d of devices) {
    const k = `${d.key.tenant}/${d.key.site}`;
    bySite[k] = (bySite[k] || 0) + 1;
  }
  const edgesOf = (s) => health.edges.filter((e) => e.tenant === s.tenant && e.site === s.site);
  return `<h2>Fleet overview</h2>
    <div class="cards">
      <div class="card"><div class="n" id="sites-count">${sites.length}</div><div class="l">sites</div></div>
      <div class="card"><div class="n ok" id="edges-online">${health.online}</div><div class="l">edges online</div></div>
      <div class="card"><div class="n ${health.offline ? "bad" : ""}" id="edges-offline">${health.offline}</div><div class="l">edges offline</div></div>
      <div class="card"><div class="n ${alarms.length ? "bad" : ""}" id="alarms-active">${alarms.length}</div><div class="l">active alarms (${unacked} unacknowledged)</div></div>
      <div class="card"><div class="n">${devices.length}</div><div class="l">devices</div></div>
    </div>
    <h2>Sites</h2>
    <table id="sites"><thead><tr><th>Site</th><th>Name</th><th>Devices</th><th>Edges</th></tr></thead><tbody>${
      sites.map((s) => `<tr><td><a href="#/site/${esc(s.tenant)}/${esc(s.site)}">${esc(s.tenant)}/${esc(s.site)}</a></td>
        <td>${esc(s.name)}</td><td>${bySite[`${s.tenant}/${s.site}`] || 0}</td>
        <td>${edgesOf(s).map((e) => `<span class="badge ${e.online ? "ok" : "bad"}">${e.online ? "online" : "offline"}</span>`).join(" ") || '<span class="muted">none</span>'}</td></tr>`).join("")
    }</tbody></table>
    <h2>Edges</h2>
    <table id="edges"><thead><tr><th>Edge</th><th>Site</th><th>State</th><th>Last seen</th><th>Docs behind</th><th>Bytes queued</th></tr></thead><tbody>${
      health.edges.map((e) => `<tr><td title="${esc(e.endpoint)}"><code>${esc(e.endpoint.slice(0, 12))}…</code></td>
        <td>${esc(e.tenant)}/${esc(e.site)}</td>
        <td><span class="badge ${e.online ? "ok" : "bad"}">${e.online ? "online" : "offline"}</span></td>
        <td>${fmtTime(e.last_seen)}</td><td>${e.docs_behind}</td><td>${e.bytes_queued}</td></tr>`).join("")
    }</tbody></table>
    <h2>Active alarms</h2>${alarmRows(alarms)}`;
}

async function viewSite(tenant, site) {
  const q = `tenant=${encodeURIComponent(tenant)}&site=${encodeURIComponent(site)}`;
  const [devices, alarms, edges] = await Promise.all([
    apiAll(`/api/v1/devices?${q}`),
    apiAll(`/api/v1/alarms?${q}`),
    apiAll(`/api/v1/edges?${q}`),
  ]);
  return `<h2>Site ${esc(tenant)}/${esc(site)}</h2>
    <p>${edges.map((e) => `<span class="badge ${e.online ? "ok" : "bad"}">edge ${esc(e.endpoint.slice(0, 8))} ${e.online ? "online" : "offline"}</span>`).join(" ") || '<span class="muted">no edge known</span>'}</p>
    <table id="devices"><thead><tr><th>Device</th><th>Type</th><th>Health</th><th>Reported</th><th>Conflicts</th></tr></thead><tbody>${
      devices.map((d) => `<tr><td><a href="#/device/${esc(d.id)}">${esc(d.key.device)}</a></td><td>${esc(d.device_type)}</td>
        <td>${esc(d.reported.health.status)}</td><td>${fmtTime(d.reported_at)}</td>
        <td>${d.conflicts.length ? `<span class="badge warn">${d.conflicts.length}</span>` : "—"}</td></tr>`).join("")
    }</tbody></table>
    <h2>Alarms</h2>${alarmRows(alarms)}`;
}

// An SVG line chart of one series: mean per window, min..max band.
function chart(series) {
  const W = 800, H = 220, L = 48, R = 10, T = 12, B = 26;
  const pts = series.points.filter((p) => p.count > 0);
  if (!pts.length) return `<p class="muted">No points.</p>`;
  const xs = pts.map((p) => p.window_start);
  const lo = Math.min(...pts.map((p) => p.min)), hi = Math.max(...pts.map((p) => p.max));
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const sx = (x) => L + (x1 === x0 ? (W - L - R) / 2 : ((x - x0) / (x1 - x0)) * (W - L - R));
  const sy = (y) => T + (hi === lo ? (H - T - B) / 2 : (1 - (y - lo) / (hi - lo)) * (H - T - B));
  const mean = (p) => (p.mean ?? p.sum / p.count);
  const line = pts.map((p, i) => `${i ? "L" : "M"}${sx(p.window_start).toFixed(1)},${sy(mean(p)).toFixed(1)}`).join(" ");
  const band = pts.map((p, i) => `${i ? "L" : "M"}${sx(p.window_start).toFixed(1)},${sy(p.max).toFixed(1)}`).join(" ")
    + " " + pts.slice().reverse().map((p) => `L${sx(p.window_start).toFixed(1)},${sy(p.min).toFixed(1)}`).join(" ") + " Z";
  return `<div class="chart" data-metric="${esc(series.metric)}"><strong>${esc(series.metric)}</strong> <span class="muted">(${esc(series.unit)}, ${pts.length} points)</span>
    <svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none" role="img" aria-label="${esc(series.metric)} over time">
      <line class="axis" x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}"></line>
      <line class="axis" x1="${L}" y1="${T}" x2="${L}" y2="${H - B}"></line>
      <text x="2" y="${T + 8}">${esc(fmtValue(hi))}</text><text x="2" y="${H - B}">${esc(fmtValue(lo))}</text>
      <text x="${L}" y="${H - 6}">${esc(fmtTime(x0))}</text><text x="${W - R}" y="${H - 6}" text-anchor="end">${esc(fmtTime(x1))}</text>
      <path class="band" d="${band}"></path>
      <path class="line series" d="${line}"></path>
    </svg></div>`;
}

async function viewDevice(id, level) {
  const d = await api(`/api/v1/devices/${encodeURIComponent(id)}`);
  const q = `tenant=${encodeURIComponent(d.key.tenant)}&site=${encodeURIComponent(d.key.site)}&device=${encodeURIComponent(d.key.device)}`;
  const [series, alarms, commands] = await Promise.all([
    apiAll(`/api/v1/telemetry?${q}&level=${level}&group_by=device`),
    apiAll(`/api/v1/alarms?${q}`),
    apiAll(`/api/v1/commands?${q}`),
  ]);
  const levels = ["minute", "hour", "day"].map((l) => l === level ? `<b>${l}</b>` : `<a href="#/device/${esc(id)}?level=${l}">${l}</a>`).join(" · ");
  const desired = Object.entries(d.desired.fields);
  const readings = Object.entries(d.reported.values);
  return `<h2>Device ${esc(d.key.device)} <span class="muted">${esc(d.device_type)} at <a href="#/site/${esc(d.key.tenant)}/${esc(d.key.site)}">${esc(d.key.tenant)}/${esc(d.key.site)}</a></span></h2>
    <p>Tags: ${d.tags.map((t) => `<span class="badge">${esc(t)}</span>`).join(" ") || "—"} · health <b>${esc(d.reported.health.status)}</b> · reported ${fmtTime(d.reported_at)}</p>
    <h2>Telemetry</h2><p>Level: ${levels}</p>
    <div id="charts">${series.length ? series.map(chart).join("") : '<p class="muted">No telemetry.</p>'}</div>
    <h2>Desired</h2>
    <table id="desired"><thead><tr><th>Field</th><th>Value</th></tr></thead><tbody>${desired.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(fmtValue(v))}</td></tr>`).join("")}</tbody></table>
    ${d.conflicts.length ? `<h2>Conflicts</h2>${conflictTable([d])}` : ""}
    <h2>Reported</h2>
    <table><thead><tr><th>Value</th><th>Reading</th><th>At</th></tr></thead><tbody>${readings.map(([k, r]) => `<tr><td>${esc(k)}</td><td>${esc(fmtValue(r.value))}</td><td>${fmtTime(r.ts)}</td></tr>`).join("")}</tbody></table>
    <h2>Alarms</h2>${alarmRows(alarms)}
    <h2>Commands</h2>${commandTable(commands)}`;
}

function conflictTable(devices) {
  const rows = devices.flatMap((d) => d.conflicts.map((c) => `<tr><td><a href="#/device/${esc(d.id)}">${esc(d.id)}</a></td><td>${esc(c.field)}</td>
    <td>${c.values.map((v) => `<span class="badge warn">${esc(fmtValue(v))}</span>`).join(" ")}</td><td>${esc(c.policy)}</td><td><b>${esc(fmtValue(c.effective))}</b></td></tr>`));
  if (!rows.length) return `<p class="muted">No open conflicts.</p>`;
  return `<table id="conflicts"><thead><tr><th>Device</th><th>Field</th><th>Concurrent values</th><th>Policy</th><th>In force</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

async function viewConflicts() {
  const devices = await apiAll("/api/v1/devices");
  return `<h2>Open conflicts</h2>${conflictTable(devices.filter((d) => d.conflicts.length))}`;
}

function commandTable(commands) {
  if (!commands.length) return `<p class="muted">No commands.</p>`;
  commands.sort((a, b) => b.command.issued_at - a.command.issued_at);
  return `<table id="commands"><thead><tr><th>Id</th><th>Site</th><th>Target</th><th>Action</th><th>Issued</th><th>By</th><th>Status</th></tr></thead><tbody>${
    commands.map((c) => {
      const { action, ...rest } = c.command;
      const args = ["register", "field", "value"].filter((k) => k in rest).map((k) => `${k}=${fmtValue(rest[k])}`).join(" ");
      return `<tr><td><code>${esc(c.command.id)}</code></td><td>${esc(c.tenant)}/${esc(c.site)}</td><td>${esc(c.command.target)}</td>
        <td>${esc(action)} <span class="muted">${esc(args)}</span></td><td>${fmtTime(c.command.issued_at)}</td><td>${esc(c.command.issued_by)}</td>
        <td>${statusBadge(c.status)}${c.result && c.result.reason ? ` <span class="muted">${esc(c.result.reason)}</span>` : ""}</td></tr>`;
    }).join("")
  }</tbody></table>`;
}

async function viewCommands() {
  return `<h2>Commands</h2>${commandTable(await apiAll("/api/v1/commands"))}`;
}

async function viewRollouts() {
  const rollouts = await apiAll("/api/v1/rollouts");
  if (!rollouts.length) return `<h2>Rollouts</h2><p class="muted">No rollouts.</p>`;
  return `<h2>Rollouts</h2><table id="rollouts"><thead><tr><th>Id</th><th>State</th><th>Changes</th><th>Cohort</th><th>Canary</th><th>Created</th><th>By</th></tr></thead><tbody>${
    rollouts.map((r) => {
      const st = r.state.state;
      const cls = st === "completed" ? "ok" : ["rolled_back", "aborted"].includes(st) ? "bad" : "warn";
      const changes = Object.entries(r.spec.changes).map(([k, v]) => `${k}=${fmtValue(v)}`).join(", ");
      return `<tr><td><code>${esc(r.spec.id)}</code></td><td><span class="badge ${cls}">${esc(st)}</span></td><td>${esc(changes)}</td>
        <td>${r.members.length} devices</td><td>${r.spec.canary_percent}%</td><td>${fmtTime(r.created_at)}</td><td>${esc(r.spec.created_by)}</td></tr>`;
    }).join("")
  }</tbody></table>`;
}

async function viewAudit() {
  const recs = await apiAll("/api/v1/audit");
  recs.sort((a, b) => b.seq - a.seq);
  return `<h2>Audit log</h2><table id="audit"><thead><tr><th>#</th><th>Time</th><th>Actor</th><th>Action</th><th>Target</th><th>Reason</th></tr></thead><tbody>${
    recs.map((r) => `<tr><td>${r.seq}</td><td>${fmtTime(r.at)}</td><td>${esc(r.actor)}</td><td><code>${esc(r.action)}</code></td><td>${esc(r.target)}</td><td>${esc(r.reason)}</td></tr>`).join("")
  }</tbody></table>`;
}

// ---------- routing ----------

function route() {
  const h = location.hash.replace(/^#/, "") || "/";
  const [path, query] = h.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  switch (parts[0]) {
    case undefined: return ["overview", () => viewOverview()];
    case "site": return ["site", () => viewSite(parts[1], parts[2])];
    case "device": return ["device", () => viewDevice(parts[1], params.get("level") || "minute")];
    case "conflicts": return ["conflicts", () => viewConflicts()];
    case "rollouts": return ["rollouts", () => viewRollouts()];
    case "commands": return ["commands", () => viewCommands()];
    case "audit": return ["audit", () => viewAudit()];
    default: return ["notfound", async () => `<p class="error">No page ${esc(h)}.</p>`];
  }
}

async function render() {
  if (!token) return showLogin();
  const seq = ++renderSeq;
  const [name, view] = route();
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.getAttribute("href") === location.hash || (name === "overview" && a.getAttribute("href") === "#/"));
  }
  try {
    const html = await view();
    if (seq !== renderSeq) return; // a newer render started
    app.innerHTML = html;
    app.dataset.view = name;
    app.dataset.state = "ready";
    wireAck(app);
  } catch (e) {
    if (seq !== renderSeq) return;
    app.innerHTML = `<p class="error">${esc(e.message)}</p>`;
    app.dataset.state = "error";
  }
}

document.getElementById("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = document.getElementById("token-input").value.trim();
  if (!t) return;
  localStorage.setItem(TOKEN_KEY, t);
  token = t;
  document.getElementById("login").hidden = true;
  connectEvents();
  render();
});

document.getElementById("logout").addEventListener("click", () => {
  localStorage.removeItem(TOKEN_KEY);
  token = null;
  if (events) events.close();
  setLive(false);
  app.innerHTML = "";
  showLogin();
});

window.addEventListener("hashchange", render);

token = localStorage.getItem(TOKEN_KEY);
if (token) {
  connectEvents();
  render();
} else {
  showLogin();
}
