/* The researcher's dashboard: reads /admin/api/stats every few seconds and draws it.
 * Everything from the server goes in with textContent or as SVG attributes, never as HTML.
 */
(function () {
  "use strict";

  var REFRESH_MS = 5000;
  var SVG = "http://www.w3.org/2000/svg";

  function $(id) { return document.getElementById(id); }

  function make(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, String(attrs[k])); });
    return node;
  }

  function seconds(ms) {
    if (ms === null || ms === undefined) return "–";
    return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s";
  }

  function megabytes(bytes) {
    return bytes === null || bytes === undefined ? "–" : Math.round(bytes / 1048576) + " MB";
  }

  function setText(id, value) { $(id).textContent = value === null || value === undefined ? "–" : String(value); }

  function bar(className, share, title) {
    var part = make("span", "bar " + className);
    part.style.width = Math.max(0, Math.min(100, share * 100)).toFixed(2) + "%";
    if (title) part.title = title;
    return part;
  }

  function hbars(container, items, labelKey) {
    var max = items.reduce(function (m, it) { return Math.max(m, it.n); }, 0) || 1;
    var rows = items.map(function (it) {
      var row = make("div", "hbar");
      row.appendChild(make("span", "hbar__label", it[labelKey]));
      var track = make("span", "hbar__track");
      track.appendChild(bar("bar--plain", it.n / max));
      row.appendChild(track);
      row.appendChild(make("span", "hbar__n", it.n));
      return row;
    });
    container.replaceChildren.apply(container, rows);
  }

  // See admin.html: the cells and timing tables keep their roles when a phone lays their rows out as grids.
  function cellRole(node, role) {
    node.setAttribute("role", role || "cell");
    return node;
  }

  function drawCells(cells) {
    var max = cells.reduce(function (m, c) { return Math.max(m, c.started); }, 0) || 1;
    var rows = cells.map(function (c) {
      var tr = cellRole(make("tr"), "row");
      tr.appendChild(cellRole(make("td", "num", c.number === null ? "" : c.number)));
      tr.appendChild(cellRole(make("td", "cell", c.description || c.cell || "(none)")));
      ["started", "finished", "active", "abandoned"].forEach(function (k) {
        tr.appendChild(cellRole(make("td", "num count-" + k, c[k])));
      });
      var td = cellRole(make("td", "bars"));
      var track = make("span", "stack");
      track.appendChild(bar("bar--finished", c.finished / max, c.finished + " finished"));
      track.appendChild(bar("bar--active", c.active / max, c.active + " chatting"));
      track.appendChild(bar("bar--abandoned", c.abandoned / max, c.abandoned + " abandoned"));
      td.appendChild(track);
      tr.appendChild(td);
      return tr;
    });
    $("cells").replaceChildren.apply($("cells"), rows);
  }

  // One slot per minute of the window, the newest on the right, so gaps show as gaps.
  function drawTimeline(points, windowMinutes, generatedAt) {
    var box = $("timeline");
    if (!points.length) {
      box.replaceChildren(make("p", "note", "No replies in the last " + windowMinutes + " minutes."));
      return;
    }
    var width = 720, height = 120, pad = 18;
    var slots = Math.max(1, windowMinutes);
    var nowMinute = Math.floor(Date.parse(generatedAt) / 60000);
    var max = points.reduce(function (m, p) { return Math.max(m, p.replies + p.errors); }, 0) || 1;
    var step = (width - 2 * pad) / slots;
    var chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", class: "timeline__svg" });
    chart.appendChild(svg("title", {})).textContent = "Replies (and errors, in red) per minute";
    points.forEach(function (p) {
      var ago = nowMinute - Math.floor(Date.parse(p.minute + ":00Z") / 60000);
      var i = Math.min(slots - 1, Math.max(0, slots - 1 - ago));
      var x = pad + i * step + 1, w = Math.max(1, step - 2);
      var hOk = (height - 2 * pad) * p.replies / max, hErr = (height - 2 * pad) * p.errors / max;
      var ok = svg("rect", { x: x, y: height - pad - hOk, width: w, height: hOk, class: "tl-ok" });
      ok.appendChild(svg("title", {})).textContent = p.minute + "Z: " + p.replies + " replies, average " + seconds(p.mean_ms);
      chart.appendChild(ok);
      if (p.errors) {
        var err = svg("rect", { x: x, y: height - pad - hOk - hErr, width: w, height: hErr, class: "tl-err" });
        err.appendChild(svg("title", {})).textContent = p.minute + "Z: " + p.errors + " errors";
        chart.appendChild(err);
      }
    });
    var first = svg("text", { x: pad, y: height - 3, class: "tl-label" });
    first.textContent = windowMinutes + " minutes ago";
    var last = svg("text", { x: width - pad, y: height - 3, class: "tl-label", "text-anchor": "end" });
    last.textContent = "now (" + generatedAt.slice(11, 16) + " UTC)";
    var top = svg("text", { x: pad, y: pad - 5, class: "tl-label" });
    top.textContent = max + " per minute";
    chart.appendChild(first);
    chart.appendChild(last);
    chart.appendChild(top);
    box.replaceChildren(chart);
  }

  // A cell's shown reply times as a small histogram (100 ms buckets, the last one "10 s or more").
  function sparkline(histogram, bucketMs) {
    var width = 200, height = 28;
    var max = histogram.reduce(function (m, n) { return Math.max(m, n); }, 0) || 1;
    var step = width / histogram.length;
    var chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img", class: "spark" });
    chart.appendChild(svg("title", {})).textContent = "Replies shown per " + bucketMs + " ms, 0 to " +
      histogram.length * bucketMs / 1000 + " s";
    histogram.forEach(function (n, i) {
      if (!n) return;
      var h = Math.max(1, (height - 2) * n / max);
      chart.appendChild(svg("rect", { x: i * step, y: height - h, width: Math.max(1, step - 0.5), height: h,
        class: "spark__bar" }));
    });
    return chart;
  }

  function drawTiming(timing, windowMinutes) {
    $("timing-window").textContent = "over the last " + windowMinutes + " minutes";
    var rows = timing.cells.map(function (c) {
      var tr = cellRole(make("tr", c.drifts ? "drifts" : ""), "row");
      tr.appendChild(cellRole(make("td", "num", c.number)));
      tr.appendChild(cellRole(make("td", "cell", c.description || c.cell)));
      tr.appendChild(cellRole(make("td", "design", c.design)));
      tr.appendChild(cellRole(make("td", "num", c.turns)));
      tr.appendChild(cellRole(make("td", "num", seconds(c.shown_p50_ms) + " / " + seconds(c.shown_p90_ms))));
      tr.appendChild(cellRole(make("td", "num", seconds(c.compute_p50_ms) + " / " + seconds(c.compute_p90_ms))));
      var td = cellRole(make("td", "bars"));
      if (c.turns) td.appendChild(sparkline(c.histogram, c.bucket_ms));
      tr.appendChild(td);
      return tr;
    });
    $("timing").replaceChildren.apply($("timing"), rows);
  }

  function drawWorkers(workers, memory, threshold) {
    var total = memory.total_bytes || 1;
    var rows = workers.map(function (w) {
      var tr = make("tr");
      tr.appendChild(make("td", "", w.pid + (w.host ? " on " + w.host : "")));
      tr.appendChild(make("td", "num", megabytes(w.rss_bytes)));
      var td = make("td", "bars");
      var track = make("span", "stack");
      track.appendChild(bar("bar--plain", (w.rss_bytes || 0) / total, "share of the machine's memory"));
      td.appendChild(track);
      tr.appendChild(td);
      tr.appendChild(make("td", "", (w.seen_at || "").slice(11, 19) + " UTC"));
      return tr;
    });
    if (!rows.length) {
      var tr = make("tr");
      var td = make("td", "note", "No worker has reported in the last 30 seconds.");
      td.colSpan = 4;
      tr.appendChild(td);
      rows.push(tr);
    }
    $("workers").replaceChildren.apply($("workers"), rows);
    var note = "workers together " + megabytes(memory.workers_bytes) + " of " + megabytes(memory.total_bytes);
    if (memory.used_percent !== null && memory.used_percent !== undefined) {
      note += "; machine " + memory.used_percent + "% in use (warning above " + threshold + "%)";
    }
    $("memory-note").textContent = note;
  }

  function drawDigest(d) {
    if (!d) return;
    $("digest").textContent = d.digest;
    var note = "Merkle root over the hash chains of " + d.participants + " participants and " + d.messages +
      " messages (synthetic ones left out); chains authoritative since " + (d.chain_since || "–") + ".";
    if (d.closed_at) {
      note += " Collection closed at " + d.closed_at + "; closing digest " + d.closing_digest +
        (d.closing_digest === d.digest ? " (unchanged)." : " — the data no longer gives it: run combot verify.");
    } else {
      note += " Publish it when you close collection with combot digest --close.";
    }
    $("digest-note").textContent = note;
  }

  function draw(data) {
    $("study-title").textContent = data.title ? "· " + data.title : "";
    ["started", "finished", "active", "abandoned", "declined"].forEach(function (k) {
      setText("total-" + k, data.totals[k]);
    });
    $("cells-note").textContent = "Abandoned: no message for " + data.active_minutes + " minutes.";
    drawCells(data.cells);
    hbars($("funnel"), data.funnel, "step");
    hbars($("problems"), data.problem_types.map(function (p) {
      return { n: p.n, label: p.meaning ? p.type + " = " + p.meaning : p.type };
    }), "label");
    hbars($("openings"), data.openings || [], "opening");
    var r = data.replies;
    $("window").textContent = "over the last " + r.window_minutes + " minutes";
    setText("p50", seconds(r.p50_ms));
    setText("p95", seconds(r.p95_ms));
    setText("mean", seconds(r.mean_ms));
    setText("success", r.success_percent === null ? "–" : r.success_percent + "%");
    setText("errors", r.errors);
    setText("fallbacks", r.fallbacks);
    drawTimeline(data.timeline, r.window_minutes, data.generated_at);
    drawWorkers(data.workers, data.memory, data.thresholds.memory_percent);
    if (data.reply_timing) drawTiming(data.reply_timing, r.window_minutes);
    drawDigest(data.digest);
    var notes = (data.warnings || []).slice();
    if (data.synthetic_left_out) {
      notes.push(data.synthetic_left_out + " synthetic participants (combot bench, pilots) are left out of every number here.");
    }
    var warnings = notes.map(function (w) { return make("p", "warning", w); });
    $("warnings").replaceChildren.apply($("warnings"), warnings);
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString() + " · refreshes every " + REFRESH_MS / 1000 + " s";
  }

  async function refresh() {
    try {
      var response = await fetch("admin/api/stats", { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        location.assign("admin"); // the token changed or the cookie expired: the sign-in form
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      draw(await response.json());
    } catch (error) {
      $("updated").textContent = "Could not refresh (" + error.message + "); trying again.";
    } finally {
      setTimeout(refresh, REFRESH_MS);
    }
  }

  refresh();
})();
