// Compare page: one chart per metric, one line per chosen run.
(function () {
  const data = document.getElementById("series");
  if (!data) return;
  const series = JSON.parse(data.textContent);
  const C = window.TrainyardCharts;
  for (const [suffix, chart] of Object.entries(C.COMPARE)) {
    const traces = Object.values(series).map((s) => {
      const pts = s.points.filter((p) => typeof p.values[chart.key] === "number");
      return {x: pts.map((p) => p.step), y: pts.map((p) => p.values[chart.key]), name: s.name, type: C.TRACE, mode: "lines"};
    });
    Plotly.newPlot("cmp-" + suffix, traces, C.layout(chart.title, "step", {height: 260}), C.CONFIG);
  }
})();
