// One definition of the metric charts, shared by the run page and the compare page.
window.TrainyardCharts = (function () {
  // chart id suffix -> title and the metric keys it draws: [key, label, smoothable]
  const RUN = {
    loss: {title: "loss", keys: [["loss", "train loss", true], ["eval_loss", "eval loss", false]]},
    lr: {title: "learning rate", keys: [["learning_rate", "learning rate", false]], linearOnly: true},
    grad: {title: "grad norm", keys: [["grad_norm", "grad norm", false]]},
    tps: {title: "throughput", keys: [["tokens_per_second", "tokens/s", false]]},
    mem: {title: "peak memory (MB)", keys: [["memory_mb", "memory MB", false]]},
  };
  // Across runs: one metric per chart, one line per run.
  const COMPARE = {
    loss: {title: "train loss", key: "loss"},
    eval: {title: "eval loss", key: "eval_loss"},
    lr: {title: "learning rate", key: "learning_rate"},
    grad: {title: "grad norm", key: "grad_norm"},
  };
  const CONFIG = {displaylogo: false, responsive: true};
  // SVG "scatter", not "scattergl": WebGL traces compile code at run time, which the CSP forbids.
  const TRACE = "scatter";

  function layout(title, xTitle, extra) {
    return Object.assign({title: {text: title, font: {size: 14}}, height: 250, margin: {l: 55, r: 10, t: 34, b: 36},
      xaxis: {title: {text: xTitle}}, legend: {orientation: "h"}, hovermode: "x unified"}, extra || {});
  }
  return {RUN, COMPARE, CONFIG, TRACE, layout};
})();
