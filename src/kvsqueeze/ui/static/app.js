// kvsqueeze ui: compress a document, colour its tokens by how much of the cache kept them, stream two answers.
// Every URL is relative, so the page works wherever its application is mounted.
"use strict";

const $ = (id) => document.getElementById(id);
let options = null, result = null;

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function megabytes(n) { return (n / 2 ** 20).toFixed(1) + " MB"; }

function colour(share) {  // red (evicted everywhere) -> yellow -> green (kept by every head)
  return `hsl(${Math.round(130 * share)}, ${share > 0.5 ? 55 : 75}%, ${share > 0.5 ? 72 : 83}%)`;
}

async function postJSON(url, body) {
  const response = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify(body) });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function loadOptions() {
  options = await (await fetch("api/options")).json();
  for (const m of options.methods) {
    const option = new Option(m.name, m.name, false, m.name === options.default_method);
    option.title = m.summary;
    $("method").add(option);
  }
  $("method").add(new Option("none (full cache, quantizer only)", "none"));
  for (const q of options.quantizers) $("quantizer").add(new Option(q, q));
  $("ratio").value = options.default_ratio;
  showSummary();
}

function showSummary() {
  const m = options.methods.find((m) => m.name === $("method").value);
  $("method-summary").textContent = m ? `${m.class}: ${m.summary}` : "Nothing evicted.";
}

// kept shares: for "all", per layer and token the share of its heads; for one layer, per head 0 or 1
function rows(view) {
  if (view === "all") {
    return result.kept.map((heads) => {
      const counts = new Float32Array(result.tokens.length);
      for (const head of heads) for (let t = 0; t < head.length; t++) if (head[t] === "1") counts[t] += 1;
      return counts.map((c) => c / heads.length);
    });
  }
  return result.kept[Number(view)].map((head) => Float32Array.from(head, (c) => (c === "1" ? 1 : 0)));
}

function drawGrid(grid) {
  const canvas = $("grid"), n = result.tokens.length;
  canvas.width = Math.min(n, 2000);
  canvas.height = Math.max(grid.length * (grid.length > 8 ? 8 : 24), 24);
  const g = canvas.getContext("2d"), w = canvas.width / n, h = canvas.height / grid.length;
  g.clearRect(0, 0, canvas.width, canvas.height);
  grid.forEach((row, r) => row.forEach((share, t) => {
    g.fillStyle = colour(share);
    g.fillRect(t * w, r * h, Math.max(w, 1), h);
  }));
  $("grid-caption").textContent = $("view").value === "all"
    ? `rows: ${grid.length} layers, columns: ${n} tokens` : `rows: ${grid.length} KV heads of layer ${$("view").value}`;
}

function drawText(grid) {
  const shares = result.tokens.map((_, t) => grid.reduce((sum, row) => sum + row[t], 0) / grid.length);
  const box = $("heatmap");
  box.replaceChildren();
  const fragment = document.createDocumentFragment();
  result.tokens.forEach((token, t) => {
    const span = document.createElement("span");
    span.className = "tok" + (token.special ? " special" : "");
    span.textContent = token.text;
    span.style.background = colour(shares[t]);
    span.title = `token ${t}: kept in ${Math.round(100 * shares[t])}% of the ${
      $("view").value === "all" ? "layers' heads" : "layer's heads"}`;
    fragment.appendChild(span);
  });
  box.appendChild(fragment);
}

function redraw() {
  const grid = rows($("view").value);
  drawGrid(grid);
  drawText(grid);
}

function showResult(data) {
  result = data;
  const share = data.bytes.compressed / data.bytes.full;
  $("bytes").textContent = `${megabytes(data.bytes.compressed)} held by ${data.method}` +
    (data.quantizer ? ` + ${data.quantizer.name}-${data.quantizer.bits}` : "") +
    ` against ${megabytes(data.bytes.full)} for the full cache: ${Math.round(100 * share)}%` +
    ` (${Math.round(100 * data.kept_share)}% of the tokens x heads kept, ${data.tokens.length} tokens)`;
  $("bytes-bar").style.width = `${Math.min(100, 100 * share)}%`;
  const view = $("view");
  view.replaceChildren(new Option("all layers (share of each layer's heads)", "all"));
  for (let layer = 0; layer < data.layers; layer++) view.add(new Option(`layer ${layer}, by heads`, String(layer)));
  $("compressed-title").textContent = data.method + (data.quantizer ? ` + ${data.quantizer.name}` : "");
  for (const id of ["result", "kept-panel", "ask-panel"]) $(id).classList.remove("hidden");
  redraw();
}

async function compress() {
  $("compress").disabled = true;
  status("Compressing (prefill, compression, and a full-cache prefill to compare with)…");
  try {
    const response = await postJSON("api/compress", {
      text: $("document").value, method: $("method").value, ratio: Number($("ratio").value),
      quantizer: $("quantizer").value || null });
    const data = await response.json();
    showResult(data);
    status(`Compressed in ${data.seconds.toFixed(1)} s.`);
  } catch (error) {
    status(error.message, true);
  } finally {
    $("compress").disabled = false;
  }
}

async function ask() {
  if (!result) return;
  $("ask").disabled = true;
  $("answers").classList.remove("hidden");
  for (const side of ["full", "compressed"]) {
    $(`answer-${side}`).classList.remove("done");
    $(`answer-${side}`).querySelector(".text").textContent = "";
  }
  try {
    const response = await postJSON("api/ask", { id: result.id, question: $("question").value,
                                                 max_new_tokens: Number($("max-new-tokens").value) });
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data: ")) continue;
        const event = JSON.parse(line.slice(6));
        const box = $(`answer-${event.side}`);
        if (event.text) box.querySelector(".text").textContent += event.text;
        if (event.error) box.querySelector(".text").textContent += ` [error: ${event.error}]`;
        if (event.done) { box.classList.add("done"); box.title = `${event.seconds} s`; }
      }
    }
  } catch (error) {
    status(error.message, true);
  } finally {
    $("ask").disabled = false;
  }
}

$("demo").addEventListener("click", () => { $("document").value = options.demo_document; });
$("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (file) $("document").value = await file.text();
});
$("method").addEventListener("change", showSummary);
$("view").addEventListener("change", redraw);
$("compress").addEventListener("click", compress);
$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (event) => { if (event.key === "Enter") ask(); });
loadOptions().catch((error) => status(`cannot load the options: ${error.message}`, true));
