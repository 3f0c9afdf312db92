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
      // Show the answer itself: after a redirect it is the new dataset's page carrying the one-time
      // message ("Uploaded …", "already uploaded as …"); loading the URL again would lose it.
      const moved = xhr.responseURL && xhr.responseURL !== location.href;
      document.open(); document.write(xhr.responseText); document.close();
      if (moved) history.replaceState(null, "", xhr.responseURL);
    };
    xhr.open("POST", location.href);
    xhr.send(new FormData(form));
  });
})();
