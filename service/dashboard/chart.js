// A small SVG chart: lines (training curves) or labelled points (method comparison).
// No dependencies; colours come from style.css (.series-0 ... .series-5).
//
//   const chart = createChart(el, {xLabel: "step", yLabel: "loss"});
//   chart.update([{name: "train loss", points: [{x: 1, y: 0.69}, ...]}]);
//
// The container gets data-points (total points drawn) for tests and tools to read.

import { clear, h, s } from "./dom.js";

const W = 640;
const H = 280;
const M = { left: 58, right: 18, top: 14, bottom: 44 };

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  const step = norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10;
  return step * mag;
}

function linearScale(lo, hi, count, integer = false) {
  if (!(hi > lo)) {
    const pad = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 1;
    lo -= pad;
    hi += pad;
  }
  const step = integer ? Math.max(1, niceStep(hi - lo, count)) : niceStep(hi - lo, count);
  const start = Math.floor(lo / step + 1e-9) * step;
  const end = Math.ceil(hi / step - 1e-9) * step;
  const ticks = [];
  for (let v = start; v <= end + step / 2; v += step) ticks.push(Number(v.toPrecision(12)));
  return { lo: start, hi: end, ticks, map: (v) => (v - start) / (end - start || 1) };
}

function logScale(lo, hi) {
  const a = Math.floor(Math.log10(Math.max(lo, 1e-12)));
  let b = Math.ceil(Math.log10(Math.max(hi, 1e-12)));
  if (b <= a) b = a + 1;
  const ticks = [];
  for (let e = a; e <= b; e += 1) {
    ticks.push(10 ** e);
    if (b - a <= 2 && e < b) ticks.push(2 * 10 ** e, 5 * 10 ** e);
  }
  ticks.sort((x, y) => x - y);
  return {
    lo: 10 ** a,
    hi: 10 ** b,
    ticks,
    map: (v) => (Math.log10(Math.max(v, 1e-12)) - a) / (b - a),
  };
}

