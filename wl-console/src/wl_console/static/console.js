// Progressive enhancement only: every form works without this file.
// "Select all" for the dead-letter selection.
document.addEventListener("DOMContentLoaded", () => {
  const table = document.querySelector('table[data-table="dead-letters"]');
  if (!table) return;
  const boxes = table.querySelectorAll('input[name="ids"]');
  const header = table.querySelector("thead th");
  if (!boxes.length || !header) return;
  const all = document.createElement("input");
  all.type = "checkbox";
  all.setAttribute("aria-label", "select all");
  all.addEventListener("change", () => boxes.forEach((box) => { box.checked = all.checked; }));
  header.appendChild(all);
});
