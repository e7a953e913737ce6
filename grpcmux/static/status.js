// grpcmux status page: refresh the table from status.json.
// Peer-supplied text (client ids, labels) is only ever set with textContent.
"use strict";

(function () {
  const script = document.currentScript;
  const refreshMs = Number(script.dataset.refreshMs) || 1000;

  function row(cells, tag) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement(tag);
      td.textContent = cell;
      tr.appendChild(td);
    }
    return tr;
  }

  function show(data) {
    const table = document.getElementById("clients");
    table.tHead.replaceChildren(row(data.columns, "th"));
    table.tBodies[0].replaceChildren(...data.rows.map((cells) => row(cells, "td")));
    document.getElementById("summary").textContent = data.summary;
    document.getElementById("problem").textContent = "";
    document.body.dataset.updated = String(Date.now());
  }

  async function refresh() {
    try {
      const response = await fetch("status.json", { cache: "no-store" });
      if (!response.ok) {
        throw new Error(`HTTP ${response.status}`);
      }
      show(await response.json());
    } catch (error) {
      document.getElementById("problem").textContent =
        `Cannot refresh (${error.message}); retrying.`;
    }
    setTimeout(refresh, refreshMs);
  }

  setTimeout(refresh, refreshMs);
})();
