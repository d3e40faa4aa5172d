const $ = (id) => document.getElementById(id);
let key = localStorage.getItem("darkroom.key") || "";
$("key").value = key;

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } });
  if (!response.ok && response.status !== 207) {
    let detail = response.statusText;
    try { const p = await response.json(); detail = p.detail || p.title; } catch {}
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

const thumbs = new Map();
async function thumbnail(id) {
  if (thumbs.has(id)) return thumbs.get(id);
  const response = await api(`/api/images/${id}/thumbnail`);
  const url = URL.createObjectURL(await response.blob());
  thumbs.set(id, url);
  return url;
}

async function refresh() {
  if (!key) { $("summary").textContent = "Enter an API key to begin."; return; }
  try {
    const { items } = await (await api("/api/images?limit=200")).json();
    $("summary").textContent = `${items.length} image(s)`;
    const grid = $("grid");
    grid.replaceChildren();
    for (const doc of items) {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = doc.name || doc.id;
      if (doc.ingest) thumbnail(doc.id).then((u) => (img.src = u)).catch(() => {});
      const cap = document.createElement("figcaption");
      const reason = doc.failure && doc.status === "failed" ? ` — ${doc.failure.reason}` : "";
      cap.innerHTML = `<div></div><div class="status ${doc.status}"></div><div class="tags"></div>`;
      cap.children[0].textContent = doc.name || doc.id;
      cap.children[1].textContent = doc.status + reason;
      cap.children[2].textContent = (doc.tags || []).join(" ");
      fig.append(img, cap);
      grid.append(fig);
    }
    $("key-msg").textContent = "";
  } catch (err) {
    $("key-msg").textContent = err.message;
    $("key-msg").className = "error";
  }
}

async function upload(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  $("upload-msg").textContent = `Uploading ${files.length} file(s)…`;
  $("upload-msg").className = "";
  try {
    const response = await fetch("/api/uploads", { method: "POST", body: form, headers: { Authorization: `Bearer ${key}` } });
    const body = await response.json();
    const results = body.results || [];
    const failed = results.filter((r) => r.status >= 400);
    const duplicates = results.filter((r) => r.duplicate).length;
    const note = duplicates ? ` (${duplicates} already uploaded before)` : "";
    $("upload-msg").textContent = failed.length
      ? failed.map((r) => `${r.name}: ${r.error}`).join("; ")
      : `Uploaded ${results.length} file(s)${note}.`;
    $("upload-msg").className = failed.length ? "error" : "";
    if (!response.ok && !results.length) throw new Error(body.detail || body.title);
  } catch (err) {
    $("upload-msg").textContent = err.message;
    $("upload-msg").className = "error";
  }
  refresh();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key").value.trim();
  localStorage.setItem("darkroom.key", key);
  refresh();
});
$("files").addEventListener("change", (e) => upload([...e.target.files]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload([...e.dataTransfer.files]); });
refresh();
setInterval(refresh, 3000);
