// Routing grid: tokens (columns) x MoE layers (rows). Each cell is filled with its top-1 expert's colour and, when
// the cell is big enough, that expert's number; a thin strip at the cell's foot shows experts 2..k, sized by weight.
// Token texts run along the x axis (whitespace made visible), layer labels along the y axis; a legend names the
// colours; hover highlights the row and column, a click selects the token. Written once against a tiny `api`
// ({get, set, on}) so the same code runs under anywidget (notebook), Panel's JSComponent (`workbench serve`) and the
// static HTML export; the bridge files beside this one adapt each host's model to that api.
//
// data: {start, n_total, page, n_pages, layers[L], n_experts E, top_k k, text[n],
//        expert_ids[n*L*k] (flat, token-major), weights[n*L*k], load[L*E], source,
//        hash_layers[] (DeepSeek-V4 layers routed by tid2eid[token id]), token_ids[n] (only with hash layers)}
// Hash-routed rows are marked: "#" before the layer label, a dashed border, and the tooltip names tid2eid.
//
// Two stacked canvases: the grid (drawn once per page, O(n·L) rects) and an overlay for hover / selection /
// legend highlights, so moving the cursor never repaints the grid.

const MIN_CELL_W = 14, MAX_CELL_W = 36; // 256 tokens: the dense 14 px columns; a short prompt: 36 px
const GRID_TARGET_W = 720; // a page of n tokens gets about this width, within the bounds above
const AXIS_W = 40, PAD_TOP = 4, LOAD_H = 26, MAX_LABEL_PX = 96, FOOT_SHARE = 0.24;
const NUMBER_MIN_W = 20; // cells narrower than this show colour only
const HASH_INK = "#8a4b00"; // label and border of a hash-routed row

function isHashRow(d, l) {
  return (d.hash_layers || []).includes(d.layers[l]);
}

function layerLabel(d, l) {
  return `${isHashRow(d, l) ? "#" : ""}L${d.layers[l]}`;
}

// What routed token i in row l: the gate, or (hash-routed) tid2eid's row for the token's id.
function hashNote(d, i) {
  const tid = d.token_ids ? d.token_ids[i] : undefined;
  return `hash-routed: experts = tid2eid[${tid === undefined ? "token id" : tid}]`;
}

// Cell size for a page of n tokens: wide cells for a short prompt, the dense layout for a full page.
function cellGeometry(n) {
  const w = Math.max(MIN_CELL_W, Math.min(MAX_CELL_W, Math.floor(GRID_TARGET_W / Math.max(1, n))));
  return { w, h: Math.max(18, Math.min(26, Math.round(w * 0.7))) };
}

function expertRgb(e) {
  if (e < 0) return [221, 221, 221];
  const h = (e * 137.508) % 360; // golden angle: neighbouring ids get distant hues
  const s = 0.62, l = (42 + 16 * ((e * 7) % 3) / 2) / 100;
  const a = s * Math.min(l, 1 - l);
  const f = (n) => { const k = (n + h / 30) % 12; return l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)); };
  return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
}

function expertColour(e) {
  const [r, g, b] = expertRgb(e);
  return `rgb(${r}, ${g}, ${b})`;
}

