// medssm report.html: tables, charts and a slice viewer drawn from the JSON in #medssm-data.
// No library and no request: everything the page shows is in the page (medssm/metrics/html_report.py).
//
// Section types: facts (label: value), table (sortable), cases (sortable, filterable, with the
// viewer), charts (line, scatter and bar charts as SVG with values on hover), confusion (matrices).
// A volume of the viewer: {dims, shape: [Z, Y, X], spacing: [z, y, x], channels, bits, centre,
// image: base64 of deflated MED residuals (8-bit), labels: {name: base64 of deflated class bits}}.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("medssm-data").textContent);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"];
  const SVGNS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------------------------------------
  // Small helpers.

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function sv(tag, attrs, ...children) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, v);
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) e.append(c);
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "–";
    if (typeof v !== "number") return String(v);
    if (digits === undefined) return Number.isInteger(v) ? String(v) : String(+v.toPrecision(6));
    if (digits === 0) return Math.round(v).toLocaleString("en-US");
    return v.toFixed(digits);
  }

  function compare(a, b) {  // numbers numerically, text naturally; missing values go last (see sortRows)
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a).localeCompare(String(b), "en", {numeric: true});
  }

  function missing(v) { return v === null || v === undefined || v === "" || (typeof v === "number" && !isFinite(v)); }

  function hexRgb(hex) { return [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16)); }

  // ---------------------------------------------------------------------------------------------
  // The page.

  function page() {
    const sections = DATA.sections.map((s, i) => ({...s, id: s.id || `section-${i}`}));
    document.title = DATA.title;
    const nav = el("nav", {}, sections.map(s => el("a", {href: "#" + s.id}, s.title)));
    const header = el("header", {}, el("h1", {}, DATA.title),
                      el("p", {class: "meta"}, `written by ${DATA.generator} on ${DATA.generated.replace("T", " ")}`),
                      nav);
    const main = el("main", {});
    document.body.append(header, main);
    let row = null;  // consecutive "half" sections side by side
    for (const s of sections) {
      if (!s.half) { row = null; main.append(section(s)); continue; }
      if (!row) { row = el("div", {class: "row"}); main.append(row); }
      row.append(section(s));
    }
  }

  function section(s) {
    const box = el("section", {id: s.id, class: "section section-" + s.type}, el("h2", {}, s.title));
    const render = {facts, links, table: plainTable, cases, charts, confusion}[s.type];
    if (render) box.append(render(s));
    if (s.note) box.append(el("p", {class: "note"}, s.note));
    return box;
  }

  function facts(s) {
    return el("dl", {class: "facts"}, s.items.map(([k, v]) => [
      el("dt", {}, k),
      el("dd", {}, fmt(v)),
    ]));
  }

  function links(s) {  // relative links to the folder's other files: opened only when clicked
    return el("ul", {class: "links"}, s.items.map(([text, href]) => el("li", {}, el("a", {href}, text))));
  }

  // ---------------------------------------------------------------------------------------------
  // Tables: click a heading to sort (again to reverse); missing values stay last.

  function sortRows(rows, key, dir) {
    return rows.slice().sort((a, b) => {
      const x = a[key], y = b[key];
      if (missing(x) || missing(y)) return missing(x) - missing(y);
      return dir * compare(x, y);
    });
  }

  function dataTable(columns, rows, opts) {
    const state = {key: opts.sort === undefined ? null : opts.sort, dir: 1};
    const heads = columns.map(c => el("th", {"data-key": c.key, class: c.digits !== undefined ? "num" : null,
                                               title: (c.note ? c.note + ". " : "") + "Click to sort"}, c.label));
    const tbody = el("tbody", {});
    const table = el("table", {class: "data" + (opts.clickable ? " clickable" : "")},
                     el("thead", {}, el("tr", {}, heads)), tbody);
    heads.forEach((th, i) => th.addEventListener("click", () => {
      const key = columns[i].key;
      state.dir = state.key === key ? -state.dir : 1;
      state.key = key;
      draw();
    }));
    let shown = [];
    function draw() {
      let view = (opts.filter ? rows.filter(opts.filter) : rows);
      if (state.key !== null) view = sortRows(view, state.key, state.dir);
      shown = view;
      heads.forEach((th, i) => {
        th.classList.toggle("sorted-up", columns[i].key === state.key && state.dir > 0);
        th.classList.toggle("sorted-down", columns[i].key === state.key && state.dir < 0);
      });
      const limit = opts.limit || 2000;
      tbody.replaceChildren(...view.slice(0, limit).map(r => {
        const tr = el("tr", {"data-case": opts.rowId ? opts.rowId(r) : null},
                      columns.map(c => el("td", {class: c.digits !== undefined ? "num" : null}, fmt(r[c.key], c.digits))));
        if (opts.onClick) tr.addEventListener("click", () => opts.onClick(r, tr));
        if (opts.selected && opts.selected() === opts.rowId(r)) tr.classList.add("selected");
        return tr;
      }));
      if (opts.onDraw) opts.onDraw(view.length, Math.min(view.length, limit));
    }
    draw();
    return {table, draw, shown: () => shown, state};
  }

  function plainTable(s) {
    const columns = s.columns.map((c, i) => ({...c, key: String(i)}));
    const rows = s.rows.map(r => Object.fromEntries(r.map((v, i) => [String(i), v])));
    return el("div", {class: "table-wrap"}, dataTable(columns, rows, {sort: null}).table);
  }

  // ---------------------------------------------------------------------------------------------
  // Cases: the filterable table beside the viewer.

  function cases(s) {
    const numeric = s.columns.filter(c => c.digits !== undefined);
    const text = el("input", {type: "search", placeholder: "filter by name", class: "filter-text"});
    const column = el("select", {class: "filter-column"}, numeric.map(c => el("option", {value: c.key}, c.label)));
    const low = el("input", {type: "number", step: "any", placeholder: "min", class: "filter-min"});
    const high = el("input", {type: "number", step: "any", placeholder: "max", class: "filter-max"});
    const count = el("span", {class: "count"});
    const nameKey = s.columns[0].key;
    let selected = null;
    const filter = r => {
      const t = text.value.trim().toLowerCase();
      if (t && !String(r[nameKey]).toLowerCase().includes(t)) return false;
      const v = r[column.value];
      if (low.value !== "" && (missing(v) || v < +low.value)) return false;
      if (high.value !== "" && (missing(v) || v > +high.value)) return false;
      return true;
    };
    const viewer = s.viewer ? new Viewer(s.viewer) : null;
    const t = dataTable(s.columns, s.rows, {
      sort: s.sort, filter, clickable: !!viewer, rowId: r => String(r[nameKey]), selected: () => selected,
      onDraw: (n, drawn) => { count.textContent = `${n} of ${s.rows.length}` + (drawn < n ? ` (first ${drawn} shown)` : ""); },
      onClick: viewer ? (r, tr) => open(r) : null,
    });
    function open(r) {
      selected = String(r[nameKey]);
      for (const tr of t.table.querySelectorAll("tbody tr")) tr.classList.toggle("selected", tr.dataset.case === selected);
      viewer.show(selected, r);
    }
    if (viewer) {
      viewer.step = d => {  // previous / next case in the table's order
        const rows = t.shown();
        const i = rows.findIndex(r => String(r[nameKey]) === selected);
        const next = rows[Math.min(rows.length - 1, Math.max(0, i + d))];
        if (next) { open(next); const tr = t.table.querySelector(`tbody tr[data-case="${CSS.escape(selected)}"]`); if (tr) tr.scrollIntoView({block: "nearest"}); }
      };
    }
    for (const input of [text, column, low, high]) input.addEventListener("input", () => t.draw());
    if (viewer && t.shown().length) setTimeout(() => { if (selected === null) open(t.shown()[0]); }, 0);  // the first row (the worst) to start with
    const controls = el("div", {class: "filters"}, text, el("label", {}, "where ", column), low, high, count);
    const left = el("div", {class: "cases-table"}, controls, el("div", {class: "table-scroll"}, t.table));
    return el("div", {class: viewer ? "cases-layout" : ""}, left, viewer ? viewer.root : null);
  }

  // ---------------------------------------------------------------------------------------------
  // The viewer: the image with the reference outlined and the prediction filled, per plane.

  async function inflate(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  function unpredict(res, rows, cols) {  // inverse of html_report._med_residuals, slice by slice
    const out = new Uint8Array(res.length), n = rows * cols;
    for (let base = 0; base < res.length; base += n) {
      for (let y = 0; y < rows; y++) {
        for (let x = 0; x < cols; x++) {
          const i = base + y * cols + x;
          const L = x > 0 ? out[i - 1] : 0, U = y > 0 ? out[i - cols] : 0, UL = x > 0 && y > 0 ? out[i - cols - 1] : 0;
          const lo = Math.min(L, U), hi = Math.max(L, U);
          const g = UL >= hi ? lo : UL <= lo ? hi : L + U - UL;
          out[i] = (res[i] + g) & 255;
        }
      }
    }
    return out;
  }

  const decoded = new Map();
  async function decode(id) {
    if (decoded.has(id)) return decoded.get(id);
    const v = DATA.volumes[id];
    const [Z, Y, X] = v.shape;
    const Bits = {uint8: Uint8Array, uint16: Uint16Array, uint32: Uint32Array}[v.bits];
    const labels = {};
    for (const [name, b64] of Object.entries(v.labels)) labels[name] = new Bits((await inflate(b64)).buffer);
    const image = v.image ? unpredict(await inflate(v.image), Y, X) : null;
    const out = {...v, Z, Y, X, labels, image};
    decoded.set(id, out);
    if (decoded.size > 8) decoded.delete(decoded.keys().next().value);  // keep the last few cases opened
    return out;
  }

  // A plane: which axis is fixed, and how a (row, column) of the picture maps to a voxel.
  const PLANES = {
    axial: {axis: 0, size: v => [v.Y, v.X], sp: v => [v.spacing[1], v.spacing[2]], at: (v, k, r, c) => (k * v.Y + r) * v.X + c},
    coronal: {axis: 1, size: v => [v.Z, v.X], sp: v => [v.spacing[0], v.spacing[2]], at: (v, k, r, c) => ((v.Z - 1 - r) * v.Y + k) * v.X + c},
    sagittal: {axis: 2, size: v => [v.Z, v.Y], sp: v => [v.spacing[0], v.spacing[1]], at: (v, k, r, c) => ((v.Z - 1 - r) * v.Y + c) * v.X + k},
  };

  function fileVoxel(v, p) {  // the voxel's indices in the file, in ITK order (x, y, z) as viewers show them
    const idx = [0, 0, 0];
    for (let i = 0; i < 3; i++) {
      const q = v.flips[i] ? v.shape[i] - 1 - p[i] : p[i];
      idx[v.order[i]] = q * (v.dims === 3 || i > 0 ? v.stride : 1);
    }
    const axes = v.dims === 3 ? idx : idx.slice(1);  // numpy order (z, y, x) or (y, x)
    return "(" + axes.slice().reverse().join(", ") + ")";
  }

  class Viewer {
    constructor(spec) {
      this.spec = spec;
      this.classes = spec.classes.map((c, k) => ({...c, bit: 1 << k, rgb: hexRgb(c.colour), on: true}));
      this.showRef = true; this.showPred = true; this.opacity = 0.45;
      this.slices = [0, 0, 0]; this.volume = null; this.row = null;
      const check = (id, label, on, set, extra) => el("label", {class: "toggle"},
        el("input", {type: "checkbox", id, checked: on, onchange: e => { set(e.target.checked); this.draw(); }}), extra, label);
      this.title = el("h3", {class: "viewer-title"}, "Click a case in the table");
      this.readout = el("span", {class: "readout"});
      this.sliders = ["axial", "coronal", "sagittal"].map((name, axis) => {
        const input = el("input", {type: "range", min: 0, max: 0, value: 0, id: "slice-" + name, "aria-label": name + " slice"});
        const label = el("span", {class: "slice-label"});
        input.addEventListener("input", () => { this.slices[axis] = +input.value; this.draw(); });
        return {name, axis, input, label, box: el("label", {class: "slice"}, el("b", {}, name), input, label)};
      });
      const opacity = el("input", {type: "range", min: 0, max: 100, value: 45, id: "opacity", "aria-label": "fill opacity"});
      opacity.addEventListener("input", () => { this.opacity = opacity.value / 100; this.draw(); });
      this.sliceBar = el("div", {class: "slice-bar"}, this.sliders.map(s => s.box));
      this.panels = el("div", {class: "panels"});
      const nav = el("span", {class: "case-nav"},
        el("button", {type: "button", title: "previous case in the table", onclick: () => this.step && this.step(-1)}, "‹ previous"),
        el("button", {type: "button", title: "next case in the table", onclick: () => this.step && this.step(1)}, "next ›"));
      this.root = el("div", {class: "viewer", id: "viewer"},
        el("div", {class: "viewer-head"}, this.title, nav),
        el("div", {class: "controls"},
           check("show-reference", "reference (outline)", true, v => { this.showRef = v; }, null),
           check("show-prediction", "prediction (fill)", true, v => { this.showPred = v; }, null),
           el("label", {class: "toggle"}, "opacity ", opacity),
           this.classes.map((c, k) => check(`show-class-${k}`, c.name, true, v => { c.on = v; },
                                       el("span", {class: "swatch", style: `background:${c.colour}`})))),
        this.sliceBar, this.panels, this.readout);
      this.root.hidden = false;
    }

    async show(id, row) {
      this.row = row;
      this.current = id;
      if (!DATA.volumes[id]) {
        this.title.textContent = `${id}: no image or reference to show`;
        this.panels.replaceChildren();
        return;
      }
      const v = await decode(id);
      if (this.current !== id) return;  // another case was clicked meanwhile
      this.volume = v;
      this.slices = v.centre.slice();
      this.title.textContent = id;
      this.title.dataset.case = id;
      const planes = v.dims === 3 ? ["axial", "coronal", "sagittal"] : ["axial"];
      this.sliceBar.hidden = v.dims !== 3;
      for (const s of this.sliders) { s.input.max = v.shape[s.axis] - 1; s.input.value = this.slices[s.axis]; }
      // One scale (CSS pixels per spacing unit) for every plane and panel: no plane is squashed.
      const ext = [v.Z * v.spacing[0], v.Y * v.spacing[1], v.X * v.spacing[2]];
      const n = this.spec.panels.length;
      const width = Math.max(320, this.root.clientWidth - 24);
      let scale;
      if (v.dims === 3) scale = Math.min((width - 24) / (2 * ext[2] + ext[1]), (n > 1 ? 260 : 380) / Math.max(ext[0], ext[1]));
      else scale = Math.min((n > 1 ? (width - 12 * (Math.min(n, 3) - 1)) / Math.min(n, 3) : width) / ext[2], (n > 1 ? 360 : 560) / ext[1]);
      this.canvases = [];
      this.panels.replaceChildren(...this.spec.panels.map(panel => {
        const key = row && (row[panel + ":dice"] !== undefined ? panel + ":dice" : "dice");
        const score = row && !missing(row[key]) ? ` (Dice ${fmt(row[key], 4)})` : "";
        const box = el("div", {class: "planes"});
        for (const name of planes) {
          const P = PLANES[name];
          const [rows, cols] = P.size(v), [sr, sc] = P.sp(v);
          const canvas = el("canvas", {width: cols, height: rows, class: "plane", "data-plane": name, "data-panel": panel});
          canvas.style.width = `${(cols * sc * scale).toFixed(2)}px`;
          canvas.style.height = `${(rows * sr * scale).toFixed(2)}px`;
          this.bindCanvas(canvas, name, panel);
          this.canvases.push({canvas, name, panel});
          box.append(el("figure", {}, canvas, el("figcaption", {}, v.dims === 3 ? name : "")));
        }
        const has = panel in v.labels;
        return el("div", {class: "panel", "data-panel": panel},
                  el("div", {class: "panel-title"}, panel + score + (has ? "" : " (no prediction)")), box);
      }));
      this.draw();
    }

    bindCanvas(canvas, name, panel) {
      const P = PLANES[name];
      const where = e => {
        const v = this.volume, [rows, cols] = P.size(v), r = canvas.getBoundingClientRect();
        return [Math.min(rows - 1, Math.floor((e.clientY - r.top) / r.height * rows)),
                Math.min(cols - 1, Math.floor((e.clientX - r.left) / r.width * cols))];
      };
      const voxel = (r, c) => {  // [z, y, x] of a picture's (row, column)
        const v = this.volume, k = this.slices[P.axis];
        if (name === "axial") return [k, r, c];
        if (name === "coronal") return [v.Z - 1 - r, k, c];
        return [v.Z - 1 - r, c, k];
      };
      canvas.addEventListener("wheel", e => {
        if (this.volume.dims !== 3) return;
        e.preventDefault();
        this.setSlice(P.axis, this.slices[P.axis] + (e.deltaY > 0 ? 1 : -1));
      }, {passive: false});
      canvas.addEventListener("click", e => {
        if (this.volume.dims !== 3) return;
        const p = voxel(...where(e));
        for (let a = 0; a < 3; a++) if (a !== P.axis) this.slices[a] = p[a];
        this.syncSliders();
        this.draw();
      });
      canvas.addEventListener("mousemove", e => {
        const v = this.volume, p = voxel(...where(e)), i = (p[0] * v.Y + p[1]) * v.X + p[2];
        const names = bits => this.classes.filter(c => bits & c.bit).map(c => c.name).join("+") || "background";
        const grey = v.image ? v.image[i] : null;
        this.readout.textContent = `voxel ${fileVoxel(v, p)} of the file` + (grey !== null ? `, shown as ${grey}` : "") +
          `  reference: ${names(v.labels.reference[i])}` + (v.labels[panel] ? `  ${panel}: ${names(v.labels[panel][i])}` : "");
      });
    }

    setSlice(axis, k) {
      const v = this.volume;
      this.slices[axis] = Math.max(0, Math.min(v.shape[axis] - 1, k));
      this.syncSliders();
      this.draw();
    }

    syncSliders() { for (const s of this.sliders) s.input.value = this.slices[s.axis]; }

    draw() {
      const v = this.volume;
      if (!v) return;
      for (const s of this.sliders) s.label.textContent = `${this.slices[s.axis] + 1} / ${v.shape[s.axis]}`;
      for (const {canvas, name, panel} of this.canvases) this.drawPlane(canvas, name, panel);
    }

    drawPlane(canvas, name, panel) {
      const v = this.volume, P = PLANES[name], k = this.slices[P.axis];
      const [rows, cols] = P.size(v), n = rows * cols;
      const ref = v.labels.reference, pred = v.labels[panel];
      const idx = new Int32Array(n);
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) idx[r * cols + c] = P.at(v, k, r, c);
      const ctx = canvas.getContext("2d");
      const img = ctx.createImageData(cols, rows), px = img.data, plane = v.Z * v.Y * v.X;
      let mask = 0;
      for (const c of this.classes) if (c.on) mask |= c.bit;
      const a = this.opacity;
      for (let j = 0; j < n; j++) {
        const i = idx[j];
        let rgb = v.image ? (v.channels === 3 ? [v.image[i], v.image[plane + i], v.image[2 * plane + i]]
                                                : [v.image[i], v.image[i], v.image[i]]) : [0, 0, 0];
        if (this.showPred && pred && (pred[i] & mask)) {
          const c = this.classes.find(c => c.on && (pred[i] & c.bit));
          rgb = rgb.map((x, t) => (1 - a) * x + a * c.rgb[t]);
        }
        px[4 * j] = rgb[0]; px[4 * j + 1] = rgb[1]; px[4 * j + 2] = rgb[2]; px[4 * j + 3] = 255;
      }
      if (this.showRef && ref) {  // the reference's outline: a voxel of the class with a neighbour outside it
        for (const c of this.classes) {
          if (!c.on) continue;
          const line = c.rgb.map(x => Math.round(x + (255 - x) * 0.6));  // lighter than the fill, to show over it
          for (let r = 0; r < rows; r++) {
            for (let cc = 0; cc < cols; cc++) {
              const j = r * cols + cc;
              if (!(ref[idx[j]] & c.bit)) continue;
              const edge = r === 0 || cc === 0 || r === rows - 1 || cc === cols - 1 ||
                !(ref[idx[j - 1]] & c.bit) || !(ref[idx[j + 1]] & c.bit) ||
                !(ref[idx[j - cols]] & c.bit) || !(ref[idx[j + cols]] & c.bit);
              if (edge) { px[4 * j] = line[0]; px[4 * j + 1] = line[1]; px[4 * j + 2] = line[2]; }
            }
          }
        }
      }
      ctx.putImageData(img, 0, 0);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Charts (SVG): line, scatter and grouped bars; hover shows the values.

  function ticks(lo, hi, count, integer) {
    if (!(hi > lo)) { const d = Math.abs(lo) || 1; lo -= d * 0.05; hi += d * 0.05; }
    const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw);
    if (integer) step = Math.max(1, Math.round(step));
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
    return {lo, hi, out, step};
  }

  function charts(s) {
    return el("div", {class: "charts"}, s.charts.map(c => c.kind === "bar" ? barChart(c) : lineChart(c)));
  }

  function frame(c, W, H) {
    const m = {l: 62, r: 16, t: 30, b: 46};
    const svg = sv("svg", {viewBox: `0 0 ${W} ${H}`, width: W, height: H, class: "chart-svg", role: "img"});
    svg.append(sv("text", {x: m.l, y: 18, class: "chart-title"}, c.title));
    svg.append(sv("text", {x: m.l + (W - m.l - m.r) / 2, y: H - 8, class: "axis-label", "text-anchor": "middle"}, c.x || ""));
    svg.append(sv("text", {x: 14, y: m.t + (H - m.t - m.b) / 2, class: "axis-label", "text-anchor": "middle",
                           transform: `rotate(-90 14 ${m.t + (H - m.t - m.b) / 2})`}, c.y || ""));
    return {svg, m};
  }

  function yAxis(svg, m, W, H, Y, fy) {
    for (const t of Y.out) {
      svg.append(sv("line", {x1: m.l, x2: W - m.r, y1: fy(t), y2: fy(t), class: "grid"}));
      svg.append(sv("text", {x: m.l - 6, y: fy(t) + 4, "text-anchor": "end", class: "tick"}, fmt(t)));
    }
  }

  function tooltipBox(box) {
    const tip = el("div", {class: "tooltip", hidden: true});
    box.append(tip);
    return {
      show(x, y, text) { tip.hidden = false; tip.textContent = text; tip.style.left = `${x + 12}px`; tip.style.top = `${y - 8}px`; },
      hide() { tip.hidden = true; },
    };
  }

  function lineChart(c) {
    const W = c.square ? 400 : 540, H = c.square ? 400 : 320;
    const {svg, m} = frame(c, W, H);
    const all = c.series.flatMap(s => s.points).filter(p => !missing(p[0]) && !missing(p[1]));
    const box = el("div", {class: "chart"}, svg);
    if (!all.length) { svg.append(sv("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "tick"}, "no values")); return box; }
    const range = (i, lo, hi) => {  // a scatter's points kept off the edges
      lo = lo ?? Math.min(...all.map(p => p[i])); hi = hi ?? Math.max(...all.map(p => p[i]));
      if (c.kind !== "scatter") return [lo, hi];
      const pad = (hi - lo) * 0.12 || Math.abs(hi) * 0.05 || 1;
      return [lo - pad, hi + pad];
    };
    const X = ticks(...range(0, c.xmin, c.xmax), 6, all.every(p => Number.isInteger(p[0])));
    const Y = ticks(...range(1, c.ymin, c.ymax), 5);
    const fx = x => m.l + (x - X.lo) / (X.hi - X.lo) * (W - m.l - m.r);
    const fy = y => H - m.b - (y - Y.lo) / (Y.hi - Y.lo) * (H - m.t - m.b);
    yAxis(svg, m, W, H, Y, fy);
    for (const t of X.out) svg.append(sv("text", {x: fx(t), y: H - m.b + 16, "text-anchor": "middle", class: "tick"}, fmt(t)));
    svg.append(sv("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis"}));
    if (c.diagonal) svg.append(sv("line", {x1: fx(0), y1: fy(0), x2: fx(1), y2: fy(1), class: "diagonal"}));
    const marks = [];
    c.series.forEach((s, k) => {
      const colour = PALETTE[k % PALETTE.length];
      const pts = s.points.filter(p => !missing(p[0]) && !missing(p[1]));
      if (c.kind !== "scatter" && pts.length > 1)
        svg.append(sv("polyline", {points: pts.map(p => `${fx(p[0])},${fy(p[1])}`).join(" "), stroke: colour, class: "series"}));
      for (const p of pts) {
        marks.push({x: fx(p[0]), y: fy(p[1]), p, s, colour});
        if (c.kind === "scatter" || pts.length <= 60)
          svg.append(sv("circle", {cx: fx(p[0]), cy: fy(p[1]), r: c.kind === "scatter" ? 5 : 2.5, fill: colour}));
        if (c.kind === "scatter") svg.append(sv("text", {x: fx(p[0]) + 7, y: fy(p[1]) - 6, class: "tick"}, s.name));
      }
    });
    const focus = sv("circle", {r: 5, class: "focus", visibility: "hidden"});
    svg.append(focus);
    const tip = tooltipBox(box);
    const hit = sv("rect", {x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, class: "hit"});
    svg.append(hit);
    hit.addEventListener("mousemove", e => {
      const r = svg.getBoundingClientRect(), mx = (e.clientX - r.left) * W / r.width, my = (e.clientY - r.top) * H / r.height;
      let best = null, dist = 40 * 40;
      for (const mk of marks) { const d = (mk.x - mx) ** 2 + (mk.y - my) ** 2; if (d < dist) { dist = d; best = mk; } }
      if (!best) { focus.setAttribute("visibility", "hidden"); tip.hide(); return; }
      focus.setAttribute("cx", best.x); focus.setAttribute("cy", best.y); focus.setAttribute("stroke", best.colour);
      focus.setAttribute("visibility", "visible");
      tip.show(best.x * r.width / W, best.y * r.height / H, `${best.s.name}\n${c.x || "x"}: ${fmt(best.p[0])}\n${c.y || "y"}: ${fmt(best.p[1])}`);
    });
    hit.addEventListener("mouseleave", () => { focus.setAttribute("visibility", "hidden"); tip.hide(); });
    box.append(legend(c.series));
    return box;
  }

  function legend(series) {
    return el("div", {class: "legend"}, series.map((s, k) =>
      el("span", {}, el("span", {class: "swatch", style: `background:${PALETTE[k % PALETTE.length]}`}), s.name)));
  }

  function barChart(c) {
    const n = c.categories.length, W = Math.max(420, 90 * n + 80), H = 340;
    const {svg, m} = frame(c, W, H);
    const box = el("div", {class: "chart"}, svg);
    const values = c.series.flatMap(s => s.values).filter(v => !missing(v));
    if (!values.length) return box;
    const lo = Math.min(...values), hi = Math.max(...values);
    const Y = ticks(Math.max(0, lo - (hi - lo) * 0.3 - 0.02), hi, 5);
    const fy = y => H - m.b - (y - Y.lo) / (Y.hi - Y.lo) * (H - m.t - m.b);
    yAxis(svg, m, W, H, Y, fy);
    const band = (W - m.l - m.r) / n, bw = band * 0.8 / c.series.length;
    const tip = tooltipBox(box);
    c.categories.forEach((cat, i) => {
      const x0 = m.l + i * band + band * 0.1;
      c.series.forEach((s, k) => {
        const v = s.values[i];
        if (missing(v)) return;
        const x = x0 + k * bw, y = fy(v);
        const bar = sv("rect", {x, y, width: bw - 2, height: H - m.b - y, fill: PALETTE[k % PALETTE.length], class: "bar"});
        bar.addEventListener("mousemove", e => { const r = svg.getBoundingClientRect(); tip.show(e.clientX - r.left, e.clientY - r.top, `${cat}\n${s.name}: ${fmt(v, 4)}`); });
        bar.addEventListener("mouseleave", () => tip.hide());
        svg.append(bar, sv("text", {x: x + (bw - 2) / 2, y: y - 4, "text-anchor": "middle", class: "bar-value"}, fmt(v, 3)));
      });
      svg.append(sv("text", {x: m.l + i * band + band / 2, y: H - m.b + 16, "text-anchor": "middle", class: "tick"},
                    cat.length > 18 ? cat.slice(0, 17) + "…" : cat));
    });
    svg.append(sv("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis"}));
    if (c.series.length > 1) box.append(legend(c.series));
    return box;
  }

  // ---------------------------------------------------------------------------------------------
  // Confusion matrices: counts, shaded by the share of the true class's row.

  function confusion(s) {
    return el("div", {class: "matrices"}, s.matrices.map(mx => {
      const rows = mx.matrix.map((row, i) => {
        const total = row.reduce((a, b) => a + b, 0) || 1;
        return el("tr", {}, el("th", {}, mx.classes[i] ?? String(i)), row.map(v => {
          const rate = v / total;
          return el("td", {class: "num", title: `${(100 * rate).toFixed(1)} % of the true class`,
                           style: `background: rgba(31,119,180,${rate.toFixed(3)}); color: ${rate > 0.5 ? "#fff" : "#000"}`}, String(v));
        }));
      });
      return el("div", {class: "matrix"},
        mx.title ? el("h3", {}, mx.title) : null,
        el("table", {class: "confusion"},
           el("thead", {}, el("tr", {}, el("th", {}, "true \\ predicted"), mx.classes.map(c => el("th", {}, c)))),
           el("tbody", {}, rows)));
    }));
  }

  page();
  window.medssmReport = {data: DATA, decode};  // for tests and the curious, from the console
})();
