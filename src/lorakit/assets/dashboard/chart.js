// A small SVG line chart: no library, so the dashboard works offline and ships no third-party code.
// lineChart(container, {xLabel, yLabel}).draw([{name, color, points: [[x, y], ...], dots}])
// Each series is one <polyline class="series"> whose data-points attribute counts its points.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

// Round tick steps (1, 2, 5 x 10^k) covering [lo, hi] with about n ticks.
function ticks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
  return +v.toPrecision(4) + "";
}

function lineChart(container, opts) {
  const W = 560, H = 260, L = 58, R = 12, T = 12, B = 40;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" });
  container.appendChild(svg);
  const legend = document.createElement("div");
  legend.className = "legend";
  container.appendChild(legend);

  function draw(series) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    legend.textContent = "";
    const all = series.flatMap((s) => s.points).filter((p) => isFinite(p[0]) && isFinite(p[1]));
    svg.setAttribute("data-series", series.filter((s) => s.points.length).length);
    if (!all.length) {
      svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent = "no data yet";
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const grid = svgEl("g", { class: "grid" }, svg);
    for (const v of ticks(y0, y1, 5)) {
      svgEl("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v) }, grid);
      svgEl("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, grid).textContent = fmt(v);
    }
    for (const v of ticks(x0, x1, 6)) {
      svgEl("line", { x1: sx(v), x2: sx(v), y1: T, y2: H - B }, grid);
      svgEl("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle" }, grid).textContent = fmt(v);
    }
    svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, svg).textContent = opts.xLabel || "";
    svgEl("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-label",
      transform: `rotate(-90 12 ${(T + H - B) / 2})` }, svg).textContent = opts.yLabel || "";
    for (const s of series) {
      const pts = s.points.filter((p) => isFinite(p[0]) && isFinite(p[1]));
      if (!pts.length) continue;
      const line = svgEl("polyline", {
        class: "series", fill: "none", stroke: s.color, "stroke-width": 1.8,
        "data-name": s.name, "data-points": pts.length,
        points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
      }, svg);
      if (s.dash) line.setAttribute("stroke-dasharray", "5 3");
      svgEl("title", {}, line).textContent = s.name;
      if (s.dots || pts.length === 1) {
        for (const p of pts) {
          const c = svgEl("circle", { class: "dot", cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color }, svg);
          svgEl("title", {}, c).textContent = `${s.name}: ${fmt(p[1])} at ${fmt(p[0])}`;
        }
      }
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = s.color;
      item.append(swatch, s.name);
      legend.appendChild(item);
    }
  }
  return { draw };
}

window.lineChart = lineChart;
