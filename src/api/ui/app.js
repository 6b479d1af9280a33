// The live page: polls /ui/state.json every second and derives each
// limit's rates from two successive snapshots of its counters. Text is
// only ever set through textContent, so nothing from the config or the
// server is parsed as markup.
"use strict";

const POLL_MS = 1000;
const HISTORY = 60;
let previous = null;
const history = new Map(); // limit name -> refused/s samples, oldest first

const $ = (id) => document.getElementById(id);

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, empty) {
  const body = $(tableId).tBodies[0];
  const columns = $(tableId).tHead.rows[0].cells.length;
  const fresh = document.createElement("tbody");
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = columns;
    tr.append(td);
    fresh.append(tr);
  }
  for (const r of rows) fresh.append(r);
  body.replaceWith(fresh);
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.append(c);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") tr.className = v;
    else tr.dataset[k] = v;
  }
  return tr;
}

function rate(n) {
  return n >= 100 ? n.toFixed(0) : n.toFixed(1);
}

function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function clock(ms) {
  return ms ? new Date(ms).toLocaleTimeString([], { hour12: false }) : "–";
}

function quota(l) {
  if (l.capacity !== undefined) return l.capacity + " burst, " + l.refill_per_sec + "/s";
  if (l.limit !== undefined) return l.limit + " per " + l.window;
  return "";
}

function sparkline(samples) {
  const ns = "http://www.w3.org/2000/svg";
  const w = 120, h = 22;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  const base = document.createElementNS(ns, "line");
  base.setAttribute("x1", 0);
  base.setAttribute("x2", w);
  base.setAttribute("y1", h - 1);
  base.setAttribute("y2", h - 1);
  svg.append(base);
  const max = Math.max(1, ...samples);
  const step = w / (HISTORY - 1);
  const offset = HISTORY - samples.length;
  const points = samples.map((v, i) =>
    ((offset + i) * step).toFixed(1) + "," + (h - 1 - (v / max) * (h - 3)).toFixed(1));
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return svg;
}

function badge(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  el.className = "badge" + (cls ? " " + cls : "");
}

function render(s) {
  const config = s.config || {};
  badge("version", "config v" + config.version);
  badge("backend", "state: " + s.state_backend);
  badge("mode", "stream: " + s.stream.mode);
  badge("ready", s.ready ? "ready" : "not ready", s.ready ? "ok" : "bad");

  const seconds = previous ? (s.now_ms - previous.now_ms) / 1000 : 0;
  const before = new Map((previous ? previous.limits : []).map((l) => [l.name, l]));
  const docs = new Map((config.limits || []).map((l) => [l.name, l]));
  const rows = s.limits.map((c) => {
    const doc = docs.get(c.name) || {};
    const p = before.get(c.name);
    // A counter that went down belongs to a limit removed and added again.
    const valid = p && seconds > 0 && c.allowed >= p.allowed && c.refused >= p.refused;
    const allowedRate = valid ? (c.allowed - p.allowed) / seconds : null;
    const refused = doc.shadow ? c.shadow_refused : c.refused;
    const refusedBefore = p ? (doc.shadow ? p.shadow_refused : p.refused) : 0;
    const refusedRate = valid && refused >= refusedBefore ? (refused - refusedBefore) / seconds : null;
    const samples = history.get(c.name) || [];
    if (refusedRate !== null) {
      samples.push(refusedRate);
      if (samples.length > HISTORY) samples.shift();
    }
    history.set(c.name, samples);
    return row(
      [
        cell(c.name),
        cell(doc.algorithm),
        cell((doc.key || []).join(", ") || "(global)"),
        cell(quota(doc)),
        cell(allowedRate === null ? null : rate(allowedRate), "num allowed rate-allowed"),
        cell(refusedRate === null ? null : rate(refusedRate), "num refused rate-refused"),
        cell(c.allowed, "num total-allowed"),
        cell(refused, "num total-refused"),
        (() => { const td = cell(""); td.append(sparkline(samples)); return td; })(),
      ],
      { limit: c.name, class: doc.shadow ? "shadow" : "" },
    );
  });
  for (const name of history.keys()) if (!docs.has(name)) history.delete(name);
  fill("limits", rows, "no limits configured");

  fill("top", s.top_refused.map((t) => row(
    [cell(t.limit), cell(t.key_fp, "fp"), cell(t.refused, "num refused"), cell(ago(t.age_ms), "num")],
    { keyFp: t.key_fp, class: t.shadow ? "shadow" : "" },
  )), "no key is being refused");

  fill("breaches", s.breaches.map((b) => row(
    [cell(clock(b.at_ms)), cell(b.kind, b.kind === "started" ? "refused" : "allowed"),
      cell(b.limit), cell(b.key_fp, "fp"), cell(b.refused, "num")],
    { keyFp: b.key_fp, class: b.shadow ? "shadow" : "" },
  )), "none yet");

  const st = s.stream;
  $("stream-note").textContent = {
    embedded: "Embedded bus (POST /events). Output keys are shown as fingerprints.",
    kafka: "Kafka consumer group; decisions and alerts are on their topics.",
    none: "Not running.",
  }[st.mode] || "";
  fill("partitions", st.partitions.map((p) => row(
    [cell(p.partition), cell(p.epoch, "num"), cell(p.next_offset, "num"), cell(p.lag, "num")],
    { partition: p.partition },
  )), "no partition owned");
  fill("decisions", (st.decisions || []).map((d) => row(
    [cell(clock(d.at_ms)), cell(d.action, d.action === "BLOCK" || d.action === "DENY" ? "refused" : "allowed"),
      cell(d.limit), cell(d.key_fp, "fp")],
    { keyFp: d.key_fp },
  )), st.decisions ? "none yet" : "on the decisions topic");
  fill("alerts", (st.alerts || []).map((a) => row(
    [cell(clock(a.at_ms)), cell(a.severity, a.severity === "CRITICAL" ? "refused" : "shadow"),
      cell(a.limit), cell(a.key_fp, "fp"), cell(a.refused, "num")],
    { keyFp: a.key_fp },
  )), st.alerts ? "none yet" : "on the alerts topic");

  $("updated").textContent = "updated " + clock(s.now_ms);
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  previous = s;
}

async function poll() {
  let state = null;
  try {
    const r = await fetch("/ui/state.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    state = await r.json();
  } catch (e) {
    $("updated").textContent = "disconnected (" + e.message + "), retrying";
  }
  setTimeout(poll, POLL_MS);
  // Outside the try: a bug in render is an error in the console, not a
  // "disconnected".
  if (state) render(state);
}

poll();