// Black or white, whichever reads better on the expert's colour (relative luminance, WCAG weights).
function inkOn(e) {
  const [r, g, b] = expertRgb(e).map((v) => { const c = v / 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.22 ? "#111" : "#fff";
}

function cellChoices(d, i, l) {
  const L = d.layers.length, k = d.top_k, out = [];
  for (let s = 0; s < k; s++) {
    const at = (i * L + l) * k + s;
    out.push([d.expert_ids[at], d.weights[at]]);
  }
  return out;
}

// `text` cut to `maxW` pixels in the current font, with an ellipsis when cut.
function fitText(g, text, maxW) {
  if (g.measureText(text).width <= maxW) return text;
  const chars = Array.from(text);
  while (chars.length > 1 && g.measureText(chars.join("") + "…").width > maxW) chars.pop();
  return chars.join("") + "…";
}

function detailTable(d, i) {
  const table = el_("table", "wb-routing-detail-table");
  const head = el_("tr");
  head.appendChild(el_("th", "", "layer"));
  for (let s = 0; s < d.top_k; s++) head.appendChild(el_("th", "", `#${s + 1}`));
  table.appendChild(head);
  d.layers.forEach((layer, l) => {
    const tr = el_("tr");
    tr.dataset.layer = String(layer);
    tr.dataset.hashRouted = String(isHashRow(d, l));
    const label = el_("td", "", layerLabel(d, l));
    if (isHashRow(d, l)) { label.title = hashNote(d, i); label.style.color = HASH_INK; }
    tr.appendChild(label);
    for (const [e, w] of cellChoices(d, i, l)) {
      const td = el_("td", "", e < 0 ? "—" : `e${e} ${Number(w).toFixed(3)}`);
      td.style.borderLeft = `6px solid ${expertColour(e)}`;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  });
  return table;
}

function fillRects(g, colour, r) {
  g.fillStyle = colour;
  g.beginPath();
  for (let j = 0; j < r.length; j += 4) g.rect(r[j], r[j + 1], r[j + 2], r[j + 3]);
  g.fill();
}

function sizeCanvas(canvas, W, H, dpr) {
  canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
  canvas.style.width = `${W}px`; canvas.style.height = `${H}px`;
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, W, H);
  return g;
}

function draw(el, api) {
  const root = el_("div", "wb-routing");
  const style = el_("style");
  style.textContent = `
    .wb-routing { font: 12px/1.35 system-ui, sans-serif; color: #222; position: relative; }
    .wb-routing-caption { margin: 2px 0 4px; }
    .wb-routing-scroll { overflow-x: auto; max-width: 100%; }
    .wb-routing-plot { position: relative; width: max-content; }
    .wb-routing canvas { display: block; }
    .wb-routing canvas.wb-routing-grid { cursor: crosshair; }
    .wb-routing canvas.wb-routing-overlay { position: absolute; left: 0; top: 0; pointer-events: none; }
    .wb-routing-tokens, .wb-routing-rows { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
      white-space: nowrap; margin: 0; padding: 0; }
    .wb-routing-legend { display: flex; flex-wrap: wrap; gap: 2px 10px; align-items: center; margin: 4px 0 2px;
      max-width: 900px; }
    .wb-routing-legend-item { display: inline-flex; align-items: center; gap: 3px; cursor: default; }
    .wb-routing-legend-swatch { width: 11px; height: 11px; border-radius: 2px; display: inline-block; }
    .wb-routing-tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #999;
      padding: 4px 6px; box-shadow: 0 1px 4px rgba(0,0,0,.25); display: none; z-index: 10; white-space: pre; }
    .wb-routing-detail-table { border-collapse: collapse; margin-top: 6px; }
    .wb-routing-detail-table td, .wb-routing-detail-table th { padding: 1px 8px 1px 4px; text-align: left; }
    .wb-routing-loads { margin-top: 8px; }
    .wb-routing-load-row { display: flex; align-items: center; gap: 6px; }
  `;
  const caption = el_("div", "wb-routing-caption");
  const scroll = el_("div", "wb-routing-scroll");
  const plot = el_("div", "wb-routing-plot");
  const canvas = el_("canvas", "wb-routing-grid");
  const overlay = el_("canvas", "wb-routing-overlay");
  canvas.setAttribute("role", "img");
  plot.append(canvas, overlay);
  scroll.appendChild(plot);
  const tokenList = el_("ol", "wb-routing-tokens");
  tokenList.setAttribute("aria-label", "tokens on this page, left to right");
  const rowList = el_("ol", "wb-routing-rows");
  rowList.setAttribute("aria-label", "MoE layers, top to bottom");
  const legend = el_("div", "wb-routing-legend");
  const tip = el_("div", "wb-routing-tip");
  const detail = el_("div", "wb-routing-detail");
  const loads = el_("div", "wb-routing-loads");
  root.append(style, caption, scroll, tokenList, rowList, legend, tip, detail, loads);
  el.appendChild(root);

  // what the overlay shows; geometry is set by render() for the page drawn
  const view = { d: null, geo: null, hover: null, expert: null };

  function showDetail(d, i) {
    detail.replaceChildren();
    if (i < 0 || i >= d.text.length) return;
    detail.dataset.token = String(d.start + i);
    detail.appendChild(el_("div", "wb-routing-detail-title",
      `token ${d.start + i}: ${JSON.stringify(d.text[i])} — top-${d.top_k} experts and weights per MoE layer`));
    detail.appendChild(detailTable(d, i));
  }

  function selectedOnPage() {
    const d = view.d, sel = api.get("selected");
    return d && sel >= d.start && sel < d.start + d.text.length ? sel - d.start : -1;
  }

  function render() {
    const d = api.get("data");
    if (!d || !d.layers) { caption.textContent = "no routing data"; view.d = null; return; }
    const n = d.text.length, L = d.layers.length, k = d.top_k;
    root.dataset.tokens = String(n);
    root.dataset.layers = String(L);
    root.dataset.start = String(d.start);
    root.dataset.source = d.source || "";
    root.dataset.hashLayers = (d.hash_layers || []).join(",");
    const hashed = d.hash_layers || [];
    caption.textContent = `${d.source}: tokens ${d.start}-${d.start + n - 1} of ${d.n_total} ` +
      `(page ${d.page + 1}/${d.n_pages}) x ${L} MoE layers, top-${k} of ${d.n_experts} experts` +
      (hashed.length ? `; # = hash-routed (${hashed.map((x) => `L${x}`).join(", ")}: experts = tid2eid[token id])` : "");
    canvas.setAttribute("aria-label", caption.textContent);
    const geo = layout(d);
    view.d = d; view.geo = geo; view.hover = null; view.expert = null;
    const dpr = window.devicePixelRatio || 1;
    const g = sizeCanvas(canvas, geo.W, geo.H, dpr);
    drawAxes(g, d, geo);
    drawCells(g, d, geo);
    Object.assign(canvas.dataset, {
      cellW: String(geo.cw), cellH: String(geo.ch), gridX: String(geo.x0), gridY: String(geo.y0),
      labelY: String(geo.bandY), labelMode: geo.mode,
    });
    tokenList.replaceChildren(...geo.labels.map((label, i) => {
      const li = el_("li", "", label);
      li.dataset.token = String(d.start + i);
      li.dataset.text = d.text[i];
      return li;
    }));
    rowList.replaceChildren(...d.layers.map((layer, l) => {
      const li = el_("li", "wb-routing-row",
        isHashRow(d, l) ? `${layerLabel(d, l)} (hash-routed: experts = tid2eid[token id])` : layerLabel(d, l));
      li.dataset.layer = String(layer);
      li.dataset.hashRouted = String(isHashRow(d, l));
      li.dataset.label = layerLabel(d, l);
      return li;
    }));
    drawLegend(d);
    const i = selectedOnPage();
    showDetail(d, i);
    drawOverlay();
    drawLoads(d);
  }

  // Cell size, label orientation and canvas size for page `d`. Labels lie flat when every one fits its column;
  // otherwise all are slanted 45° (wide columns) or turned a quarter (dense ones), reading downwards, and cut at
  // MAX_LABEL_PX.
  function layout(d) {
    const n = d.text.length, L = d.layers.length;
    const { w: cw, h: ch } = cellGeometry(n);
    const g = canvas.getContext("2d");
    // a trace stored without token text (e.g. imported from vLLM) is labelled with token positions instead
    const labels = d.text.every((t) => t === "") ? d.text.map((_, i) => String(d.start + i)) : d.text.map(visibleToken);
    const flatFont = `${cw >= 30 ? 12 : 11}px system-ui, sans-serif`;
    g.font = flatFont;
    const flat = labels.every((s) => g.measureText(s).width <= cw - 3);
    const mode = flat ? "flat" : cw >= 24 ? "diagonal" : "vertical";
    const font = flat ? flatFont : `${Math.max(9, Math.min(12, cw - 3))}px system-ui, sans-serif`;
    g.font = font;
    const longest = Math.min(MAX_LABEL_PX, Math.ceil(Math.max(0, ...labels.map((s) => g.measureText(s).width))));
    const angle = mode === "diagonal" ? Math.PI / 4 : Math.PI / 2;
    const band = flat ? 18 : Math.ceil(longest * Math.sin(angle)) + 12;
    const overhang = mode === "diagonal" ? Math.max(0, Math.ceil(longest * Math.cos(angle) - cw / 2)) : 0;
    const x0 = AXIS_W, y0 = PAD_TOP, bandY = y0 + L * ch + 2;
    return { cw, ch, x0, y0, bandY, band, labels, font, mode, angle, W: x0 + n * cw + 4 + overhang, H: bandY + band };
  }

  function drawAxes(g, d, geo) {
    g.fillStyle = "#222"; g.font = "11px system-ui, sans-serif"; g.textBaseline = "middle"; g.textAlign = "right";
    d.layers.forEach((layer, l) => {
      g.fillStyle = isHashRow(d, l) ? HASH_INK : "#222";
      g.fillText(layerLabel(d, l), geo.x0 - 6, geo.y0 + l * geo.ch + geo.ch / 2);
    });
    g.font = geo.font;
    g.fillStyle = "#333";
    geo.labels.forEach((label, i) => {
      const cx = geo.x0 + i * geo.cw + geo.cw / 2;
      if (geo.mode === "flat") {
        g.textAlign = "center"; g.textBaseline = "top";
        g.fillText(label, cx, geo.bandY + 3);
      } else {
        g.save();
        g.translate(cx - (geo.mode === "diagonal" ? 4 : 0), geo.bandY + 5);
        g.rotate(geo.angle);
        g.textAlign = "left"; g.textBaseline = "middle";
        g.fillText(fitText(g, label, MAX_LABEL_PX), 0, 0);
        g.restore();
      }
    });
  }

  // Cells are collected per colour and filled as one path each (a few hundred fills instead of n·L·k fillRects:
  // ~10x faster on a software canvas), edges on whole pixels so neighbouring strips neither blur nor overlap.
  function drawCells(g, d, geo) {
    const n = d.text.length, L = d.layers.length, k = d.top_k, { cw, ch } = geo;
    const ids = d.expert_ids, wts = d.weights;
    const rects = new Map(); // expert id -> [x, y, w, h, x, y, w, h, ...]
    const add = (e, x, y, w, h) => { let r = rects.get(e); if (!r) rects.set(e, r = []); r.push(x, y, w, h); };
    const foot = k > 1 ? Math.max(3, Math.round((ch - 2) * FOOT_SHARE)) : 0;
    const w = cw - 2, h = ch - 2;
    const hairlines = [];
    for (let i = 0; i < n; i++) {
      const x = geo.x0 + i * cw + 1;
      for (let l = 0; l < L; l++) {
        const y = geo.y0 + l * ch + 1, at = (i * L + l) * k;
        let total = 0, count = 0;
        for (let s = 1; s < k; s++) {
          if (ids[at + s] < 0) continue;
          count++;
          total += Number.isFinite(wts[at + s]) ? Math.abs(wts[at + s]) : 0;
        }
        add(ids[at], x, y, w, count ? h - foot - 1 : h);
        if (!count) continue;
        hairlines.push(x, y + h - foot - 1, w, 1); // between the top-1 fill and the others' strip
        let acc = 0, fx = x; // experts 2..k along the foot, widths by weight (equal when weights are missing)
        for (let s = 1; s < k; s++) {
          const e = ids[at + s], wt = wts[at + s];
          if (e < 0) continue;
          acc += total > 0 && Number.isFinite(wt) ? Math.abs(wt) / total : 1 / count;
          const next = x + Math.round(acc * w);
          if (next > fx) add(e, fx, y + h - foot, next - fx, foot);
          fx = next;
        }
      }
    }
    for (const [e, r] of rects) fillRects(g, expertColour(e), r);
    fillRects(g, "rgba(255,255,255,0.85)", hairlines);
    g.save(); // hash-routed rows: a dashed border round the whole row
    g.strokeStyle = HASH_INK; g.lineWidth = 2; g.setLineDash([4, 3]);
    for (let l = 0; l < L; l++) if (isHashRow(d, l)) g.strokeRect(geo.x0 + 1, geo.y0 + l * ch + 1, n * cw - 2, ch - 2);
    g.restore();
    const numberFont = `${Math.min(12, ch - foot - 6)}px system-ui, sans-serif`;
    g.font = numberFont;
    if (cw < NUMBER_MIN_W || g.measureText(String(Math.max(0, d.n_experts - 1))).width > cw - 4) return;
    g.textAlign = "center"; g.textBaseline = "middle";
    for (let i = 0; i < n; i++) for (let l = 0; l < L; l++) {
      const top = ids[(i * L + l) * k];
      if (top < 0) continue;
      g.fillStyle = inkOn(top);
      g.fillText(String(top), geo.x0 + i * cw + 1 + w / 2, geo.y0 + l * ch + 1 + (h - foot) / 2 + 0.5);
    }
  }

  // Legend of the experts that are top-1 somewhere on this page, with how many cells each fills.
  function drawLegend(d) {
    const n = d.text.length, L = d.layers.length, counts = new Map();
    for (let i = 0; i < n; i++) for (let l = 0; l < L; l++) {
      const e = d.expert_ids[(i * L + l) * d.top_k];
      counts.set(e, (counts.get(e) || 0) + 1);
    }
    const title = el_("span", "wb-routing-legend-title",
      d.top_k > 1 ? `cell colour = top-1 expert (strip at its foot: #2-#${d.top_k}); cells per expert:`
        : "cell colour = top-1 expert; cells per expert:");
    const items = [...counts.keys()].sort((a, b) => a - b).map((e) => {
      const item = el_("span", "wb-routing-legend-item");
      item.dataset.expert = String(e);
      item.dataset.count = String(counts.get(e));
      const swatch = el_("span", "wb-routing-legend-swatch");
      swatch.style.background = expertColour(e);
      item.append(swatch, el_("span", "", `${e < 0 ? "none" : `e${e}`} ${counts.get(e)}`));
      item.addEventListener("mouseenter", () => { view.expert = e; drawOverlay(); });
      item.addEventListener("mouseleave", () => { view.expert = null; drawOverlay(); });
      return item;
    });
    legend.replaceChildren(title, ...items);
  }

  // Hover (row + column), selection (column) and legend highlight, on the overlay canvas only.
  function drawOverlay() {
    const { d, geo } = view;
    if (!d) return;
    const n = d.text.length, L = d.layers.length, { cw, ch, x0, y0, bandY, band } = geo;
    const g = sizeCanvas(overlay, geo.W, geo.H, window.devicePixelRatio || 1);
    const gridH = L * ch;
    if (view.expert !== null) { // fade every cell whose top-1 is another expert
      g.fillStyle = "rgba(255,255,255,0.78)";
      for (let i = 0; i < n; i++) for (let l = 0; l < L; l++) {
        if (d.expert_ids[(i * L + l) * d.top_k] !== view.expert) g.fillRect(x0 + i * cw, y0 + l * ch, cw, ch);
      }
    }
    const sel = selectedOnPage();
    root.dataset.selected = sel < 0 ? "" : String(d.start + sel);
    for (const li of tokenList.children) li.removeAttribute("aria-current");
    if (sel >= 0) {
      tokenList.children[sel].setAttribute("aria-current", "true");
      g.fillStyle = "rgba(30, 110, 230, 0.18)";
      g.fillRect(x0 + sel * cw, bandY, cw, band);
      g.strokeStyle = "#1e6ee6"; g.lineWidth = 2;
      g.strokeRect(x0 + sel * cw + 1, y0 - 2, cw - 2, gridH + 4);
    }
    const hv = view.hover;
    root.dataset.hoverToken = hv ? String(d.start + hv.i) : "";
    root.dataset.hoverLayer = hv && hv.l >= 0 ? String(d.layers[hv.l]) : "";
    if (hv) {
      g.fillStyle = "rgba(255, 190, 0, 0.28)";
      g.fillRect(x0 + hv.i * cw, bandY, cw, band);
      g.strokeStyle = "rgba(0, 0, 0, 0.7)"; g.lineWidth = 1;
      g.strokeRect(x0 + hv.i * cw + 0.5, y0 + 0.5, cw - 1, gridH - 1);
      if (hv.l >= 0) {
        g.fillRect(0, y0 + hv.l * ch, x0 - 2, ch);
        g.strokeRect(x0 + 0.5, y0 + hv.l * ch + 0.5, n * cw - 1, ch - 1);
        g.lineWidth = 2; g.strokeStyle = "#000";
        g.strokeRect(x0 + hv.i * cw + 1, y0 + hv.l * ch + 1, cw - 2, ch - 2);
      }
    }
  }

  function drawLoads(d) {
    loads.replaceChildren(el_("div", "", "expert load per layer (share of token choices over the whole source)"));
    const E = d.n_experts;
    d.layers.forEach((layer, l) => {
      const row = el_("div", "wb-routing-load-row");
      const counts = d.load.slice(l * E, (l + 1) * E);
      const total = counts.reduce((a, b) => a + b, 0), max = Math.max(1, ...counts);
      const c = el_("canvas", "wb-routing-load");
      const w = Math.max(E * 3, 120);
      c.width = w; c.height = LOAD_H; c.dataset.layer = String(layer);
      const g = c.getContext("2d");
      counts.forEach((v, e) => {
        g.fillStyle = expertColour(e);
        const h = (v / max) * (LOAD_H - 2);
        g.fillRect((e * w) / E, LOAD_H - h, Math.max(1, w / E - 1), h);
      });
      const mean = total / E;
      const stat = el_("span", "wb-routing-load-stat",
        `L${layer}: max/mean ${(mean > 0 ? max / mean : 0).toFixed(2)}, busiest e${counts.indexOf(max)}`);
      row.append(c, stat);
      loads.appendChild(row);
    });
  }

  // The token (and layer, or -1 over the token labels) under the pointer, or null.
  function cellAt(ev) {
    const { d, geo } = view;
    if (!d) return null;
    const r = canvas.getBoundingClientRect();
    const x = ev.clientX - r.left, y = ev.clientY - r.top;
    const i = Math.floor((x - geo.x0) / geo.cw);
    if (i < 0 || i >= d.text.length || y < geo.y0) return null;
    const l = y < geo.y0 + d.layers.length * geo.ch ? Math.floor((y - geo.y0) / geo.ch) : -1;
    return { d, i, l };
  }

  canvas.addEventListener("mousemove", (ev) => {
    const hit = cellAt(ev);
    const before = view.hover;
    view.hover = hit ? { i: hit.i, l: hit.l } : null;
    if (!before || !hit || before.i !== hit.i || before.l !== hit.l) drawOverlay();
    if (!hit) { tip.style.display = "none"; return; }
    const { d, i } = hit;
    const lines = [`token ${d.start + i} ${JSON.stringify(d.text[i])}`];
    d.layers.forEach((layer, l) => lines.push(
      `${layerLabel(d, l)}: ` + cellChoices(d, i, l).map(([e, w]) => `e${e} ${Number(w).toFixed(2)}`).join("  ") +
      (isHashRow(d, l) ? `  (${hashNote(d, i)})` : "")));
    tip.textContent = lines.join("\n");
    const box = root.getBoundingClientRect();
    tip.style.left = `${ev.clientX - box.left + 12}px`;
    tip.style.top = `${ev.clientY - box.top + 12}px`;
    tip.style.display = "block";
  });
  canvas.addEventListener("mouseleave", () => {
    tip.style.display = "none";
    view.hover = null;
    drawOverlay();
  });
  canvas.addEventListener("click", (ev) => {
    const hit = cellAt(ev);
    if (!hit) return;
    api.set("selected", hit.d.start + hit.i);
    showDetail(hit.d, hit.i);
    drawOverlay();
  });

  api.on("data", render);
  api.on("selected", () => {
    if (!view.d) return;
    const i = selectedOnPage();
    showDetail(view.d, i);
    drawOverlay();
  });
  render();
}
