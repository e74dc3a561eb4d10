// Review page: renders a case from /api/cases/{id}, sends each edit with the version it saw.
"use strict";
(() => {
  const body = document.body;
  const caseId = body.dataset.caseId;
  const csrf = body.dataset.csrf;
  const ORDER_KEY = "leukodiff.galleryOrder";  // the gallery order, remembered per browser
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
  let data = null;
  let order = storedOrder();  // "type": grouped by label; "confidence": least confident first
  let selected = null;   // cell id
  let drawing = false;
  let poll = null;

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

  // The cells that count: those of fields not excluded (J/K, the keys and the gallery's
  // sections walk these; excluded fields' cells are shown apart, greyed, frozen).
  function cells() {
    return data.fields.filter((f) => !f.excluded).flatMap((f) => f.cells);
  }

  function excludedCells() {
    return data.fields.filter((f) => f.excluded).flatMap((f) => f.cells);
  }

  function mayExclude() {
    return data.status !== "signed" && ["technologist", "reviewer"].includes(body.dataset.role);
  }

  function storedOrder() {
    try {
      return localStorage.getItem(ORDER_KEY) === "confidence" ? "confidence" : "type";
    } catch {
      return "type";  // storage turned off: the default order, not remembered
    }
  }

  function setOrder(value) {
    order = value === "confidence" ? "confidence" : "type";
    try { localStorage.setItem(ORDER_KEY, order); } catch { /* not remembered */ }
    $("gallery-order").value = order;
    if (data) renderGallery();
  }

  // Least confident first: the model's doubtful calls teach it most. Cells with no model
  // confidence (drawn by a person) come last; equal ones by id.
  function byConfidence(a, b) {
    const ca = a.model_confidence ?? Infinity;
    const cb = b.model_confidence ?? Infinity;
    return ca - cb || a.id - b.id;
  }

  // The gallery's sections, in the order shown; J/K and the step after an edit follow it.
  function gallerySections() {
    if (order === "confidence") {
      const sorted = cells().sort(byConfidence);
      return sorted.length
        ? [{ label: null, title: `least confident first (${sorted.length})`, cells: sorted }] : [];
    }
    const byLabel = new Map(ORDER.map((l) => [l, []]));
    for (const cell of cells()) {
      if (!byLabel.has(cell.label)) byLabel.set(cell.label, []);  // a label the page lacks
      byLabel.get(cell.label).push(cell);
    }
    return [...byLabel].filter(([, list]) => list.length).map(([label, list]) => ({
      label, title: `${NAMES[label] || label} (${list.length})`, cells: list }));
  }

  function shownCells() {
    return gallerySections().flatMap((s) => s.cells);
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
    $("signed").textContent = signed ? `by ${data.signed_by} at ${data.signed_at.slice(0, 16)} UTC` : "";
    $("upload-card").hidden = signed;
    // A signed case is locked: no target to set, no box to draw (the API refuses them too).
    $("target-form").hidden = signed;
    $("draw-mode").hidden = signed;
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
    renderDifferential();
    renderGallery();
    renderFields();
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
    $("gallery").dataset.order = order;
    const sections = gallerySections().map(({ label, title, cells: shown }) => label
      ? el("div", { class: "gallery-section", "data-label": label },
        el("h3", { style: `color:var(--${label})` }, title),
        el("div", { class: "thumbs" }, ...shown.map((c) => thumb(c, false))))
      : el("div", { class: "gallery-section", "data-order": "confidence" },
        el("h3", {}, title), el("div", { class: "thumbs" }, ...shown.map((c) => thumb(c, true)))));
    const frozen = excludedCells();
    if (frozen.length) {
      sections.push(el("div", { class: "gallery-section excluded", "data-excluded": "true" },
        el("h3", {}, `in excluded fields, not counted (${frozen.length})`),
        el("div", { class: "thumbs" }, ...frozen.map((c) => thumb(c, true, true)))));
    }
    $("gallery").replaceChildren(...(sections.length ? sections : [el("p", {}, "No cells yet.")]));
  }

  // Rounded, but never up to 100% (a model 99.6% sure is not certain).
  function percent(confidence) {
    return `${Math.min(Math.round(100 * confidence), confidence < 1 ? 99 : 100)}%`;
  }

  // One crop; `named`: show its label too (the confidence order mixes the types).
  // `frozen`: a cell of an excluded field, shown greyed and not selectable.
  function thumb(cell, named, frozen = false) {
    const classes = ["thumb", cell.reviewed ? "reviewed" : "", cell.id === selected ? "selected" : "",
      frozen ? "excluded" : ""];
    const note = cell.model_label && cell.model_label !== cell.label ? ` (was ${cell.model_label})` : "";
    const known = cell.model_confidence !== null && cell.model_confidence !== undefined;
    const confidence = known ? ` · model ${percent(cell.model_confidence)}` : "";
    return el("button", { type: "button", class: classes.join(" "), "data-cell": cell.id,
      "data-confidence": known ? String(cell.model_confidence) : "",
      title: `cell ${cell.id}${note}${confidence}${frozen ? " · in an excluded field" : ""}`,
      ...(frozen ? { disabled: "" } : { onclick: () => select(cell.id) }) },
      el("img", { src: `/api/cells/${cell.id}/crop`, alt: `cell ${cell.id}`, loading: "lazy" }),
      named ? el("span", { class: "dot", style: `background:var(--${cell.label})` }) : "",
      `#${cell.id}${named ? ` ${NAMES[cell.label] || cell.label}` : ""}${note}`,
      known ? el("span", { class: "confidence", title: "the model's confidence in its type" },
        percent(cell.model_confidence)) : "");
  }

  function renderFields() {
    const figures = data.fields.map((field) => {
      const stage = el("div", { class: `stage${drawing && !field.excluded ? " drawing" : ""}`,
        "data-field": field.id });
      if (field.status === "done") {
        stage.append(el("img", { src: `/api/fields/${field.id}/image`, alt: field.name, draggable: "false" }));
        for (const cell of field.cells) stage.append(box(field, cell));
        stage.addEventListener("mousedown", (event) => startDraw(event, field, stage));
      } else {
        stage.append(el("p", { class: field.status === "failed" ? "error" : "" },
          field.status === "failed" ? `Failed: ${field.error}` : `${field.status}...`));
      }
      return el("figure", { class: `field${field.excluded ? " excluded" : ""}`, "data-field": field.id },
        stage,
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
    if (selected !== null && !cells().some((c) => c.id === selected)) selected = null;
    render();
    say(action === "exclude" ? `${field.name} excluded: its cells are not counted.`
      : `${field.name} included again: its cells count.`, "ok");
  }

  function box(field, cell) {
    const [x0, y0, x1, y1] = cell.box;
    const style = `left:${(100 * x0) / field.width}%;top:${(100 * y0) / field.height}%;` +
      `width:${(100 * (x1 - x0)) / field.width}%;height:${(100 * (y1 - y0)) / field.height}%;` +
      `border-color:var(--${cell.label})`;
    return el("button", { type: "button", class: `box${cell.id === selected ? " selected" : ""}`,
      style, "data-cell": cell.id, title: NAMES[cell.label] || cell.label,
      onmousedown: (event) => event.stopPropagation(), onclick: () => select(cell.id) },
      el("span", { style: `background:var(--${cell.label})` }, `${cell.id} ${NAMES[cell.label] || cell.label}`));
  }

  function select(cellId) {
    selected = cellId;
    for (const node of document.querySelectorAll(".selected")) node.classList.remove("selected");
    for (const node of document.querySelectorAll(`[data-cell="${cellId}"]`)) node.classList.add("selected");
  }

  function show(cellId) {
    select(cellId);
    document.querySelector(`.thumb[data-cell="${cellId}"]`)?.scrollIntoView({ block: "nearest" });
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

  // The cell shown after this one, taken before an edit moves it (by type, a new label
  // moves a cell to another group): the review goes on where the reviewer was looking.
  function following(cellId) {
    const list = shownCells();
    const index = list.findIndex((c) => c.id === cellId);
    if (index < 0 || list.length < 2) return null;
    return list[(index + 1) % list.length].id;
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
    data.revision = result.revision;
    render();
  }

  async function refused(status, result) {
    say(result.detail || `refused (${status})`, "error");
    if (status === 409 || status === 423) await load();
  }

  async function setLabel(label) {
    const cell = cells().find((c) => c.id === selected);
    if (!cell || data.status === "signed") return;
    const next = following(cell.id);
    const { ok, status, result } = await call("PATCH", `/api/cases/${caseId}/cells/${cell.id}`,
      { label, version: cell.version });
    if (!ok) return refused(status, result);
    applyEdit(result);
    say(`cell ${cell.id}: ${NAMES[label] || label}`, "ok");
    show(next ?? cell.id);
  }

  async function deleteCell() {
    const cell = cells().find((c) => c.id === selected);
    if (!cell || data.status === "signed") return;
    const next = following(cell.id);
    const { ok, status, result } = await call("DELETE",
      `/api/cases/${caseId}/cells/${cell.id}?version=${cell.version}`);
    if (!ok) return refused(status, result);
    selected = null;
    applyEdit(result);
    say(`cell ${cell.id} deleted`, "ok");
    if (next !== null) show(next);
  }

  function setDrawing(on) {
    drawing = on;
    $("draw-mode").setAttribute("aria-pressed", String(on));
    for (const stage of document.querySelectorAll(".stage")) stage.classList.toggle("drawing", on);
  }

  function startDraw(event, field, stage) {
    if (!drawing || data.status === "signed" || field.excluded || event.button !== 0) return;
    event.preventDefault();
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
    const up = async (e) => {
      window.removeEventListener("mousemove", move);
      window.removeEventListener("mouseup", up);
      rubber.remove();
      const x1 = e.clientX - rect.left, y1 = e.clientY - rect.top;
      const boxPx = [Math.min(x0, x1) * sx, Math.min(y0, y1) * sy, Math.max(x0, x1) * sx, Math.max(y0, y1) * sy];
      const { ok, status, result } = await call("POST", `/api/cases/${caseId}/cells`,
        { field_id: field.id, box: boxPx, label: "unidentified" });
      if (!ok) return refused(status, result);
      setDrawing(false);
      applyEdit(result);
      select(result.cell.id);
      say(`cell ${result.cell.id} added: press a class key to classify it`, "ok");
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
      `${e.at.slice(0, 19)} ${e.user} ${e.action}` + (e.cell_id ? ` cell ${e.cell_id}` : "") +
      (e.before ? ` ${JSON.stringify(e.before)}` : "") + (e.after ? ` -> ${JSON.stringify(e.after)}` : ""))));
  }

  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, textarea, select") || event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key.toLowerCase();
    if (KEYS[key]) { event.preventDefault(); setLabel(KEYS[key]); }
    else if (key === "enter" && selected) {
      event.preventDefault();
      const cell = cells().find((c) => c.id === selected);
      if (cell) setLabel(cell.label);
    } else if (key === "delete" || key === "backspace") { event.preventDefault(); deleteCell(); }
    else if (key === "j" || key === "arrowright") { event.preventDefault(); step(1); }
    else if (key === "k" || key === "arrowleft") { event.preventDefault(); step(-1); }
    else if (key === "b" && data && data.status !== "signed") setDrawing(!drawing);
    else if (key === "escape") setDrawing(false);
  });

  $("draw-mode").addEventListener("click", () => setDrawing(!drawing));
  $("gallery-order").value = order;
  $("gallery-order").addEventListener("change", (event) => {
    setOrder(event.target.value);
    event.target.blur();  // back to the keys: J / K walk the new order at once
  });
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
  load();
})();
