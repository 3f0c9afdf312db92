// Hub import page: polls the worker's progress until the dataset is stored (then links it) or the import failed.
(function () {
  const box = document.getElementById("import-progress");
  if (!box || !box.dataset.statusUrl) return;
  const bar = document.getElementById("import-bar");
  const text = document.getElementById("import-text");
  async function poll() {
    let data;
    try {
      const res = await fetch(box.dataset.statusUrl, {credentials: "same-origin"});
      data = await res.json();
    } catch (e) { setTimeout(poll, 2000); return; }
    box.dataset.status = data.status;
    if (data.rows_total) { bar.max = data.rows_total; bar.value = data.rows_done; }
    if (data.status === "failed") {
      text.textContent = "failed";
      const err = document.getElementById("import-error");
      err.textContent = data.error;
      err.hidden = false;
      return;
    }
    if (data.status === "done") {
      text.textContent = `done: ${data.rows_total} rows`;
      document.getElementById("import-dataset-link").href = data.dataset_url;
      document.getElementById("import-done").hidden = false;
      return;
    }
    text.textContent = data.rows_total ? `copying rows… ${data.rows_done} / ${data.rows_total}` : `${data.status}: loading the split…`;
    setTimeout(poll, 1000);
  }
  poll();
})();
