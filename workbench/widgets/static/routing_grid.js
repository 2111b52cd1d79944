// Routing grid: tokens (columns) x MoE layers (rows), each cell split into top-k stripes coloured by expert and
// sized by weight; per-layer expert load underneath. Written once against a tiny `api` ({get, set, on}) so the
// same code runs under anywidget (notebook), Panel's JSComponent (`workbench serve`) and the static HTML export;
// the bridge files beside this one adapt each host's model to that api.
//
// data: {start, n_total, page, n_pages, layers[L], n_experts E, top_k k, text[n],
//        expert_ids[n*L*k] (flat, token-major), weights[n*L*k], load[L*E], source}

const CELL_W = 14, CELL_H = 18, LABEL_W = 44, LOAD_H = 26;

function expertColour(e, E) {
  if (e < 0) return "#ddd";
  const hue = (e * 137.508) % 360; // golden angle: neighbouring ids get distant hues
  const light = 42 + 16 * ((e * 7) % 3) / 2;
  return `hsl(${hue.toFixed(1)}, 62%, ${light.toFixed(0)}%)`;
}

function el_(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function cellChoices(d, i, l) {
  const L = d.layers.length, k = d.top_k, out = [];
  for (let s = 0; s < k; s++) {
    const at = (i * L + l) * k + s;
    out.push([d.expert_ids[at], d.weights[at]]);
  }
  return out;
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
    tr.appendChild(el_("td", "", `L${layer}`));
    for (const [e, w] of cellChoices(d, i, l)) {
      const td = el_("td", "", e < 0 ? "—" : `e${e} ${Number(w).toFixed(3)}`);
      td.style.borderLeft = `6px solid ${expertColour(e, d.n_experts)}`;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  });
  return table;
}

function draw(el, api) {
  const root = el_("div", "wb-routing");
  const style = el_("style");
  style.textContent = `
    .wb-routing { font: 12px/1.35 system-ui, sans-serif; color: #222; position: relative; }
    .wb-routing-caption { margin: 2px 0 4px; }
    .wb-routing-scroll { overflow-x: auto; max-width: 100%; }
    .wb-routing canvas { display: block; cursor: crosshair; }
    .wb-routing-tip { position: absolute; pointer-events: none; background: #fff; border: 1px solid #999;
      padding: 4px 6px; box-shadow: 0 1px 4px rgba(0,0,0,.25); display: none; z-index: 10; white-space: pre; }
    .wb-routing-detail-table { border-collapse: collapse; margin-top: 6px; }
    .wb-routing-detail-table td, .wb-routing-detail-table th { padding: 1px 8px 1px 4px; text-align: left; }
    .wb-routing-loads { margin-top: 8px; }
    .wb-routing-load-row { display: flex; align-items: center; gap: 6px; }
  `;
  const caption = el_("div", "wb-routing-caption");
  const scroll = el_("div", "wb-routing-scroll");
  const canvas = el_("canvas", "wb-routing-grid");
  scroll.appendChild(canvas);
  const tip = el_("div", "wb-routing-tip");
  const detail = el_("div", "wb-routing-detail");
  const loads = el_("div", "wb-routing-loads");
  root.append(style, caption, scroll, tip, detail, loads);
  el.appendChild(root);

  function showDetail(d, i) {
    detail.replaceChildren();
    if (i < 0 || i >= d.text.length) return;
    detail.dataset.token = String(d.start + i);
    detail.appendChild(el_("div", "wb-routing-detail-title",
      `token ${d.start + i}: ${JSON.stringify(d.text[i])} — top-${d.top_k} experts and weights per MoE layer`));
    detail.appendChild(detailTable(d, i));
  }

  function render() {
    const d = api.get("data");
    if (!d || !d.layers) { caption.textContent = "no routing data"; return; }
    const n = d.text.length, L = d.layers.length, k = d.top_k;
    root.dataset.tokens = String(n);
    root.dataset.layers = String(L);
    root.dataset.start = String(d.start);
    root.dataset.source = d.source || "";
    caption.textContent = `${d.source}: tokens ${d.start}-${d.start + n - 1} of ${d.n_total} ` +
      `(page ${d.page + 1}/${d.n_pages}) x ${L} MoE layers, top-${k} of ${d.n_experts} experts`;
    const dpr = window.devicePixelRatio || 1;
    const W = LABEL_W + n * CELL_W, H = L * CELL_H;
    canvas.width = W * dpr; canvas.height = H * dpr;
    canvas.style.width = `${W}px`; canvas.style.height = `${H}px`;
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, W, H);
    g.fillStyle = "#222"; g.font = "11px system-ui, sans-serif"; g.textBaseline = "middle";
    d.layers.forEach((layer, l) => g.fillText(`L${layer}`, 4, l * CELL_H + CELL_H / 2));
    for (let i = 0; i < n; i++) {
      for (let l = 0; l < L; l++) {
        const choices = cellChoices(d, i, l);
        const total = choices.reduce((a, [, w]) => a + (Number.isFinite(w) ? Math.abs(w) : 0), 0);
        let y = l * CELL_H + 1;
        const h = CELL_H - 2;
        for (const [e, w] of choices) {
          const share = total > 0 && Number.isFinite(w) ? Math.abs(w) / total : 1 / k;
          g.fillStyle = expertColour(e, d.n_experts);
          g.fillRect(LABEL_W + i * CELL_W + 1, y, CELL_W - 2, Math.max(1, share * h));
          y += share * h;
        }
      }
    }
    const sel = api.get("selected");
    showDetail(d, sel >= d.start && sel < d.start + n ? sel - d.start : -1);
    drawLoads(d);
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
        g.fillStyle = expertColour(e, E);
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

  function cellAt(ev) {
    const d = api.get("data");
    const r = canvas.getBoundingClientRect();
    const i = Math.floor((ev.clientX - r.left - LABEL_W) / CELL_W);
    const l = Math.floor((ev.clientY - r.top) / CELL_H);
    if (!d || i < 0 || i >= d.text.length || l < 0 || l >= d.layers.length) return null;
    return { d, i, l };
  }

  canvas.addEventListener("mousemove", (ev) => {
    const hit = cellAt(ev);
    if (!hit) { tip.style.display = "none"; return; }
    const { d, i } = hit;
    const lines = [`token ${d.start + i} ${JSON.stringify(d.text[i])}`];
    d.layers.forEach((layer, l) => lines.push(
      `L${layer}: ` + cellChoices(d, i, l).map(([e, w]) => `e${e} ${Number(w).toFixed(2)}`).join("  ")));
    tip.textContent = lines.join("\n");
    const box = root.getBoundingClientRect();
    tip.style.left = `${ev.clientX - box.left + 12}px`;
    tip.style.top = `${ev.clientY - box.top + 12}px`;
    tip.style.display = "block";
  });
  canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  canvas.addEventListener("click", (ev) => {
    const hit = cellAt(ev);
    if (!hit) return;
    api.set("selected", hit.d.start + hit.i);
    showDetail(hit.d, hit.i);
  });

  api.on("data", render);
  api.on("selected", render);
  render();
}
