// Behaviour every page shares, declared in the markup with data- attributes (no inline handlers, so
// the Content-Security-Policy can forbid inline script):
//   <select data-autosubmit>          submits its form when changed
//   <form data-confirm="Delete …?">   asks before submitting
document.addEventListener("change", (ev) => {
  const el = ev.target.closest("[data-autosubmit]");
  if (el && el.form) el.form.submit();
});
document.addEventListener("submit", (ev) => {
  const form = ev.target.closest("form[data-confirm]");
  if (form && !window.confirm(form.dataset.confirm)) ev.preventDefault();
});
