// Config page: importing a YAML file puts its text in the editor.
(function () {
  const input = document.getElementById("import-yaml");
  if (!input) return;
  input.addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    if (file) document.querySelector("textarea[name=yaml]").value = await file.text();
  });
})();
