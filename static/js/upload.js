// Upload with a progress bar; the server's answer replaces the page (errors or the new dataset).
(function () {
  const form = document.getElementById("upload-form");
  if (!form) return;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const bar = document.getElementById("upload-progress");
    const xhr = new XMLHttpRequest();
    bar.hidden = false;
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = 100 * e.loaded / e.total; };
    xhr.onload = () => {
      if (xhr.responseURL && xhr.responseURL !== location.href) { location.href = xhr.responseURL; return; }
      document.open(); document.write(xhr.responseText); document.close();
    };
    xhr.open("POST", location.href);
    xhr.send(new FormData(form));
  });
})();
