// Run page: history (downsampled server-side) then live points over one websocket; reconnects by
// itself and resumes after the last seq it has, so there is no gap and no duplicate.
(function () {
  const run = JSON.parse(document.getElementById("run-info").textContent);
  const initial = JSON.parse(document.getElementById("initial-status").textContent);
  const C = window.TrainyardCharts;
  const series = {};  // key -> {step: [], time: [], y: []}
  let lastSeq = -1, logOffset = run.logOffset, plotted = false, closedForGood = false, dirty = false, failures = 0;
  let firstTime = null, latestEpoch = null;

  const num = (v) => (typeof v === "number" ? v : v === "nan" ? NaN : v === "inf" ? Infinity : v === "-inf" ? -Infinity : null);

  function addPoints(points) {
    points = points.filter((p) => p.seq > lastSeq);
    if (!points.length) return;
    for (const p of points) {
      if (firstTime === null) firstTime = p.time;
      for (const [key, raw] of Object.entries(p.values)) {
        const v = num(raw);
        if (v === null) continue;
        const s = series[key] || (series[key] = {step: [], time: [], y: []});
        s.step.push(p.step); s.time.push(p.time - firstTime); s.y.push(v);
      }
      if (typeof p.values.epoch === "number") latestEpoch = p.values.epoch;
    }
    lastSeq = points[points.length - 1].seq;
    dirty = true;
  }

  function ema(values, alpha) {
    if (!alpha) return values;
    let last = null;
    return values.map((v) => (Number.isFinite(v) ? (last = last === null ? v : alpha * last + (1 - alpha) * v) : v));
  }

  function draw() {
    if (!dirty) return;
    dirty = false;
    const smooth = parseFloat(document.getElementById("smoothing").value);
    const xKey = document.getElementById("x-axis").value;
    const log = document.getElementById("log-scale").checked;
    if (!Object.keys(series).length) return;
    document.getElementById("no-points").hidden = true;
    for (const [suffix, chart] of Object.entries(C.RUN)) {
      const traces = [];
      // A sharded run also reports each rank's memory (memory_mb_rank0, ...): drawn beside memory_mb.
      const rankKeys = suffix === "mem" ? Object.keys(series).filter((k) => /^memory_mb_rank\d+$/.test(k)).sort()
        .map((k) => [k, "rank " + k.slice("memory_mb_rank".length) + " MB", false]) : [];
      for (const [key, name, smoothable] of [...chart.keys, ...rankKeys]) {
        const s = series[key];
        if (!s) continue;
        if (smoothable && smooth) traces.push({x: s[xKey], y: s.y, name: name + " (raw)", type: C.TRACE,
          mode: "lines", opacity: 0.3, line: {color: "#3358d4"}, showlegend: false});
        traces.push({x: s[xKey], y: smoothable ? ema(s.y, smooth) : s.y, name, type: C.TRACE,
          mode: s.y.length > 200 ? "lines" : "lines+markers", marker: {size: 4}});
      }
      const layout = C.layout(chart.title, xKey === "step" ? "step" : "seconds", {
        yaxis: {type: log && !chart.linearOnly ? "log" : "linear"},
        annotations: traces.length ? [] : [{text: "no data yet", showarrow: false, xref: "paper", yref: "paper",
          x: 0.5, y: 0.5, font: {color: "#667085"}}]});
      Plotly.react("chart-" + suffix, traces, layout, C.CONFIG);
    }
    plotted = true;
  }
  setInterval(draw, 500);  // at most two redraws a second, however fast points arrive
  for (const id of ["smoothing", "x-axis", "log-scale"]) {
    document.getElementById(id).addEventListener("input", () => {
      document.getElementById("smoothing-value").textContent = document.getElementById("smoothing").value;
      dirty = true; draw();
    });
  }

  function fmt(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s";
  }

  function showStatus(s) {
    const badge = document.getElementById("status-badge");
    badge.textContent = s.status;
    badge.className = "badge " + s.status;
    document.getElementById("status-message").textContent = s.message || "";
    const bar = document.getElementById("step-progress");
    if (s.total_steps) bar.max = s.total_steps;
    bar.value = s.current_step;
    document.getElementById("step-text").textContent = "step " + s.current_step + (s.total_steps ? " / " + s.total_steps : "");
    if (latestEpoch !== null) document.getElementById("epoch-text").textContent = "epoch " + latestEpoch.toFixed(2);
    // A page opened while queued follows the run all the way: queue place, then start and end times.
    const queue = document.getElementById("queue-position");
    queue.hidden = !s.queue_position;
    if (s.queue_position) queue.textContent = ` · position ${s.queue_position} in the queue`;
    if (s.started_at) run.startedAt = s.started_at;
    if (s.finished_at) run.finishedAt = s.finished_at;
    if (run.startedAt) {
      const end = s.final ? (run.finishedAt || Date.now() / 1000) : Date.now() / 1000;
      const elapsed = end - run.startedAt;
      let text = "elapsed " + fmt(elapsed);
      if (!s.final && s.total_steps && s.current_step > 0) text += " · ETA " + fmt(elapsed / s.current_step * (s.total_steps - s.current_step));
      document.getElementById("time-text").textContent = text;
    }
    const box = document.getElementById("health-alerts");
    if (s.health && s.health.length) {
      box.innerHTML = "";
      for (const a of s.health) {
        const div = document.createElement("div");
        div.className = "alert " + a.level;
        const b = document.createElement("b");
        b.textContent = a.message;
        div.append(b, " — " + a.fix);
        box.append(div);
      }
    }
    if (s.final) {
      const cancel = document.getElementById("cancel-form");
      if (cancel) cancel.remove();
      if (!initial.final) { closedForGood = true; setTimeout(() => location.reload(), 800); }
    }
  }

  const logBox = document.getElementById("log"), search = document.getElementById("log-search");
  let logText = logBox.textContent;
  function showLog() {
    const q = search.value.toLowerCase();
    const atBottom = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.textContent = q ? logText.split("\n").filter((l) => l.toLowerCase().includes(q)).join("\n") : logText;
    if (atBottom || !q) logBox.scrollTop = logBox.scrollHeight;
  }
  search.addEventListener("input", showLog);
  logBox.scrollTop = logBox.scrollHeight;

  function connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${proto}://${location.host}/ws/runs/${run.id}/?after=${lastSeq}&log=${logOffset}`);
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "points") { addPoints(msg.points); draw(); }
      else if (msg.type === "status") showStatus(msg);
      else if (msg.type === "log") { logText += msg.text; logOffset = msg.offset; showLog(); }
    };
    ws.onopen = () => { failures = 0; document.getElementById("connection-lost").hidden = true; };
    ws.onclose = (ev) => {
      if (ev.code === 4403 || closedForGood) return;
      // Back off (1 s, 2 s, 4 s … 30 s); a refusal (signed out, access removed) looks like a plain
      // failure to the browser, so after a few in a row say so instead of retrying silently.
      failures += 1;
      if (failures >= 4) document.getElementById("connection-lost").hidden = false;
      setTimeout(connect, Math.min(30000, 1000 * 2 ** (failures - 1)));
    };
  }
  showStatus(initial);
  connect();

  // A merge under way (a worker task after the run ended; the websocket has nothing to say of it):
  // ask the API every 2 s and reload once its state changes, to show the merged model or the error.
  const merging = document.getElementById("merge-status");
  if (merging) {
    const pollMerge = async () => {
      try {
        const res = await fetch(`/api/runs/${run.id}`, {headers: {Accept: "application/json"}});
        if (res.ok && (await res.json()).merge_state !== merging.dataset.state) { location.reload(); return; }
      } catch (e) { /* offline for a moment: ask again */ }
      setTimeout(pollMerge, 2000);
    };
    setTimeout(pollMerge, 2000);
  }
  window.trainyardSeries = series;  // for tests and the curious
})();

