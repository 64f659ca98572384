// The document browser of report.html: reads the JSON block #doc-data and renders the table and the detail view.
// Every text from the data goes into the page through textContent, never as markup.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("doc-data").textContent);
  const columns = data.columns;
  const docs = data.documents.map((d, i) => Object.assign({ index: i + 1 }, d));
  const $ = (id) => document.getElementById(id);
  const state = { metric: data.metrics[0][0], query: "", filter: "all", a: null, b: null, highlight: "reference",
                  sort: { key: "index", dir: 1 }, selected: null };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function option(select, value, label) { select.append(el("option", { value: value }, label)); }

  // ---------------------------------------------------------------- toolbar

  function setup() {
    for (const [key, label] of data.metrics) option($("doc-metric"), key, label);
    for (const c of columns) { option($("doc-a"), c.key, c.label); option($("doc-b"), c.key, c.label); }
    // A defaults to the first method, B to the untouched model (the first column) when there is one.
    state.a = columns.length > 1 ? columns[1].key : (columns[0] || {}).key;
    state.b = columns.length ? columns[0].key : null;
    $("doc-a").value = state.a || "";
    $("doc-b").value = state.b || "";
    if (!docs.some((d) => d.document !== null)) $("doc-highlight").querySelector("[value=document]").disabled = true;
    for (const note of data.notes) $("doc-notes").append(el("p", {}, note));
    $("doc-search").addEventListener("input", (e) => { state.query = e.target.value; update(); });
    $("doc-metric").addEventListener("change", (e) => { state.metric = e.target.value; update(); });
    $("doc-filter").addEventListener("change", (e) => { state.filter = e.target.value; sortByGap(); update(); });
    $("doc-a").addEventListener("change", (e) => { state.a = e.target.value; sortByGap(); update(); });
    $("doc-b").addEventListener("change", (e) => { state.b = e.target.value; sortByGap(); update(); });
    $("doc-swap").addEventListener("click", () => {
      [state.a, state.b] = [state.b, state.a];
      $("doc-a").value = state.a; $("doc-b").value = state.b;
      sortByGap(); update();
    });
    $("doc-highlight").addEventListener("change", (e) => { state.highlight = e.target.value; renderDetail(); });
    document.addEventListener("keydown", moveSelection);
  }

  // A filter on who beats whom shows the largest gaps first.
  function sortByGap() {
    if (state.filter === "a") state.sort = { key: "gap", dir: -1 };
    else if (state.filter === "b") state.sort = { key: "gap", dir: 1 };
  }

  // ---------------------------------------------------------------- rows: filter, search, sort

  function score(doc, column) {
    const s = doc.scores[column];
    return s ? s[state.metric] : null;
  }

  function gap(doc) {
    const a = score(doc, state.a), b = score(doc, state.b);
    return a === null || b === null ? null : a - b;
  }

  function matches(doc, words) {
    if (!words.length) return true;
    const haystack = [doc.id, doc.document || "", doc.reference, ...(doc.references || []),
                      ...Object.values(doc.predictions)].join("\n").toLowerCase();
    return words.every((w) => haystack.includes(w));
  }

  function sortValue(doc, key) {
    if (key === "index") return doc.index;
    if (key === "id") return doc.id;
    if (key === "document") return doc.document || "";
    if (key === "reference") return doc.reference;
    if (key === "gap") return gap(doc);
    return score(doc, key.slice(4)); // "col:<column key>"
  }

  function visibleDocs() {
    const words = state.query.toLowerCase().split(/\s+/).filter(Boolean);
    let rows = docs.filter((d) => matches(d, words));
    if (state.filter !== "all") {
      const sign = state.filter === "a" ? 1 : -1;
      rows = rows.filter((d) => gap(d) !== null && sign * gap(d) > 0);
    }
    const { key, dir } = state.sort;
    return rows.slice().sort((x, y) => {
      const a = sortValue(x, key), b = sortValue(y, key);
      if (a === b) return x.index - y.index;
      if (a === null) return 1; // missing values last, whichever the direction
      if (b === null) return -1;
      return (typeof a === "string" ? a.localeCompare(b, undefined, { numeric: true }) : a - b) * dir || x.index - y.index;
    });
  }

  // ---------------------------------------------------------------- table

  function label(key) { return (columns.find((c) => c.key === key) || { label: key }).label; }

  function header() {
    const cells = [["index", "#"], ["id", "id"], ["document", "document"], ["reference", "reference"],
                   ...columns.map((c) => ["col:" + c.key, c.label]), ["gap", "A − B"]];
    const row = el("tr");
    for (const [key, text] of cells) {
      const th = el("th", { "data-sort": key }, text);
      if (key === "gap") th.title = `${label(state.a)} − ${label(state.b)}, in the chosen score`;
      if (state.sort.key === key) th.className = state.sort.dir > 0 ? "sorted-asc" : "sorted-desc";
      th.addEventListener("click", () => {
        // Scores and gaps sort best first on the first click, text and position in order.
        const numeric = key.startsWith("col:") || key === "gap";
        state.sort = state.sort.key === key ? { key, dir: -state.sort.dir } : { key, dir: numeric ? -1 : 1 };
        update();
      });
      row.append(th);
    }
    const thead = $("doc-table").tHead;
    thead.replaceChildren(row);
  }

  function fixed(x) { return x === null || x === undefined ? "–" : x.toFixed(1); }

  function excerpt(text) { return text === null ? "–" : text.length > 90 ? text.slice(0, 90) + "…" : text; }

  function update() {
    header();
    const rows = visibleDocs();
    const body = $("doc-table").tBodies[0];
    body.replaceChildren(...rows.map((d) => {
      const tr = el("tr", { "data-id": d.id, "data-index": String(d.index) },
        el("td", { class: "num" }, String(d.index)), el("td", { class: "id" }, d.id),
        el("td", { class: "excerpt" }, excerpt(d.document)), el("td", { class: "excerpt" }, excerpt(d.reference)),
        ...columns.map((c) => el("td", { class: "num", "data-column": c.key }, fixed(score(d, c.key)))));
      const g = gap(d);
      tr.append(el("td", { class: "num gap " + (g > 0 ? "pos" : g < 0 ? "neg" : "") },
                   g === null ? "–" : (g > 0 ? "+" : g < 0 ? "−" : "") + Math.abs(g).toFixed(1)));
      if (d === state.selected) tr.classList.add("selected");
      tr.addEventListener("click", () => select(d));
      return tr;
    }));
    $("doc-count").textContent = `${rows.length} of ${docs.length} documents`;
    if (!rows.includes(state.selected)) state.selected = rows[0] || null;
    markSelected();
    renderDetail();
  }

  function select(doc) { state.selected = doc; markSelected(); renderDetail(); }

  function markSelected() {
    for (const tr of $("doc-table").tBodies[0].rows) {
      tr.classList.toggle("selected", state.selected !== null && tr.dataset.index === String(state.selected.index));
    }
  }

  function moveSelection(event) {
    if (!["ArrowDown", "ArrowUp"].includes(event.key) || /INPUT|SELECT|TEXTAREA/.test(event.target.tagName)) return;
    const rows = visibleDocs();
    const at = rows.indexOf(state.selected) + (event.key === "ArrowDown" ? 1 : -1);
    if (at < 0 || at >= rows.length) return;
    event.preventDefault();
    select(rows[at]);
    const tr = $("doc-table").tBodies[0].rows[at];
    if (tr) tr.scrollIntoView({ block: "nearest" });
  }

  // ---------------------------------------------------------------- word overlap

  function norm(word) { return word.toLowerCase().replace(/^[^\p{L}\p{N}]+|[^\p{L}\p{N}]+$/gu, ""); }

  const SPAN = 3; // words in a row, in the source's order, that count as copied

  function sourceIndex(text) {
    const words = text.split(/\s+/).map(norm).filter(Boolean);
    const grams = new Set();
    for (let i = 0; i + SPAN <= words.length; i++) grams.add(words.slice(i, i + SPAN).join(" "));
    return { words: new Set(words), grams };
  }

  // The prediction as spans: copied (in a run of SPAN words found in the source), shared, or new (names marked).
  function highlighted(text, source) {
    const box = el("div", { class: "body" });
    if (source === null) { box.textContent = text; return { box, stats: null }; }
    const index = sourceIndex(source);
    const tokens = text.split(/(\s+)/);
    const words = tokens.map((t, i) => ({ i, n: /\s/.test(t) ? "" : norm(t) })).filter((w) => w.n);
    const copied = new Set();
    for (let k = 0; k + SPAN <= words.length; k++) {
      if (index.grams.has(words.slice(k, k + SPAN).map((w) => w.n).join(" "))) {
        for (let j = k; j < k + SPAN; j++) copied.add(words[j].i);
      }
    }
    const kind = new Map();
    let sentenceStart = true; // a capital there says nothing: only numbers count as names
    for (const w of words) {
      const raw = tokens[w.i].replace(/^[^\p{L}\p{N}]+/u, "");
      const name = /^\p{N}/u.test(raw) || (!sentenceStart && /^\p{Lu}/u.test(raw));
      if (copied.has(w.i)) kind.set(w.i, "hl-copy");
      else if (index.words.has(w.n)) kind.set(w.i, "hl-shared");
      else kind.set(w.i, name ? "hl-novel hl-name" : "hl-novel");
      sentenceStart = /[.!?:]["'’”)\]]*$/u.test(tokens[w.i]);
    }
    tokens.forEach((t, i) => box.append(kind.has(i) ? el("span", { class: kind.get(i) }, t) : t));
    const count = (c) => [...kind.values()].filter((v) => v === c).length;
    return { box, stats: { words: words.length, copied: count("hl-copy"), shared: count("hl-shared"),
                           novel: count("hl-novel") + count("hl-novel hl-name"), names: count("hl-novel hl-name") } };
  }

  // ---------------------------------------------------------------- detail

  function textBox(cls, title, text) {
    return el("div", { class: "text-box " + cls }, el("h4", {}, title), el("div", { class: "body" }, text));
  }

  function renderDetail() {
    const detail = $("doc-detail");
    const d = state.selected;
    if (!d) { detail.replaceChildren(el("p", {}, docs.length ? "No document matches." : "No predictions to show.")); return; }
    const references = d.references && d.references.length > 1 ? d.references : [d.reference];
    const source = state.highlight === "reference" ? references.join("\n")
      : state.highlight === "document" ? d.document : null;
    const refBox = el("div", { class: "text-box reference" },
      el("h4", {}, references.length > 1 ? `references (${references.length})` : "reference"),
      ...references.map((r) => el("div", { class: "body" }, r)));
    const cards = columns.map((c) => {
      const s = d.scores[c.key] || {};
      const { box, stats } = highlighted(d.predictions[c.key] || "", source ?? null);
      const card = el("div", { class: "text-box prediction", "data-column": c.key }, el("h4", {}, c.label),
        el("div", { class: "scores" }, data.metrics.map(([k, name]) => `${name} ${fixed(s[k])}`).join(" · ")), box);
      if (stats) {
        card.append(el("div", { class: "stats" }, `${stats.words} words: ${stats.copied} in copied spans, ` +
          `${stats.shared} shared, ${stats.novel} new (${stats.names} names or numbers)`));
      }
      return card;
    });
    detail.replaceChildren(
      el("h3", {}, `#${d.index} · ${d.id}`),
      el("div", { class: "sources" },
        textBox("document", "document", d.document === null ? "(the document text is not available: see the notes above)" : d.document),
        refBox),
      el("div", { class: "predictions" }, ...cards));
  }

  setup();
  update();
})();