function fmtTick(v, log) {
  const a = Math.abs(v);
  if (log || a >= 1e4) {
    if (a >= 1e9) return `${+(v / 1e9).toPrecision(3)}G`;
    if (a >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`;
    if (a >= 1e3) return `${+(v / 1e3).toPrecision(3)}k`;
  }
  if (a !== 0 && a < 1e-3) return v.toExponential(0);
  return String(+v.toPrecision(4));
}

/**
 * options: title, xLabel, yLabel, xLog (log x axis), yMin/yMax (fixed y bounds),
 * kind ("line" | "scatter"), empty (text shown without data), xFormat (tick labels),
 * xInteger (whole-number x ticks, e.g. steps), yBounds ([lo, hi] the scatter's padded y axis
 * stays within). Returns {update(series), setEmpty(text)}.
 */
export function createChart(container, options = {}) {
  const opts = { kind: "line", empty: "No data yet", ...options };
  container.classList.add("chart");
  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`,
    role: "img",
    "aria-label": opts.title || opts.yLabel || "chart",
    preserveAspectRatio: "xMidYMid meet",
  });
  const legend = h("div", { class: "legend" });
  container.append(svg, legend);

  function update(series) {
    clear(svg);
    clear(legend);
    const all = series.flatMap((ser) => ser.points).filter(
      (p) => Number.isFinite(p.x) && Number.isFinite(p.y) && (!opts.xLog || p.x > 0),
    );
    container.dataset.points = String(all.length);
    const pw = W - M.left - M.right;
    const ph = H - M.top - M.bottom;
    svg.append(
      s("rect", { class: "plot-bg", x: M.left, y: M.top, width: pw, height: ph }),
    );
    if (!all.length) {
      svg.append(
        s("text", { class: "empty", x: M.left + pw / 2, y: M.top + ph / 2, "text-anchor": "middle" },
          opts.empty),
      );
      return;
    }
    const xs = all.map((p) => p.x);
    const ys = all.map((p) => p.y);
    let xMin = Math.min(...xs);
    let xMax = Math.max(...xs);
    if (opts.kind === "line" && !opts.xLog) xMin = Math.min(0, xMin);
    if (opts.kind === "scatter" && !opts.xLog) {
      const pad = (xMax - xMin || Math.abs(xMax) || 1) * 0.08;
      xMin -= pad;
      xMax += pad;
      if (Math.min(...xs) >= 0) xMin = Math.max(0, xMin);
    }
    let yLo = opts.yMin ?? Math.min(...ys);
    let yHi = opts.yMax ?? Math.max(...ys);
    if (opts.kind === "scatter") {
      // Room around the points, within yBounds (e.g. [0, 1] for accuracy).
      const pad = Math.max((yHi - yLo) * 0.2, 0.02);
      yLo -= pad;
      yHi += pad;
      if (opts.yBounds) {
        yLo = Math.max(opts.yBounds[0], yLo);
        yHi = Math.min(opts.yBounds[1], yHi);
      }
    }
    const xs_ = opts.xLog ? logScale(xMin, xMax) : linearScale(xMin, xMax, 6, opts.xInteger);
    const ys_ = linearScale(yLo, yHi, 5);
    const X = (v) => M.left + xs_.map(v) * pw;
    const Y = (v) => M.top + (1 - ys_.map(v)) * ph;

    const grid = s("g", { class: "grid" });
    for (const t of ys_.ticks) {
      grid.append(
        s("line", { x1: M.left, x2: M.left + pw, y1: Y(t), y2: Y(t) }),
        s("text", { class: "tick", x: M.left - 6, y: Y(t) + 4, "text-anchor": "end" },
          fmtTick(t, false)),
      );
    }
    for (const t of xs_.ticks) {
      if (t < xs_.lo - 1e-12 || t > xs_.hi + 1e-12) continue;
      grid.append(
        s("line", { x1: X(t), x2: X(t), y1: M.top, y2: M.top + ph }),
        s("text", { class: "tick", x: X(t), y: M.top + ph + 16, "text-anchor": "middle" },
          opts.xFormat ? opts.xFormat(t) : fmtTick(t, opts.xLog)),
      );
    }
    svg.append(grid);
    svg.append(
      s("line", { class: "axis", x1: M.left, x2: M.left + pw, y1: M.top + ph, y2: M.top + ph }),
      s("line", { class: "axis", x1: M.left, x2: M.left, y1: M.top, y2: M.top + ph }),
    );
    if (opts.xLabel) {
      svg.append(
        s("text", { class: "label", x: M.left + pw / 2, y: H - 6, "text-anchor": "middle" },
          opts.xLabel),
      );
    }
    if (opts.yLabel) {
      svg.append(
        s("text", {
          class: "label",
          x: -(M.top + ph / 2),
          y: 14,
          transform: "rotate(-90)",
          "text-anchor": "middle",
        }, opts.yLabel),
      );
    }

    series.forEach((ser, i) => {
      const cls = `series-${ser.colorIndex ?? i}`;
      const pts = ser.points
        .filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y) && (!opts.xLog || p.x > 0))
        .slice()
        .sort((a, b) => (opts.kind === "line" ? a.x - b.x : 0));
      const g = s("g", { class: ["series", cls, ser.faint && "faint"], "data-series": ser.name,
        "data-count": pts.length });
      if (opts.kind === "line" && pts.length > 1) {
        const d = pts.map((p, j) => `${j ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`);
        g.append(s("path", { class: "line", d: d.join("") }));
      }
      const markers = opts.kind === "scatter" || ser.markers || pts.length === 1;
      if (markers) {
        for (const p of pts) {
          const c = s("circle", { class: "dot", cx: X(p.x), cy: Y(p.y), r: opts.kind === "scatter" ? 6 : 3.5 },
            s("title", null, p.title || `${ser.name}: ${fmtTick(p.y)} at ${fmtTick(p.x, opts.xLog)}`));
          g.append(c);
          if (p.label) {
            // Labels go right of the point, or left of it near the right edge.
            const left = X(p.x) > M.left + pw * 0.7;
            g.append(s("text", {
              class: "point-label",
              x: X(p.x) + (left ? -9 : 9),
              y: Y(p.y) + 4,
              "text-anchor": left ? "end" : "start",
            }, p.label));
          }
        }
      }
      svg.append(g);
      if (ser.name) {
        legend.append(
          h("span", { class: ["key", cls, ser.faint && "faint"] },
            h("span", { class: "swatch" }), `${ser.name}`),
        );
      }
    });
  }

  let last = [];
  const draw = update;
  function setEmpty(text) {
    opts.empty = text;
    draw(last);
  }
  update([]);
  return {
    update(series) {
      last = series;
      draw(series);
    },
    setEmpty,
    element: container,
  };
}
