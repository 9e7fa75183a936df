// Progressive enhancement only: every page works without this file.
// 1. Forms with data-confirm ask before they are sent.
// 2. The worklist (#worklist[data-refresh-url]) reloads itself every 30 s, keeping the
//    filters (they are in the URL); a background refresh does not extend the session, and
//    when the session has ended the page goes to the sign-in page.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  function startRefresh() {
    var region = document.getElementById("worklist");
    if (!region) { return; }
    var url = region.getAttribute("data-refresh-url");
    var seconds = parseInt(region.getAttribute("data-refresh-seconds") || "30", 10);
    window.setInterval(function () {
      if (document.activeElement && region.contains(document.activeElement)) { return; }
      fetch(url, {headers: {"X-Dashboard-Poll": "1"}, credentials: "same-origin",
                  redirect: "error"})
        .then(function (resp) {
          if (resp.status === 401) {
            window.location.assign(resp.headers.get("X-Dashboard-Login") || "login");
            return null;
          }
          return resp.ok || resp.status === 400 ? resp.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined) { region.innerHTML = html; }
        })
        .catch(function () { /* offline for a moment: try again next time */ });
    }, seconds * 1000);
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", startRefresh);
  } else {
    startRefresh();
  }
}());
