// The jobs page's buttons (downloader_service/service/page.py renders the page): each calls
// the job API with fetch(), then reloads the page. Nothing from the server is ever inserted
// as HTML: the buttons' data- attributes say what to call, and messages go in as text.
"use strict";

(function () {
  const status = document.getElementById("status");
  // With DOWNLOADER_ADMIN_TOKEN, the page is opened as /?access_token=...; pass it on as a header.
  const token = new URLSearchParams(window.location.search).get("access_token");

  function say(text) {
    status.textContent = text;
  }

  async function act(button) {
    const method = button.dataset.method;
    const url = new URL(button.dataset.url, document.baseURI);
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) {
      return;
    }
    const headers = { Accept: "application/json" };
    if (token) {
      headers.Authorization = "Bearer " + token;
    }
    button.disabled = true;
    say(method + " " + url.pathname + " ...");
    try {
      // Basic auth needs nothing here: the browser sends what it was given for the page.
      const resp = await fetch(url, { method: method, headers: headers, credentials: "same-origin" });
      if (resp.ok) {
        window.location.reload();
        return;
      }
      let detail = resp.statusText;
      try {
        const body = await resp.json();
        detail = body.detail || body.error || detail;
      } catch (ignored) {
        // not JSON: the status text will do
      }
      say(method + " " + url.pathname + ": " + resp.status + " " + detail);
    } catch (err) {
      say(method + " " + url.pathname + ": " + err);
    }
    button.disabled = false;
  }

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-method]");
    if (button) {
      act(button);
    }
  });
})();
