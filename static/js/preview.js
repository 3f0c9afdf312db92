// Token preview: clicking a token chip tells its id, label and the message it belongs to.
document.querySelectorAll(".preview-column").forEach((col) => {
  col.addEventListener("click", (ev) => {
    const t = ev.target.closest(".tok");
    if (!t || !t.dataset.id) return;
    col.querySelectorAll(".tok.selected").forEach((x) => x.classList.remove("selected"));
    t.classList.add("selected");
    const trained = t.dataset.label !== "-100";
    col.querySelector(".token-info").textContent =
      `“${t.textContent}” · id ${t.dataset.id} · label ${t.dataset.label} (${trained ? "trained" : "masked"}) · ${t.dataset.part}`;
  });
});
