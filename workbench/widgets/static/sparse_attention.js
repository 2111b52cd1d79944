// Sparse attention map: for one query token of the live prompt and one attention layer, what the query reads.
// Tokens run along the top (whitespace made visible); the query is outlined, its sliding-window tokens shaded blue.
// Below them, one bar per compressed entry spanning the tokens it pools (CSA entries overlap their neighbours by m
// tokens, so they alternate between two lanes; the overlap part is drawn paler): the entries the indexer chose are
// coloured by index score (legend), visible entries it did not choose are grey, entries not complete yet are outlined
// only. HCA layers read every complete entry (teal); V3.2 layers choose key tokens, one cell per key. Under that, the
// query's attention mass on window / compressed / sink, mean over heads and per head (V4). Layer buttons switch
// layers; hovering a token previews it as the query, a click (or the arrow keys) selects it. Written against the
// tiny `api` ({get, set, on}) shared with routing_grid.js, so the same code runs under anywidget, Panel (`workbench
// serve`) and the static HTML export.
//
// data: {model, family ("v4" | "v32" | "dense"), message, n, n_prompt, capped, text[n], heads,
//        layers: [{layer, kind, ratio, window, n_entries N, compressed, overlap, spans[N][lo, own_lo, hi], reads_all,
//                  dense, topk, selected[n][<=k] | null, scores[n][<=k] | null, mass[n*heads*3] | null, control}]}
// query: the selected query token (-1: the last one); layer: the layer shown (-1: the first with a selection).

