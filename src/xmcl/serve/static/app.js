// The search page: text box, image upload (button or drag-and-drop), a grid of results; click one to search by it.
"use strict";

const $ = (id) => document.getElementById(id);
const results = $("results");
const statusLine = $("status");

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

function common() {
  return { index: $("index").value, k: Number($("k").value) || 12, target: $("target").value };
}

async function answer(response, began) {
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    setStatus((body && body.detail) || `error ${response.status}`, true);
    return;
  }
  render(body);
  const ms = Math.round(performance.now() - began);
  const found = `${body.results.length} ${body.target} from index ${body.index} in ${ms} ms`;
  setStatus(body.warning ? `${found}. Warning: ${body.warning}` : found, Boolean(body.warning));
}

async function searchJson(query) {
  const began = performance.now();
  setStatus("searching…", false);
  try {
    const response = await fetch("/search", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...common(), ...query }),
    });
    await answer(response, began);
  } catch (e) { setStatus(`the server cannot be reached (${e})`, true); }
}

async function searchImage(file) {
  if (!file) return;
  const began = performance.now();
  setStatus(`searching by ${file.name}…`, false);
  const form = new FormData();
  const fields = common();
  for (const key of Object.keys(fields)) form.append(key, String(fields[key]));
  form.append("image", file, file.name);
  try {
    await answer(await fetch("/search", { method: "POST", body: form }), began);
  } catch (e) { setStatus(`the server cannot be reached (${e})`, true); }
}

function render(body) {
  results.replaceChildren();
  const index = encodeURIComponent(body.index);
  for (const r of body.results) {
    const card = document.createElement("article");
    card.className = "result";
    card.tabIndex = 0;
    card.dataset.id = r.id;
    card.dataset.path = r.path;
    card.title = `${r.path} — click to find similar images`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = r.caption || r.path;
    img.src = `/thumbs/${r.id}?index=${index}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${r.rank} · ${r.score.toFixed(3)}`;
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.textContent = r.caption || r.path;
    meta.append(score, caption);
    card.append(img, meta);
    const more = () => { $("target").value = "images"; searchJson({ item: r.id }); };
    card.addEventListener("click", more);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") more(); });
    results.append(card);
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  searchJson({ text: $("query").value });
});
$("upload").addEventListener("change", (e) => searchImage(e.target.files[0]));

const dropzone = $("dropzone");
["dragenter", "dragover"].forEach((name) => dropzone.addEventListener(name, (e) => {
  e.preventDefault(); dropzone.classList.add("over");
}));
["dragleave", "drop"].forEach((name) => dropzone.addEventListener(name, (e) => {
  e.preventDefault(); dropzone.classList.remove("over");
}));
dropzone.addEventListener("drop", (e) => searchImage(e.dataTransfer.files[0]));

fetch("/healthz").then((r) => r.json()).then((health) => {
  for (const [name, info] of Object.entries(health.indexes)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${info.images} images)`;
    $("index").append(option);
  }
  $("index").value = health.default;
  setStatus("ready", false);
}).catch((e) => setStatus(`the server cannot be reached (${e})`, true));
