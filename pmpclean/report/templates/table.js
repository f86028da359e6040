// Sort and filter the table of flagged rows. Allowed by the page's CSP through its sha256.
(function () {
  var table = document.getElementById("flagged-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var heads = table.tHead.rows[0].cells;
  var action = document.getElementById("flagged-action");
  var filter = document.getElementById("flagged-filter");
  var count = document.getElementById("flagged-count");
  document.getElementById("flagged-tools").hidden = false;
  function key(row, i, numeric) {
    var v = row.cells[i].getAttribute("data-sort");
    if (!numeric) { return v; }
    return v === "" ? Infinity : parseFloat(v);
  }
  function sortBy(i) {
    var numeric = heads[i].getAttribute("data-kind") === "num";
    var up = heads[i].getAttribute("aria-sort") !== "ascending";
    for (var j = 0; j < heads.length; j++) { heads[j].setAttribute("aria-sort", "none"); }
    heads[i].setAttribute("aria-sort", up ? "ascending" : "descending");
    rows.sort(function (a, b) {
      var x = key(a, i, numeric), y = key(b, i, numeric);
      var c = x < y ? -1 : (x > y ? 1 : 0);
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  function apply() {
    var want = action.value, text = filter.value.toLowerCase(), shown = 0;
    rows.forEach(function (r) {
      var ok = (!want || r.getAttribute("data-action") === want) &&
        (!text || r.textContent.toLowerCase().indexOf(text) >= 0);
      r.hidden = !ok;
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " rows";
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    th.tabIndex = 0;
    th.title = "sort by " + th.textContent;
    th.addEventListener("click", function () { sortBy(i); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(i); }
    });
  });
  action.addEventListener("change", apply);
  filter.addEventListener("input", apply);
  apply();
  var hash = window.location.hash.match(/^#sort=(\d+)$/);
  if (hash) { sortBy(parseInt(hash[1], 10)); }
})();
