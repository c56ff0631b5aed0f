// tokenfactory dashboard: polls /dashboard/data and draws it with uPlot (vendored, MIT).
// No build step. The API key (when the server needs one) is kept in sessionStorage only.
"use strict";
(function () {
  const KEY_STORE = "tokenfactory-dashboard-key";
  const MAX_POINTS = 600;
  const params = new URLSearchParams(location.search);
  const $ = (sel) => document.querySelector(sel);

  const secs = (v) => v == null ? "-" : v < 1 ? (v * 1000).toPrecision(3) + " ms" : v.toPrecision(3) + " s";
  const pct = (v) => v == null ? "-" : (v * 100).toFixed(1) + " %";
  const num = (v, d) => v == null ? "-" : Number(v).toFixed(d);
  const money = (v) => v == null ? "-" : "$" + (v >= 1 ? v.toFixed(2) : v.toPrecision(3));
  const big = (v) => v == null ? "-" : v >= 1e6 ? (v / 1e6).toFixed(2) + " M" : v >= 1e4 ? (v / 1e3).toFixed(1) + " k" : String(Math.round(v));

  const TILES = {
    running: (s) => num(s.running, 0), waiting: (s) => num(s.waiting, 0),
    out_tps: (s) => num(s.out_tps, 1), ttft_p50: (s) => secs(s.ttft_p50),
    itl_p50: (s) => secs(s.itl_p50), kv_used_frac: (s) => pct(s.kv_used_frac),
    hit_rate: (s) => pct(s.hit_rate), usd_per_mtok_out: (s) => money(s.usd_per_mtok_out),
    j_per_token_out: (s) => s.j_per_token_out == null ? "-" : s.j_per_token_out.toPrecision(3) + " J",
    roofline_eff: (s) => pct(s.roofline_eff), output_tokens: (s) => big(s.output_tokens),
    dollars: (s) => s.dollars == null ? "-" : "$" + s.dollars.toFixed(6),
  };

  // chart id -> its series (sample field, label, colour) and how to print the y axis
  const CHARTS = [
    ["requests", [["running", "running", "#2a6fdb"], ["waiting", "waiting", "#d9822b"]], (v) => v],
    ["ttft", [["ttft_p50", "p50", "#2a6fdb"], ["ttft_p90", "p90", "#d9822b"], ["ttft_p99", "p99", "#c23030"]], (v) => v],
    ["itl", [["itl_p50", "p50", "#2a6fdb"], ["itl_p90", "p90", "#d9822b"], ["itl_p99", "p99", "#c23030"]], (v) => v],
    ["tps", [["out_tps", "output", "#2a6fdb"], ["prefill_tps", "prefill (computed prompt)", "#7a3fb0"]], (v) => v],
    ["kv", [["kv_total", "total", "#999"], ["kv_used", "used", "#2a6fdb"], ["kv_cached", "cached (hashed)", "#3c9a4a"], ["kv_pinned", "pinned", "#c23030"]], (v) => v],
    ["cache", [["hit_rate", "prefix hit rate", "#3c9a4a"], ["busy", "machine busy", "#d9822b"]], (v) => (v * 100).toFixed(0) + "%"],
    ["cost", [["usd_per_mtok_out", "per M output tokens", "#2a6fdb"], ["usd_per_mtok", "per M tokens processed", "#7a3fb0"]], (v) => "$" + v],
    ["energy", [["j_per_token_out", "J / output token", "#d9822b"]], (v) => v],
    ["roofline", [["roofline_eff", "achieved / measured read bandwidth", "#c23030"]], (v) => (v * 100).toFixed(0) + "%"],
  ];

  const samples = [];
  const plots = {};
  let since = null;
  let pollMs = Math.max(200, Math.min(1000, Number(params.get("poll")) || 1000));
  let polls = 0;
  let timer = null;

  function setState(state, text) {
    document.body.dataset.state = state;
    $("#status").textContent = text;
  }

  function makePlots() {
    for (const [id, series, fmt] of CHARTS) {
      const el = $("#chart-" + id);
      const opts = {
        width: Math.max(300, el.clientWidth - 12), height: 170,
        scales: { x: { time: true } },
        series: [{}].concat(series.map(([, label, stroke]) => ({ label, stroke, width: 1.5, spanGaps: false }))),
        axes: [{}, { size: 60, values: (u, vals) => vals.map((v) => v == null ? "" : fmt(v)) }],
        legend: { live: false },
        cursor: { show: false },
      };
      plots[id] = new uPlot(opts, columns(series), el);
    }
  }

  function columns(series) {
    const cols = [samples.map((s) => s.t)];
    for (const [key] of series) cols.push(samples.map((s) => s[key] == null ? null : s[key]));
    return cols;
  }

  function render() {
    const last = samples[samples.length - 1];
    if (!last) return;
    for (const el of document.querySelectorAll(".tile")) {
      const key = el.dataset.key;
      el.querySelector(".v").textContent = TILES[key](last);
      el.dataset.value = last[key] == null ? "" : String(last[key]);
    }
    for (const [id, series] of CHARTS) {
      plots[id].setData(columns(series));
      const el = $("#chart-" + id);
      el.dataset.points = String(samples.length);
      el.dataset.nonnull = String(samples.filter((s) => series.some(([k]) => s[k] != null)).length);
    }
  }

  async function poll() {
    const headers = {};
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers["x-api-key"] = key;
    const url = "/dashboard/data" + (since == null ? "" : "?since=" + since);
    try {
      const resp = await fetch(url, { headers, cache: "no-store" });
      const body = await resp.json().catch(() => null);
      if (resp.status === 401 || resp.status === 403) {
        // 401: no key or a wrong one; 403: a key that may not read server-wide metrics
        // (a tenant key, or metrics switched off). Nothing is shown until a key is accepted.
        const msg = (body && body.error && body.error.message) || "key refused";
        $("#keyform").hidden = false;
        $("#keyerror").textContent = key || resp.status === 403 ? msg : "";
        setState("key", resp.status === 401 ? "key required" : "key refused");
        return;
      }
      if (!resp.ok || !body) {
        setState("error", "HTTP " + resp.status + ((body && body.error) ? ": " + body.error.message : ""));
        return;
      }
      $("#keyform").hidden = true;
      $("#model").textContent = body.model;
      $("#window").textContent = body.window_s;
      $("#roofnote").textContent = roofNote(body.roofline);
      pollMs = Math.min(pollMs, body.poll_ms || 1000);
      for (const s of body.samples) {
        s.kv_used_frac = s.kv_total ? s.kv_used / s.kv_total : null;
        samples.push(s);
      }
      if (samples.length > MAX_POINTS) samples.splice(0, samples.length - MAX_POINTS);
      if (samples.length) since = samples[samples.length - 1].t;
      polls += 1;
      document.body.dataset.polls = String(polls);
      render();
      setState("live", "live, " + new Date().toLocaleTimeString());
    } catch (err) {
      setState("error", "server unreachable (" + err.message + ")");
    }
  }

  function roofNote(r) {
    if (!r) return "";
    const bw = r.bandwidth_bytes_per_s ? (r.bandwidth_bytes_per_s / 1e9).toFixed(1) + " GB/s measured read bandwidth" : null;
    const w = r.weight_bytes ? (r.weight_bytes / 1e6).toFixed(1) + " MB of weights per decode step" : null;
    return "Roofline: " + [bw, w, r.note].filter(Boolean).join("; ") + ".";
  }

  function loop() {
    poll().finally(() => { timer = setTimeout(loop, pollMs); });
  }

  $("#keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("#key").value.trim());
    $("#key").value = "";
    clearTimeout(timer);
    loop();
  });

  makePlots();
  loop();
})();
