/* minichart.js: line charts in plain SVG for ray-monitor's status page (no dependencies,
   no network). Part of ray-monitor, Apache-2.0.

   MiniChart.line(container, {
     times: [epoch seconds...],               // shared x values
     series: [{name, values: [number|null]}], // null: no data, drawn as a gap
     format: v => string,                     // y tick labels
     height: 160,
   });
   Redraws in place: call it again with new data. */
(function (global) {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04"];
  var PAD = {left: 56, right: 12, top: 10, bottom: 24};

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  // About n round ticks from 0 to at least hi (1, 2 or 5 times a power of ten apart).
  function ticks(hi, n) {
    var raw = hi / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * mag; })
      .find(function (s) { return s >= raw; });
    var out = [];
    for (var k = 0; out.length < 2 || out[out.length - 1] < hi * (1 - 1e-9); k++) out.push(+(k * step).toPrecision(12));
    return out;
  }

  function clock(t) {
    var d = new Date(t * 1000);
    return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0");
  }

  function line(container, opts) {
    var width = Math.max(240, container.clientWidth || 480), height = opts.height || 160;
    var times = opts.times || [], series = opts.series || [], fmt = opts.format || String;
    var plotW = width - PAD.left - PAD.right, plotH = height - PAD.top - PAD.bottom;
    var svg = container.querySelector("svg.minichart");
    if (!svg) svg = el("svg", {"class": "minichart", role: "img"}, container);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("aria-label", opts.label || "chart");
    while (svg.firstChild) svg.removeChild(svg.firstChild);

    var values = [];
    series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null) values.push(v); }); });
    var t0 = times.length ? times[0] : 0, t1 = times.length ? times[times.length - 1] : 1;
    if (opts.start !== undefined) t0 = Math.min(t0, opts.start);
    if (t1 <= t0) t1 = t0 + 1;
    var hi = values.length ? Math.max.apply(null, values) : 1;
    if (!(hi > 0)) hi = 1;
    var yt = ticks(hi, 4), top = yt[yt.length - 1];
    function x(t) { return PAD.left + (t - t0) / (t1 - t0) * plotW; }
    function y(v) { return PAD.top + plotH - v / top * plotH; }

    var axes = el("g", {"class": "axes"}, svg);
    yt.forEach(function (v) {
      el("line", {x1: PAD.left, x2: width - PAD.right, y1: y(v), y2: y(v), "class": "grid"}, axes);
      el("text", {x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end"}, axes).textContent = v === 0 ? "0" : fmt(v);
    });
    var xticks = 5;
    for (var i = 0; i <= xticks; i++) {
      var t = t0 + (t1 - t0) * i / xticks;
      el("text", {x: x(t), y: height - 6, "text-anchor": i === 0 ? "start" : i === xticks ? "end" : "middle"},
         axes).textContent = clock(t);
    }
    el("line", {x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + plotH, "class": "axis"}, axes);
    el("line", {x1: PAD.left, x2: width - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH, "class": "axis"}, axes);

    if (!values.length) {
      el("text", {x: PAD.left + plotW / 2, y: PAD.top + plotH / 2, "text-anchor": "middle", "class": "empty"},
         svg).textContent = "no data in this window";
    }
    series.forEach(function (s, k) {
      var color = s.color || COLORS[k % COLORS.length];
      var g = el("g", {"class": "series", "data-name": s.name}, svg);
      // Runs of consecutive values are lines; a lone value between gaps is a dot.
      var run = [];
      function flush() {
        if (run.length === 1) {
          el("circle", {cx: run[0][0], cy: run[0][1], r: 2.5, fill: color, "class": "dot"}, g);
        } else if (run.length > 1) {
          el("polyline", {points: run.map(function (p) { return p[0].toFixed(1) + "," + p[1].toFixed(1); }).join(" "),
                          fill: "none", stroke: color, "stroke-width": 1.8, "stroke-linejoin": "round",
                          "class": "line"}, g);
        }
        run = [];
      }
      s.values.forEach(function (v, j) {
        if (v === null || v === undefined) { flush(); return; }
        run.push([x(times[j]), y(v)]);
        var dot = el("circle", {cx: x(times[j]), cy: y(v), r: 6, fill: "transparent", "class": "hit"}, g);
        el("title", {}, dot).textContent = s.name + " " + clock(times[j]) + ": " + fmt(v);
      });
      flush();
    });

    var legend = container.querySelector(".legend");
    if (!legend) {
      legend = document.createElement("div");
      legend.className = "legend";
      container.appendChild(legend);
    }
    legend.textContent = "";
    series.forEach(function (s, k) {
      var item = document.createElement("span");
      var swatch = document.createElement("i");
      swatch.style.background = s.color || COLORS[k % COLORS.length];
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(s.name));
      legend.appendChild(item);
    });
    return svg;
  }

  global.MiniChart = {line: line, ticks: ticks};
})(window);