const SVG_NS = "http://www.w3.org/2000/svg";
const TARGET_W = 760, MIN_CELL = 8, MAX_CELL = 36;
const LABEL_H = 64, ROW_H = 14, LANE_GAP = 3, AXIS_W = 74;
const BRANCHES = [["window", "#1f77b4"], ["compressed", "#ff7f0e"], ["sink", "#8c8c8c"]];
const UNCHOSEN = "#c8c8c8", READ_ALL = "#17a2a2", FUTURE = "#f4f4f4", WINDOW = "rgba(31, 119, 180, 0.28)";
// viridis stops: a perceptual ramp from low (dark violet) to high (yellow) index score
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function rampColour(f) {
  const x = Math.max(0, Math.min(1, Number.isFinite(f) ? f : 1)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x)), t = x - i;
  const c = RAMP[i].map((v, j) => Math.round(v + t * (RAMP[i + 1][j] - v)));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function svg_(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

// What query t reads in layer L: its window [lo, hi] (null: none), the entries visible to it, the chosen ones in
// the indexer's order and their scores.
function readsOf(L, t) {
  const window = L.window > 0 ? [Math.max(0, t - L.window + 1), t] : null;
  const visible = !L.compressed ? 0 : L.kind === "V3.2 sparse" ? t + 1 : Math.min(L.n_entries, Math.floor((t + 1) / L.ratio));
  let chosen = [], scores = [];
  if (L.reads_all) chosen = Array.from({ length: visible }, (_, w) => w);
  else if (L.selected) { chosen = L.selected[t] || []; scores = (L.scores && L.scores[t]) || []; }
  return { window, visible, chosen, scores };
}

function layerLabel(L) {
  if (L.kind === "window") return `L${L.layer} window`;
  if (L.kind === "V3.2 sparse") return `L${L.layer} sparse`;
  return `L${L.layer} ${L.kind}${L.kind === "HCA" ? ` m=${L.ratio}` : ""}`;
}

function draw(el, api) {
  const root = el_("div", "wb-sa");
  const style = el_("style");
  style.textContent = `
    .wb-sa { font: 12px/1.35 system-ui, sans-serif; color: #222; position: relative; }
    .wb-sa-caption { margin: 2px 0 4px; }
    .wb-sa-layers { display: flex; flex-wrap: wrap; gap: 4px; margin: 2px 0 6px; }
    .wb-sa-layer-button { font: inherit; padding: 2px 8px; border: 1px solid #999; border-radius: 3px; background: #fff;
      cursor: pointer; }
    .wb-sa-layer-button[aria-pressed="true"] { background: #1e6ee6; color: #fff; border-color: #1e6ee6; }
    .wb-sa-scroll { overflow-x: auto; max-width: 100%; }
    .wb-sa svg { display: block; }
    .wb-sa-token { cursor: pointer; }
    .wb-sa-detail { margin: 6px 0; white-space: pre-wrap; }
    .wb-sa-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; align-items: center; margin: 4px 0; }
    .wb-sa-swatch { width: 12px; height: 12px; display: inline-block; border-radius: 2px; vertical-align: middle;
      margin-right: 3px; border: 1px solid #bbb; }
    .wb-sa-ramp { width: 110px; height: 12px; display: inline-block; vertical-align: middle; margin: 0 4px;
      background: linear-gradient(to right, ${RAMP.map((c) => `rgb(${c.join(",")})`).join(", ")}); }
    .wb-sa-mass { margin-top: 6px; }
    .wb-sa-mass-row { display: flex; align-items: center; gap: 6px; margin: 1px 0; }
    .wb-sa-mass-label { width: 64px; text-align: right; color: #555; }
    .wb-sa-mass-bar { display: flex; width: 300px; height: 12px; border: 1px solid #ccc; }
    .wb-sa-mass-row[data-head="mean"] .wb-sa-mass-bar { height: 16px; }
    .wb-sa-tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #999; padding: 4px 6px;
      box-shadow: 0 1px 4px rgba(0,0,0,.25); display: none; z-index: 10; white-space: pre; }
    .wb-sa-message { padding: 6px; background: #f6f6f6; border-left: 4px solid #999; }
  `;
  const caption = el_("div", "wb-sa-caption");
  const layerBar = el_("div", "wb-sa-layers");
  const scroll = el_("div", "wb-sa-scroll");
  const detail = el_("div", "wb-sa-detail");
  const legend = el_("div", "wb-sa-legend");
  const mass = el_("div", "wb-sa-mass");
  const tip = el_("div", "wb-sa-tip");
  root.append(style, caption, layerBar, scroll, detail, legend, mass, tip);
  el.appendChild(root);

  // what is drawn: the data, the layer's record, the geometry, and the elements painted per query
  const view = { d: null, L: null, cw: 0, tokens: [], entries: [], windowBar: null, hover: -1 };

  function layerIndex(d) {
    const want = api.get("layer");
    const at = d.layers.findIndex((L) => L.layer === want);
    if (at >= 0) return at;
    const sparse = d.layers.findIndex((L) => L.selected);
    return sparse >= 0 ? sparse : 0;
  }

  function selectedQuery() {
    const d = view.d, q = api.get("query");
    return d && q >= 0 && q < d.n ? q : d ? d.n - 1 : -1;
  }

  function render() {
    const d = api.get("data");
    view.d = null;
    if (!d || !d.layers || !d.layers.length) {
      caption.textContent = "";
      layerBar.replaceChildren(); scroll.replaceChildren(); legend.replaceChildren(); mass.replaceChildren();
      detail.replaceChildren(el_("div", "wb-sa-message", (d && d.message) || "no attention data"));
      root.dataset.family = (d && d.family) || "";
      return;
    }
    view.d = d;
    const L = d.layers[layerIndex(d)];
    view.L = L;
    root.dataset.family = d.family;
    root.dataset.layer = String(L.layer);
    root.dataset.kind = L.kind;
    root.dataset.tokens = String(d.n);
    caption.textContent = `${d.model}: ${d.n} query tokens` +
      (d.capped ? ` (the first ${d.n} of the prompt's ${d.n_prompt}: the view's token cap)` : "") +
      ` × ${d.layers.length} attention layers; hover a token to preview it as the query, click to select it`;
    layerBar.replaceChildren(...d.layers.map((M) => {
      const b = el_("button", "wb-sa-layer-button", layerLabel(M));
      b.type = "button";
      b.dataset.layer = String(M.layer);
      b.dataset.kind = M.kind;
      b.setAttribute("aria-pressed", M.layer === L.layer ? "true" : "false");
      b.addEventListener("click", () => { api.set("layer", M.layer); render(); }); // hosts differ on local echoes
      return b;
    }));
    buildPlot(d, L);
    paint();
  }

  // The layer's static skeleton: token cells and labels, the window bar, one rect per entry (painted per query).
  function buildPlot(d, L) {
    const n = d.n, cw = Math.max(MIN_CELL, Math.min(MAX_CELL, Math.floor(TARGET_W / Math.max(1, n))));
    view.cw = cw;
    const lanes = L.kind === "V3.2 sparse" || !L.compressed ? 1 : L.overlap ? 2 : 1;
    const tokensY = LABEL_H, windowY = tokensY + ROW_H + 6, entriesY = windowY + ROW_H + 6;
    const H = entriesY + (L.compressed ? lanes * (ROW_H + LANE_GAP) : 0) + 4;
    const W = AXIS_W + n * cw + 8;
    const svg = svg_("svg", { width: W, height: H, class: "wb-sa-plot", role: "img" });
    svg.setAttribute("aria-label", `layer ${L.layer} (${L.kind}): tokens, window and compressed entries`);
    const axis = (y, text) => { const t = svg_("text", { x: AXIS_W - 6, y: y + ROW_H - 3, "text-anchor": "end",
      "font-size": 11, fill: "#444" }); t.textContent = text; svg.appendChild(t); };
    axis(tokensY, "tokens");
    axis(windowY, L.window > 0 ? `window ${L.window}` : "no window");
    if (L.compressed) axis(entriesY, L.kind === "V3.2 sparse" ? "keys" : `entries m=${L.ratio}`);
    const chars = Math.max(1, Math.floor((LABEL_H - 6) / 7));
    view.tokens = d.text.map((text, i) => {
      const x = AXIS_W + i * cw;
      const label = visibleToken(text);
      const t = svg_("text", { "font-size": Math.min(12, Math.max(9, cw - 2)), fill: "#333",
        transform: `translate(${x + cw / 2 + 3}, ${LABEL_H - 3}) rotate(-90)`, class: "wb-sa-token-label" });
      t.textContent = Array.from(label).length > chars ? Array.from(label).slice(0, chars - 1).join("") + "…" : label;
      t.dataset.token = String(i);
      svg.appendChild(t);
      const r = svg_("rect", { x: x + 0.5, y: tokensY, width: cw - 1, height: ROW_H, class: "wb-sa-token" });
      r.dataset.token = String(i);
      r.dataset.text = text;
      r.addEventListener("mouseenter", () => { view.hover = i; paint(); });
      r.addEventListener("click", () => { view.hover = -1; api.set("query", i); paint(); });
      svg.appendChild(r);
      return r;
    });
    view.windowBar = svg_("rect", { y: windowY, height: ROW_H, fill: "#1f77b4", class: "wb-sa-window" });
    svg.appendChild(view.windowBar);
    view.entries = [];
    if (L.compressed) {
      L.spans.forEach(([lo, ownLo, hi], w) => {
        const lane = lanes === 2 ? w % 2 : 0, y = entriesY + lane * (ROW_H + LANE_GAP);
        const g = svg_("g", { class: "wb-sa-entry" });
        Object.assign(g.dataset, { entry: String(w), lo: String(lo), ownLo: String(ownLo), hi: String(hi) });
        const parts = [];
        if (ownLo > lo) parts.push(svg_("rect", { x: AXIS_W + lo * cw + 1, y, width: (ownLo - lo) * cw - 1,
          height: ROW_H, "fill-opacity": 0.45, class: "wb-sa-entry-overlap" }));
        parts.push(svg_("rect", { x: AXIS_W + ownLo * cw + 1, y, width: (hi - ownLo + 1) * cw - 2, height: ROW_H,
          class: "wb-sa-entry-own" }));
        g.append(...parts);
        g.addEventListener("mousemove", (ev) => showTip(ev, entryTip(w)));
        g.addEventListener("mouseleave", () => { tip.style.display = "none"; });
        svg.appendChild(g);
        view.entries.push({ g, parts });
      });
    }
    svg.addEventListener("mouseleave", () => { view.hover = -1; tip.style.display = "none"; paint(); });
    scroll.replaceChildren(svg);
  }

  function entryTip(w) {
    const { L } = view, t = view.hover >= 0 ? view.hover : selectedQuery();
    const [lo, ownLo, hi] = L.spans[w], r = readsOf(L, t), rank = r.chosen.indexOf(w);
    const what = L.kind === "V3.2 sparse" ? `key token ${w}` :
      `entry ${w}: tokens ${lo}-${hi}` + (ownLo > lo ? ` (own window ${ownLo}-${hi}, overlap ${lo}-${ownLo - 1})` : "");
    const state = w >= r.visible ? "not complete yet for this query" : rank < 0 ? "visible, not chosen" :
      L.reads_all ? "read (every complete entry)" : `chosen #${rank + 1}, index score ${r.scores[rank]}`;
    return `${what}\nquery ${t}: ${state}`;
  }

  function showTip(ev, text) {
    tip.textContent = text;
    const box = root.getBoundingClientRect();
    tip.style.left = `${ev.clientX - box.left + 12}px`;
    tip.style.top = `${ev.clientY - box.top + 12}px`;
    tip.style.display = "block";
  }

  // Colours and data-* of everything that depends on the query (the hovered one while hovering).
  function paint() {
    const { d, L, cw } = view;
    if (!d) return;
    const sel = selectedQuery(), t = view.hover >= 0 ? view.hover : sel;
    root.dataset.query = String(sel);
    root.dataset.hoverQuery = view.hover >= 0 ? String(view.hover) : "";
    const r = readsOf(L, t);
    const lo = r.scores.length ? Math.min(...r.scores) : 0, hi = r.scores.length ? Math.max(...r.scores) : 0;
    const scoreOf = new Map(r.chosen.map((w, j) => [w, r.scores[j]]));
    const colourOf = (w) => L.reads_all ? READ_ALL : rampColour(hi > lo ? (scoreOf.get(w) - lo) / (hi - lo) : 1);
    const keyCells = L.kind === "V3.2 sparse";
    view.tokens.forEach((rect, i) => {
      const inWindow = r.window && i >= r.window[0] && i <= r.window[1];
      const state = i === t ? "query" : inWindow ? "window" : i > t ? "future" : "";
      rect.dataset.read = state;
      rect.setAttribute("fill", i === t ? "#ffb000" : inWindow ? WINDOW : i > t ? "#fafafa" : "#fff");
      rect.setAttribute("stroke", i === t ? "#000" : i === sel ? "#1e6ee6" : "#ddd");
      rect.setAttribute("stroke-width", i === t || i === sel ? 2 : 1);
      rect.setAttribute("aria-current", i === sel ? "true" : "false");
    });
    if (r.window) {
      view.windowBar.setAttribute("x", AXIS_W + r.window[0] * cw + 1);
      view.windowBar.setAttribute("width", (r.window[1] - r.window[0] + 1) * cw - 2);
      view.windowBar.setAttribute("visibility", "visible");
    } else view.windowBar.setAttribute("visibility", "hidden");
    view.entries.forEach(({ g, parts }, w) => {
      const state = w >= r.visible ? "future" : scoreOf.has(w) || (L.reads_all && w < r.visible) ? "chosen" : "unchosen";
      g.dataset.state = state;
      g.dataset.score = scoreOf.has(w) ? String(scoreOf.get(w)) : "";
      const fill = state === "future" ? FUTURE : state === "chosen" ? colourOf(w) : UNCHOSEN;
      for (const p of parts) {
        p.setAttribute("fill", fill);
        p.setAttribute("stroke", state === "future" ? "#d0d0d0" : "none");
        p.setAttribute("stroke-dasharray", state === "future" ? "2 2" : "");
      }
      g.setAttribute("visibility", keyCells && w > t ? "hidden" : "visible");
    });
    showDetail(d, L, t, r);
    drawLegend(L, lo, hi);
    drawMass(d, L, t);
  }

  function showDetail(d, L, t, r) {
    Object.assign(detail.dataset, {
      query: String(t), layer: String(L.layer), kind: L.kind,
      windowLo: r.window ? String(r.window[0]) : "", windowHi: r.window ? String(r.window[1]) : "",
      visible: String(r.visible), chosen: r.chosen.join(","),
    });
    const lines = [`query ${t} ${JSON.stringify(d.text[t])} in layer ${L.layer} (${L.kind}` +
      (L.ratio > 1 && L.kind !== "V3.2 sparse" ? `, compress ratio ${L.ratio}` : "") + ")"];
    lines.push(r.window ? `window: tokens ${r.window[0]}-${r.window[1]} (${r.window[1] - r.window[0] + 1} of ` +
      `${L.window})` : L.kind === "V3.2 sparse" ? "no sliding window (V3.2: MLA over the indexer's keys)" :
      "window: off (a control drops it)");
    if (!L.compressed) lines.push(L.kind === "window" ? "no compressed entries (window-only layer)" :
      "compressed entries: off (a control drops them)");
    else if (L.kind === "V3.2 sparse") lines.push(`keys: ${r.chosen.length} of ${r.visible} causal keys chosen` +
      (L.topk ? ` (index_topk ${L.topk})` : L.dense ? " (dense control: every causal key)" : ""));
    else if (L.reads_all) lines.push(`compressed: every one of the ${r.visible} complete entries` +
      (L.dense ? " (dense control: no indexer)" : " (HCA reads them all)"));
    else lines.push(`compressed: ${r.chosen.length} of ${r.visible} complete entries chosen (index_topk ${L.topk})`);
    if (r.chosen.length && !L.reads_all) lines.push("chosen, best first: " + r.chosen.map((w, j) =>
      `${w}${L.kind === "V3.2 sparse" ? "" : ` [${L.spans[w][0]}-${L.spans[w][2]}]`} (${r.scores[j]})`).join(", "));
    detail.textContent = lines.join("\n");
  }

  function drawLegend(L, lo, hi) {
    const item = (colour, text, cls) => {
      const s = el_("span", `wb-sa-legend-item ${cls || ""}`);
      const sw = el_("span", "wb-sa-swatch");
      sw.style.background = colour;
      s.append(sw, document.createTextNode(text));
      return s;
    };
    const items = [item("#ffb000", "query")];
    if (L.window > 0) items.push(item(WINDOW, "window token"));
    if (L.compressed && !L.reads_all) {
      const ramp = el_("span", "wb-sa-legend-item wb-sa-legend-score");
      ramp.dataset.lo = String(lo); ramp.dataset.hi = String(hi);
      ramp.append(document.createTextNode(`chosen, by index score ${lo}`), el_("span", "wb-sa-ramp"),
        document.createTextNode(String(hi)));
      items.push(ramp, item(UNCHOSEN, "visible, not chosen"));
    } else if (L.compressed) items.push(item(READ_ALL, "read (every complete entry)"));
    if (L.compressed && L.kind !== "V3.2 sparse") items.push(item(FUTURE, "not complete yet"));
    if (L.overlap) items.push(item("rgba(120,120,120,0.45)", "paler part: the overlap with the previous window"));
    legend.replaceChildren(...items);
  }

  function drawMass(d, L, t) {
    mass.replaceChildren();
    if (!L.mass) {
      if (d.family === "v32") mass.appendChild(el_("div", "", "V3.2 has no window / compressed / sink split " +
        "(its MLA attends only to the chosen keys)"));
      return;
    }
    const H = d.heads, at = (h, b) => L.mass[(t * H + h) * 3 + b];
    const row = (label, values) => {
      const r = el_("div", "wb-sa-mass-row");
      r.dataset.head = label;
      const bar = el_("div", "wb-sa-mass-bar");
      values.forEach((v, b) => {
        const seg = el_("div", "wb-sa-mass-seg");
        seg.dataset.branch = BRANCHES[b][0];
        seg.dataset.value = String(v);
        seg.style.width = `${Math.max(0, v) * 100}%`;
        seg.style.background = BRANCHES[b][1];
        seg.title = `${BRANCHES[b][0]} ${(100 * v).toFixed(1)}%`;
        bar.appendChild(seg);
      });
      r.append(el_("span", "wb-sa-mass-label", label === "mean" ? "mean" : `head ${label}`), bar,
        el_("span", "wb-sa-mass-text", values.map((v, b) => `${BRANCHES[b][0]} ${(100 * v).toFixed(1)}%`).join(" · ")));
      return r;
    };
    const heads = Array.from({ length: H }, (_, h) => [0, 1, 2].map((b) => at(h, b)));
    const mean = [0, 1, 2].map((b) => heads.reduce((s, v) => s + v[b], 0) / H);
    mass.appendChild(el_("div", "wb-sa-mass-title", `attention mass of query ${t} per branch (softmax shares)`));
    mass.appendChild(row("mean", mean));
    heads.forEach((v, h) => mass.appendChild(row(String(h), v)));
  }

  // keyboard: left / right move the selected query (the map is focusable)
  root.tabIndex = 0;
  root.addEventListener("keydown", (ev) => {
    if (!view.d || (ev.key !== "ArrowLeft" && ev.key !== "ArrowRight")) return;
    const q = Math.max(0, Math.min(view.d.n - 1, selectedQuery() + (ev.key === "ArrowLeft" ? -1 : 1)));
    ev.preventDefault();
    view.hover = -1;
    api.set("query", q);
    paint();
  });

  api.on("data", render);
  api.on("layer", render);
  api.on("query", paint);
  render();
}
