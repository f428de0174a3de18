// hopwatch web view: findings (live, filterable), one trace's chain with its break marked,
// and the service graph. Plain JavaScript, no library, no external asset (works offline).
"use strict";

const POLL_FINDINGS_MS = 2000;
const POLL_GRAPH_MS = 5000;

const state = { breaks: [], known: new Set(), loaded: false, selected: null, trace: null };

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function ago(ms) {
  if (!ms) return "-";
  const s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
  if (s < 60) return s + "s ago";
  if (s < 3600) return Math.floor(s / 60) + "m ago";
  if (s < 86400) return Math.floor(s / 3600) + "h ago";
  return Math.floor(s / 86400) + "d ago";
}

// ------------------------------------------------------------------ findings

function filters() {
  return {
    namespace: $("#f-namespace").value,
    workload: $("#f-workload").value,
    kind: $("#f-kind").value,
    severity: $("#f-severity").value,
  };
}

function matches(b, f) {
  return (!f.namespace || b.namespace === f.namespace) &&
    (!f.workload || b.workload === f.workload || b.peer === f.workload) &&
    (!f.kind || b.kind === f.kind) &&
    (!f.severity || b.severity === f.severity);
}

function fillSelect(sel, values) {
  const cur = sel.value;
  const have = new Set([...sel.options].map((o) => o.value));
  for (const v of [...values].sort()) {
    if (!have.has(v)) sel.append(el("option", { value: v }, v));
  }
  sel.value = cur;
}

function renderFindings() {
  const f = filters();
  fillSelect($("#f-namespace"), new Set(state.breaks.map((b) => b.namespace).filter(Boolean)));
  fillSelect($("#f-workload"), new Set(state.breaks.map((b) => b.workload).filter(Boolean)));
  fillSelect($("#f-kind"), new Set(state.breaks.map((b) => b.kind)));
  const shown = state.breaks.filter((b) => matches(b, f));
  const tbody = $("#findings tbody");
  tbody.replaceChildren(...shown.map((b) => {
    const isNew = state.loaded && !state.known.has(b.id);
    const tr = el("tr", {
      class: "finding" + (isNew ? " new" : "") + (state.selected === b.id ? " selected" : ""),
      dataset: { id: b.id, kind: b.kind, severity: b.severity, namespace: b.namespace, workload: b.workload },
      title: b.hint,
      onclick: () => selectFinding(b),
    },
      el("td", { class: "sev sev-" + b.severity }, b.severity),
      el("td", { class: "kind" }, b.kind),
      el("td", {}, b.namespace || "-"),
      el("td", { class: "workload" }, b.workload || "-"),
      el("td", {}, b.peer || "-"),
      el("td", { class: "count" }, b.count),
      el("td", {}, (b.flags || []).join(",") || "-"),
      el("td", {}, ago(b.last_seen_unix_ms)),
      el("td", { class: "summary" }, b.summary));
    return tr;
  }));
  for (const b of state.breaks) state.known.add(b.id);
  state.loaded = true;
  $("#count").textContent = shown.length === state.breaks.length
    ? `(${state.breaks.length})` : `(${shown.length} of ${state.breaks.length})`;
  $("#no-findings").hidden = shown.length > 0;
}

