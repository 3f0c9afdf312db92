// Dataset page: polls the worker's token statistics, then draws the length histogram and figures.
(function () {
  const box = document.getElementById("token-stats");
  if (!box || !box.dataset.statsUrl) return;
  const query = new URLSearchParams(location.search).toString();
  const url = box.dataset.statsUrl + "?" + query;
  const previewUrl = box.dataset.previewUrl + "?" + query;
  async function poll() {
    const res = await fetch(url, {credentials: "same-origin"});
    const data = await res.json();
    document.getElementById("stats-bar").value = data.rows_done;
    if (data.status === "failed") { document.getElementById("stats-text").textContent = "failed: " + data.error; return; }
    if (data.status !== "done") {
      document.getElementById("stats-text").textContent = `tokenizing rows… ${data.rows_done} / ${data.rows}`;
      setTimeout(poll, 1000); return;
    }
    const r = data.result;
    document.getElementById("stats-progress").hidden = true;
    document.getElementById("stats-figures").hidden = false;
    document.getElementById("st-trained-ratio").textContent = (100 * r.trained_ratio).toFixed(1) + "%";
    document.getElementById("st-over").textContent = r.over_sequence_len;
    document.getElementById("st-max").textContent = r.max_length;
    const dropped = Object.values(r.dropped).reduce((a, b) => a + b, 0);
    const el = document.getElementById("st-dropped");
    el.textContent = "";
    if (dropped) {
      const a = document.createElement("a");
      a.href = previewUrl + "&dropped=1";
      a.textContent = dropped;
      el.append(a);
    } else el.textContent = "0";
    const mids = r.lengths.counts.map((_, i) => (r.lengths.edges[i] + r.lengths.edges[i + 1]) / 2);
    const top = Math.max(...r.lengths.counts, 1);
    Plotly.newPlot("length-histogram", [{type: "bar", x: mids, y: r.lengths.counts, name: "rows",
        marker: {color: "#3358d4"}, hovertemplate: "%{x} tokens: %{y} rows<extra></extra>"},
      {type: "scatter", mode: "lines", x: [data.sequence_len, data.sequence_len], y: [0, top], name: "sequence_len",
        line: {color: "#b42318", dash: "dash"}}],
      {title: {text: "tokens per row", font: {size: 14}}, height: 300, margin: {l: 50, r: 10, t: 36, b: 40},
       xaxis: {title: {text: "tokens"}}, yaxis: {title: {text: "rows"}}, bargap: 0.05, legend: {orientation: "h"}},
      window.TrainyardCharts.CONFIG);
    const warnings = document.getElementById("stats-warnings");
    warnings.textContent = "";
    for (const w of r.warnings || []) {
      const div = document.createElement("div");
      div.className = "warning-box";
      div.textContent = "⚠ " + w;
      warnings.append(div);
    }
    const f = r.fields;
    let text = "Fields (share of rows): " + Object.entries(f.keys).map(([k, v]) => `${k} ${(100 * v).toFixed(0)}%`).join(", ");
    if (f.roles) text += ` · roles: ` + Object.entries(f.roles).map(([k, v]) => `${k} ${v}`).join(", ") + ` · ${f.messages_per_row} messages per row`;
    document.getElementById("field-summary").textContent = text;
  }
  poll();
})();