// Playground: the prompt goes to a worker; poll until both answers are there.
(function () {
  const form = document.getElementById("playground-form");
  if (!form) return;
  const status = document.getElementById("playground-status");
  const run = JSON.parse(document.getElementById("run-info").textContent);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    status.textContent = "queued…";
    const res = await fetch(`/runs/${run.id}/playground/`, {method: "POST", body: new FormData(form),
      credentials: "same-origin"});
    // A refusal may be a page (403 for a viewer), not JSON: say so instead of waiting forever.
    const data = await res.json().catch(() => ({error: res.status === 403 ? "you can't do that in this workspace" : "failed: " + res.status}));
    if (!res.ok) { status.textContent = data.error; return; }
    const poll = async () => {
      const g = await (await fetch(`/runs/${run.id}/playground/${data.id}/`, {credentials: "same-origin"})).json();
      if (g.status === "pending") { status.textContent = "generating…"; setTimeout(poll, 700); return; }
      if (g.status === "failed") { status.textContent = "failed: " + g.error; return; }
      status.textContent = "";
      document.getElementById("playground-result").hidden = false;
      document.getElementById("gen-base").textContent = g.base;
      document.getElementById("gen-tuned").textContent = g.tuned;
      document.getElementById("gen-source").textContent = "(" + g.source + ")";
    };
    poll();
  });
})();
