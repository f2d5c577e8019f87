// vspan dashboard charts: small SVG drawings, no library. Every drawn mark carries the
// number it shows in data-* attributes, so tests (and people) can read the values back.
"use strict";

const VChart = (() => {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  function human(n) {
    const units = ["", "k", "M", "G", "T"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i += 1; }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(1)) + units[i];
  }

  // Stacked columns: one per bin, a rect per series (bottom to top), heights to scale.
  function stacked(container, bins, series, opts) {
    const width = (opts && opts.width) || 360;
    const height = (opts && opts.height) || 120;
    const pad = 24;
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const totals = bins.map((_, i) => series.reduce((s, ser) => s + ser.values[i], 0));
    const max = Math.max(1, ...totals);
    const step = (width - pad) / Math.max(1, bins.length);
    bins.forEach((bin, i) => {
      let y = height - 14;
      for (const ser of series) {
        const h = ((height - 24) * ser.values[i]) / max;
        y -= h;
        el("rect", {
          class: ser.kind, x: pad + i * step + 1, y, width: Math.max(1, step - 2), height: h,
          "data-time": bin, "data-kind": ser.kind, "data-value": ser.values[i],
        }, svg);
      }
    });
    el("text", { x: 0, y: 10 }, svg).textContent = human(max);
    if (bins.length) {
      el("text", { x: pad, y: height - 2 }, svg).textContent =
        new Date(bins[0] * 1000).toISOString().slice(11, 19);
    }
    container.appendChild(svg);
    return svg;
  }

  // Horizontal bars: label, bar to scale, value.
  function hbars(container, items) {
    container.replaceChildren();
    const max = Math.max(1, ...items.map((it) => it.value));
    for (const it of items) {
      const row = document.createElement("div");
      row.className = "row";
      row.dataset.name = it.label;
      row.dataset.value = String(it.value);
      const label = document.createElement("span");
      label.textContent = it.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${(100 * it.value) / max}%`;
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = human(it.value);
      value.title = String(it.value);
      row.append(label, bar, value);
      container.appendChild(row);
    }
  }

  // Heat map: rows × columns of cells, colour by value (log scale), value in data-bytes.
  function heatmap(container, names, cells) {
    container.replaceChildren();
    const size = 34;
    const left = 90;
    const top = 70;
    const width = left + size * names.length + 4;
    const height = top + size * names.length + 4;
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const max = Math.max(1, ...cells.map((c) => c.bytes));
    names.forEach((name, i) => {
      el("text", { x: 2, y: top + i * size + size / 2 + 3 }, svg).textContent = name;
      const t = el("text", { x: left + i * size + size / 2, y: top - 4,
        transform: `rotate(-45 ${left + i * size + size / 2} ${top - 4})` }, svg);
      t.textContent = name;
    });
    const index = new Map(names.map((n, i) => [n, i]));
    for (const c of cells) {
      const r = index.get(c.src);
      const k = index.get(c.dst);
      const level = Math.log1p(c.bytes) / Math.log1p(max);
      const rect = el("rect", {
        class: "cell", x: left + k * size, y: top + r * size, width: size - 2, height: size - 2,
        fill: `rgba(43, 123, 185, ${0.08 + 0.92 * level})`,
        "data-src": c.src, "data-dst": c.dst, "data-bytes": c.bytes,
      }, svg);
      el("title", {}, rect).textContent = `${c.src} → ${c.dst}: ${c.bytes} bytes`;
    }
    container.appendChild(svg);
  }

  // Forecast band: the measured line, then per forecast bin a rect from lower to upper and
  // the forecast line through the medians. Points carry data-time/-value, bins data-lower,
  // data-forecast and data-upper.
  function band(container, measured, forecast, opts) {
    container.replaceChildren();
    const width = (opts && opts.width) || 900;
    const height = (opts && opts.height) || 180;
    const pad = 40;
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
    const times = [...measured.map((p) => p.time), ...forecast.map((b) => b.time)];
    const t0 = Math.min(...times);
    const t1 = Math.max(...times);
    const max = Math.max(1, ...measured.map((p) => p.value), ...forecast.map((b) => b.upper));
    const step = forecast.length > 1 ? forecast[1].time - forecast[0].time : 3600;
    const x = (t) => pad + ((width - pad - 4) * (t - t0)) / Math.max(1, t1 - t0 + step);
    const y = (v) => height - 14 - ((height - 24) * v) / max;
    const w = Math.max(1, x(t0 + step) - x(t0));
    for (const b of forecast) {
      el("rect", {
        class: "band", x: x(b.time), y: y(b.upper), width: w,
        height: Math.max(0.5, y(b.lower) - y(b.upper)),
        "data-time": b.time, "data-lower": b.lower, "data-forecast": b.forecast,
        "data-upper": b.upper,
      }, svg);
    }
    const line = (points, cls) => el("polyline", {
      class: cls, points: points.map(([t, v]) => `${x(t) + w / 2},${y(v)}`).join(" "),
    }, svg);
    line(measured.map((p) => [p.time, p.value]), "measured");
    line(forecast.map((b) => [b.time, b.forecast]), "fc");
    for (const p of measured) {
      el("circle", { class: "measured", cx: x(p.time) + w / 2, cy: y(p.value), r: 1.2,
        "data-time": p.time, "data-value": p.value }, svg);
    }
    el("text", { x: 0, y: 10 }, svg).textContent = human(max);
    el("text", { x: pad, y: height - 2 }, svg).textContent =
      new Date(t0 * 1000).toISOString().slice(0, 16).replace("T", " ");
    container.appendChild(svg);
    return svg;
  }

  return { stacked, hbars, heatmap, band, human };
})();
