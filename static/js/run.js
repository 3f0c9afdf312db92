// Run page: history then live points over one websocket; reconnects by itself and resumes from the
// last seq it has (no gap, no duplicate).
(function () {
  const run = window.RUN;
  const initial = JSON.parse(document.getElementById("initial-status").textContent);
  const series = {
    "chart-loss": {title: "loss", traces: [["loss", "train loss"], ["eval_loss", "eval loss"]]},
    "chart-lr": {title: "learning rate", traces: [["learning_rate", "learning rate"]]},
    "chart-grad": {title: "grad norm", traces: [["grad_norm", "grad norm"]]},
    "chart-tps": {title: "tokens / s", traces: [["tokens_per_second", "tokens/s"]]},
  };
  let lastSeq = -1, logOffset = run.logOffset, plotted = false, closedForGood = false;
  const layout = (title) => ({title: {text: title, font: {size: 14}}, margin: {l: 50, r: 10, t: 36, b: 36},
    height: 260, xaxis: {title: {text: "step"}}, legend: {orientation: "h"}, hovermode: "x unified"});

  function ensurePlots() {
    if (plotted) return;
    for (const [id, s] of Object.entries(series)) {
      Plotly.newPlot(id, s.traces.map(([, name]) => ({x: [], y: [], name, mode: "lines+markers",
        type: "scattergl", marker: {size: 4}})), layout(s.title), {displaylogo: false, responsive: true});
    }
    plotted = true;
    document.getElementById("no-points").hidden = true;
  }

  function addPoints(points) {
    points = points.filter((p) => p.seq > lastSeq);
    if (!points.length) return;
    ensurePlots();
    for (const [id, s] of Object.entries(series)) {
      const xs = s.traces.map(() => []), ys = s.traces.map(() => []);
      for (const p of points) {
        s.traces.forEach(([key], i) => {
          const v = p.values[key];
          if (v !== undefined && v !== null) { xs[i].push(p.step); ys[i].push(typeof v === "number" ? v : NaN); }
        });
      }
      if (xs.some((x) => x.length)) Plotly.extendTraces(id, {x: xs, y: ys}, s.traces.map((_, i) => i));
    }
    lastSeq = points[points.length - 1].seq;
  }

  function showStatus(s) {
    const badge = document.getElementById("status-badge");
    badge.textContent = s.status;
    badge.className = "badge " + s.status;
    document.getElementById("status-message").textContent = s.message || "";
    const bar = document.getElementById("step-progress");
    if (s.total_steps) bar.max = s.total_steps;
    bar.value = s.current_step;
    document.getElementById("step-text").textContent =
      "step " + s.current_step + (s.total_steps ? " / " + s.total_steps : "");
    if (s.final) {
      const cancel = document.getElementById("cancel-form");
      if (cancel) cancel.remove();
      if (!initial.final) { closedForGood = true; setTimeout(() => location.reload(), 800); }
    }
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${proto}://${location.host}/ws/runs/${run.id}/?after=${lastSeq}&log=${logOffset}`);
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "points") addPoints(msg.points);
      else if (msg.type === "status") showStatus(msg);
      else if (msg.type === "log") {
        const pre = document.getElementById("log");
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.textContent += msg.text;
        logOffset = msg.offset;
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      }
    };
    ws.onclose = (ev) => {
      if (ev.code === 4403 || closedForGood) return;
      setTimeout(connect, 1000);
    };
  }
  connect();
})();