async function refreshFindings() {
  try {
    const r = await fetch("/api/breaks", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    state.breaks = await r.json();
    renderFindings();
    $("#status").textContent = "live · updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("#status").textContent = "collector unreachable (" + e.message + "), retrying…";
  }
}

function selectFinding(b) {
  state.selected = b.id;
  for (const tr of document.querySelectorAll("tr.finding")) tr.classList.toggle("selected", tr.dataset.id === b.id);
  if (b.trace_ids && b.trace_ids.length) showTrace(b.trace_ids[0]);
}

// ------------------------------------------------------------------ trace

function showTrace(id) {
  if (location.hash !== "#trace=" + encodeURIComponent(id)) {
    history.replaceState(null, "", "#trace=" + encodeURIComponent(id));
  }
  loadTrace(id);
}

function hopDetails(h, side) {
  if (!h) return null;
  const code = h.response_code;
  const flags = (h.response_flags || []).filter((x) => x && x !== "-");
  const tag = side === "out" ? h.tag_sent : h.tag_received;
  return el("div", { class: "hop " + side },
    el("b", {}, side === "out" ? h.workload + " outbound" : h.workload + " inbound"), " ",
    el("span", { class: "chip tag", title: "tag (source)" }, "tag=" + (tag || "∅") + (h.tag_source ? " (" + h.tag_source + ")" : "")),
    el("span", { class: "chip trace", title: h.trace_detail || "trace classification" }, "trace=" + (h.trace_context || "?")),
    el("span", { class: "chip code " + (code >= 500 || flags.length ? "code-bad" : "code-ok") }, code || "-"),
    flags.map((f) => el("span", { class: "chip flag", title: h.response_code_details || "" }, f)),
    h.response_code_details && h.response_code_details !== "via_upstream"
      ? el("span", { class: "mono" }, " " + h.response_code_details) : null,
    (h.missing_trace_headers || []).length ? el("span", { class: "muted" }, " missing: " + h.missing_trace_headers.join(", ")) : null);
}

function renderNode(n, severities) {
  const breaks = n.breaks || [];
  const sev = breaks.map((k) => severities[k] || "ERROR");
  const warnOnly = sev.length > 0 && sev.every((s) => s !== "ERROR");
  const h = n.inbound || n.outbound || {};
  const dur = h.duration_micros ? (h.duration_micros / 1000).toFixed(1) + "ms" : "";
  const li = el("li", {
    class: "call" + (breaks.length ? " broken" : "") + (warnOnly ? " warn" : ""),
    dataset: { breaks: breaks.join(","), call: n.call },
  },
    el("span", { class: "line" },
      el("b", {}, n.call), " ", el("span", { class: "mono" }, (h.method || "") + " " + (h.path || "")), " ", dur,
      breaks.length ? el("span", { class: "mark" }, "✗ " + breaks.join(", ")) : null),
    hopDetails(n.outbound, "out"),
    hopDetails(n.inbound, "in"));
  if (n.children && n.children.length) li.append(el("ul", {}, n.children.map((c) => renderNode(c, severities))));
  return li;
}

async function loadTrace(id) {
  $("#trace-id").textContent = id;
  $("#trace-help").hidden = true;
  const box = $("#trace");
  try {
    const r = await fetch("/api/trace/" + encodeURIComponent(id), { cache: "no-store" });
    if (!r.ok) {
      box.replaceChildren(el("p", { class: "muted" }, r.status === 404
        ? "Trace " + id + " is not held any more (analysed too long ago) or unknown." : "Error: HTTP " + r.status));
      return;
    }
    const t = await r.json();
    state.trace = t;
    const severities = {};
    for (const b of t.breaks) severities[b.kind] = b.severity;
    const classification = new Set();
    (function walk(ns) { for (const n of ns) { for (const h of [n.outbound, n.inbound]) if (h) classification.add(h.trace_context); walk(n.children || []); } })(t.roots);
    box.replaceChildren(
      el("p", { class: "muted" }, `${t.open ? "open (still receiving hops)" : "analysed"}, ${t.hop_count} hops, trace classification: ${[...classification].filter(Boolean).join(", ") || "-"}`),
      el("ul", { class: "tree" }, t.roots.map((n) => renderNode(n, severities))),
      t.breaks.length ? el("div", { id: "trace-breaks" }, el("h3", {}, "Breaks"),
        el("ul", { class: "breaks-list" }, t.breaks.map((b) => el("li", { dataset: { kind: b.kind } },
          el("span", { class: "sev sev-" + b.severity }, b.severity), " ", el("b", {}, b.kind), " ",
          `${b.namespace}/${b.workload}${b.peer ? " → " + b.peer : ""}`, (b.flags || []).length ? " [" + b.flags.join(",") + "]" : "",
          el("div", {}, b.summary), el("div", { class: "hint" }, "hint: " + b.hint))))) : el("p", { class: "muted" }, "No break in this trace."),
      (t.fragments || []).length ? el("div", { class: "fragments", id: "fragments" },
        el("b", {}, "This request broke into pieces: "),
        t.fragments.map((f) => el("div", {},
          f.relation === "continued_from" ? "continued from " : "continued in ",
          el("a", { href: "#trace=" + encodeURIComponent(f.trace_id), class: "fragment", dataset: { trace: f.trace_id, relation: f.relation },
            onclick: (e) => { e.preventDefault(); showTrace(f.trace_id); } }, f.trace_id),
          el("span", { class: "muted" }, " (same x-request-id " + f.request_id + ")")))) : null);
  } catch (e) {
    box.replaceChildren(el("p", {}, "Error: " + e.message));
  }
}

// ------------------------------------------------------------------ graph

function layout(nodes, edges) {
  // Columns by longest path from the callers nobody calls (cycles cut by a visit bound).
  const depth = new Map(nodes.map((n) => [n.id, 0]));
  for (let round = 0; round < nodes.length; round++) {
    let changed = false;
    for (const e of edges) {
      if (e.from === e.to) continue;
      const d = (depth.get(e.from) || 0) + 1;
      if (d > (depth.get(e.to) || 0) && d < nodes.length + 1) { depth.set(e.to, d); changed = true; }
    }
    if (!changed) break;
  }
  const cols = new Map();
  for (const n of nodes) {
    const d = depth.get(n.id) || 0;
    if (!cols.has(d)) cols.set(d, []);
    cols.get(d).push(n);
  }
  // Wide gaps between columns: the edge labels (finding kinds) go there.
  const W = 190, H = 64, GAP = 150, pos = new Map();
  for (const [d, ns] of cols) ns.forEach((n, i) => pos.set(n.id, { x: 20 + d * (W + GAP), y: 20 + i * (H + 24), w: W, h: H }));
  const width = 40 + Math.max(1, cols.size) * (W + GAP) - GAP;
  const height = 40 + Math.max(1, ...[...cols.values()].map((c) => c.length)) * (H + 24);
  return { pos, width, height };
}

function renderGraph(g) {
  const box = $("#graph");
  if (!g.nodes.length) { box.replaceChildren(el("p", { class: "muted" }, "No traffic seen yet.")); return; }
  const { pos, width, height } = layout(g.nodes, g.edges);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "service graph" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7280" }))));
  for (const e of g.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + a.w, y1 = a.y + a.h / 2, x2 = b.x, y2 = b.y + b.h / 2, mx = (x1 + x2) / 2;
    const broken = e.findings.length > 0;
    const warn = broken && e.findings.every((f) => f.severity !== "ERROR");
    const kinds = [...new Set(e.findings.map((f) => f.kind))];
    const path = svg("path", {
      class: "edge" + (broken ? " broken" : "") + (warn ? " warn" : ""),
      d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, "marker-end": "url(#arrow)",
      "data-from": e.from, "data-to": e.to, "data-kinds": kinds.join(","),
    }, svg("title", {}, `${e.from} → ${e.to}: ${e.calls} calls, ${e.errors} failed${kinds.length ? "; " + kinds.join(", ") : ""}`));
    root.append(path);
    if (broken) {
      // One line per kind, centred on the edge.
      const y0 = (y1 + y2) / 2 - 6 - (kinds.length - 1) * 13;
      root.append(svg("text", { class: "edge-label", "text-anchor": "middle" },
        kinds.map((k, i) => svg("tspan", { x: mx, y: y0 + i * 13 }, k))));
    }
  }
  for (const n of g.nodes) {
    const p = pos.get(n.id);
    const broken = n.findings.length > 0;
    root.append(svg("g", { class: "node" + (broken ? " broken" : ""), "data-id": n.id, transform: `translate(${p.x},${p.y})` },
      svg("title", {}, `${n.id}: ${n.calls} inbound calls, ${n.errors} failed; workloads ${n.workloads.join(", ") || "-"}`),
      svg("rect", { width: p.w, height: p.h, rx: 6 }),
      svg("text", { x: 10, y: 20, "font-weight": "600" }, n.service),
      svg("text", { x: 10, y: 37, fill: "#6b7280" }, n.namespace + " · " + (n.workloads.join(", ") || "no sidecar seen")),
      svg("text", { x: 10, y: 54, fill: n.errors ? "#c62828" : "#6b7280" }, `${n.calls} in, ${n.errors} failed`)));
  }
  box.replaceChildren(root);
}

async function refreshGraph() {
  try {
    const r = await fetch("/api/graph", { cache: "no-store" });
    if (r.ok) renderGraph(await r.json());
  } catch (e) { /* the findings poll reports the outage */ }
}

// ------------------------------------------------------------------ start

for (const id of ["#f-namespace", "#f-workload", "#f-kind", "#f-severity"]) $(id).addEventListener("change", renderFindings);
window.addEventListener("hashchange", () => {
  const m = location.hash.match(/^#trace=(.+)$/);
  if (m) loadTrace(decodeURIComponent(m[1]));
});
refreshFindings();
refreshGraph();
setInterval(refreshFindings, POLL_FINDINGS_MS);
setInterval(refreshGraph, POLL_GRAPH_MS);
const initial = location.hash.match(/^#trace=(.+)$/);
if (initial) loadTrace(decodeURIComponent(initial[1]));
