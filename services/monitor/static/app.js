/* QualiTeacher bank monitor: plain JS, SVG charts, no external assets.
 *
 * Polls /bank/stats and /bank/images every few seconds; keeps a short history of the
 * stats in this browser (sessionStorage) for the "over time" charts; a click on a
 * thumbnail opens the image's top-k beside its degraded input with per-metric scores.
 * A ?token= the page was opened with is sent along as a Bearer header (API) and as
 * ?token= on image URLs. The training panel draws /api/training: what the student's rank 0
 * logged into Redis (loss curves, teacher version, rates by step) and its latest probes.
 */
"use strict";

(() => {
  const TOKEN = new URLSearchParams(location.search).get("token");
  const PAGE_SIZE = 48;
  const HISTORY_MAX = 400;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const LOWER_IS_BETTER = new Set(["brisque", "niqe", "piqe"]);
  const TRAIN_POINTS = 1000;
  const LOSS_COLOURS = ["#58a6ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff9bce", "#e3b341",
    "#a5d6ff", "#8d99a8"];

  const state = {
    sort: "score",
    offset: 0,
    total: 0,
    items: [],
    stats: null,
    gridKey: "",
    detailId: null,
    detailKey: "",
    interval: 3000,
    timer: null,
    busy: false,
    history: [],
    historyKey: null,
    probeKey: "",
  };

  // ------------------------------------------------------------------ helpers
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function withToken(url) {
    if (!TOKEN) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
  }

  async function api(path) {
    const headers = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
    const res = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try { body = await res.json(); } catch (_) { body = null; }
    if (!res.ok) {
      const err = new Error((body && body.detail) || res.statusText || "request failed");
      err.status = res.status;
      throw err;
    }
    return body;
  }

  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const fmtPct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(x < 0.1 && x > 0 ? 1 : 0) + "%");
  const fmtScore = (x) => (x === null || x === undefined ? "–" : Number(x).toFixed(2));

  function fmtNum(x) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    const a = Math.abs(x);
    return a >= 100 ? x.toFixed(1) : a >= 10 ? x.toFixed(2) : x.toFixed(3);
  }

  /** An axis label: two significant digits, exponent notation for very small or large values. */
  function fmtTick(x) {
    const a = Math.abs(x);
    if (a === 0) return "0";
    return a < 0.01 || a >= 1e4 ? x.toExponential(1) : String(Number(x.toPrecision(2)));
  }

  function fmtAge(s) {
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  /** Colour of a 0-10 score: red - amber - green. */
  function scoreColour(score) {
    const t = Math.max(0, Math.min(1, (score || 0) / 10));
    return `hsl(${Math.round(4 + t * 128)}, 68%, ${Math.round(52 + 8 * Math.sin(Math.PI * t))}%)`;
  }

  function scoreBadge(score, cls) {
    const b = el("span", { class: "score " + (cls || ""), text: fmtScore(score) });
    b.style.background = score === null || score === undefined ? "#5b6675" : scoreColour(score);
    return b;
  }

  // ------------------------------------------------------------------ status
  function setStatus(kind, text) {
    const s = $("status");
    s.className = "status " + kind;
    $("status-text").textContent = text;
  }

  function showBanner(text) {
    const b = $("banner");
    if (text) { b.textContent = text; b.hidden = false; } else { b.hidden = true; }
  }

  // ------------------------------------------------------------------ history
  function loadHistory(prefix) {
    const key = "qt-monitor-history:" + prefix;
    if (state.historyKey === key) return;
    state.historyKey = key;
    try { state.history = JSON.parse(sessionStorage.getItem(key) || "[]"); } catch (_) { state.history = []; }
    if (!Array.isArray(state.history)) state.history = [];
  }

  function pushHistory(s) {
    loadHistory(s.prefix);
    const point = {
      t: s.time_ms,
      v: s.teacher_version,
      d: s.dropped_total,
      g: s.counters.gate_calls || 0,
      e: s.entries,
    };
    const last = state.history[state.history.length - 1];
    // A bank that was cleared (counters went down) starts a new history.
    if (last && (point.g < last.g || point.d < last.d)) state.history = [];
    state.history.push(point);
    if (state.history.length > HISTORY_MAX) state.history.splice(0, state.history.length - HISTORY_MAX);
    try { sessionStorage.setItem(state.historyKey, JSON.stringify(state.history)); } catch (_) { /* full */ }
  }

  // ------------------------------------------------------------------ KPIs
  function renderKpis(s) {
    $("prefix").textContent = s.prefix;
    $("k-images").textContent = fmtInt(s.images);
    $("k-entries").textContent = fmtInt(s.entries);
    $("k-entries-sub").textContent = s.top_k ? `top-${s.top_k} per image` : "\u00a0";
    $("k-images-sub").textContent = s.last_event_ms
      ? "last gate " + fmtAge(Math.max(0, (s.time_ms - s.last_event_ms) / 1000)) + " ago"
      : "no gate yet";
    $("k-version").textContent = s.teacher_version === null ? "–" : "v" + s.teacher_version;
    const h = state.history;
    const firstV = h.find((p) => p.v !== null && p.v !== undefined);
    $("k-version-sub").textContent = firstV && s.teacher_version !== null && s.teacher_version > firstV.v
      ? `+${s.teacher_version - firstV.v} since ${new Date(firstV.t).toLocaleTimeString()}` : "weights pushed by the student";
    $("k-scorers").textContent = s.scorer_count === null ? "–" : s.scorer_count;
    $("k-gating").textContent = fmtPct(s.gating_rate);
    $("k-gating-sub").textContent = `${fmtInt(s.counters.admitted)} of ${fmtInt(s.counters.candidates)} PLs admitted`;
    $("k-drop").textContent = fmtPct(s.drop_rate);
    $("k-drop-sub").textContent = `${fmtInt(s.dropped_total)} sets dropped, ${fmtInt(s.counters.gate_calls)} gated`;
  }

  // ------------------------------------------------------------------ grid
  function renderGrid(page) {
    const key = JSON.stringify([page.offset, page.sort, page.items.map((i) => [i.image_id, i.best_label_id, i.best_score, i.entries])]);
    const topK = (state.stats && state.stats.top_k) || 3;
    const pages = Math.max(1, Math.ceil(page.total / PAGE_SIZE));
    const current = Math.floor(page.offset / PAGE_SIZE) + 1;
    $("page").textContent = `${current} / ${pages}`;
    $("prev").disabled = page.offset === 0;
    $("next").disabled = page.offset + PAGE_SIZE >= page.total;
    $("grid-count").textContent = page.total ? `· ${fmtInt(page.total)} images` : "";
    $("empty").hidden = page.total > 0;
    if (key === state.gridKey) return;
    state.gridKey = key;
    const grid = $("grid");
    const cards = page.items.map((item) => {
      const img = el("img", {
        src: withToken(item.thumbnail_url + "&v=" + encodeURIComponent(item.best_label_id || "")),
        alt: item.image_id, loading: "lazy", decoding: "async",
      });
      const pips = el("span", { class: "pips", title: `${item.entries} of ${topK} entries` });
      for (let i = 0; i < topK; i++) pips.append(el("span", { class: "pip" + (i < item.entries ? " on" : "") }));
      return el("button", {
        class: "card", type: "button", "data-image-id": item.image_id,
        title: `${item.image_id}: best ${fmtScore(item.best_score)}, ${item.entries} entries`,
        onclick: () => openDetail(item.image_id),
      },
      el("div", { class: "thumb" }, img, scoreBadge(item.best_score)),
      el("div", { class: "card-foot" }, el("span", { class: "card-id", text: item.image_id }), pips));
    });
    grid.replaceChildren(...cards);
  }

  // ------------------------------------------------------------------ charts
  function renderHistogram(hist) {
    const root = $("hist");
    const W = 320, H = 150, L = 26, B = 20, T = 14, R = 10;
    const counts = hist.counts;
    const max = Math.max(1, ...counts);
    const bw = (W - L - R) / counts.length;
    const nodes = [];
    const total = counts.reduce((a, b) => a + b, 0);
    const ticks = total === 0 ? [] : [...new Set([Math.round(max / 2), max])].filter((t) => t > 0);
    for (const t of ticks) {
      const y = T + (H - T - B) * (1 - t / max);
      nodes.push(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "axis", "stroke-dasharray": "2 3" }));
      nodes.push(svg("text", { x: L - 4, y: y + 3, "text-anchor": "end" }, fmtInt(t)));
    }
    if (total === 0) nodes.push(svg("text", { x: (L + W - R) / 2, y: (T + H - B) / 2, "text-anchor": "middle" }, "no entries yet"));
    counts.forEach((c, i) => {
      const h = (H - T - B) * (c / max);
      const x = L + i * bw + 2;
      const y = H - B - h;
      const mid = (hist.edges[i] + hist.edges[i + 1]) / 2;
      const rect = svg("rect", { x, y, width: Math.max(1, bw - 4), height: Math.max(0, h), rx: 2, fill: scoreColour(mid) });
      rect.append(svg("title", {}, `${hist.edges[i]}–${hist.edges[i + 1]}: ${c} entries`));
      nodes.push(rect);
      if (c > 0) nodes.push(svg("text", { x: x + (bw - 4) / 2, y: y - 3, "text-anchor": "middle" }, String(c)));
    });
    nodes.push(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    hist.edges.forEach((e, i) => {
      if (i % 2 === 0) nodes.push(svg("text", { x: L + i * bw, y: H - 6, "text-anchor": "middle" }, String(e)));
    });
    root.replaceChildren(...nodes);
  }

  function renderDrops(s) {
    const root = $("drops");
    const reasons = Object.entries(s.drops).sort((a, b) => b[1] - a[1]);
    const total = s.dropped_total + (s.counters.gate_calls || 0);
    $("drops-total").textContent = total ? `${fmtInt(s.dropped_total)} of ${fmtInt(total)} sets` : "";
    if (!reasons.length) {
      root.replaceChildren(el("div", { class: "none", text: "nothing dropped yet" }));
      return;
    }
    const labels = { metric_disagreement: "metrics disagree", augmentation_instability: "aug. unstable", stale: "stale teacher", non_finite: "non-finite" };
    root.replaceChildren(...reasons.map(([reason, n]) => {
      const fill = el("span");
      fill.style.width = (100 * n / Math.max(1, total)).toFixed(1) + "%";
      return el("div", { class: "drop-row", title: reason },
        el("span", { text: labels[reason] || reason }),
        el("div", { class: "bar" }, fill),
        el("span", { class: "n", text: `${fmtInt(n)} · ${fmtPct(n / Math.max(1, total))}` }));
    }));
  }

  function renderSpark(id, points, opts) {
    const root = $(id);
    const W = 320, H = 60, P = 5, PT = 18, PB = 4;
    if (points.length < 2) {
      root.replaceChildren(svg("text", { x: W / 2, y: H / 2 + 3, "text-anchor": "middle" }, "collecting…"));
      return;
    }
    const t0 = points[0].x, t1 = points[points.length - 1].x;
    const ys = points.map((p) => p.y);
    let lo = opts.min !== undefined ? opts.min : Math.min(...ys);
    let hi = Math.max(...ys, lo + (opts.minSpan || 1));
    const sx = (x) => P + (W - 2 * P) * (t1 > t0 ? (x - t0) / (t1 - t0) : 1);
    const sy = (y) => H - PB - (H - PT - PB) * ((y - lo) / (hi - lo || 1));
    let d = "";
    points.forEach((p, i) => {
      const x = sx(p.x).toFixed(1), y = sy(p.y).toFixed(1);
      if (i === 0) d += `M${x},${y}`;
      else d += opts.step ? `H${x}V${y}` : `L${x},${y}`;
    });
    const area = `${d}V${H - PB}H${sx(t0).toFixed(1)}Z`;
    root.replaceChildren(
      svg("path", { d: area, fill: opts.colour, "fill-opacity": "0.12", stroke: "none" }),
      svg("path", { d, fill: "none", stroke: opts.colour, "stroke-width": "1.8", "vector-effect": "non-scaling-stroke" }),
      svg("text", { x: W - P, y: 12, "text-anchor": "end" }, "max " + opts.label(Math.max(...ys))),
      svg("text", { x: P, y: 12 }, opts.span ? opts.span(t0, t1) : fmtAge((t1 - t0) / 1000) + " ago"),
    );
  }

  function renderHistory() {
    const h = state.history;
    $("history-span").textContent = h.length > 1 ? `last ${fmtAge((h[h.length - 1].t - h[0].t) / 1000)}, this browser` : "this browser";
    const versions = h.filter((p) => p.v !== null && p.v !== undefined).map((p) => ({ x: p.t, y: p.v }));
    renderSpark("spark-version", versions, { colour: "#58a6ff", step: true, min: versions.length ? Math.min(...versions.map((p) => p.y)) : 0, minSpan: 1, label: (v) => "v" + Math.round(v) });
    const rates = [];
    for (let i = 1; i < h.length; i++) {
      const dd = h[i].d - h[i - 1].d, dg = h[i].g - h[i - 1].g;
      rates.push({ x: h[i].t, y: dd + dg > 0 ? dd / (dd + dg) : (rates.length ? rates[rates.length - 1].y : 0) });
    }
    renderSpark("spark-drop", rates, { colour: "#d29922", min: 0, minSpan: 0.05, label: (v) => fmtPct(v) });
    renderSpark("spark-entries", h.map((p) => ({ x: p.t, y: p.e })), { colour: "#3fb950", min: 0, minSpan: 1, label: (v) => fmtInt(Math.round(v)) });
    const last = h[h.length - 1];
    $("sv-version").textContent = last && last.v !== null ? "v" + last.v : "–";
    $("sv-drop").textContent = rates.length ? fmtPct(rates[rates.length - 1].y) : "–";
    $("sv-entries").textContent = last ? fmtInt(last.e) : "–";
  }

  function renderCounters(s) {
    const rows = [
      ["gate calls", s.counters.gate_calls], ["PLs offered", s.counters.candidates],
      ["admitted", s.counters.admitted], ["rejected (not top-k)", s.counters.rejected],
      ["evicted", s.counters.evicted], ["duplicates (replays)", s.counters.duplicates],
      ["events kept", s.events],
    ];
    $("counters").replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("td", { text: k }), el("td", { text: fmtInt(v) }))));
  }

  // ------------------------------------------------------------------ training
  /** [{x: step, y}] of one tag, leaving out steps where it is missing or not finite. */
  function series(points, tag) {
    return points.filter((p) => p.scalars[tag] !== null && p.scalars[tag] !== undefined)
      .map((p) => ({ x: p.step, y: p.scalars[tag] }));
  }

  const stepSpan = (a, b) => `steps ${fmtInt(a)}–${fmtInt(b)}`;

  /** Every loss/* tag as a line over steps; log scale when every value is positive. */
  function renderLosses(t) {
    const W = 640, H = 200, L = 46, R = 10, T = 10, B = 22;
    const tags = t.tags.filter((g) => g.startsWith("loss/"))
      .sort((a, b) => (a === "loss/total" ? -1 : b === "loss/total" ? 1 : a.localeCompare(b)));
    const lines = tags.map((tag) => ({ tag, pts: series(t.points, tag) })).filter((l) => l.pts.length);
    const ys = lines.flatMap((l) => l.pts.map((p) => p.y));
    const xs = lines.flatMap((l) => l.pts.map((p) => p.x));
    const root = $("train-loss");
    if (!ys.length) {
      root.replaceChildren(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no losses yet"));
      $("train-legend").replaceChildren();
      return;
    }
    const log = ys.every((y) => y > 0);
    const f = log ? Math.log10 : (y) => y;
    let lo = Math.min(...ys.map(f)), hi = Math.max(...ys.map(f));
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const x0 = Math.min(...xs), x1 = Math.max(...xs);
    const sx = (x) => L + (W - L - R) * (x1 > x0 ? (x - x0) / (x1 - x0) : 1);
    const sy = (y) => T + (H - T - B) * (1 - (f(y) - lo) / (hi - lo));
    const nodes = [];
    for (const v of [lo, (lo + hi) / 2, hi]) {
      const y = T + (H - T - B) * (1 - (v - lo) / (hi - lo));
      nodes.push(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "axis", "stroke-dasharray": "2 3" }));
      nodes.push(svg("text", { x: L - 4, y: y + 3, "text-anchor": "end" }, fmtTick(log ? 10 ** v : v)));
    }
    nodes.push(svg("text", { x: L, y: H - 6 }, "step " + fmtInt(x0)));
    nodes.push(svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }, "step " + fmtInt(x1)));
    const legend = [];
    lines.forEach((l, i) => {
      const colour = LOSS_COLOURS[i % LOSS_COLOURS.length];
      const d = l.pts.map((p, j) => `${j ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
      nodes.push(svg("path", { d, fill: "none", stroke: colour, "stroke-width": l.tag === "loss/total" ? "2.4" : "1.4",
        "vector-effect": "non-scaling-stroke", "data-tag": l.tag }));
      const sw = el("span", { class: "sw" });
      sw.style.background = colour;
      legend.push(el("span", { class: "lg", title: l.tag }, sw, l.tag.slice(5) + " ",
        el("b", { text: fmtNum(l.pts[l.pts.length - 1].y) })));
    });
    root.replaceChildren(...nodes);
    $("train-legend").replaceChildren(...legend);
    $("train-scale").textContent = log ? "log scale" : "linear scale";
  }

  function renderRates(t) {
    const last = (pts) => (pts.length ? pts[pts.length - 1].y : null);
    const versions = series(t.points, "train/teacher_version");
    renderSpark("train-version", versions, { colour: "#58a6ff", step: true, minSpan: 1, span: stepSpan,
      min: versions.length ? Math.min(...versions.map((p) => p.y)) : 0, label: (v) => "v" + Math.round(v) });
    $("tv-version").textContent = last(versions) === null ? "–" : "v" + Math.round(last(versions));
    for (const [id, tag, out] of [["train-speed", "train/steps_per_s", "tv-speed"],
      ["train-sets", "bank/labelled_sets_per_s", "tv-sets"]]) {
      const pts = series(t.points, tag);
      renderSpark(id, pts, { colour: id === "train-speed" ? "#3fb950" : "#d29922", min: 0, minSpan: 0.1,
        span: stepSpan, label: fmtNum });
      $(out).textContent = fmtNum(last(pts));
    }
  }

  function renderProbes(probe) {
    const key = probe ? JSON.stringify([probe.step, probe.items.map((i) => i.url)]) : "none";
    if (key === state.probeKey) return;
    state.probeKey = key;
    if (!probe) {
      $("probe-caption").textContent = "none yet (train.probe_every_pushes)";
      $("train-probes").replaceChildren();
      return;
    }
    $("probe-caption").textContent = `step ${fmtInt(probe.step)} · teacher v${probe.teacher_version} · ` +
      `${probe.images} image${probe.images > 1 ? "s" : ""}`;
    $("train-probes").replaceChildren(...probe.items.map((item) => el("div", {
      class: "probe-row" + (item.score === null ? " input" : ""), "data-probe": item.name,
    }, el("span", { class: "probe-label", text: item.score === null ? "input" : "score " + item.name }),
    el("img", { src: withToken(item.url), alt: item.score === null ? "probe inputs" : "restored at score " + item.name }))));
  }

  function renderTraining(t) {
    const empty = !t.points.length && !t.probe;
    $("train-empty").hidden = !empty;
    $("train-body").hidden = empty;
    if (empty) return;
    const last = t.points[t.points.length - 1];
    $("train-step").textContent = last ? `· step ${fmtInt(last.step)}` : "";
    renderLosses(t);
    renderRates(t);
    renderProbes(t.probe);
  }

  // ------------------------------------------------------------------ detail
  function weightMap(w) {
    if (!w || !w.rows || !w.cols) return null;
    const max = Math.max(...w.values), min = Math.min(...w.values);
    const grid = el("span", { class: "wmap", title: "block weights: " + w.values.map(fmtNum).join(", ") });
    grid.style.gridTemplateColumns = `repeat(${w.cols}, 9px)`;
    for (const v of w.values) {
      const cell = el("span");
      const t = max > min ? (v - min) / (max - min) : 0.5;
      cell.style.background = `hsl(212, 80%, ${Math.round(25 + 45 * t)}%)`;
      grid.append(cell);
    }
    return grid;
  }

  function shot(title, badge, src, meta, cls) {
    const frame = el("div", { class: "frame" });
    if (src) frame.append(el("img", { src: withToken(src), alt: title }));
    else frame.append(el("span", { class: "missing", text: "not stored" }));
    return el("div", { class: "shot " + (cls || "") }, frame,
      el("div", { class: "cap" }, el("div", { class: "cap-top" }, el("span", { class: "title", text: title }), badge), meta));
  }

  function metaLine(pairs, extra) {
    const m = el("div", { class: "meta" });
    for (const [k, v] of pairs) m.append(el("span", {}, k + " ", el("b", { text: v })));
    if (extra) m.append(extra);
    return m;
  }

  function renderDetail(d) {
    const key = JSON.stringify(d.entries.map((e) => e.label_id)) + d.input_url;
    $("d-title").textContent = d.image_id;
    const best = d.entries.length ? d.entries[0].ensemble : null;
    $("d-sub").textContent = d.entries.length
      ? `${d.entries.length} pseudo-label${d.entries.length > 1 ? "s" : ""} · best ${fmtScore(best)}`
      : "no pseudo-label kept";
    const idx = state.items.findIndex((i) => i.image_id === d.image_id);
    $("d-prev").disabled = idx <= 0;
    $("d-next").disabled = idx < 0 || idx >= state.items.length - 1;
    if (key === state.detailKey) {
      // Same entries: only the ages move.
      document.querySelectorAll("[data-age-ms]").forEach((node) => {
        node.textContent = fmtAge((Date.now() - Number(node.dataset.ageMs)) / 1000);
      });
      return;
    }
    state.detailKey = key;
    const shots = [shot("Degraded input", null, d.input_url ? d.input_url + "?size=512" : null,
      metaLine([["image", d.image_id]]), "input")];
    d.entries.forEach((e) => {
      const age = el("b", { "data-age-ms": String(e.created_at_ms), text: fmtAge(e.age_s) });
      const meta = metaLine([["teacher", "v" + e.teacher_version], ["aug", e.augmentation], ["level", e.level.toFixed(2)]]);
      meta.append(el("span", {}, "age ", age));
      meta.append(el("span", { class: "label", title: "label id" }, el("b", { text: e.label_id })));
      const wm = weightMap(e.weights);
      if (wm) meta.append(el("span", {}, "blocks", wm));
      shots.push(shot(`#${e.rank + 1}`, scoreBadge(e.ensemble), e.image_url + "?size=512", meta));
    });
    $("d-strip").replaceChildren(...shots);

    const metrics = [...new Set(d.entries.flatMap((e) => Object.keys(e.normalized_scores).concat(Object.keys(e.raw_scores))))].sort();
    const head = el("tr", {}, el("th", { text: "metric" }),
      ...d.entries.map((e) => el("th", { text: `#${e.rank + 1} · ${e.augmentation}` })));
    const rows = metrics.map((m) => el("tr", {},
      el("td", {}, m, el("span", { class: "dir", text: LOWER_IS_BETTER.has(m) ? "raw: lower is better" : "" })),
      ...d.entries.map((e) => {
        const n = e.normalized_scores[m];
        const bar = el("span", { class: "nbar" });
        const fill = el("span");
        if (n !== undefined) {
          fill.style.width = (100 * Math.max(0, Math.min(1, n))).toFixed(0) + "%";
          fill.style.background = scoreColour(10 * n);
        }
        bar.append(fill);
        return el("td", { title: `${m}: raw ${e.raw_scores[m]}, normalised ${n}` },
          el("span", { class: "norm", text: n === undefined ? "–" : n.toFixed(3) }), bar,
          el("span", { class: "raw", text: "raw " + fmtNum(e.raw_scores[m]) }));
      })));
    const ens = el("tr", { class: "ens" }, el("td", { text: "ensemble (0-10)" }),
      ...d.entries.map((e) => el("td", {}, scoreBadge(e.ensemble))));
    const cols = el("colgroup", {}, ...Array.from({ length: 4 }, () => el("col")));
    $("d-metrics").replaceChildren(cols, el("thead", {}, head), el("tbody", {}, ...rows, ens));
  }

  async function loadDetail() {
    if (!state.detailId) return;
    try {
      const d = await api(`/bank/images/${encodeURIComponent(state.detailId)}`);
      if (d.image_id === state.detailId) renderDetail(d);
    } catch (err) {
      if (err.status === 404) {
        $("d-sub").textContent = "this image has left the bank";
      }
    }
  }

  function openDetail(imageId) {
    state.detailId = imageId;
    state.detailKey = "";
    $("d-strip").replaceChildren();
    $("d-metrics").replaceChildren();
    $("d-title").textContent = imageId;
    $("d-sub").textContent = "loading…";
    $("detail").hidden = false;
    history.replaceState(null, "", "#" + encodeURIComponent(imageId));
    loadDetail();
  }

  function closeDetail() {
    state.detailId = null;
    $("detail").hidden = true;
    history.replaceState(null, "", location.pathname + location.search);
  }

  function stepDetail(delta) {
    const idx = state.items.findIndex((i) => i.image_id === state.detailId);
    const next = state.items[idx + delta];
    if (idx >= 0 && next) openDetail(next.image_id);
  }

  // ------------------------------------------------------------------ refresh loop
  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const [stats, page, training] = await Promise.all([
        api("/bank/stats"),
        api(`/bank/images?offset=${state.offset}&limit=${PAGE_SIZE}&sort=${state.sort}`),
        api(`/api/training?limit=${TRAIN_POINTS}`),
      ]);
      if (page.total > 0 && state.offset >= page.total) {
        state.offset = Math.max(0, (Math.ceil(page.total / PAGE_SIZE) - 1) * PAGE_SIZE);
      }
      state.stats = stats;
      state.items = page.items;
      pushHistory(stats);
      renderKpis(stats);
      renderGrid(page);
      renderHistogram(stats.histogram);
      renderDrops(stats);
      renderHistory();
      renderCounters(stats);
      renderTraining(training);
      await loadDetail();
      showBanner(null);
      setStatus(state.interval ? "live" : "paused",
        (state.interval ? "live · " : "paused · ") + new Date().toLocaleTimeString());
    } catch (err) {
      if (err.status === 503) {
        setStatus("down", "Redis unavailable");
        showBanner("Redis is not reachable right now (restarting?). The page keeps retrying; what you see is the last state it read.");
      } else if (err.status === 401) {
        setStatus("down", "token needed");
        showBanner("This monitor needs a token: open the page as /?token=<token>.");
      } else {
        setStatus("down", "monitor unreachable");
        showBanner("The monitor is not answering: " + (err.message || err));
      }
    } finally {
      state.busy = false;
    }
  }

  function schedule() {
    if (state.timer) clearInterval(state.timer);
    state.timer = state.interval ? setInterval(refresh, state.interval) : null;
  }

  function init() {
    $("api-link").href = withToken("/openapi.json");
    $("metrics-link").href = withToken("/metrics");
    $("sort").addEventListener("change", (ev) => { state.sort = ev.target.value; state.offset = 0; refresh(); });
    $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); refresh(); });
    $("next").addEventListener("click", () => { state.offset += PAGE_SIZE; refresh(); });
    $("refresh").addEventListener("change", (ev) => { state.interval = Number(ev.target.value); schedule(); refresh(); });
    $("d-close").addEventListener("click", closeDetail);
    $("d-prev").addEventListener("click", () => stepDetail(-1));
    $("d-next").addEventListener("click", () => stepDetail(1));
    $("detail").addEventListener("click", (ev) => { if (ev.target === $("detail")) closeDetail(); });
    document.addEventListener("keydown", (ev) => {
      if ($("detail").hidden) return;
      if (ev.key === "Escape") closeDetail();
      else if (ev.key === "ArrowLeft") stepDetail(-1);
      else if (ev.key === "ArrowRight") stepDetail(1);
    });
    const hash = decodeURIComponent(location.hash.slice(1));
    if (/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(hash)) openDetail(hash);
    refresh();
    schedule();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
