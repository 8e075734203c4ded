/* gradwatch live view: the run page's charts follow the run as it trains.
 *
 * The page draws a REST snapshot (each live figure carries layout.meta.last_step, the last step it
 * holds). This script then opens the server's WS /api/v1/runs/{id}/live itself, and after each
 * (re)subscription fetches over REST what the snapshot or the last connection missed, so there is
 * no gap. What is complete is tracked as a range per history (S.covered: every step from there to the
 * cursor is held); a graph whose figure ends before it (a figure fetched before the snapshot, a
 * scalar that came in a later batch than its step) asks for a fill from its own last step first.
 * A fill reads /steps first and bounds every other request by its last step, so one step's values
 * come from one read; a step both the fill and the stream bring is merged, not dropped.
 * Messages are buffered and flushed at most FLUSH_MS apart, in one requestAnimationFrame,
 * as one dcc.Graph extendData per graph: extending per message makes dcc.Graph duplicate points.
 * Steps already drawn are dropped (a per-graph cursor); a lost connection is retried with
 * exponential backoff. window.gradwatchLive.stats holds what the bench reads (script ms, bytes).
 */
(function () {
  "use strict";
  var FLUSH_MS = 250, HISTORY = 4000, MAX_POINTS = 20000, HEAT_MAX = 3000, BACKOFF_MAX = 8000;
  /* line charts whose layout.meta.live_traces says which trace follows which value of a step record:
   * [trace index, path] with path ["total_norm"], ["transforms", name, field], ["scalars", key], or
   * {num: path, den: path} for a ratio (AutoscaledNorm's sigma/sigma_ref) */
  var LINE_GRAPHS = ["norm-graph", "scale-graph", "transforms-graph", "scalars-graph", "layer-graph"];
  var S = {run: null, ws: null, wsStats: "", history: [], byStep: {}, scalarHist: [], scalarAt: {}, cursor: -1, pending: [], timer: null,
           backoff: 500, retry: null, graphs: {}, newEvents: 0, lastStep: null, generation: 0,
           covered: Infinity, scalarCovered: Infinity, notLive: {}, scalarCursor: -1, need: Infinity, hold: {}, subscribed: false};
  var stats = {messages: 0, bytes: 0, flushes: 0, scriptMs: 0, maxScriptMs: 0, steps: 0, connects: 0, reloads: 0, subscribed: 0, fills: 0};

  function num(v) {
    if (v === null || v === undefined) { return null; }
    if (typeof v === "string") { return v === "Infinity" ? Infinity : v === "-Infinity" ? -Infinity : NaN; }
    return v;
  }
  function fin(v) { v = num(v); return v !== null && isFinite(v) ? v : null; }
  function gd(id) { var el = document.getElementById(id); return el && el.querySelector(".js-plotly-plot"); }
  function setProps(id, props) {
    if (window.dash_clientside && window.dash_clientside.set_props && document.getElementById(id)) {
      window.dash_clientside.set_props(id, props);
    }
  }
  function status(text) { setProps("live-status", {children: text}); }

  function heatMeta() { var g = gd("heatmap"); return g && g.layout && g.layout.meta; }
  function wantStats() {
    var m = heatMeta();
    var out = ["nonfinite"];
    if (m && m.live && out.indexOf(m.stat) < 0 && !S.notLive[m.stat]) { out.push(m.stat); }
    var lg = gd("layer-graph"), lm = lg && lg.layout && lg.layout.meta;  // the shown layer's series
    ((lm && lm.live_stats) || []).forEach(function (k) { if (out.indexOf(k) < 0 && !S.notLive[k]) { out.push(k); } });
    return out.sort().join(",");
  }

  /* one step record (rank 0) into the history, unless that step is already held */
  function keep(rec) {
    if (rec.rank) { return false; }
    var old = S.byStep[rec.step];
    if (old) {  // held already (the fill and the stream both brought it): add what it lacks
      if (rec.transforms && !old.transforms) { old.transforms = rec.transforms; }
      if (rec.layers && !old.layers) { old.layers = rec.layers; } else if (rec.layers) { mergeLayers(old.layers, rec.layers); }
      if (rec.layerFill && !old.layerFill) { old.layerFill = rec.layerFill; }
      return false;
    }
    // a step older than what is drawn (an agent's backlog delivered late): the charts cannot
    // append it in order, so they are redrawn from a fresh REST snapshot
    if (S.cursor >= 0 && rec.step < S.cursor && !S.inGap) { S.late = true; }
    S.byStep[rec.step] = rec;
    var h = S.history;
    if (!h.length || h[h.length - 1].step < rec.step) { h.push(rec); }
    else { var i = h.length; while (i > 0 && h[i - 1].step > rec.step) { i--; } h.splice(i, 0, rec); }
    if (h.length > HISTORY) { var gone = h.shift().step; delete S.byStep[gone]; S.covered = Math.max(S.covered, gone + 1); }
    if (rec.step > S.cursor) { S.cursor = rec.step; }
    stats.steps++;
    return true;
  }

  /* per-layer statistics `into` lacks, taken from `from` by layer index (a stream subscribed before
   * the heatmap's statistic was known, filled over REST) */
  function mergeLayers(into, from) {
    if (!into.index || !from.index) { return; }
    var pos = {};
    for (var i = 0; i < from.index.length; i++) { pos[from.index[i]] = i; }
    Object.keys(from).forEach(function (k) {
      if (k === "index" || into[k] !== undefined) { return; }
      into[k] = into.index.map(function (li) { var p = pos[li]; return p === undefined ? null : from[k][p]; });
    });
  }

  /* Watcher.log values of a step, in their own history (the scalars chart has its own cursor:
   * a step's scalars may arrive in a later batch than its step record) */
  function attachScalars(sc) {
    if (sc.rank) { return; }
    var o = S.scalarAt[sc.step];
    if (!o) {
      o = S.scalarAt[sc.step] = {step: sc.step, scalars: {}};
      var h = S.scalarHist, i = h.length;
      while (i > 0 && h[i - 1].step > sc.step) { i--; }
      h.splice(i, 0, o);
      if (h.length > HISTORY) { var gone = h.shift().step; delete S.scalarAt[gone]; S.scalarCovered = Math.max(S.scalarCovered, gone + 1); }
    }
    if (sc.step > S.scalarCursor) { S.scalarCursor = sc.step; }
    for (var k in sc.values) { if (Object.prototype.hasOwnProperty.call(sc.values, k)) { o.scalars[k] = sc.values[k]; } }
  }

  /* a value of a step record by path; undefined when the record does not hold it */
  function pick(rec, path) {
    if (!Array.isArray(path)) {
      var a = pick(rec, path.num), b = pick(rec, path.den);
      if (a === undefined || b === undefined) { return undefined; }
      return a === null || b === null || !b ? null : a / b;
    }
    var last = path[path.length - 1];
    if (last !== null && typeof last === "object") {  // ["layers", stat, {layer: index}]: one layer's value
      var k = path[path.length - 2], L = rec.layers, pos = L && L.index ? L.index.indexOf(last.layer) : -1;
      if (pos >= 0 && L[k] && L[k][pos] !== undefined) { return fin(L[k][pos]); }
      var f = rec.layerFill && rec.layerFill[last.layer];  // not streamed for this step: a REST fill's
      return f && f[k] !== undefined ? fin(f[k]) : undefined;
    }
    var v = rec;
    for (var i = 0; i < path.length; i++) { if (v === null || v === undefined) { return undefined; } v = v[path[i]]; }
    return v === undefined ? undefined : fin(v);
  }

  function onMessage(ev) {
    stats.messages++;
    stats.bytes += ev.data.length;
    var t0 = performance.now();
    var msg = JSON.parse(ev.data);
    if (msg.type === "subscribed") {
      S.backoff = 500; stats.subscribed++; S.subscribed = true;
      // a fill under way may have read before this subscription: another after it, from the cursor
      if (S.filling) { S.need = Math.min(S.need, S.cursor + 1); } else { fillGap(); }
    }
    else if (msg.type === "batch") { S.pending.push(msg); schedule(); }
    stats.scriptMs += performance.now() - t0;
  }

  function schedule() {
    if (S.timer === null) {
      S.timer = setTimeout(function () { requestAnimationFrame(flush); }, FLUSH_MS);
    }
  }

  function flush() {
    var t0 = performance.now();
    S.timer = null;
    if (S.filling) { schedule(); return; }  // drawn in step order: the gap's steps first
    var msgs = S.pending; S.pending = [];
    for (var i = 0; i < msgs.length; i++) {
      var m = msgs[i];
      (m.scalars || []).forEach(attachScalars);
      (m.steps || []).forEach(keep);
      S.newEvents += (m.events || []).length;
    }
    if (S.late) { S.late = false; reload(); } else { draw(); }
    if (S.newEvents) { setProps("live-tick", {data: {events: S.newEvents, step: S.cursor, t: Date.now()}}); S.newEvents = 0; }
    status("live · step " + (S.cursor >= 0 ? S.cursor : "—"));
    var dt = performance.now() - t0;
    stats.flushes++; stats.scriptMs += dt; stats.maxScriptMs = Math.max(stats.maxScriptMs, dt);
    if (wantStats() !== S.wsStats && S.ws) { S.restat = true; S.ws.close(); }  // the heatmap's statistic changed
  }

  /* every chart redrawn from a fresh REST snapshot; until a graph's new figure arrives, its old
   * one (known by its key) is left alone: appending to it would duplicate what the new one holds */
  function reload() {
    stats.reloads++;
    S.hold = {};
    Object.keys(S.graphs).forEach(function (id) { S.hold[id] = S.graphs[id].key; });
    S.graphs = {};
    setProps("reset-zoom", {n_clicks: Date.now()});
  }

  /* a fill from step `from` on, now or after the one under way */
  function needFill(from) {
    S.need = Math.min(S.need, from);
    if (S.subscribed && !S.filling) { fillGap(); }
  }

  /* the part of the history a graph does not hold yet (its cursor survives a figure replacement) */
  function fresh(id, hist) {
    var g = gd(id);
    var scal = hist === S.scalarHist;
    hist = hist || S.history;
    if (!g || !g.layout) { return null; }
    if (!g.layout.meta || g.layout.meta.last_step === undefined) {
      // an empty state drawn before the run had steps: redraw from a snapshot once data flows
      if (S.history.length && !S.reloaded) { S.reloaded = true; setProps("reset-zoom", {n_clicks: Date.now()}); }
      return null;
    }
    // a figure is known by its content, not its object: Plotly.relayout may copy the layout
    var m = g.layout.meta, key = [m.last_step, m.stat, m.depth, (m.layer_index || []).join(" "),
                                  g.layout.uirevision].join("|");
    if (S.hold[id] !== undefined) {
      if (S.hold[id] === key) { return null; }  // the figure from before the reload: wait for the new one
      delete S.hold[id];
    }
    var st = S.graphs[id];
    if (!st || st.key !== key) {
      st = S.graphs[id] = {key: key, sent: m.last_step === null ? -1 : m.last_step};
    }
    // the history must hold every step after the figure's last one: else fill from there first
    if (st.sent + 1 < (scal ? S.scalarCovered : S.covered)) { needFill(st.sent + 1); return null; }
    var out = [];
    for (var i = 0; i < hist.length; i++) { if (hist[i].step > st.sent) { out.push(hist[i]); } }
    if (out.length) { st.sent = out[out.length - 1].step; }
    return out;
  }

  function draw() {
    LINE_GRAPHS.forEach(function (id) {
      var g = gd(id), lt = g && g.layout && g.layout.meta && g.layout.meta.live_traces;
      if (!lt) { if (id === "norm-graph") { fresh(id); } return; }  // an empty state: reloads once data flows
      var recs = fresh(id, id === "scalars-graph" ? S.scalarHist : null);
      if (!recs || !recs.length) { return; }
      var xs = [], ys = [], idx = [];
      lt.forEach(function (t) {
        var x = [], y = [];
        recs.forEach(function (r) { var v = pick(r, t[1]); if (v !== undefined) { x.push(r.step); y.push(v); } });
        xs.push(x); ys.push(y); idx.push(t[0]);
      });
      if (xs.some(function (x) { return x.length; })) { setProps(id, {extendData: [{x: xs, y: ys}, idx, MAX_POINTS]}); }
    });
    var m = heatMeta();
    if (!m || !m.live || S.notLive[m.stat]) { return; }  // (a statistic this server does not stream: as drawn)
    var recs = fresh("heatmap");
    if (!recs || !recs.length) { return; }
    // a step streamed before the subscription carried the heatmap's statistic: drawn once a REST
    // fill brings its values (never as an empty column), and so are the steps after it
    for (var k = 0; k < recs.length; k++) {
      if (recs[k].layers && recs[k].layers.index && recs[k].layers[m.stat] === undefined) {
        S.graphs.heatmap.sent = recs[k].step - 1;
        needFill(recs[k].step);
        recs = recs.slice(0, k);
        break;
      }
    }
    var x = [], z = [], bad = [];
    recs.forEach(function (r) {
      var L = r.layers;
      if (!L || !L.index) { return; }
      var pos = {};
      for (var i = 0; i < L.index.length; i++) { pos[L.index[i]] = i; }
      var vals = L[m.stat] || [], nf = L.nonfinite || [];
      var row = [], brow = [];
      (m.rows || m.layer_index).forEach(function (li) {
        var p, v, n;
        if (Array.isArray(li)) {  // a module-prefix group: merged as figures.merge_group does
          var got = group(li, pos, vals, nf, m.agg); v = got[0]; n = got[1];
        } else {
          p = pos[li]; v = p === undefined ? null : num(vals[p]); n = p === undefined ? 0 : (nf[p] || 0);
        }
        if (v === Infinity && m.inf_top !== undefined && m.inf_top !== null) {  // figures.SAFE_INF
          brow.push(null); row.push(m.inf_top); return;
        }
        var isBad = (v !== null && !isFinite(v)) || (m.stat === "nonfinite" ? v > 0 : n > 0 && v === null);
        brow.push(isBad || (v !== null && !isFinite(v)) ? 1 : null);
        if (v === null || !isFinite(v)) { row.push(m.stat === "nonfinite" ? v : null); return; }
        row.push(m.log ? (v > 0 ? Math.log10(v) : (v === 0 ? m.zmin : null)) : v);
      });
      x.push(r.step); z.push(row); bad.push(brow);
    });
    if (x.length) { setProps("heatmap", {extendData: [{x: [x, x], z: [z, bad]}, [0, 1], HEAT_MAX]}); }
  }

  function group(members, pos, vals, nf, how) {
    var out = null, n = 0, sq = 0, big = 0, any = false, nan = false;
    for (var i = 0; i < members.length; i++) {
      var p = pos[members[i]];
      if (p === undefined) { continue; }
      n += nf[p] || 0;
      var v = num(vals[p]);
      if (v === null) { continue; }
      if (isNaN(v)) { nan = true; continue; }
      any = true;
      if (how === "rss") { var a = Math.abs(v); if (a > big) { sq = sq * (big / a) * (big / a) + 1; big = a; } else if (a > 0) { sq += (a / big) * (a / big); } }
      else if (how === "sum") { out = (out || 0) + v; }
      else if (how === "min") { out = out === null ? v : Math.min(out, v); }
      else { out = out === null ? v : Math.max(out, v); }
    }
    if (nan) { return [NaN, n]; }  // NaN wins, as in figures.merge_group
    if (!any) { return [null, n]; }
    return [how === "rss" ? (big === Infinity ? Infinity : big * Math.sqrt(sq)) : out, n];
  }

  /* REST: the steps the stream did not bring (first connect, reconnects) and those a graph asked
   * for: from the earliest step any history or graph may lack. /steps is read first; the heatmap
   * and the transform values are then read up to its last step (they are stored in the same
   * transaction as their step), the scalars without an end (a step's scalars may come in a later
   * batch; the stream's copy of them merges). Steps stored after the subscription also come over
   * the stream, which is held (not drawn) until the fill is in. A failed fill is retried. */
  function fillGap() {
    var run = S.run, gen = S.generation;
    var from = Math.min(S.need, S.cursor + 1, S.scalarCursor + 1);
    S.need = Infinity;
    if (from < 0) { from = 0; }
    S.filling = true;
    var base = "/api/v1/runs/" + encodeURIComponent(run);
    function json(url) {
      return fetch(base + url, {credentials: "same-origin"}).then(function (r) {
        if (!r.ok) { throw new Error(url + ": " + r.status); }
        return r.json();
      });
    }
    var m = heatMeta(), hs = m && m.live ? m.stat : null, end = null, tooLong = false;
    var lg = gd("layer-graph"), lm = lg && lg.layout && lg.layout.meta;
    var lidx = lm && lm.live_stats && lm.layer_index ? lm.layer_index[0] : null;
    json("/steps?fields=total_norm,total_norm_post,loss_scale&start=" + from).then(function (st) {
      if (gen !== S.generation) { return null; }
      var pts = (st.points || []).filter(function (p) { return !p.rank; });
      tooLong = !!st.downsampled || (pts.length && pts[pts.length - 1].step - from > HISTORY / 2);
      end = pts.length ? pts[pts.length - 1].step : null;
      if (tooLong) { return [pts, null, {}, null]; }
      var heat = hs === null || end === null ? Promise.resolve(null)
        : json("/heatmap?stat=" + hs + "&start=" + from + "&end=" + end + "&max_points=" + (end - from + 1));
      // the shown layer's series (layer-graph), stat by stat, up to the same last step
      var lay = lidx === null || end === null ? Promise.resolve(null) : Promise.all(lm.live_stats.map(function (k) {
        return json("/stats?layer=" + lidx + "&stat=" + k + "&start=" + from + "&end=" + end + "&max_points=" + (end - from + 1));
      }));
      return Promise.all([pts, heat, gapValues(base, from, end), lay]);
    }).then(function (got) {
      if (!got || gen !== S.generation) { return; }
      // a long outage (or a heatmap too large to read step by step): redraw from snapshots (they
      // hold everything stored so far)
      if (tooLong || (got[1] && (got[1].steps || []).length && got[1].bucket_width !== 1)) {
        S.cursor = Math.max(S.cursor, end); S.covered = Math.min(S.covered, end + 1);
        S.scalarCovered = Math.min(S.scalarCovered, end + 1);
        reload();
        return;
      }
      var pts = got[0], hm = got[1], layersAt = {}, valuesAt = got[2];
      if (hm && hm.bucket_width === 1) {
        hm.steps.forEach(function (s, k) {
          var blk = {index: hm.layers.map(function (l) { return l.index; })};
          blk[hs] = hm.values.map(function (row) { return row[k]; });
          blk.nonfinite = hm.nan.map(function (row) { return row[k]; });
          layersAt[s] = blk;
        });
      }
      var fillAt = {};  // step -> {layer index: {stat: value}}
      (got[3] || []).forEach(function (resp, j) {
        var ser = resp && resp.series && resp.series[0];
        if (!ser || ser.downsampled) { return; }
        (ser.points || []).forEach(function (q) {
          if (q.rank) { return; }
          var at = fillAt[q.step] || (fillAt[q.step] = {});
          (at[lidx] || (at[lidx] = {}))[lm.live_stats[j]] = q.value;
        });
      });
      S.inGap = true;  // the gap's steps may precede steps the stream already brought
      pts.forEach(function (p) {
        p = {step: p.step, rank: 0, total_norm: p.total_norm, total_norm_post: p.total_norm_post, loss_scale: p.loss_scale,
             transforms: (valuesAt[p.step] || {}).transforms || {}};
        if (layersAt[p.step]) { p.layers = layersAt[p.step]; }
        if (fillAt[p.step]) { p.layerFill = fillAt[p.step]; }
        keep(p);
      });
      Object.keys(valuesAt).forEach(function (step) { attachScalars({step: +step, values: valuesAt[step].scalars}); });
      S.inGap = false;
      S.covered = Math.min(S.covered, from);
      S.scalarCovered = Math.min(S.scalarCovered, from);
      stats.fills++;
    }).then(function () {
      if (gen !== S.generation) { return; }
      S.filling = false;
      if (S.need !== Infinity) { fillGap(); } else { schedule(); }
    }, function () {  // a request failed (the server restarting): again shortly, the stream held meanwhile
      if (gen !== S.generation) { return; }
      S.need = Math.min(S.need, from);
      setTimeout(function () { if (gen === S.generation && S.filling) { fillGap(); } }, 1000);
    });
  }

  /* REST: the transform values and scalars the charts follow, from step `from` on, as
   * {step: {transforms: {name: {field: v}}, scalars: {key: v}}} (transforms up to `end`) */
  function gapValues(base, from, end) {
    var names = {}, keys = {};
    ["transforms-graph", "scalars-graph"].forEach(function (id) {
      var g = gd(id), lt = g && g.layout && g.layout.meta && g.layout.meta.live_traces;
      (lt || []).forEach(function (t) {
        (Array.isArray(t[1]) ? [t[1]] : [t[1].num, t[1].den]).forEach(function (p) {
          if (p[0] === "transforms") { names[p[1]] = 1; } else if (p[0] === "scalars") { keys[p[1]] = 1; }
        });
      });
    });
    function get(url) {  // a failed request fails the fill (retried), never leaves a silent hole
      return fetch(base + url + "&start=" + from, {credentials: "same-origin"})
        .then(function (r) { if (!r.ok) { throw new Error(url + ": " + r.status); } return r.json(); });
    }
    function points(sr) {  // raw points, or a bucket's mean at its last step (as fillGap does for /steps)
      return sr.points ? sr.points.filter(function (p) { return !p.rank; }).map(function (p) { return [p.step, p.value]; })
        : (sr.buckets || []).map(function (b) { return [b.step_max, b.mean]; });
    }
    var out = {};
    function at(step) { return out[step] || (out[step] = {transforms: {}, scalars: {}}); }
    var jobs = Object.keys(names).map(function (n) {
      if (end === null) { return null; }
      return get("/transforms?transform=" + encodeURIComponent(n) + "&end=" + end).then(function (j) {
        ((j && j.series) || []).forEach(function (sr) {
          points(sr).forEach(function (p) { var t = at(p[0]).transforms; (t[n] = t[n] || {})[sr.field] = p[1]; });
        });
      });
    }).concat(Object.keys(keys).map(function (k) {
      return get("/scalars?key=" + encodeURIComponent(k)).then(function (j) {
        if (j) { points(j).forEach(function (p) { at(p[0]).scalars[k] = p[1]; }); }
      });
    }));
    return Promise.all(jobs).then(function () { return out; });
  }

  function connect() {
    if (!S.run) { return; }
    var gen = S.generation;
    S.wsStats = wantStats();
    var proto = location.protocol === "https:" ? "wss:" : "ws:";
    var ws = new WebSocket(proto + "//" + location.host + "/api/v1/runs/" + encodeURIComponent(S.run) +
                           "/live?layers=" + S.wsStats);
    S.ws = ws;
    stats.connects++;
    ws.onmessage = onMessage;
    ws.onclose = function (ev) {
      if (gen !== S.generation) { return; }
      S.ws = null; S.subscribed = false;
      if (ev && ev.code === 1008 && /unknown statistic/.test(ev.reason || "")) {
        // a heatmap statistic this server does not stream: the heatmap stays as drawn, the rest goes on
        S.wsStats.split(",").forEach(function (k) { if (k !== "nonfinite") { S.notLive[k] = true; } });
        connect(); return;
      }
      if (S.restat) { S.restat = false; connect(); return; }
      status("live · reconnecting in " + (S.backoff / 1000).toFixed(1) + " s");
      S.retry = setTimeout(connect, S.backoff);
      S.backoff = Math.min(BACKOFF_MAX, S.backoff * 2);
    };
  }

  function stop() {
    S.generation++;
    if (S.retry) { clearTimeout(S.retry); S.retry = null; }
    if (S.ws) { var ws = S.ws; S.ws = null; ws.onclose = null; ws.close(); }
  }

  function start(snap) {
    if (!snap || !snap.run_id) { return; }
    if (snap.run_id === S.run && S.ws) { return; }  // a snapshot reload: the cursors follow the figures
    stop();
    S.run = snap.run_id; S.reloaded = false; S.history = []; S.byStep = {}; S.scalarHist = []; S.scalarAt = {}; S.graphs = {}; S.pending = []; S.backoff = 500;
    S.cursor = snap.last_step === null || snap.last_step === undefined ? -1 : snap.last_step;
    S.scalarCursor = S.cursor; S.covered = Infinity; S.scalarCovered = Infinity; S.need = Infinity; S.hold = {};
    S.filling = false; S.subscribed = false;
    connect();
  }

  /* an events-table row: every chart to that step, marked with a line */
  function jump(cell, rows) {
    var row = rows && rows[cell.row];
    if (!row || !window.Plotly) { return; }
    var step = row.step;
    ["heatmap", "layer-graph", "norm-graph", "scale-graph", "scalars-graph", "transforms-graph"].forEach(function (id) {
      var g = gd(id);
      if (!g || !g.layout || !g.data || !g.data.length) { return; }
      var r = (g._fullLayout && g._fullLayout.xaxis && g._fullLayout.xaxis.range) || [0, step * 2];
      var half = Math.max(20, Math.min((r[1] - r[0]) / 10, 2000));
      window.Plotly.relayout(g, {"xaxis.range": [step - half, step + half], "xaxis.autorange": false,
        shapes: [{type: "line", x0: step, x1: step, yref: "paper", y0: 0, y1: 1,
                  line: {color: "#d62728", width: 1.5, dash: "dot"}}]});
    });
    S.lastJump = step;
  }

  window.addEventListener("popstate", function () { if (!/^\/runs\//.test(location.pathname)) { stop(); S.run = null; } });
  window.gradwatchLive = {start: start, stop: stop, jump: jump, stats: stats, state: S, group: group};
})();
