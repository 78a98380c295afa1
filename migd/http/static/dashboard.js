// migd live dashboard: plain JS, inline SVG, fed by Server-Sent Events from /api/v1/events.
// Every number comes from query-migrate samples taken by the daemon; passes are marked where the
// dirty-sync count grows. Text is always set with textContent (error texts come from the network).
"use strict";

const WINDOW_S = 300;              // seconds of history drawn
const W = 600, H = 170, PAD_L = 58, PAD_B = 18, PAD_T = 14;
const SVG_NS = "http://www.w3.org/2000/svg";

const CHARTS = [
  { id: "remaining", key: "remaining", fmt: bytes },
  { id: "bandwidth", key: "bandwidth", fmt: rate },
  { id: "dirty", key: "dirty_rate", fmt: rate },
  { id: "downtime", key: "expected_downtime", fmt: ms },
];

let samples = [];
let shownPercent = 0;

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}
function rate(n) { return n === null || n === undefined ? "–" : bytes(n) + "/s"; }
function ms(n) { return n === null || n === undefined ? "–" : (n < 10000 ? n.toFixed(0) + " ms" : (n / 1000).toFixed(1) + " s"); }
function setText(id, text) { document.getElementById(id).textContent = text; }

function el(name, attrs, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Where the pass number grew: [{t, pass}]
function passMarks(list) {
  const marks = [];
  let prev = null;
  for (const s of list) {
    if (typeof s.pass === "number" && s.pass > 0 && s.pass !== prev && s.status !== "none") {
      if (prev === null || s.pass > prev) marks.push({ t: s.t, pass: s.pass });
    }
    if (typeof s.pass === "number") prev = s.pass;
  }
  return marks;
}

function drawChart(chart, list, t0, t1) {
  const svg = document.getElementById("chart-" + chart.id);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const pts = list.filter((s) => typeof s[chart.key] === "number");
  svg.dataset.points = String(pts.length);
  let max = 0;
  for (const s of pts) max = Math.max(max, s[chart.key]);
  if (max <= 0) max = 1;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => PAD_L + ((t - t0) / span) * (W - PAD_L - 4);
  const y = (v) => H - PAD_B - (v / max) * (H - PAD_B - PAD_T);
  svg.appendChild(el("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W, y2: H - PAD_B }));
  svg.appendChild(el("line", { class: "axis", x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B }));
  svg.appendChild(el("text", { x: 2, y: PAD_T + 4 }, chart.fmt(max)));
  svg.appendChild(el("text", { x: 2, y: H - PAD_B }, chart.fmt(0)));
  svg.appendChild(el("text", { x: PAD_L, y: H - 3 }, "-" + Math.round(span) + " s"));
  svg.appendChild(el("text", { x: W - 24, y: H - 3 }, "now"));
  for (const m of passMarks(list)) {
    const px = x(m.t);
    svg.appendChild(el("line", { class: "pass", x1: px, y1: PAD_T, x2: px, y2: H - PAD_B }));
    svg.appendChild(el("text", { class: "passlabel", x: px + 2, y: PAD_T + 10 }, "pass " + m.pass));
  }
  // one path, broken where a sample has no value (no migration at that moment)
  let d = "", pen = false;
  for (const s of list) {
    const v = s[chart.key];
    if (typeof v !== "number") { pen = false; continue; }
    d += (pen ? " L" : " M") + x(s.t).toFixed(1) + " " + y(v).toFixed(1);
    pen = true;
  }
  if (d) svg.appendChild(el("path", { class: "series", d: d.trim() }));
  const last = pts.length ? pts[pts.length - 1][chart.key] : null;
  setText("now-" + chart.id, chart.fmt(last));
}

function percentOf(s) {
  if (s.status === "completed") return 100;
  if (typeof s.total !== "number" || s.total <= 0 || typeof s.remaining !== "number") return null;
  return Math.min(99.9, 100 - Math.min(Math.max(s.remaining, 0), s.total) / s.total * 100);
}

function drawStatus(s) {
  const status = document.getElementById("status");
  status.textContent = s.status;
  status.dataset.status = s.status;
  setText("runstate", s.runstate);
  if (s.status === "setup") shownPercent = 0;
  const p = percentOf(s);
  if (p !== null) shownPercent = Math.max(shownPercent, p);   // never runs backwards
  if (s.status === "none") shownPercent = 0;
  document.getElementById("bar-fill").style.width = shownPercent + "%";
  setText("percent", s.status === "none" ? "–" : shownPercent.toFixed(1) + " %");
  setText("transferred", bytes(s.transferred));
  setText("remaining", bytes(s.remaining));
  setText("pass", s.pass === null || s.pass === undefined ? "–" : String(s.pass));
  setText("expected", ms(s.expected_downtime));
  setText("throttle", typeof s.throttle === "number" ? s.throttle + " %" : "–");
  const result = document.getElementById("result");
  const parts = [];
  if (s.status === "completed") {
    parts.push("downtime " + ms(s.downtime));
    for (const [name, v] of Object.entries(s.phases || {})) parts.push(name + " " + Number(v).toFixed(1) + " ms");
  }
  if (s.error) parts.push("error: " + s.error);
  result.hidden = parts.length === 0;
  result.textContent = parts.join(" · ");
}

function redraw() {
  document.body.dataset.samples = String(samples.length);
  if (!samples.length) return;
  const t1 = samples[samples.length - 1].t;
  const t0 = Math.max(samples[0].t, t1 - WINDOW_S);
  const shown = samples.filter((s) => s.t >= t0);
  for (const chart of CHARTS) drawChart(chart, shown, t0, t1);
  drawStatus(samples[samples.length - 1]);
}

function addEvent(ev) {
  const list = document.getElementById("events");
  const item = document.createElement("li");
  const ts = ev.timestamp || {};
  const when = new Date((ts.seconds || 0) * 1000 + (ts.microseconds || 0) / 1000);
  item.textContent = when.toLocaleTimeString() + " " + ev.event + (ev.data ? " " + JSON.stringify(ev.data) : "");
  list.insertBefore(item, list.firstChild);
  while (list.children.length > 50) list.removeChild(list.lastChild);
}

function connect() {
  const conn = document.getElementById("connection");
  const source = new EventSource("/api/v1/events");
  source.onopen = () => { conn.dataset.state = "open"; conn.textContent = "live"; };
  source.onerror = () => { conn.dataset.state = "retrying"; conn.textContent = "reconnecting…"; };
  source.addEventListener("history", (e) => { samples = JSON.parse(e.data); redraw(); });
  source.addEventListener("sample", (e) => {
    samples.push(JSON.parse(e.data));
    const cutoff = samples[samples.length - 1].t - WINDOW_S - 5;
    while (samples.length && samples[0].t < cutoff) samples.shift();
    redraw();
  });
  source.addEventListener("qmp", (e) => addEvent(JSON.parse(e.data)));
}

connect();
