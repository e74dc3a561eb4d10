// Review page: renders a case from /api/cases/{id}, sends each edit with the version it saw.
// Plain JavaScript, no library: the strict CSP (script-src 'self') allows only files served
// from /static/, and the station is built without network access to vendor one, so the
// field viewer's zoom and pan below are written here (a few dozen lines).
"use strict";
(() => {
  const body = document.body;
  const caseId = body.dataset.caseId;
  const csrf = body.dataset.csrf;
  const USER = body.dataset.user || "";
  // The gallery's sort and filter, remembered per user in this browser (localStorage).
  const PREFS_KEY = `leukodiff.review.${USER}`;
  const OLD_ORDER_KEY = "leukodiff.galleryOrder";  // before the per-user preferences
  const SORTS = ["type", "confidence", "field"];
  const $ = (id) => document.getElementById(id);
  // Every class a reviewer may assign, with its title, key, colour and counting: the
  // server's taxonomy (leukodiff/taxonomy.py, REVIEW_CLASSES), rendered into the page.
  const TAXONOMY = JSON.parse($("taxonomy").textContent);
  const CLASSES = TAXONOMY.classes;
  const ORDER = CLASSES.map((c) => c.name);
  const NAMES = Object.fromEntries(CLASSES.map((c) => [c.name, c.title]));
  const KEYS = Object.fromEntries(CLASSES.map((c) => [c.key, c.name]));
  // Each class's colour as a CSS custom property (var(--name)) for dots, boxes and headings.
  for (const c of CLASSES) document.documentElement.style.setProperty(`--${c.name}`, c.colour);
  const REFERENCE_PER_CLASS = 3;
  const HISTORY_MAX = 500;
  let data = null;
  let prefs = storedPrefs();  // {order: type | confidence | field, filter: label or "", unreviewed}
  let selected = null;   // cell id
  let drawing = false;
  let poll = null;
  // The field viewer: which field, its scale (screen px per image px) and offset; `fitted`:
  // the whole field shown (the scale follows the viewer's size).
  const view = { field: null, scale: 1, tx: 0, ty: 0, fitted: true };
  // Undo / redo of this page's edits: entries {what, undo(), redo()}, each an async call
  // that resolves to the server's answer (null when refused).
  const history = { done: [], undone: [] };
  let queue = Promise.resolve();  // edits run one after another, each on the last answer
  const pending = new Set();  // cells whose label is on its way: reviewed, for the navigation

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "style") node.style.cssText = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function say(text, kind = "") {
    const box = $("message");
    box.textContent = text;
    box.className = kind;
  }

  async function call(method, url, payload) {
    const options = { method, headers: { "X-CSRF-Token": csrf, Accept: "application/json" } };
    if (payload instanceof FormData) options.body = payload;
    else if (payload !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(payload);
    }
    const response = await fetch(url, options);
    if (response.status === 401) { window.location = "/login"; throw new Error("signed out"); }
    const result = await response.json().catch(() => ({}));
    return { ok: response.ok, status: response.status, result };
  }

  // Run edits one at a time, in the order asked: each reads the versions the last one left.
  function serial(task) {
    queue = queue.then(task).catch((error) => say(String(error.message || error), "error"));
    return queue;
  }

  // The cells that count: those of fields not excluded (J/K, the keys and the gallery's
  // sections walk these; excluded fields' cells are shown apart, greyed, frozen).
  function cells() {
    return data.fields.filter((f) => !f.excluded).flatMap((f) => f.cells);
  }

  function excludedCells() {
    return data.fields.filter((f) => f.excluded).flatMap((f) => f.cells);
  }

  function cellById(cellId) {
    return cellId === null ? undefined : cells().find((c) => c.id === cellId);
  }

  function mayExclude() {
    return data.status !== "signed" && ["technologist", "reviewer"].includes(body.dataset.role);
  }

  function storedPrefs() {
    const fallback = { order: "type", filter: "", unreviewed: false };
    try {
      const saved = JSON.parse(localStorage.getItem(PREFS_KEY) || "null");
      if (saved && typeof saved === "object") {
        return { order: SORTS.includes(saved.order) ? saved.order : "type",
          filter: ORDER.includes(saved.filter) ? saved.filter : "", unreviewed: !!saved.unreviewed };
      }
      const old = localStorage.getItem(OLD_ORDER_KEY) === "confidence" ? "confidence" : "type";
      return { ...fallback, order: old };
    } catch {
      return fallback;  // storage turned off: the defaults, not remembered
    }
  }

  function setPrefs(change) {
    prefs = { ...prefs, ...change };
    if (!SORTS.includes(prefs.order)) prefs.order = "type";
    try { localStorage.setItem(PREFS_KEY, JSON.stringify(prefs)); } catch { /* not remembered */ }
    showPrefs();
    if (data) { renderGallery(); renderConfirmClass(); }
  }

  function showPrefs() {
    $("gallery-order").value = prefs.order;
    $("gallery-filter").value = prefs.filter;
    $("unreviewed-only").checked = prefs.unreviewed;
  }

  // Least confident first: the model's doubtful calls teach it most. Cells with no model
  // confidence (drawn by a person) come last; equal ones by id.
  function byConfidence(a, b) {
    const ca = a.model_confidence ?? Infinity;
    const cb = b.model_confidence ?? Infinity;
    return ca - cb || a.id - b.id;
  }

  // The cells the gallery shows: the filter's class, and only the unreviewed if asked.
  function filtered() {
    return cells().filter((c) => (!prefs.filter || c.label === prefs.filter) &&
      (!prefs.unreviewed || !c.reviewed));
  }

  // The gallery's sections, in the order shown; J/K and the step after an edit follow it.
  function gallerySections() {
    const list = filtered();
    if (prefs.order === "confidence") {
      const sorted = list.sort(byConfidence);
      return sorted.length ? [{ kind: "confidence",
        title: `confidence, low to high (${sorted.length})`, cells: sorted }] : [];
    }
    if (prefs.order === "field") {  // as uploaded: field by field, cells by id
      return data.fields.filter((f) => !f.excluded)
        .map((f) => ({ kind: "field", field: f.id, cells: list.filter((c) => c.field_id === f.id) }))
        .filter((s) => s.cells.length)
        .map((s) => ({ ...s, title: `${fieldName(s.field)} (${s.cells.length})` }));
    }
    const byLabel = new Map(ORDER.map((l) => [l, []]));
    for (const cell of list) {
      if (!byLabel.has(cell.label)) byLabel.set(cell.label, []);  // a label the page lacks
      byLabel.get(cell.label).push(cell);
    }
    return [...byLabel].filter(([, found]) => found.length).map(([label, found]) => ({
      kind: "type", label, title: `${NAMES[label] || label} (${found.length})`, cells: found }));
  }

  function fieldName(fieldId) {
    return data.fields.find((f) => f.id === fieldId)?.name ?? `field ${fieldId}`;
  }

  function shownCells() {
    return gallerySections().flatMap((s) => s.cells);
  }

  // A time from the API (ISO 8601 with its UTC offset) in the browser's own time zone.
  function localTime(iso, seconds = false) {
    if (!iso) return "";
    const when = new Date(iso);
    return Number.isNaN(when.getTime()) ? iso : when.toLocaleString([], {
      year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
      ...(seconds ? { second: "2-digit" } : {}) });
  }

  async function load() {
    const { ok, result } = await call("GET", `/api/cases/${caseId}`);
    if (!ok) { say(result.detail || "could not load the case", "error"); return; }
    data = result;
    render();
    const busy = data.progress.queued + data.progress.analysing > 0;
    clearTimeout(poll);
    if (busy) poll = setTimeout(load, 700);
  }

  function render() {
    const signed = data.status === "signed";
    $("status").textContent = data.status;
    $("status").className = `badge ${data.status}`;
    $("signed").textContent = signed ? `by ${data.signed_by} at ${localTime(data.signed_at)}` : "";
    $("signed").title = signed ? `${data.signed_at} (your time zone shown)` : "";
    $("upload-card").hidden = signed;
    // A signed case is locked: no target to set, no box to draw (the API refuses them too).
    $("target-form").hidden = signed;
    $("draw-mode").hidden = signed;
    $("confirm-class").hidden = signed;
    if (signed && drawing) setDrawing(false);
    if (signed) $("sign-off-confirm").hidden = true;
    const confirming = !$("sign-off-confirm").hidden;
    $("sign-off").hidden = signed || body.dataset.role !== "reviewer" || confirming;
    if (confirming) fillSignOff();  // the numbers follow edits made while it is open
    $("signed-reason").hidden = !data.sign_off_reason;
    if (!signed) $("reopen-confirm").hidden = true;
    $("reopen").hidden = !signed || body.dataset.role !== "reviewer" || !$("reopen-confirm").hidden;
    $("amended").hidden = !data.amendments;
    $("amended").textContent = data.amendments
      ? `Amendment ${data.amendments}: reopened because: ${data.amend_reason}` : "";
    $("signed-reason-text").textContent = data.sign_off_reason || "";
    $("exports").hidden = !signed;
    for (const [id, path] of [["export-csv", "export.csv"], ["export-json", "export.json"],
      ["export-fhir", "fhir.json"], ["export-training", "training.zip"]]) {
      $(id).href = `/api/cases/${caseId}/${path}`;
    }
    const p = data.progress;
    $("progress").max = Math.max(1, p.total);
    $("progress").value = p.done + p.failed;
    $("progress-text").textContent = p.total
      ? `Analysed ${p.done} of ${p.total} field(s)` + (p.failed ? `, ${p.failed} failed` : "") +
        (data.differential.excluded_fields ? `, ${data.differential.excluded_fields} excluded` : "") +
        (p.queued + p.analysing ? " - analysing..." : "")
      : "No fields yet.";
    if (selected !== null && !cellById(selected)) selected = null;
    renderDifferential();
    renderGallery();
    renderReference();
    renderFields();
    renderViewer();
    renderConfirmClass();
    renderHistory();
    renderModels();
    if (document.activeElement !== $("target")) $("target").value = data.target_count;
  }

  // The model sets the case's fields were analysed with, and the reviewed cells the
  // latest model call disagrees with (marked wherever the cell is shown).
  function renderModels() {
    if (!$("model-sets-used")) return;
    $("model-sets-used").textContent = (data.model_sets || []).join(", ") || "none yet";
    const n = data.disagreements || 0;
    $("disagreements").hidden = !n;
    $("disagreements").textContent = `The model disagrees with ${n} reviewed cell${n === 1 ? "" : "s"} (marked).`;
    const calls = new Map();
    for (const field of data.fields) for (const cell of field.cells) if (cell.disagrees) calls.set(String(cell.id), cell.model_label);
    for (const node of document.querySelectorAll("[data-cell]")) {
      const call = calls.get(node.dataset.cell);
      node.classList.toggle("disagrees", call !== undefined);
      if (call !== undefined && !node.title.includes("model says")) node.title += ` · model says ${NAMES[call] || call}`;
    }
  }

  // A class's share: % of the WBC count, or per 100 WBC for those outside it (NRBC,
  // smudge); unidentified cells count towards the target but have no share of any class.
  function share(d, name) {
    if (name in d.percentages) return d.percentages[name].toFixed(1);
    if (name in d.per_100_wbc) return `${d.per_100_wbc[name].toFixed(1)}/100`;
    return "-";
  }

  function renderDifferential() {
    const d = data.differential;
    const rows = [];
    let group = null;
    for (const c of CLASSES) {
      if (c.counting !== group) {  // rows grouped by how they are counted, each headed
        group = c.counting;
        rows.push(el("tr", { class: "group" }, el("th", { colspan: "4" }, TAXONOMY.counting[group])));
      }
      rows.push(el("tr", { "data-label": c.name, "data-counting": c.counting },
        el("td", {}, el("span", { class: "dot", style: `background:var(--${c.name})` }), c.title),
        el("td", {}, c.key.toUpperCase()),
        el("td", { class: "count" }, String(d.counts[c.name] ?? 0)),
        el("td", {}, share(d, c.name))));
    }
    $("differential").tBodies[0].replaceChildren(...rows);
    const apart = CLASSES.filter((c) => c.name in d.per_100_wbc)
      .map((c) => ` · ${c.title}: ${d.counts[c.name]}`).join("");
    const notCounted = CLASSES.filter((c) => c.counting === "not_counted")
      .reduce((n, c) => n + (d.counts[c.name] ?? 0), 0);
    const tally = $("tally");
    tally.textContent = `Counted ${d.counted} / ${d.target} WBC · ${d.unidentified} unidentified` +
      `${apart} · ${notCounted} not counted · ${d.reviewed} reviewed`;
    tally.classList.toggle("reached", d.counted >= d.target);
    $("tally-bar").max = d.target;
    $("tally-bar").value = Math.min(d.counted, d.target);
    // The models' own confidences mean nothing on images unlike their training labs.
    $("unlike-training").hidden = !d.warning;
    $("unlike-training").textContent = d.warning
      ? `Images unlike the training labs. ${d.warning}.` : "";
  }

  function renderGallery() {
    $("gallery").dataset.order = prefs.order;
    const open = data.status !== "signed";
    const sections = gallerySections().map(({ kind, label, field, title, cells: shown }) => {
      if (kind === "type") {
        const unreviewed = open ? cells().filter((c) => c.label === label && !c.reviewed).length : 0;
        return el("div", { class: "gallery-section", "data-label": label },
          el("div", { class: "section-head" },
            el("h3", { style: `color:var(--${label})` }, title),
            unreviewed ? el("button", { type: "button", class: "confirm-all", "data-label": label,
              title: `accept the current label of every unreviewed ${NAMES[label] || label} (undo: Ctrl+Z)`,
              onclick: (event) => { event.currentTarget.blur(); confirmClass(label); } },
            `Confirm ${unreviewed} unreviewed`) : ""),
          el("div", { class: "thumbs" }, ...shown.map((c) => thumb(c, false))));
      }
      return el("div", { class: "gallery-section", "data-order": kind,
        ...(field !== undefined ? { "data-field": field } : {}) },
        el("h3", {}, title), el("div", { class: "thumbs" }, ...shown.map((c) => thumb(c, true))));
    });
    const total = cells().length;
    const count = sections.reduce((n, s) => n + s.querySelectorAll(".thumb").length, 0);
    $("shown-count").textContent = count === total ? `(${total})` : `(${count} of ${total} shown)`;
    const frozen = excludedCells();
    if (frozen.length) {
      sections.push(el("div", { class: "gallery-section excluded", "data-excluded": "true" },
        el("h3", {}, `in excluded fields, not counted (${frozen.length})`),
        el("div", { class: "thumbs" }, ...frozen.map((c) => thumb(c, true, true)))));
    }
    const empty = total ? "No cell matches the filter." : "No cells yet.";
    $("gallery").replaceChildren(...(sections.length ? sections : [el("p", {}, empty)]));
  }

  // Examples of each class from this case, to compare the selected cell with: the cells a
  // person has reviewed first, then the model's most confident calls (up to three a class).
  function renderReference() {
    const byLabel = new Map();
    for (const cell of cells()) {
      if (!byLabel.has(cell.label)) byLabel.set(cell.label, []);
      byLabel.get(cell.label).push(cell);
    }
    const rank = (c) => (c.reviewed ? 2 : 0) + (c.model_confidence ?? 1);
    const strips = ORDER.filter((l) => byLabel.has(l)).map((label) => {
      const examples = byLabel.get(label).sort((a, b) => rank(b) - rank(a) || a.id - b.id)
        .slice(0, REFERENCE_PER_CLASS);
      return el("figure", { class: "ref", "data-label": label },
        el("figcaption", { style: `border-color:var(--${label})` }, NAMES[label] || label),
        ...examples.map((c) => el("img", { src: `/api/cells/${c.id}/crop`,
          alt: `example: ${NAMES[label] || label}`, loading: "lazy", "data-ref": c.id,
          title: `cell ${c.id}${c.reviewed ? " (reviewed)" : " (the model's call)"}`,
          onmouseenter: (event) => hover(c, event.currentTarget), onmouseleave: unhover })));
    });
    $("reference").replaceChildren(...(strips.length
      ? [el("span", { class: "muted ref-title" }, "Examples in this case"), ...strips] : []));
    markReference();
  }

  function markReference() {
    const label = cellById(selected)?.label;
    const strip = $("reference");
    for (const node of strip.querySelectorAll(".ref")) {
      const current = node.dataset.label === label;
      node.classList.toggle("current", current);
      if (current) {  // into view inside the strip only: the page itself never moves
        const n = node.getBoundingClientRect(), c = strip.getBoundingClientRect();
        if (n.left < c.left) strip.scrollLeft += n.left - c.left - 8;
        else if (n.right > c.right) strip.scrollLeft += n.right - c.right + 8;
      }
    }
  }

  // Rounded, but never up to 100% (a model 99.6% sure is not certain).
  function percent(confidence) {
    return `${Math.min(Math.round(100 * confidence), confidence < 1 ? 99 : 100)}%`;
  }

  // One crop; `named`: show its label too (the orders other than by class mix the types).
  // `frozen`: a cell of an excluded field, shown greyed and not selectable.
  function thumb(cell, named, frozen = false) {
    const classes = ["thumb", cell.reviewed ? "reviewed" : "", cell.id === selected ? "selected" : "",
      frozen ? "excluded" : ""];
    const note = cell.model_label && cell.model_label !== cell.label ? ` (was ${cell.model_label})` : "";
    const known = cell.model_confidence !== null && cell.model_confidence !== undefined;
    const confidence = known ? ` · model ${percent(cell.model_confidence)}` : "";
    return el("button", { type: "button", class: classes.filter(Boolean).join(" "), "data-cell": cell.id,
      "data-confidence": known ? String(cell.model_confidence) : "",
      title: `cell ${cell.id}${note}${confidence}${cell.reviewed ? " · reviewed" : ""}` +
        `${frozen ? " · in an excluded field" : ""}`,
      onmouseenter: (event) => hover(cell, event.currentTarget), onmouseleave: unhover,
      ...(frozen ? { disabled: "" } : { onclick: (event) => { event.currentTarget.blur(); select(cell.id); } }) },
      el("img", { src: `/api/cells/${cell.id}/crop`, alt: `cell ${cell.id}`, loading: "lazy" }),
      named ? el("span", { class: "dot", style: `background:var(--${cell.label})` }) : "",
      `#${cell.id}${named ? ` ${NAMES[cell.label] || cell.label}` : ""}${note}`,
      known ? el("span", { class: "confidence", title: "the model's confidence in its type" },
        percent(cell.model_confidence)) : "");
  }

  // The field navigator: every field as a tile in a grid as wide as the screen allows;
  // a click opens the field in the viewer.
  function renderFields() {
    const figures = data.fields.map((field) => {
      const mini = el("div", { class: "mini", "data-field": field.id,
        style: `aspect-ratio:${field.width || 4} / ${field.height || 3}` });
      if (field.status === "done") {
        mini.append(el("img", { src: `/api/fields/${field.id}/image?max_side=480`, alt: field.name,
          draggable: "false", loading: "lazy" }));
        for (const cell of field.cells) mini.append(box(field, cell, false));
        mini.addEventListener("click", () => openField(field.id));
        mini.title = "open in the field viewer";
      } else {
        mini.append(el("p", { class: field.status === "failed" ? "error" : "" },
          field.status === "failed" ? `Failed: ${field.error}` : `${field.status}...`));
      }
      const classes = ["field", field.excluded ? "excluded" : "", field.id === view.field ? "current" : ""];
      return el("figure", { class: classes.filter(Boolean).join(" "), "data-field": field.id },
        mini,
        el("figcaption", {}, `${field.name} · ${field.cells.length} cell(s)` +
          (field.unlike_training ? " · unlike the training labs" : "")),
        field.excluded ? el("p", { class: "excluded-note" },
          `Excluded by ${field.excluded_by}: ${field.exclude_reason} (not counted)`) : "",
        mayExclude() ? fieldControls(field) : "");
    });
    $("fields").replaceChildren(...figures);
  }

  // Exclude (with a reason) or include again: the field's cells leave or rejoin the count.
  function fieldControls(field) {
    if (field.excluded) {
      return el("button", { type: "button", class: "include-field",
        onclick: () => changeField(field, "include", {}) }, "Include again");
    }
    const reason = el("input", { type: "text", maxlength: "1000", required: "",
      placeholder: "why (blurred, wrong slide...)", "aria-label": `Reason to exclude ${field.name}` });
    const form = el("form", { class: "exclude-form row", hidden: "",
      onsubmit: (event) => {
        event.preventDefault();
        if (!reason.value.trim()) { say("A reason is required to exclude a field.", "error"); return; }
        changeField(field, "exclude", { reason: reason.value.trim() });
      } }, reason, el("button", { type: "submit" }, "Exclude"),
      el("button", { type: "button", onclick: () => { form.hidden = true; open.hidden = false; } }, "Cancel"));
    const open = el("button", { type: "button", class: "exclude-field",
      onclick: () => { form.hidden = false; open.hidden = true; reason.focus(); } }, "Exclude field...");
    return el("div", { class: "field-controls" }, open, form);
  }

  async function changeField(field, action, payload) {
    const { ok, status, result } = await call("POST", `/api/fields/${field.id}/${action}`, payload);
    if (!ok) return refused(status, result);
    data = result;
    render();
    say(action === "exclude" ? `${field.name} excluded: its cells are not counted.`
      : `${field.name} included again: its cells count.`, "ok");
  }

  function viewable() {
    return data.fields.filter((f) => f.status === "done");
  }

  function openField(fieldId) {
    Object.assign(view, { field: fieldId, fitted: true });
    renderViewer();
    for (const node of document.querySelectorAll("figure.field")) {
      node.classList.toggle("current", Number(node.dataset.field) === view.field);
    }
  }

  // The field viewer: the full-size image (a large field is loaded whole and zoomed into:
  // deep zoom without tiles), its boxes placed in % so that they scale with the zoom.
  function renderViewer() {
    const port = $("viewer");
    const fields = viewable();
    let field = fields.find((f) => f.id === view.field);
    if (!field) {
      field = fields[0];
      Object.assign(view, { field: field ? field.id : null, fitted: true });
    }
    $("field-prev").disabled = $("field-next").disabled = fields.length < 2;
    if (!field) {
      port.replaceChildren(el("p", {}, "No analysed field yet."));
      $("viewer-name").textContent = "";
      $("zoom-level").textContent = "";
      return;
    }
    let stage = port.querySelector(".stage");
    if (!stage || Number(stage.dataset.field) !== field.id) {
      stage = el("div", { class: "stage", "data-field": field.id });
      stage.append(el("img", { src: `/api/fields/${field.id}/image`, alt: field.name, draggable: "false" }));
      stage.addEventListener("mousedown", (event) => startDraw(event, field.id, stage));
      port.replaceChildren(stage);
    }
    for (const old of stage.querySelectorAll(".box")) old.remove();
    for (const cell of field.cells) stage.append(box(field, cell, true));
    stage.classList.toggle("drawing", drawing && !field.excluded);
    stage.classList.toggle("excluded", field.excluded);
    $("viewer-name").textContent = `${field.name} (${fields.indexOf(field) + 1} of ${fields.length})` +
      (field.excluded ? " · excluded" : "");
    layoutViewer();
  }

  function viewerField() {
    return data ? data.fields.find((f) => f.id === view.field && f.status === "done") : undefined;
  }

  function fitScale(field) {
    const port = $("viewer");
    return Math.min(port.clientWidth / field.width, port.clientHeight / field.height) || 1;
  }

  function mostScale(field) {
    return Math.max(fitScale(field) * 16, 4);  // 16 x the fitted view, and at least 4 x 1:1
  }

  function layoutViewer() {
    const field = viewerField();
    const stage = $("viewer").querySelector(".stage");
    if (!field || !stage) return;
    const port = $("viewer");
    const W = port.clientWidth, H = port.clientHeight;
    const fit = fitScale(field);
    view.scale = view.fitted ? fit : Math.min(Math.max(view.scale, fit), mostScale(field));
    if (view.scale <= fit * 1.0001) view.fitted = true;
    const w = field.width * view.scale, h = field.height * view.scale;
    // Zoomed in, the field may be panned until its edge reaches the middle: a cell at the
    // edge can still be centred.
    view.tx = w <= W ? (W - w) / 2 : Math.min(W / 2, Math.max(W / 2 - w, view.tx));
    view.ty = h <= H ? (H - h) / 2 : Math.min(H / 2, Math.max(H / 2 - h, view.ty));
    stage.style.width = `${w}px`;
    stage.style.height = `${h}px`;
    stage.style.transform = `translate(${view.tx}px, ${view.ty}px)`;
    port.dataset.scale = view.scale.toFixed(4);
    port.dataset.fitted = String(view.fitted);
    $("zoom-level").textContent = `${Math.round(view.scale * 100)}%`;
    // Small boxes on screen (a large field, fitted): labels only on the selected or hovered
    // box, so they no longer overlap; zooming in brings them back.
    const widths = field.cells.map((c) => (c.box[2] - c.box[0]) * view.scale).sort((a, b) => a - b);
    stage.classList.toggle("compact", widths.length > 0 && widths[widths.length >> 1] < 48);
  }

  // Zoom by `factor` about a point of the viewer (px from its top left; default its centre).
  function zoomBy(factor, px, py) {
    const field = viewerField();
    if (!field) return;
    const port = $("viewer");
    px ??= port.clientWidth / 2;
    py ??= port.clientHeight / 2;
    const old = view.scale;
    const fit = fitScale(field);
    const next = Math.min(Math.max(old * factor, fit), mostScale(field));
    view.tx = px - ((px - view.tx) * next) / old;
    view.ty = py - ((py - view.ty) * next) / old;
    view.scale = next;
    view.fitted = next <= fit * 1.0001;
    layoutViewer();
  }

  // The zoom keys and buttons centre the selected cell when the viewer shows it.
  function zoomKey(factor) {
    const cell = cellById(selected);
    zoomBy(factor);
    if (cell && cell.field_id === view.field && !view.fitted) centreOn(cell);
  }

  function centreOn(cell) {
    const port = $("viewer");
    const [x0, y0, x1, y1] = cell.box;
    view.tx = port.clientWidth / 2 - ((x0 + x1) / 2) * view.scale;
    view.ty = port.clientHeight / 2 - ((y0 + y1) / 2) * view.scale;
    layoutViewer();
  }

  // Z: the selected cell filling about a third of the viewer; again (already zoomed): fit.
  function zoomToCell() {
    const cell = cellById(selected);
    if (!cell || !view.fitted) { fitField(); return; }
    if (cell.field_id !== view.field) openField(cell.field_id);
    const field = viewerField();
    if (!field) return;
    const port = $("viewer");
    const [x0, y0, x1, y1] = cell.box;
    const side = Math.max(x1 - x0, y1 - y0, 8);
    view.scale = Math.min(mostScale(field), Math.max(fitScale(field) * 1.5,
      Math.min(port.clientWidth, port.clientHeight) / (3 * side)));
    view.fitted = false;
    centreOn(cell);
  }

  function fitField() {
    view.fitted = true;
    layoutViewer();
  }

  function stepField(delta) {
    const fields = viewable();
    if (!fields.length) return;
    const index = fields.findIndex((f) => f.id === view.field);
    openField(fields[(index + delta + fields.length) % fields.length].id);
  }

  function wireViewer() {
    const port = $("viewer");
    port.addEventListener("wheel", (event) => {
      if (!viewerField()) return;
      event.preventDefault();
      const rect = port.getBoundingClientRect();
      zoomBy(event.deltaY < 0 ? 1.25 : 0.8, event.clientX - rect.left, event.clientY - rect.top);
    }, { passive: false });
    port.addEventListener("mousedown", (event) => {  // drag to pan (not while drawing)
      if (drawing || event.button !== 0 || event.target.closest(".box") || !viewerField()) return;
      event.preventDefault();
      const start = { x: event.clientX, y: event.clientY, tx: view.tx, ty: view.ty };
      port.classList.add("panning");
      const move = (e) => {
        view.fitted = false;
        view.tx = start.tx + e.clientX - start.x;
        view.ty = start.ty + e.clientY - start.y;
        layoutViewer();
      };
      const up = () => {
        port.classList.remove("panning");
        window.removeEventListener("mousemove", move);
        window.removeEventListener("mouseup", up);
      };
      window.addEventListener("mousemove", move);
      window.addEventListener("mouseup", up);
    });
    window.addEventListener("resize", layoutViewer);
    const button = (id, action) => $(id).addEventListener("click", (event) => {
      event.currentTarget.blur();  // back to the keys
      action();
    });
    button("zoom-in", () => zoomKey(1.5));
    button("zoom-out", () => zoomKey(1 / 1.5));
    button("zoom-fit", fitField);
    button("field-prev", () => stepField(-1));
    button("field-next", () => stepField(1));
  }

  // A larger crop beside what the pointer rests on (a crop, a box or an example), or
  // beside the selected cell with E.
  let hoverTimer = null;
  function hover(cell, anchor) {
    clearTimeout(hoverTimer);
    hoverTimer = setTimeout(() => enlarge(cell, anchor), 250);
  }

  function unhover() {
    clearTimeout(hoverTimer);
    $("preview").hidden = true;
  }

  function enlarge(cell, anchor) {
    if (!anchor.isConnected) return;
    const box = $("preview");
    $("preview-img").src = `/api/cells/${cell.id}/crop?size=384`;
    $("preview-img").alt = `cell ${cell.id}, enlarged`;
    const known = cell.model_confidence !== null && cell.model_confidence !== undefined;
    $("preview-text").textContent = `#${cell.id} ${NAMES[cell.label] || cell.label}` +
      (cell.reviewed ? " · reviewed" : " · unreviewed") +
      (cell.model_label && cell.model_label !== cell.label
        ? ` · model: ${NAMES[cell.model_label] || cell.model_label}` : "") +
      (known ? ` · model ${percent(cell.model_confidence)}` : "");
    box.dataset.cell = cell.id;
    box.hidden = false;
    const a = anchor.getBoundingClientRect();
    const w = box.offsetWidth, h = box.offsetHeight;
    const left = a.right + 12 + w < window.innerWidth ? a.right + 12 : Math.max(4, a.left - 12 - w);
    const top = Math.min(a.top + a.height / 2 - h / 2, window.innerHeight - h - 4);
    box.style.left = `${left}px`;
    box.style.top = `${Math.max(4, top)}px`;
  }

  function toggleEnlarge() {
    const box = $("preview");
    const cell = cellById(selected);
    if (!box.hidden || !cell) { box.hidden = true; return; }
    const anchor = document.querySelector(`#gallery .thumb[data-cell="${cell.id}"]`) ||
      document.querySelector(`#viewer .box[data-cell="${cell.id}"]`);
    if (anchor) enlarge(cell, anchor);
  }

  // A cell's box on a field: in the viewer a button (select; hover to enlarge), in the
  // navigator's tiles a plain outline.
  function box(field, cell, interactive) {
    const [x0, y0, x1, y1] = cell.box;
    const style = `left:${(100 * x0) / field.width}%;top:${(100 * y0) / field.height}%;` +
      `width:${(100 * (x1 - x0)) / field.width}%;height:${(100 * (y1 - y0)) / field.height}%;` +
      `border-color:var(--${cell.label})`;
    const classes = `box${cell.id === selected ? " selected" : ""}${cell.reviewed ? " reviewed" : ""}`;
    if (!interactive) return el("div", { class: classes, style, "data-cell": cell.id });
    return el("button", { type: "button", class: classes, style, "data-cell": cell.id,
      title: NAMES[cell.label] || cell.label,
      onmousedown: (event) => { if (!drawing) event.stopPropagation(); },
      onmouseenter: (event) => hover(cell, event.currentTarget), onmouseleave: unhover,
      onclick: (event) => { event.currentTarget.blur(); select(cell.id); } },
      el("span", { style: `background:var(--${cell.label})` }, `${cell.id} ${NAMES[cell.label] || cell.label}`));
  }

  // Select a cell: marked wherever it is shown; the viewer opens its field (and, zoomed in,
  // centres it); the reference strip marks its class.
  function select(cellId) {
    selected = cellId;
    for (const node of document.querySelectorAll(".selected")) node.classList.remove("selected");
    if (cellId === null) { markReference(); renderConfirmClass(); return; }
    const cell = cellById(cellId);
    if (cell && cell.field_id !== view.field) openField(cell.field_id);
    for (const node of document.querySelectorAll(`[data-cell="${cellId}"]`)) node.classList.add("selected");
    if (cell && cell.field_id === view.field && !view.fitted) centreOn(cell);
    markReference();
    renderConfirmClass();
  }

  // Select, and bring its crop into view inside the gallery (which scrolls by itself): the
  // page never jumps (it did to the top after a drawn box was classified).
  function show(cellId) {
    select(cellId);
    const node = document.querySelector(`#gallery .thumb[data-cell="${cellId}"]`);
    const gallery = $("gallery");
    if (!node) return;
    const n = node.getBoundingClientRect(), g = gallery.getBoundingClientRect();
    if (n.top < g.top) gallery.scrollTop += n.top - g.top - 6;
    else if (n.bottom > g.bottom) gallery.scrollTop += n.bottom - g.bottom + 6;
  }

  // Next / previous cell in the gallery's order as shown; from nothing selected, the first
  // (J) or the last (K).
  function step(delta) {
    const list = shownCells();
    if (!list.length) return;
    const index = list.findIndex((c) => c.id === selected);
    const next = index < 0 ? list[delta > 0 ? 0 : list.length - 1]
      : list[(index + delta + list.length) % list.length];
    show(next.id);
  }

  // ] / [: the next / previous unreviewed cell in the order shown.
  function stepUnreviewed(delta) {
    const list = shownCells();
    const index = list.findIndex((c) => c.id === selected);
    for (let i = 1; i <= list.length; i += 1) {
      const cell = list[(((index < 0 && delta < 0 ? 0 : index) + delta * i) % list.length + list.length) % list.length];
      if (!cell.reviewed && !pending.has(cell.id)) { show(cell.id); return; }
    }
    say("Every cell shown is reviewed.", "ok");
  }

  // The cell shown after this one, taken before an edit moves it (by type, a new label
  // moves a cell to another group): the review goes on where the reviewer was looking.
  function following(cellId, skip = new Set()) {
    const list = shownCells();
    const index = list.findIndex((c) => c.id === cellId);
    if (index < 0 || list.length < 2) return null;
    for (let i = 1; i < list.length; i += 1) {
      const cell = list[(index + i) % list.length];
      // "unreviewed only": a cell being labelled is about to leave the gallery
      if (!skip.has(cell.id) && !(prefs.unreviewed && pending.has(cell.id))) return cell.id;
    }
    return null;
  }

  function applyEdit(result) {
    const index = new Map(data.fields.map((f) => [f.id, f]));
    const field = index.get(result.cell.field_id);
    field.cells = field.cells.filter((c) => c.id !== result.cell.id);
    if (!result.deleted) {
      field.cells.push(result.cell);
      field.cells.sort((a, b) => a.id - b.id);
    }
    data.differential = result.differential;
    if (result.sign_off_check) data.sign_off_check = result.sign_off_check;
    data.revision = result.revision;
    render();
  }

  async function refused(status, result) {
    say(result.detail || `refused (${status})`, "error");
    if (status === 409 || status === 423) await load();
    return null;
  }

  // --- edits: each returns the server's answer, or null when refused -------------------

  async function patchCell(cellId, label, reviewed) {
    const cell = cellById(cellId);
    if (!cell) { say(`cell ${cellId} is not in the case any more`, "error"); return null; }
    const { ok, status, result } = await call("PATCH", `/api/cases/${caseId}/cells/${cellId}`,
      { label, version: cell.version, reviewed });
    if (!ok) return refused(status, result);
    applyEdit(result);
    return result;
  }

  async function removeCell(cellId) {
    const cell = cellById(cellId);
    if (!cell) { say(`cell ${cellId} is not in the case any more`, "error"); return null; }
    const { ok, status, result } = await call("DELETE",
      `/api/cases/${caseId}/cells/${cellId}?version=${cell.version}`);
    if (!ok) return refused(status, result);
    if (selected === cellId) selected = null;
    applyEdit(result);
    return result;
  }

  async function restoreCell(cellId, version) {
    const { ok, status, result } = await call("POST",
      `/api/cases/${caseId}/cells/${cellId}/restore`, { version });
    if (!ok) return refused(status, result);
    applyEdit(result);
    return result;
  }

  async function confirmCells(label, cellIds, reviewed) {
    const listed = cellIds.map(cellById);
    if (listed.some((c) => !c)) { say("a cell of that edit is not in the case any more", "error"); return null; }
    const { ok, status, result } = await call("POST", `/api/cases/${caseId}/confirm`,
      { label, reviewed, cells: listed.map((c) => ({ id: c.id, version: c.version })) });
    if (!ok) return refused(status, result);
    data = result.case;
    render();
    return result;
  }

  // --- undo / redo ------------------------------------------------------------------------

  function record(entry) {
    history.done.push(entry);
    if (history.done.length > HISTORY_MAX) history.done.shift();
    history.undone = [];
    renderHistory();
  }

  function renderHistory() {
    const last = history.done[history.done.length - 1];
    const next = history.undone[history.undone.length - 1];
    const open = data && data.status !== "signed";
    $("undo").disabled = !last || !open;
    $("redo").disabled = !next || !open;
    $("undo").title = last ? `undo ${last.what} (Ctrl+Z)` : "nothing to undo";
    $("redo").title = next ? `redo ${next.what} (Ctrl+Shift+Z or Ctrl+Y)` : "nothing to redo";
    $("undo").textContent = `Undo${history.done.length ? ` (${history.done.length})` : ""}`;
    $("redo").textContent = `Redo${history.undone.length ? ` (${history.undone.length})` : ""}`;
  }

  // Moves the latest entry of one stack to the other after running its undo (or redo);
  // refused (someone changed it since): the entry is dropped, the refusal shown. Stacks
  // by name: a new edit replaces `history.undone`, so it is looked up when the turn comes.
  function replay(from, to, run, done, nothing) {
    serial(async () => {
      const entry = history[from].pop();
      if (!entry) { say(nothing); return; }
      if (await entry[run]()) {
        history[to].push(entry);
        say(`${done}: ${entry.what}.`, "ok");
      }
      renderHistory();
    });
  }

  function undo() { replay("done", "undone", "undo", "Undone", "Nothing to undo."); }
  function redo() { replay("undone", "done", "redo", "Redone", "Nothing to redo."); }

  // --- the reviewer's edits -------------------------------------------------------------

  // A class key (or Enter: the same label) on the selected cell: the next cell as shown is
  // selected at once, and the label is sent (in turn with any edit still on its way).
  function setLabel(label) {
    const cell = cellById(selected);
    if (!cell || data.status === "signed") return;
    const cellId = cell.id;
    const next = following(cellId);
    if (next !== null) show(next);
    pending.add(cellId);
    serial(async () => {
      const before = cellById(cellId);
      if (!before) { pending.delete(cellId); return; }
      const was = { label: before.label, reviewed: before.reviewed };
      const done = await patchCell(cellId, label, true);
      pending.delete(cellId);
      if (!done) return;
      const what = was.label === label ? `confirm of cell ${cellId}`
        : `cell ${cellId} ${NAMES[was.label] || was.label} -> ${NAMES[label] || label}`;
      say(`cell ${cellId}: ${NAMES[label] || label}`, "ok");
      record({ what,
        undo: async () => { const r = await patchCell(cellId, was.label, was.reviewed); if (r) show(cellId); return r; },
        redo: async () => { const r = await patchCell(cellId, label, true); if (r) show(cellId); return r; } });
    });
  }

  // Delete: the next cell as shown is selected (the position is kept); undo restores it.
  function deleteCell() {
    const cell = cellById(selected);
    if (!cell || data.status === "signed") return;
    const cellId = cell.id;
    const next = following(cellId);
    if (next !== null) show(next); else select(null);
    serial(async () => {
      const result = await removeCell(cellId);
      if (!result) return;
      say(`cell ${cellId} deleted (Ctrl+Z brings it back)`, "ok");
      const entry = { what: `delete of cell ${cellId}`, version: result.cell.version,
        undo: async () => {
          const r = await restoreCell(cellId, entry.version);
          if (r) show(cellId);
          return r;
        },
        redo: async () => {
          const r = await removeCell(cellId);
          if (r) entry.version = r.cell.version;
          return r;
        } };
      record(entry);
    });
  }

  // Bulk confirm: every unreviewed cell labelled `label` (in counted fields) keeps its
  // label and is marked reviewed, in one request and one audit event; one undo.
  function confirmClass(label) {
    if (!label || data.status === "signed") return;
    const ids = cells().filter((c) => c.label === label && !c.reviewed).map((c) => c.id);
    const title = NAMES[label] || label;
    if (!ids.length) { say(`No unreviewed ${title} to confirm.`); return; }
    // Hidden by "unreviewed only": the selection moves on past the cells confirmed.
    if (prefs.unreviewed && ids.includes(selected)) {
      const next = following(selected, new Set(ids));
      if (next !== null) show(next); else select(null);
    }
    serial(async () => {
      const result = await confirmCells(label, ids, true);
      if (!result) return;
      const changed = result.changed;
      say(`${changed.length} ${title} confirmed (Ctrl+Z undoes it)`, "ok");
      record({ what: `confirm of ${changed.length} ${title}`,
        undo: () => confirmCells(label, changed, false),
        redo: () => confirmCells(label, changed, true) });
    });
  }

  function renderConfirmClass() {
    const button = $("confirm-class");
    const label = cellById(selected)?.label || prefs.filter;
    const count = label ? cells().filter((c) => c.label === label && !c.reviewed).length : 0;
    button.disabled = !count || data.status === "signed";
    button.dataset.label = label || "";
    button.textContent = label
      ? `Confirm ${count} unreviewed ${NAMES[label] || label} (Shift+Enter)`
      : "Confirm class (Shift+Enter)";
  }

  function setDrawing(on) {
    drawing = on;
    $("draw-mode").setAttribute("aria-pressed", String(on));
    for (const stage of document.querySelectorAll("#viewer .stage")) {
      stage.classList.toggle("drawing", on && !viewerField()?.excluded);
    }
  }

  function startDraw(event, fieldId, stage) {
    const field = data.fields.find((f) => f.id === fieldId);
    if (!drawing || !field || data.status === "signed" || field.excluded || event.button !== 0) return;
    event.preventDefault();
    event.stopPropagation();  // not a pan
    const rect = stage.getBoundingClientRect();
    const sx = field.width / rect.width;
    const sy = field.height / rect.height;
    const x0 = event.clientX - rect.left;
    const y0 = event.clientY - rect.top;
    const rubber = el("div", { class: "rubber" });
    stage.append(rubber);
    const move = (e) => {
      const x = e.clientX - rect.left, y = e.clientY - rect.top;
      rubber.style.cssText = `left:${Math.min(x, x0)}px;top:${Math.min(y, y0)}px;` +
        `width:${Math.abs(x - x0)}px;height:${Math.abs(y - y0)}px`;
    };
    const up = (e) => {
      window.removeEventListener("mousemove", move);
      window.removeEventListener("mouseup", up);
      rubber.remove();
      const x1 = e.clientX - rect.left, y1 = e.clientY - rect.top;
      const boxPx = [Math.min(x0, x1) * sx, Math.min(y0, y1) * sy, Math.max(x0, x1) * sx, Math.max(y0, y1) * sy];
      serial(async () => {
        const { ok, status, result } = await call("POST", `/api/cases/${caseId}/cells`,
          { field_id: field.id, box: boxPx, label: "unidentified" });
        if (!ok) return refused(status, result);
        setDrawing(false);
        applyEdit(result);
        const cellId = result.cell.id;
        show(cellId);
        say(`cell ${cellId} added: press a class key to classify it`, "ok");
        const entry = { what: `box drawn (cell ${cellId})`, version: null,
          undo: async () => {
            const r = await removeCell(cellId);
            if (r) entry.version = r.cell.version;
            return r;
          },
          redo: async () => {
            const r = await restoreCell(cellId, entry.version);
            if (r) show(cellId);
            return r;
          } };
        record(entry);
        return result;
      });
    };
    window.addEventListener("mousemove", move);
    window.addEventListener("mouseup", up);
  }

  async function upload(files) {
    if (!files.length) return;
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    say(`Uploading ${files.length} file(s)...`);
    const { status, result } = await call("POST", `/api/cases/${caseId}/fields`, form);
    const rejected = result.rejected || [];
    $("rejected").replaceChildren(...rejected.map((r) => el("li", {}, `${r.name}: ${r.reason}`)));
    if (result.detail) say(result.detail, "error");
    else say(`${(result.accepted || []).length} field(s) uploaded, ${rejected.length} refused`,
      rejected.length ? "error" : "ok");
    if (status !== 401) await load();
  }

  function wireUpload() {
    const zone = $("dropzone");
    const input = $("file-input");
    input.addEventListener("change", () => { upload([...input.files]); input.value = ""; });
    zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      upload([...e.dataTransfer.files]);
    });
  }

  // Sign-off is two steps: the panel shows counted vs target, unreviewed cells and failed
  // fields; a shortfall needs a written reason (the API refuses without one, 422).
  function showSignOff() {
    fillSignOff();
    $("sign-off-confirm").hidden = false;
    $("sign-off").hidden = true;
    $("sign-off-reason").focus();
  }

  function fillSignOff() {
    const c = data.sign_off_check;
    $("confirm-counted").textContent = String(c.counted);
    $("confirm-target").textContent = String(c.target);
    $("confirm-unreviewed").textContent = String(c.unreviewed);
    $("confirm-failed").textContent = String(c.failed_fields);
    $("confirm-excluded").textContent = String(c.excluded_fields);
    $("confirm-fields").replaceChildren(
      ...c.failed.map((f) => el("li", { class: "error" }, `${f.name}: failed analysis (${f.error})`)),
      ...c.excluded.map((f) => el("li", {}, `${f.name}: excluded by ${f.by} (${f.reason})`)));
    $("sign-off-problems").hidden = !c.reason_required;
    $("sign-off-problems").textContent = c.reason_required
      ? `${c.problems.join(", ")}: give a reason to sign off anyway.` : "";
    $("reason-required").textContent = c.reason_required ? "(required)" : "(optional)";
    $("sign-off-reason").required = c.reason_required;
  }

  function hideSignOff() {
    $("sign-off-confirm").hidden = true;
    $("sign-off").hidden = data.status === "signed" || body.dataset.role !== "reviewer";
  }

  async function signOff(event) {
    event.preventDefault();
    const reason = $("sign-off-reason").value.trim();
    if (data.sign_off_check.reason_required && !reason) {
      say("A reason is required to sign off this case.", "error");
      return;
    }
    const { ok, status, result } = await call("POST", `/api/cases/${caseId}/sign-off`,
      { revision: data.revision, reason: reason || null });
    if (!ok) { await refused(status, result); if (data.status !== "signed") showSignOff(); return; }
    data = result;
    history.done = [];  // a signed case is locked: nothing before its sign-off is undone
    history.undone = [];
    $("sign-off-reason").value = "";
    render();
    say("Case signed off and locked.", "ok");
    loadAudit();
  }

  async function reopen(event) {
    event.preventDefault();
    const reason = $("reopen-reason").value.trim();
    if (!reason) { say("A reason is required to reopen a signed case.", "error"); return; }
    const { ok, status, result } = await call("POST", `/api/cases/${caseId}/reopen`,
      { revision: data.revision, reason });
    if (!ok) return refused(status, result);
    data = result;
    $("reopen-reason").value = "";
    render();
    say("Case reopened: its next sign-off issues an amended report.", "ok");
    loadAudit();
  }

  async function setTarget(event) {
    event.preventDefault();
    const { ok, status, result } = await call("PATCH", `/api/cases/${caseId}`,
      { target_count: Number($("target").value), revision: data.revision });
    if (!ok) return refused(status, result);
    data = result;
    render();
    say(`Target set to ${data.target_count} WBC.`, "ok");
  }


  async function loadAudit() {
    const { ok, result } = await call("GET", `/api/cases/${caseId}/audit`);
    if (!ok) return;
    $("audit").replaceChildren(...result.map((e) => el("li", {},
      el("time", { datetime: e.at, title: e.at }, localTime(e.at, true)),
      ` ${e.user} ${e.action}` + (e.cell_id ? ` cell ${e.cell_id}` : "") +
      (e.before ? ` ${JSON.stringify(e.before)}` : "") + (e.after ? ` -> ${JSON.stringify(e.after)}` : ""))));
  }

  function toggleHelp() {
    const help = $("help");
    if (help.open) help.close(); else help.showModal();
  }

  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, textarea, select, dialog")) return;
    const key = event.key.toLowerCase();
    // Enter or Space on a focused button or link (Sign off, Undo...) is that control's own.
    if ((key === "enter" || key === " ") && event.target.closest("button, a, summary")) return;
    if ((event.ctrlKey || event.metaKey) && !event.altKey) {  // undo / redo
      if (key === "z") { event.preventDefault(); if (event.shiftKey) redo(); else undo(); }
      else if (key === "y") { event.preventDefault(); redo(); }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || !data) return;
    if (key === "enter" && event.shiftKey) {
      event.preventDefault();
      confirmClass(cellById(selected)?.label || prefs.filter);
    } else if (KEYS[key]) { event.preventDefault(); setLabel(KEYS[key]); }
    else if (key === "enter" && selected !== null) {
      event.preventDefault();
      const cell = cellById(selected);
      if (cell) setLabel(cell.label);
    } else if (key === "delete" || key === "backspace") { event.preventDefault(); deleteCell(); }
    else if (key === "j" || key === "arrowright") { event.preventDefault(); step(1); }
    else if (key === "k" || key === "arrowleft") { event.preventDefault(); step(-1); }
    else if (key === "]") { event.preventDefault(); stepUnreviewed(1); }
    else if (key === "[") { event.preventDefault(); stepUnreviewed(-1); }
    else if (key === "+" || key === "=") { event.preventDefault(); zoomKey(1.5); }
    else if (key === "-") { event.preventDefault(); zoomKey(1 / 1.5); }
    else if (key === "z") { event.preventDefault(); zoomToCell(); }
    else if (key === "f") { event.preventDefault(); fitField(); }
    else if (key === "e") { event.preventDefault(); toggleEnlarge(); }
    else if (key === "?") { event.preventDefault(); toggleHelp(); }
    else if (key === "b" && data.status !== "signed") setDrawing(!drawing);
    else if (key === "escape") { setDrawing(false); $("preview").hidden = true; }
  });

  $("draw-mode").addEventListener("click", (event) => { event.currentTarget.blur(); setDrawing(!drawing); });
  showPrefs();
  // Back to the keys after each choice: J / K walk the new order at once.
  $("gallery-order").addEventListener("change", (event) => {
    setPrefs({ order: event.target.value });
    event.target.blur();
  });
  $("gallery-filter").addEventListener("change", (event) => {
    setPrefs({ filter: event.target.value });
    event.target.blur();
  });
  $("unreviewed-only").addEventListener("change", (event) => {
    setPrefs({ unreviewed: event.target.checked });
    event.target.blur();
  });
  $("confirm-class").addEventListener("click", (event) => {
    event.currentTarget.blur();
    confirmClass(event.currentTarget.dataset.label);
  });
  $("undo").addEventListener("click", (event) => { event.currentTarget.blur(); undo(); });
  $("redo").addEventListener("click", (event) => { event.currentTarget.blur(); redo(); });
  $("help-open").addEventListener("click", (event) => { event.currentTarget.blur(); toggleHelp(); });
  $("help-close").addEventListener("click", () => $("help").close());
  $("sign-off").addEventListener("click", showSignOff);
  $("sign-off-cancel").addEventListener("click", hideSignOff);
  $("sign-off-confirm").addEventListener("submit", signOff);
  $("reopen").addEventListener("click", () => {
    $("reopen-confirm").hidden = false;
    $("reopen").hidden = true;
    $("reopen-reason").focus();
  });
  $("reopen-cancel").addEventListener("click", () => {
    $("reopen-confirm").hidden = true;
    $("reopen").hidden = false;
  });
  $("reopen-confirm").addEventListener("submit", reopen);
  $("target-form").addEventListener("submit", setTarget);
  $("audit-box").addEventListener("toggle", loadAudit);
  wireUpload();
  wireViewer();
  load();
})();
