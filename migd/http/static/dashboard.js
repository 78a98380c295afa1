// migd live dashboard: plain JS, inline SVG, fed by Server-Sent Events from /api/v1/events.
// Every number comes from query-migrate samples taken by the daemon; passes are marked where the
// dirty-sync count grows. Text is always set with textContent (error texts come from the network).
// Expected downtime is drawn on a log scale (a long first pass would flatten a linear one) with the
// downtime limit as a dashed line. ?once=1 or ?duration=S is passed on to the event stream, which then
// ends with an "end" event: the page closes it (no reconnect), so a headless screenshot can finish.
"use strict";

const WINDOW_S = 300;              // seconds of history drawn
const W = 600, H = 170, PAD_L = 58, PAD_B = 18, PAD_T = 14;
const SVG_NS = "http://www.w3.org/2000/svg";

const CHARTS = [
  { id: "remaining", key: "remaining", fmt: bytes },
  { id: "bandwidth", key: "bandwidth", fmt: rate },
  { id: "dirty", key: "dirty_rate", fmt: rate },
  { id: "downtime", key: "expected_downtime", fmt: ms, log: true, limitKey: "downtime_limit" },
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
function ms(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 10000) return (n / 1000).toFixed(1) + " s";
  return (n < 10 && !Number.isInteger(n) ? n.toFixed(1) : n.toFixed(0)) + " ms";
}
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
  const last = list.length ? list[list.length - 1] : {};
  const limit = chart.limitKey && typeof last[chart.limitKey] === "number" ? last[chart.limitKey] : null;
  let max = 0;
  for (const s of pts) max = Math.max(max, s[chart.key]);
  if (limit !== null) max = Math.max(max, limit * 2);   // the limit line is always inside the chart
  if (max <= 0) max = 1;
  const span = Math.max(t1 - t0, 1);
  const x = (t) => PAD_L + ((t - t0) / span) * (W - PAD_L - 4);
  // log charts: log10 between the floor and the maximum, values below the floor drawn at the floor
  // (a decade below the limit, at most 1 ms: the limit line never sits on the axis)
  const floor = limit !== null && limit > 0 ? Math.min(1, Math.pow(10, Math.floor(Math.log10(limit)) - 1)) : 1;
  const lo = chart.log ? Math.log10(floor) : 0;
  const hi = chart.log ? Math.max(Math.log10(max), lo + 1) : max;
  const scale = (v) => chart.log ? Math.log10(Math.max(v, floor)) : v;
  const y = (v) => H - PAD_B - ((scale(v) - lo) / (hi - lo)) * (H - PAD_B - PAD_T);
  svg.dataset.scale = chart.log ? "log" : "linear";
  svg.appendChild(el("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W, y2: H - PAD_B }));
  svg.appendChild(el("line", { class: "axis", x1: PAD_L, y1: PAD_T, x2: PAD_L, y2: H - PAD_B }));
  svg.appendChild(el("text", { x: 2, y: PAD_T + 4 }, chart.fmt(chart.log ? Math.pow(10, hi) : max)));
  svg.appendChild(el("text", { x: 2, y: H - PAD_B }, chart.fmt(chart.log ? floor : 0)));
  if (chart.log) {
    for (let d = Math.ceil(lo + 1); d < hi; d++) {     // a tick per decade, none crowding the top label
      const ty = y(Math.pow(10, d));
      if (ty - PAD_T >= 14) svg.appendChild(el("text", { x: 2, y: ty + 4 }, chart.fmt(Math.pow(10, d))));
    }
  }
  if (limit !== null) {
    const ly = y(limit);
    svg.appendChild(el("line", { class: "limit", x1: PAD_L, y1: ly, x2: W, y2: ly }));
    svg.appendChild(el("text", { class: "limitlabel", x: W - 120, y: ly - 3 }, "limit " + chart.fmt(limit)));
  }
  svg.appendChild(el("text", { x: PAD_L, y: H - 3 }, "-" + Math.round(span) + " s"));
  svg.appendChild(el("text", { x: W - 24, y: H - 3 }, "now"));
  const marks = passMarks(list);
  const every = Math.ceil(marks.length / 10);   // many passes a second: label every n-th, ten at most
  marks.forEach((m, i) => {
    const px = x(m.t);
    svg.appendChild(el("line", { class: "pass", x1: px, y1: PAD_T, x2: px, y2: H - PAD_B }));
    if ((marks.length - 1 - i) % every === 0) {   // the newest pass always has its label
      svg.appendChild(el("text", { class: "passlabel", x: px + 2, y: PAD_T + 10 }, "pass " + m.pass));
    }
  });
  // one path, broken where a sample has no value (no migration at that moment)
  let d = "", pen = false;
  for (const s of list) {
    const v = s[chart.key];
    if (typeof v !== "number") { pen = false; continue; }
    d += (pen ? " L" : " M") + x(s.t).toFixed(1) + " " + y(v).toFixed(1);
    pen = true;
  }
  if (d) svg.appendChild(el("path", { class: "series", d: d.trim() }));
  setText("now-" + chart.id, chart.fmt(pts.length ? pts[pts.length - 1][chart.key] : null));
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
  setText("transferred", bytes(typeof s.transferred === "number" ? s.transferred : s.received));
  setText("remaining", bytes(s.remaining));
  setText("pass", s.pass === null || s.pass === undefined ? "–" : String(s.pass));
  setText("expected", ms(s.expected_downtime));
  setText("throttle", typeof s.throttle === "number" ? s.throttle + " %" : "–");
  setText("limit", ms(s.downtime_limit));
  const conv = document.getElementById("convergence");
  const c = s.status === "active" ? s.convergence : null;
  conv.dataset.state = c && c.state ? c.state : "none";
  conv.textContent = c && c.state ? c.state + (typeof c["eta-ms"] === "number" ? " · eta " + ms(c["eta-ms"]) : "") : "–";
  document.title = "migd · " + s.status + (s.status === "none" ? "" : " " + shownPercent.toFixed(1) + " %");
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
  document.body.dataset.events = String(Number(document.body.dataset.events || 0) + 1);
  const item = document.createElement("li");
  const ts = ev.timestamp || {};
  const when = new Date((ts.seconds || 0) * 1000 + (ts.microseconds || 0) / 1000);
  item.textContent = when.toLocaleTimeString() + " " + ev.event + (ev.data ? " " + JSON.stringify(ev.data) : "");
  list.insertBefore(item, list.firstChild);
  while (list.children.length > 50) list.removeChild(list.lastChild);
}

function streamURL() {
  const page = new URLSearchParams(window.location.search);
  const ask = new URLSearchParams();
  for (const name of ["once", "duration"]) if (page.has(name)) ask.set(name, page.get(name));
  const q = ask.toString();
  return "/api/v1/events" + (q ? "?" + q : "");
}

function connect() {
  const conn = document.getElementById("connection");
  const source = new EventSource(streamURL());
  source.onopen = () => { conn.dataset.state = "open"; conn.textContent = "live"; };
  source.onerror = () => {
    if (conn.dataset.state === "closed") return;
    conn.dataset.state = "retrying"; conn.textContent = "reconnecting…";
  };
  source.addEventListener("history", (e) => { samples = JSON.parse(e.data); redraw(); });
  source.addEventListener("events", (e) => {   // the last migration's events, from before the page opened
    const list = document.getElementById("events");
    while (list.firstChild) list.removeChild(list.firstChild);
    document.body.dataset.events = "0";
    for (const ev of JSON.parse(e.data)) addEvent(ev);
  });
  source.addEventListener("end", () => {        // ?once / ?duration: the server is done, do not reconnect
    source.close();
    conn.dataset.state = "closed"; conn.textContent = "snapshot";
    document.body.dataset.ended = "1";
  });
  source.addEventListener("sample", (e) => {
    samples.push(JSON.parse(e.data));
    const cutoff = samples[samples.length - 1].t - WINDOW_S - 5;
    while (samples.length && samples[0].t < cutoff) samples.shift();
    redraw();
  });
  source.addEventListener("qmp", (e) => addEvent(JSON.parse(e.data)));
}

connect();
