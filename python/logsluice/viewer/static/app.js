// logsluice viewer. Log content is attacker-controlled: every value reaches the page through
// text nodes (textContent / createTextNode), never as HTML; links only for http(s) URLs.
"use strict";

(function () {
  const FORM_KEYS = ["since", "min_level", "kind", "route", "status", "text", "request_id"];
  const CHIP_KEYS = ["level", "logger", "method", "path", "trace_id", "until", "min_duration_ms"];
  const BASE_COLUMNS = ["ts", "level", "kind", "source", "status", "message"];
  const CLICKABLE = { level: "level", kind: "kind", logger: "logger", route: "route", method: "method",
    status: "status", request_id: "request_id", trace_id: "trace_id", path: "path" };
  // Top-level values a click can hide (the reader's `exclude`).
  const EXCLUDABLE = ["level", "kind", "logger", "method", "route", "status", "request_id", "path"];
  const URL_RE = /\bhttps?:\/\/[^\s<>"'`]+/gi;

  const state = {
    filters: {},   // name -> value (form fields and chips)
    fields: {},    // dotted path -> {op: "eq"|"ne", value}
    exclude: {},   // top-level name -> [values] whose records are hidden
    columns: [],   // extra columns (dotted field paths)
    records: [],
    ids: new Set(),
    next: null,
    loading: false,
    selected: -1,
    live: false,
    source: null,
    pending: [],
    generation: 0,
  };

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };

  // -- URL <-> state --------------------------------------------------------------------------

  function readUrl() {
    const q = new URLSearchParams(location.search);
    state.filters = {};
    state.fields = {};
    state.exclude = {};
    for (const [k, v] of q) {
      if (FORM_KEYS.includes(k) || CHIP_KEYS.includes(k)) state.filters[k] = v;
      else if (k.startsWith("exclude.") && EXCLUDABLE.includes(k.slice(8))) addExclusion(k.slice(8), v);
      else if (k.startsWith("field.")) state.fields[k.slice(6)] = { op: "eq", value: v };
      else if (k.startsWith("not.")) state.fields[k.slice(4)] = { op: "ne", value: v };
    }
    if (!("since" in state.filters)) state.filters.since = "1h";
    state.columns = (q.get("cols") || "").split(",").filter((c) => /^[A-Za-z0-9_.\-]+$/.test(c));
    state.live = q.get("live") === "1";
    return { view: q.get("view"), id: q.get("id") };
  }

  function writeUrl(view, id) {
    const q = filterParams(false);
    if (state.columns.length) q.set("cols", state.columns.join(","));
    if (state.live) q.set("live", "1");
    if (view) { q.set("view", view); q.set("id", id); }
    const url = location.pathname + "?" + q.toString();
    history.replaceState(null, "", url);
  }

  function filterParams(forApi) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(state.filters)) if (v !== "" && v !== undefined) q.set(k, v);
    const apiFields = {};
    for (const [path, f] of Object.entries(state.fields)) {
      if (forApi) apiFields[path] = f.op === "eq" ? typed(f.value) : { ne: typed(f.value) };
      else q.set((f.op === "eq" ? "field." : "not.") + path, f.value);
    }
    if (forApi && Object.keys(apiFields).length) q.set("fields", JSON.stringify(apiFields));
    if (forApi && Object.keys(state.exclude).length) q.set("exclude", JSON.stringify(state.exclude));
    if (!forApi) {
      for (const [name, values] of Object.entries(state.exclude)) for (const v of values) q.append("exclude." + name, v);
    }
    return q;
  }

  function addExclusion(name, value) {
    const values = state.exclude[name] || (state.exclude[name] = []);
    if (!values.includes(value)) values.push(value);
  }

  function removeExclusion(name, value) {
    const values = (state.exclude[name] || []).filter((v) => v !== value);
    if (values.length) state.exclude[name] = values; else delete state.exclude[name];
  }

  // A field filter's text as the value it stands for: JSON when it reads as JSON (42, 9.99,
  // true, null, "42", {...}), else the text itself. Long digit runs stay text: a JS number
  // would lose their digits.
  function typed(v) {
    if (/^-?\d{16,}$/.test(v)) return v;
    try {
      return JSON.parse(v);
    } catch (e) {
      return v;
    }
  }

  // The text typed() reads back as `value`: a string that would read as something else
  // ("42", "true") is quoted.
  function filterText(value) {
    if (typeof value === "string") return typed(value) === value ? value : JSON.stringify(value);
    return show(value);
  }

  function syncForm() {
    const form = $("filters");
    for (const k of FORM_KEYS) {
      const input = form.elements[k];
      const v = state.filters[k] || "";
      if (input.tagName === "SELECT" && v && ![...input.options].some((o) => o.value === v)) {
        const o = el("option", null, v.length > 24 ? v.slice(0, 19) + "…" : v);
        o.value = v;
        input.appendChild(o);
      }
      input.value = v;
    }
    $("live").checked = state.live;
    renderChips();
  }

  function renderChips() {
    const box = $("chips");
    box.replaceChildren();
    const add = (label, remove, exclude) => {
      const c = el("span", "chip" + (exclude ? " exclude" : ""), label + " ×");
      c.title = "remove this filter";
      c.addEventListener("click", () => { remove(); reload(); });
      box.appendChild(c);
    };
    for (const k of CHIP_KEYS) {
      if (state.filters[k]) add(k + " = " + state.filters[k], () => delete state.filters[k], false);
    }
    for (const [path, f] of Object.entries(state.fields)) {
      add(path + (f.op === "eq" ? " = " : " ≠ ") + f.value, () => delete state.fields[path], f.op !== "eq");
    }
    for (const [name, values] of Object.entries(state.exclude)) {
      for (const v of values) add(name + " ≠ " + v, () => removeExclusion(name, v), true);
    }
  }

  // -- data -----------------------------------------------------------------------------------

  async function api(path, params) {
    const url = "api/" + path + (params && [...params].length ? "?" + params.toString() : "");
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
    return body;
  }

  function notice(text, isError) {
    const n = $("notice");
    n.replaceChildren();
    if (!text) { n.hidden = true; return; }
    n.className = isError ? "error" : "";
    n.appendChild(typeof text === "string" ? document.createTextNode(text) : text);
    n.hidden = false;
  }

  async function reload() {
    state.generation += 1;
    state.records = [];
    state.ids = new Set();
    state.next = null;
    state.selected = -1;
    state.pending = [];
    $("rows").replaceChildren();
    $("new-records").hidden = true;
    notice(null);
    syncForm();
    writeUrl();
    renderHead();
    state.serverHistogram = false;
    loadHistogram();
    await loadMore(true);
    if (state.live) startLive(); else stopLive();
  }

  async function loadMore(first) {
    if (state.loading || (!first && !state.next)) return;
    state.loading = true;
    const gen = state.generation;
    $("more").textContent = "loading…";
    const q = filterParams(true);
    q.set("limit", "100");
    if (!first) q.set("cursor", state.next);
    try {
      const page = await api("records", q);
      if (gen !== state.generation) return;
      for (const r of page.records) appendRecord(r, false);
      state.next = page.next;
      $("more").textContent = page.partial ? "search budget used up — scroll for more"
        : state.next ? "" : state.records.length ? "end of results" : "no records match";
      renderHistogram();
    } catch (e) {
      if (gen === state.generation) { notice(e.message, true); $("more").textContent = ""; }
    } finally {
      if (gen === state.generation) state.loading = false;
    }
  }

  // -- table ----------------------------------------------------------------------------------

  function renderHead() {
    const head = $("head");
    head.replaceChildren();
    for (const c of BASE_COLUMNS.concat(state.columns)) {
      const th = el("th", null, c);
      if (state.columns.includes(c)) {
        th.title = "click to remove this column";
        th.classList.add("v");
        th.addEventListener("click", () => {
          state.columns = state.columns.filter((x) => x !== c);
          writeUrl();
          rerenderRows();
        });
      }
      head.appendChild(th);
    }
  }

  function rerenderRows() {
    renderHead();
    const rows = $("rows");
    rows.replaceChildren();
    state.records.forEach((r, i) => rows.appendChild(rowFor(r, i)));
    select(state.selected, false);
  }

  function valueAt(r, path) {
    if (Object.prototype.hasOwnProperty.call(r, path)) return r[path];
    let v = r.fields || {};
    for (const part of path.split(".")) {
      if (v === null || typeof v !== "object") return undefined;
      v = v[part];
    }
    return v;
  }

  function show(v) {
    if (v === undefined || v === null) return "";
    return typeof v === "object" ? JSON.stringify(v) : String(v);
  }

  function clickable(text, filterKey, value, cls) {
    const span = el("span", "v" + (cls ? " " + cls : ""), text);
    span.title = "click: only " + filterKey + " = " + value + " · alt-click: exclude";
    span.dataset.filter = filterKey;
    span.addEventListener("click", (ev) => {
      ev.stopPropagation();
      applyValue(filterKey, value, ev.altKey);
    });
    return span;
  }

  function applyValue(key, value, exclude) {
    if (key.startsWith("fields.")) {
      state.fields[key.slice(7)] = { op: exclude ? "ne" : "eq", value: filterText(value) };
      reload();
      return;
    }
    value = show(value);
    if (exclude && EXCLUDABLE.includes(key)) {
      addExclusion(key, value);
    } else if (exclude) {
      notice(key + " values can be included, not excluded.", false);
      return;
    } else {
      state.filters[key] = value;
    }
    reload();
  }

  function rowFor(r, index) {
    const tr = el("tr");
    tr.dataset.index = String(index);
    const level = String(r.level || "");
    tr.appendChild(el("td", "ts", show(r.ts).replace("T", " ").replace("Z", "")));
    const tdl = el("td");
    tdl.appendChild(clickable(level, "level", level, "lvl lvl-" + level.replace(/[^A-Z]/g, "")));
    tr.appendChild(tdl);
    const tdk = el("td");
    tdk.appendChild(clickable(show(r.kind), "kind", r.kind));
    tr.appendChild(tdk);
    const tds = el("td");
    if (r.kind === "http") {
      tds.appendChild(clickable(show(r.method), "method", r.method));
      tds.appendChild(document.createTextNode(" "));
      if (r.route) tds.appendChild(clickable(show(r.route), "route", r.route));
      else tds.appendChild(el("span", null, show(r.path)));
    } else {
      tds.appendChild(clickable(show(r.logger), "logger", r.logger));
    }
    tr.appendChild(tds);
    const tdst = el("td");
    if (r.status !== undefined && r.status !== null) tdst.appendChild(clickable(show(r.status), "status", r.status));
    tr.appendChild(tdst);
    const tdm = el("td", "message");
    richText(tdm, show(r.message) || (r.kind === "http" ? show(r.path) : ""));
    tr.appendChild(tdm);
    for (const c of state.columns) {
      const td = el("td");
      const v = valueAt(r, c);
      if (v !== undefined) td.appendChild(clickable(show(v), columnKey(c), v));
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => { select(index, false); openRecord(r); });
    return tr;
  }

  function columnKey(c) {
    return CLICKABLE[c] || "fields." + c;
  }

  // Text with search highlighting and http(s) links; everything through text nodes.
  function richText(parent, text) {
    let last = 0;
    for (const m of text.matchAll(URL_RE)) {
      highlight(parent, text.slice(last, m.index));
      let ok = false;
      try { ok = ["http:", "https:"].includes(new URL(m[0]).protocol); } catch (e) { ok = false; }
      if (ok) {
        const a = el("a", null, m[0]);
        a.href = m[0];
        a.rel = "noopener noreferrer";
        a.target = "_blank";
        a.addEventListener("click", (ev) => ev.stopPropagation());
        parent.appendChild(a);
      } else {
        highlight(parent, m[0]);
      }
      last = m.index + m[0].length;
    }
    highlight(parent, text.slice(last));
  }

  function highlight(parent, text) {
    const needle = (state.filters.text || "").toLowerCase();
    if (!needle || !text) { parent.appendChild(document.createTextNode(text)); return; }
    const lower = text.toLowerCase();
    let at = 0;
    for (;;) {
      const i = lower.indexOf(needle, at);
      if (i < 0) break;
      parent.appendChild(document.createTextNode(text.slice(at, i)));
      parent.appendChild(el("mark", "hl", text.slice(i, i + needle.length)));
      at = i + needle.length;
    }
    parent.appendChild(document.createTextNode(text.slice(at)));
  }

  function appendRecord(r, atTop) {
    // LocalFiles gzips a finished file under a new name: the same record, read again.
    const key = r.id !== undefined ? String(r.id).replace(".ndjson.gz:", ".ndjson:") : null;
    if (key !== null) {
      if (state.ids.has(key)) return;
      state.ids.add(key);
    }
    const rows = $("rows");
    if (atTop) {
      state.records.unshift(r);
      if (state.selected >= 0) state.selected += 1;
      rerenderRows();
    } else {
      state.records.push(r);
      rows.appendChild(rowFor(r, state.records.length - 1));
    }
  }

  function select(i, scroll) {
    const rows = $("rows").children;
    for (const tr of $("rows").querySelectorAll("tr.selected")) tr.classList.remove("selected");
    if (i < 0 || i >= rows.length) { state.selected = -1; return; }
    state.selected = i;
    rows[i].classList.add("selected");
    if (scroll) rows[i].scrollIntoView({ block: "nearest" });
  }

  // -- histogram --------------------------------------------------------------------------------

  const LEVEL_ORDER = ["TRACE", "DEBUG", "INFO", "SUCCESS", "OTHER", "WARNING", "ERROR", "CRITICAL"];
  const levelOf = (l) => (LEVEL_ORDER.includes(l) && l !== "OTHER" ? l : "OTHER");

  // Counts over time for the whole result (the reader's summary by level per bucket); the
  // loaded records stand in when the store cannot summarise.
  async function loadHistogram() {
    const gen = state.generation;
    const q = filterParams(true);
    const since = state.filters.since || "1h";
    const hours = /^(\d+)h$/.exec(since);
    const long = /^\d+(d|w)$/.test(since) || (hours !== null && Number(hours[1]) > 6);
    q.set("by", "level");
    q.set("bucket", long ? "1h" : "1m");
    q.set("slowest", "0");
    try {
      const res = await api("summary", q);
      if (gen !== state.generation) return;
      const step = long ? 3600e3 : 60e3;
      const bars = new Map();
      for (const g of res.groups || []) {
        const t = Date.parse(show(g.bucket));
        if (isNaN(t)) throw new Error("no buckets");
        const bar = bars.get(t) || { from: t, to: t + step, counts: {} };
        const lvl = levelOf(g.key && typeof g.key === "object" ? show(g.key.level) : show(g.key));
        bar.counts[lvl] = (bar.counts[lvl] || 0) + (Number(g.count) || 0);
        bars.set(t, bar);
      }
      state.serverHistogram = true;
      drawHistogram(timeline([...bars.values()], step));
    } catch (e) {
      state.serverHistogram = false;
      renderHistogram();
    }
  }

  // The bars on the query's whole time range, empty buckets included, so each sits at its time.
  function timeline(bars, step) {
    const byStart = new Map(bars.map((b) => [b.from, b]));
    const ages = { s: 1e3, m: 60e3, h: 3600e3, d: 86400e3, w: 604800e3 };
    const since = state.filters.since || "1h";
    const rel = /^(\d+)([smhdw])$/.exec(since);
    let lo = rel ? Date.now() - Number(rel[1]) * ages[rel[2]] : Date.parse(since);
    let hi = state.filters.until ? Date.parse(state.filters.until) : Date.now();
    if (isNaN(lo) || isNaN(hi) || hi <= lo) return bars.sort((a, b) => a.from - b.from);
    lo = Math.floor(lo / step) * step;
    if ((hi - lo) / step > 400) return bars.sort((a, b) => a.from - b.from);
    const out = [];
    for (let t = lo; t < hi; t += step) out.push(byStart.get(t) || { from: t, to: t + step, counts: {} });
    return out;
  }

  function renderHistogram() {
    if (state.serverHistogram) return;
    const times = state.records.map((r) => Date.parse(show(r.ts))).filter((t) => !isNaN(t));
    if (times.length < 2) { drawHistogram([]); return; }
    const lo = Math.min(...times), hi = Math.max(...times) + 1;
    const n = 40, width = (hi - lo) / n;
    const bars = Array.from({ length: n }, (_, i) => ({ from: lo + i * width, to: lo + (i + 1) * width, counts: {} }));
    state.records.forEach((r) => {
      const t = Date.parse(show(r.ts));
      if (isNaN(t)) return;
      const b = bars[Math.min(n - 1, Math.floor((t - lo) / width))];
      const lvl = levelOf(r.level);
      b.counts[lvl] = (b.counts[lvl] || 0) + 1;
    });
    drawHistogram(bars);
  }

  function drawHistogram(bars) {
    const box = $("histogram");
    box.replaceChildren();
    if (!bars.length) return;
    const n = bars.length;
    const max = Math.max(...bars.map((b) => Object.values(b.counts).reduce((a, c) => a + c, 0)), 1);
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + Math.max(n, 40) * 10 + " 60");
    svg.setAttribute("preserveAspectRatio", "none");
    bars.forEach((b, i) => {
      let y = 60;
      for (const lvl of LEVEL_ORDER) {
        const c = b.counts[lvl] || 0;
        if (!c) continue;
        const h = (c / max) * 58;
        y -= h;
        const rect = document.createElementNS(NS, "rect");
        rect.setAttribute("x", String(i * 10 + 1));
        rect.setAttribute("y", String(y));
        rect.setAttribute("width", "8");
        rect.setAttribute("height", String(h));
        rect.setAttribute("class", "bar-" + lvl);
        const title = document.createElementNS(NS, "title");
        const from = new Date(b.from), to = new Date(b.to);
        title.textContent = lvl + ": " + c + " (" + from.toISOString() + " – " + to.toISOString() + ")";
        rect.appendChild(title);
        rect.addEventListener("click", () => {
          state.filters.since = from.toISOString();
          state.filters.until = to.toISOString();
          reload();
        });
        svg.appendChild(rect);
      }
    });
    box.appendChild(svg);
  }

  // -- panel: record, request, context ----------------------------------------------------------

  function openPanel(title) {
    $("panel-title").textContent = title;
    const body = $("panel-body");
    body.replaceChildren();
    $("panel").hidden = false;
    return body;
  }

  function closePanel() {
    $("panel").hidden = true;
    writeUrl();
  }

  function fieldList(r) {
    const dl = el("dl", "fields");
    const first = ["ts", "level", "kind", "message", "logger", "request_id", "trace_id", "method", "path",
      "route", "status", "duration_ms", "exception"];
    const rank = (k) => (first.includes(k) ? first.indexOf(k) : first.length);
    const entries = Object.entries(r).filter(([k]) => k !== "fields").sort((a, b) => rank(a[0]) - rank(b[0]));
    for (const [k, v] of Object.entries(r.fields || {})) entries.push(["fields." + k, v]);
    for (const [k, v] of entries) {
      if (v === null || v === undefined || v === "") continue;
      const dt = el("dt", null, k);
      const dd = el("dd");
      const text = show(v);
      if (typeof v === "string") richText(dd, text);
      else dd.appendChild(document.createTextNode(text));
      const key = k.startsWith("fields.") ? k : CLICKABLE[k];
      if (key && (typeof v !== "object")) {
        const actions = el("span", "actions");
        const inc = el("button", null, "+");
        inc.type = "button";
        inc.title = "only records with this value";
        inc.addEventListener("click", () => applyValue(key, v, false));
        actions.appendChild(inc);
        if (key.startsWith("fields.") || EXCLUDABLE.includes(key)) {
          const exc = el("button", "exclude", "−");
          exc.type = "button";
          exc.title = "hide records with this value";
          exc.dataset.exclude = key;
          exc.addEventListener("click", () => applyValue(key, v, true));
          actions.appendChild(exc);
        }
        if (key.startsWith("fields.")) {
          const col = el("button", null, "column");
          col.type = "button";
          col.addEventListener("click", () => addColumn(k.slice(7)));
          actions.appendChild(col);
        }
        dd.appendChild(actions);
      }
      dl.appendChild(dt);
      dl.appendChild(dd);
    }
    return dl;
  }

  function addColumn(path) {
    if (!state.columns.includes(path)) state.columns.push(path);
    writeUrl();
    rerenderRows();
  }

  function openRecord(r) {
    const body = openPanel("record");
    const bar = el("div", "actions");
    if (r.request_id) {
      const b = el("button", null, "request view");
      b.type = "button";
      b.addEventListener("click", () => openRequest(String(r.request_id)));
      bar.appendChild(b);
    }
    if (r.id !== undefined && r.id !== null) {
      const b = el("button", null, "context");
      b.type = "button";
      b.addEventListener("click", () => openContext(String(r.id)));
      bar.appendChild(b);
      writeUrl("record", String(r.id));
    }
    body.appendChild(bar);
    body.appendChild(fieldList(r));
  }

  function miniTable(records) {
    const t = el("table");
    const tb = el("tbody");
    for (const r of records) {
      const tr = el("tr");
      tr.appendChild(el("td", "ts", show(r.ts).replace("T", " ").replace("Z", "")));
      tr.appendChild(el("td", "lvl lvl-" + String(r.level || "").replace(/[^A-Z]/g, ""), show(r.level)));
      const m = el("td", "message");
      richText(m, r.kind === "http" ? show(r.method) + " " + show(r.path) + " → " + show(r.status) : show(r.message));
      tr.appendChild(m);
      tr.addEventListener("click", () => openRecord(r));
      tb.appendChild(tr);
    }
    t.appendChild(tb);
    return t;
  }

  async function openRequest(id) {
    const body = openPanel("request " + id);
    writeUrl("request", id);
    body.appendChild(el("p", "muted", "loading…"));
    try {
      const res = await api("requests/" + encodeURIComponent(id));
      body.replaceChildren();
      const access = res.access || res.access_record || null;
      const records = res.records || res.app_records || [];
      if (res.in_progress) body.appendChild(el("p", "muted", "in progress: no access record yet"));
      else if (!access) body.appendChild(el("p", "muted", "no access record: sampled out, excluded or rate limited"));
      body.appendChild(el("h3", null, "access record"));
      if (access) {
        body.appendChild(fieldList(access));
        for (const k of ["request_body", "response_body"]) {
          if (access[k]) { body.appendChild(el("h3", null, k.replace("_", " "))); body.appendChild(el("pre", null, show(access[k]))); }
        }
      } else {
        body.appendChild(el("p", "muted", "none found"));
      }
      body.appendChild(el("h3", null, "app records (" + records.length + ")"));
      body.appendChild(miniTable(records));
      const related = res.trace || [];
      if (related.length) {
        body.appendChild(el("h3", null, "same trace (" + related.length + ")"));
        body.appendChild(miniTable(related));
      }
    } catch (e) {
      body.replaceChildren(el("p", "muted", e.message));
    }
  }

  async function openContext(id) {
    const body = openPanel("context of " + id);
    writeUrl("context", id);
    try {
      const q = new URLSearchParams({ before: "50", after: "50" });
      const res = await api("records/" + encodeURIComponent(id) + "/context", q);
      body.replaceChildren();
      let records = Array.isArray(res) ? res : res.records;
      if (!records) records = [].concat(res.before || [], res.record ? [res.record] : [], res.after || []);
      const t = miniTable(records);
      records.forEach((r, i) => { if (String(r.id) === id) t.querySelectorAll("tr")[i].classList.add("selected"); });
      body.appendChild(t);
    } catch (e) {
      body.replaceChildren(el("p", "muted", e.message));
    }
  }

  // -- live tail --------------------------------------------------------------------------------

  function startLive() {
    stopLive();
    const q = filterParams(true);
    q.delete("since");
    q.delete("until");
    const src = new EventSource("api/stream?" + q.toString());
    state.source = src;
    src.addEventListener("record", (ev) => {
      let r;
      try { r = JSON.parse(ev.data); } catch (e) { return; }
      if (window.scrollY > 40 || state.selected > 0) {
        state.pending.push(r);
        const b = $("new-records");
        b.textContent = state.pending.length + " new";
        b.hidden = false;
      } else {
        appendRecord(r, true);
      }
    });
    src.addEventListener("gap", (ev) => {
      let g;
      try { g = JSON.parse(ev.data); } catch (e) { return; }
      const box = el("span", null, g.count + " records were skipped because this page fell behind (" +
        show(g.from) + " – " + show(g.until) + "). ");
      const b = el("button", null, "show them");
      b.type = "button";
      b.addEventListener("click", () => {
        state.live = false;
        state.filters.since = show(g.from);
        state.filters.until = show(g.until);
        reload();
      });
      box.appendChild(b);
      notice(box, false);
    });
    src.addEventListener("shutdown", () => { src.close(); notice("the server is shutting down; live tail stopped", false); });
    src.addEventListener("stream-error", (ev) => {
      let msg = "live tail failed";
      try { msg = JSON.parse(ev.data).error || msg; } catch (e) { /* keep default */ }
      src.close();
      notice(msg, true);
    });
  }

  function stopLive() {
    if (state.source) state.source.close();
    state.source = null;
  }

  function showPending() {
    const pending = state.pending;
    state.pending = [];
    $("new-records").hidden = true;
    for (const r of pending) appendRecord(r, true);
    window.scrollTo(0, 0);
  }

  // -- wiring -----------------------------------------------------------------------------------

  function fromForm() {
    const form = $("filters");
    for (const k of FORM_KEYS) {
      const v = form.elements[k].value.trim();
      if (v) state.filters[k] = v; else delete state.filters[k];
    }
    if (!state.filters.since) state.filters.since = "1h";
    if (!/^\d/.test(state.filters.since) || /^\d+[smhdw]$/.test(state.filters.since)) delete state.filters.until;
  }

  function onKey(ev) {
    const t = ev.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT")) {
      if (ev.key === "Escape") t.blur();
      return;
    }
    const r = state.records[state.selected];
    switch (ev.key) {
      case "j": select(Math.min(state.selected + 1, state.records.length - 1), true); break;
      case "k": select(Math.max(state.selected - 1, 0), true); break;
      case "Enter": if (r) openRecord(r); break;
      case "Escape": closePanel(); break;
      case "/": ev.preventDefault(); $("filters").elements.text.focus(); break;
      case "t": state.live = !state.live; $("live").checked = state.live; writeUrl(); state.live ? startLive() : stopLive(); break;
      case "r": if (r && r.request_id) openRequest(String(r.request_id)); break;
      case "c": if (r && r.id !== undefined) openContext(String(r.id)); break;
      default: return;
    }
  }

  function init() {
    const { view, id } = readUrl();
    $("filters").addEventListener("submit", (ev) => { ev.preventDefault(); fromForm(); reload(); });
    for (const name of ["since", "min_level", "kind"]) {
      $("filters").elements[name].addEventListener("change", () => { fromForm(); reload(); });
    }
    $("live").addEventListener("change", () => {
      state.live = $("live").checked;
      writeUrl();
      if (state.live) startLive(); else stopLive();
    });
    $("panel-close").addEventListener("click", closePanel);
    $("new-records").addEventListener("click", showPending);
    document.addEventListener("keydown", onKey);
    window.addEventListener("scroll", () => { if (window.scrollY <= 40 && state.pending.length) showPending(); });
    new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) loadMore(false);
    }).observe($("more"));
    reload().then(() => {
      if (view === "request" && id) openRequest(id);
      else if (view === "context" && id) openContext(id);
      else if (view === "record" && id) {
        const r = state.records.find((x) => String(x.id) === id);
        if (r) openRecord(r); else openContext(id);
      }
    });
  }

  document.addEventListener("DOMContentLoaded", init);
})();
