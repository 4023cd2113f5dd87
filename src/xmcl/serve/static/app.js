// The search page: text box, image upload (button or drag-and-drop), a grid of results; click one to search by it.
// What is being searched for is shown above the results (the text, the uploaded image, or the clicked photo).
// A server started with --api-key is reached by opening the page as /?key=KEY.
"use strict";

const $ = (id) => document.getElementById(id);
const results = $("results");
const statusLine = $("status");
const queryView = $("query-view");
const apiKey = new URLSearchParams(location.search).get("key");
const keyHeader = apiKey ? { "X-API-Key": apiKey } : {};

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", Boolean(isError));
}

function withKey(url) {
  return apiKey ? `${url}${url.includes("?") ? "&" : "?"}key=${encodeURIComponent(apiKey)}` : url;
}

function common() {
  return { index: $("index").value, k: Number($("k").value) || 12, target: $("target").value };
}

// The query above the results: a label, and a picture for an image or item query.
function showQuery(label, pictureUrl) {
  queryView.replaceChildren();
  if (pictureUrl) {
    const img = document.createElement("img");
    img.src = pictureUrl;
    img.alt = "";
    queryView.append(img);
  }
  const text = document.createElement("span");
  text.textContent = label;
  queryView.append(text);
  queryView.hidden = false;
}

function showError(message) {
  results.replaceChildren();
  const card = document.createElement("p");
  card.className = "error-card";
  card.textContent = message;
  results.append(card);
  setStatus(message, true);
}

async function answer(response, began) {
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    showError((body && body.detail) || `error ${response.status}`);
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
      method: "POST", headers: { "Content-Type": "application/json", ...keyHeader },
      body: JSON.stringify({ ...common(), ...query }),
    });
    await answer(response, began);
  } catch (e) { showError(`the server cannot be reached (${e})`); }
}

function searchText(text) {
  showQuery(`Results for “${text.trim()}”`, null);
  searchJson({ text });
}

function searchItem(id, path) {
  $("target").value = "images";
  $("query").value = "";
  $("upload").value = "";
  const index = encodeURIComponent($("index").value);
  showQuery(`Similar to ${path}`, withKey(`/thumbs/${id}?index=${index}&size=128`));
  searchJson({ item: Number(id) });
}

async function searchImage(file) {
  if (!file) return;
  const began = performance.now();
  $("query").value = "";
  showQuery(`Similar to your image ${file.name}`, URL.createObjectURL(file));
  setStatus(`searching by ${file.name}…`, false);
  const form = new FormData();
  const fields = common();
  for (const key of Object.keys(fields)) form.append(key, String(fields[key]));
  form.append("image", file, file.name);
  try {
    await answer(await fetch("/search", { method: "POST", headers: keyHeader, body: form }), began);
  } catch (e) { showError(`the server cannot be reached (${e})`); }
}

// Caption results come one per caption; a photo gets one card, listing its matching captions.
function grouped(body) {
  if (body.target !== "captions") return body.results.map((r) => ({ ...r, lines: [r.caption || ""] }));
  const cards = new Map();
  for (const r of body.results) {
    if (!cards.has(r.id)) cards.set(r.id, { ...r, lines: [] });
    cards.get(r.id).lines.push(r.text);
  }
  return [...cards.values()];
}

function render(body) {
  results.replaceChildren();
  const index = encodeURIComponent(body.index);
  for (const r of grouped(body)) {
    const card = document.createElement("article");
    card.className = "result";
    card.tabIndex = 0;
    card.dataset.id = r.id;
    card.dataset.path = r.path;
    card.title = `${r.path} — click to find similar images`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = r.lines[0] || r.path;
    img.src = withKey(`/thumbs/${r.id}?index=${index}`);
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${r.rank} · ${r.score.toFixed(3)}`;
    const link = document.createElement("a");
    link.className = "path";
    link.href = withKey(`/images/${r.id}?index=${index}`);
    link.target = "_blank";
    link.textContent = r.path;
    link.addEventListener("click", (e) => e.stopPropagation());
    meta.append(score, link);
    for (const line of r.lines.filter(Boolean)) {
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = line;
      meta.append(caption);
    }
    card.append(img, meta);
    const more = () => searchItem(r.id, r.path);
    card.addEventListener("click", more);
    card.addEventListener("keydown", (e) => { if (e.key === "Enter") more(); });
    results.append(card);
  }
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("upload").value = "";
  searchText($("query").value);
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

fetch("/healthz", { headers: keyHeader }).then((r) => {
  if (!r.ok) throw new Error(r.status === 401 ? "an API key is needed: open this page as /?key=KEY" : r.status);
  return r.json();
}).then((health) => {
  for (const [name, info] of Object.entries(health.indexes)) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = `${name} (${info.images} images)`;
    $("index").append(option);
  }
  $("index").value = health.default;
  setStatus("ready", false);
}).catch((e) => setStatus(`the server cannot be reached (${e.message || e})`, true));
