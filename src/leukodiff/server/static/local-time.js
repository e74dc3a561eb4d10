// Times the server writes in UTC (<time datetime="ISO">) shown in the browser's own time
// zone, on every page (the case page's own times go through app.js's localTime).
"use strict";
for (const node of document.querySelectorAll("time[datetime]")) {
  const iso = node.getAttribute("datetime");
  const when = new Date(iso);
  if (!iso || Number.isNaN(when.getTime())) continue;
  node.title = iso;
  node.textContent = when.toLocaleString([], {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
  });
}
