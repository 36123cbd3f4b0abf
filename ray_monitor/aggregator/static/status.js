/* ray-monitor's status page: polls the aggregator's JSON every 2 s and redraws.
   Everything from the server is written with textContent, never as HTML. */
(function () {
  "use strict";
  var POLL_MS = 2000;

  // ------------------------------------------------------------ formatting (as the CLI's)
  function rate(v) {
    if (v === null || v === undefined) return "-";
    if (v === 0) return "0";
    if (v < 0.01) return "<0.01";
    return v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : v.toFixed(0);
  }
  function percent(r) {
    if (r === null || r === undefined) return "-";
    if (r === 0) return "0%";
    var p = r * 100;
    if (p < 0.01) return "<0.01%";
    return (p < 10 ? p.toFixed(2) : p.toFixed(1)) + "%";
  }
  function ms(s) {
    if (s === null || s === undefined) return "-";
    var m = s * 1000;
    return m < 10 ? m.toFixed(2) : m < 100 ? m.toFixed(1) : m.toFixed(0);
  }
  function value(v) { return v === null || v === undefined ? "-" : String(+v.toPrecision(4)); }
  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    var s = Math.max(0, Math.floor(seconds)), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
        m = Math.floor(s % 3600 / 60);
    s = s % 60;
    return d ? d + "d" + h + "h" : h ? h + "h" + m + "m" : m ? m + "m" + s + "s" : s + "s";
  }
  function bytes(b) { return b === undefined || b === null ? "-" : (b / Math.pow(2, 30)).toFixed(1); }
  function labelsText(labels) {
    return Object.keys(labels || {}).sort().filter(function (k) { return k !== "alertname"; })
      .map(function (k) { return k + "=" + labels[k]; }).join(", ") || "-";
  }
  function key(labels) { return (labels.application || "") + "/" + (labels.deployment || ""); }

  // ------------------------------------------------------------------------- DOM helpers
  function $(sel, root) { return (root || document).querySelector(sel); }
  function row(cells, classes) {
    var tr = document.createElement("tr");
    cells.forEach(function (c, i) {
      var td = document.createElement("td");
      td.textContent = c === null || c === undefined ? "-" : String(c);
      if (classes && classes[i]) td.className = classes[i];
      tr.appendChild(td);
    });
    return tr;
  }
  function fill(tbody, rows) {
    tbody.textContent = "";
    rows.forEach(function (r) { tbody.appendChild(r); });
  }
  function show(node, visible) { node.hidden = !visible; }

  function getJSON(path) {
    return fetch(path, {cache: "no-store"}).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok || body.status !== "success") throw new Error(path + ": " + (body.error || r.status));
        return body;
      });
    });
  }

  // -------------------------------------------------------------------------- sections
  function renderDeployments(list) {
    var section = $("#deployments");
    fill($("tbody", section), list.map(function (d) {
      var tr = row([d.application, d.deployment, d.replicas, (d.model_versions || []).join(", ") || "-",
                    rate(d.rate_per_s), percent(d.error_ratio), ms(d.p50_s), ms(d.p99_s),
                    d.inflight === null || d.inflight === undefined ? "-" : Math.round(d.inflight)],
                   [null, null, "num", null, "num rate", "num", "num", "num", "num"]);
      tr.dataset.deployment = key(d);
      return tr;
    }));
    show($(".empty", section), !list.length);
  }

  function count(v) {
    if (v === null || v === undefined) return "-";
    return v >= 1e6 ? (v / 1e6).toFixed(1) + "M" : v >= 1e4 ? (v / 1e3).toFixed(1) + "k" : v.toFixed(0);
  }
  function tenantsText(list) {  // as the CLI's: acme:120(4.1k)
    return (list || []).map(function (t) {
      return t.tenant + ":" + count(t.requests) + (t.output_tokens ? "(" + count(t.output_tokens) + ")" : "");
    }).join(", ") || "-";
  }

  // Only deployments that streamed have `stream`; the section stays hidden without one.
  function renderStreams(list) {
    var section = $("#streams"), streaming = list.filter(function (d) { return d.stream; });
    fill($("tbody", section), streaming.map(function (d) {
      var s = d.stream, tps = s.tokens_per_s !== null && s.tokens_per_s !== undefined ?
        rate(s.tokens_per_s) : rate(s.items_per_s) + " items";
      var tr = row([d.application, d.deployment, ms(s.ttft_p50_s), ms(s.ttft_p95_s), ms(s.tpot_p50_s),
                    ms(s.tpot_p95_s), ms(s.queue_p50_s), ms(s.queue_p95_s), tps,
                    tenantsText(s.top_tenants)],
                   [null, null, "num", "num", "num", "num", "num", "num", "num rate", null]);
      tr.dataset.deployment = key(d);
      return tr;
    }));
    show(section, streaming.length > 0);
  }

  function since(a) {
    var t = {firing: a.fired_at, resolved: a.resolved_at}[a.state] || a.active_at;
    return t ? age(Date.now() / 1000 - t) + " ago" : "-";
  }

  function renderAlerts(alerts) {
    var order = {firing: 0, pending: 1, resolved: 2};
    alerts = alerts.slice().sort(function (a, b) {
      return (order[a.state] - order[b.state]) || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    });
    var firing = alerts.filter(function (a) { return a.state === "firing"; });
    var recent = alerts.filter(function (a) { return a.state !== "firing"; });
    var section = $("#alerts");
    fill($("table.firing tbody", section), firing.map(function (a) {
      var tr = row([a.name, labelsText(a.labels), since(a), value(a.value), (a.annotations || {}).summary || "-"],
                   ["state-firing alertname", "labels", null, "num", "wrap"]);
      tr.dataset.alert = a.name;
      return tr;
    }));
    fill($("table.recent tbody", section), recent.map(function (a) {
      var tr = row([a.name, a.state, labelsText(a.labels), since(a), value(a.value),
                    (a.annotations || {}).summary || "-"],
                   ["alertname", "state-" + a.state, "labels", null, "num", "wrap"]);
      tr.dataset.alert = a.name;
      return tr;
    }));
    var counts = section.querySelectorAll("h3 .count");
    counts[0].textContent = "(" + firing.length + ")";
    counts[1].textContent = "(" + recent.length + ")";
    show($("table.firing", section), firing.length > 0);
    show($(".none-firing", section), !firing.length);
    show($("table.recent", section), recent.length > 0);
    show($(".none-recent", section), !recent.length);
  }

  function byDeployment(ts) {
    var out = {};
    ts.series.forEach(function (s) { out[key(s.labels)] = s.values; });
    return out;
  }

  function chartBox(card, cls, title) {
    var box = $("." + cls, card);
    if (!box) {
      box = document.createElement("div");
      box.className = "chart " + cls;
      var h = document.createElement("h4");
      h.textContent = title;
      box.appendChild(h);
      $(".pair", card).appendChild(box);
    }
    return box;
  }

  function renderCharts(p50, p99, errors) {
    var section = $("#charts"), cards = $(".cards", section);
    var a = byDeployment(p50), b = byDeployment(p99), e = byDeployment(errors);
    var keys = Object.keys(Object.assign({}, a, b, e)).sort();
    var times = p99.times;
    var seen = {};
    keys.forEach(function (k) {
      seen[k] = true;
      var card = cards.querySelector('.card[data-deployment="' + CSS.escape(k) + '"]');
      if (!card) {
        card = document.createElement("div");
        card.className = "card";
        card.dataset.deployment = k;
        var h = document.createElement("h3");
        h.textContent = k;
        card.appendChild(h);
        var pair = document.createElement("div");
        pair.className = "pair";
        card.appendChild(pair);
        cards.appendChild(card);
      }
      var empty = times.map(function () { return null; });
      MiniChart.line(chartBox(card, "latency", "Latency (ms)"), {
        times: times, label: "latency of " + k,
        format: function (v) { return ms(v); },
        series: [{name: "p50", values: a[k] || empty, color: "#2563eb"},
                 {name: "p99", values: b[k] || empty, color: "#9333ea"}]});
      MiniChart.line(chartBox(card, "errors", "Error ratio"), {
        times: errors.times, label: "error ratio of " + k,
        format: function (v) { return percent(v); },
        series: [{name: "errors / requests", values: e[k] || empty, color: "#dc2626"}]});
    });
    Array.prototype.slice.call(cards.children).forEach(function (card) {
      if (!seen[card.dataset.deployment]) cards.removeChild(card);
    });
    show($(".empty", section), !keys.length);
  }

  function renderGpus(nodes) {
    var section = $("#gpus"), box = $(".nodes", section);
    box.textContent = "";
    nodes.forEach(function (n) {
      var div = document.createElement("div");
      div.className = "node";
      div.dataset.node = n.node_id;
      var h = document.createElement("h3");
      h.textContent = "node " + n.node_id.slice(0, 12);
      div.appendChild(h);
      if (!n.devices.length) {
        var p = document.createElement("p");
        p.className = "no-gpus muted";
        p.textContent = "no GPUs: " + (n.no_gpus_reason || "none found");
        div.appendChild(p);
      } else {
        var table = document.createElement("table");
        var head = row(["GPU", "Model", "Utilization", "Memory (GiB)", "Temperature", "Power", "XID errors", "Replicas"]);
        Array.prototype.forEach.call(head.children, function (td) {
          var th = document.createElement("th");
          th.textContent = td.textContent;
          head.replaceChild(th, td);
        });
        table.appendChild(head);
        n.devices.forEach(function (d) {
          var v = d.values || {};
          var tr = row([d.index, d.model + (d.lost ? " (lost)" : ""), percent(v.utilization_ratio),
                        bytes(v.memory_used_bytes) + " / " + bytes(v.memory_total_bytes),
                        v.temperature_celsius === undefined ? "-" : v.temperature_celsius.toFixed(0) + " °C",
                        v.power_watts === undefined ? "-" : v.power_watts.toFixed(0) + " W",
                        d.xid_errors, d.replicas.join(", ") || "-"],
                       [null, d.lost ? "lost" : null, "num", "num", "num", "num", "num", null]);
          tr.className = "gpu";
          table.appendChild(tr);
        });
        div.appendChild(table);
      }
      box.appendChild(div);
    });
    show($(".empty", section), !nodes.length);
  }

  // Traces whose spans are shown; kept across redraws so a poll does not fold them up.
  var openTraces = {};

  function spansTable(t) {
    var table = document.createElement("table");
    table.className = "spans";
    t.spans.forEach(function (s) {
      var name = new Array(s.depth + 1).join("\u2003") + s.name;  // indent by depth
      var status = s.status === "error" ? "error: " + (s.exception ? s.exception.type + ": " + s.exception.message
                                                                   : s.status_message || "-") : "ok";
      var tr = row([name, (s.application || "") + "/" + (s.deployment || ""), ms(s.duration_s), status],
                   ["span-name", "labels", "num", s.status === "error" ? "state-firing wrap" : "wrap"]);
      tr.className = "span";
      table.appendChild(tr);
    });
    return table;
  }

  function renderTraces(body) {
    var section = $("#traces"), tbody = $("tbody", section);
    tbody.textContent = "";
    body.data.forEach(function (t) {
      var tr = row([age(Date.now() / 1000 - t.start) + " ago", t.kinds.join(", "), t.trace_id, key(t), t.root,
                    ms(t.duration_s), t.span_count, t.error || "-"],
                   [null, null, "labels", null, null, "num", "num", "wrap"]);
      tr.className = "trace";
      tr.dataset.trace = t.trace_id;
      tr.title = "click to show or hide its spans";
      tr.addEventListener("click", function () {
        openTraces[t.trace_id] = !openTraces[t.trace_id];
        show(detail, !!openTraces[t.trace_id]);
      });
      var detail = document.createElement("tr");
      detail.className = "trace-spans";
      var td = document.createElement("td");
      td.colSpan = 8;
      td.appendChild(spansTable(t));
      detail.appendChild(td);
      show(detail, !!openTraces[t.trace_id]);
      tbody.appendChild(tr);
      tbody.appendChild(detail);
    });
    show($("table", section), body.data.length > 0);
    $(".note", section).textContent = body.data.length ? "Click a trace to show its spans." :
      "No traces to show: " + (body.note || "none kept yet.");
  }

  // ------------------------------------------------------------------------------ loop
  function series(fn, metric) {
    return getJSON("api/v1/timeseries?function=" + fn + "&metric=" + metric +
                   "&window=1h&step=1m&by=application,deployment");
  }

  function refresh() {
    return Promise.all([
      getJSON("api/v1/deployments"), getJSON("api/v1/alerts"), series("p50", "latency_seconds"),
      series("p99", "latency_seconds"), series("error_ratio", "requests"), getJSON("api/v1/gpus"),
      getJSON("api/v1/traces?limit=20"),
    ]).then(function (r) {
      renderDeployments(r[0].data);
      renderStreams(r[0].data);
      renderAlerts(r[1].data);
      renderCharts(r[2].data, r[3].data, r[4].data);
      renderGpus(r[5].data);
      renderTraces(r[6]);
      $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
      show($("#problem"), false);
    }, function (err) {
      // The aggregator restarting is normal: say so on the page and keep polling.
      var p = $("#problem");
      p.textContent = "cannot reach the monitor (" + err.message + "); retrying";
      show(p, true);
    });
  }

  function loop() { refresh().then(function () { setTimeout(loop, POLL_MS); }); }
  loop();
})();
