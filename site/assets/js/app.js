// Outpost sample site: shows how long ago the page was loaded, to make cached copies visible.
(function () {
  "use strict";
  var target = document.querySelector("[data-loaded]");
  if (!target) {
    return;
  }
  var loaded = Date.now();
  function render() {
    var seconds = Math.round((Date.now() - loaded) / 1000);
    target.textContent = seconds < 2 ? "just now" : seconds + " seconds ago";
  }
  render();
  window.setInterval(render, 1000);
})();
