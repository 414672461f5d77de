// lorakit dashboard: one page, views chosen by the URL's #fragment, data from /api (see ui/dashboard.py).
"use strict";

const COLORS = ["#4477aa", "#cc3311", "#228833", "#aa3377", "#ee7733", "#009988", "#666666", "#bbbb00"];
const X_AXES = { step: "optimizer step", epoch: "epoch", tokens: "tokens seen" };
let timers = [];
let xAxis = "step";

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

function headers(extra) {
  const key = sessionStorage.getItem("lorakit-key");
  return Object.assign({}, extra || {}, key ? { Authorization: "Bearer " + key } : {});
}

async function api(path, body) {
  const opts = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  if (r.status === 401) {
    document.getElementById("keybar").hidden = false;
    throw new Error("API key required");
  }
  const data = await r.json();
  if (!r.ok) throw new Error(typeof data.error === "string" ? data.error : (data.error || {}).message || r.statusText);
  return data;
}

function every(ms, fn) {
  fn();
  timers.push(setInterval(fn, ms));
}

const num = (v, digits) => (v === null || v === undefined ? "–" : typeof v === "number" ? +v.toFixed(digits ?? 4) + "" : v);

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

const statusBadge = (s) => el("span", { class: "status " + s, "data-status": s }, s);
const runLink = (r) => el("a", { href: "#/run/" + encodeURIComponent(r.id) }, r.id);
const notesList = (notes) => (notes && notes.length ? el("ul", { class: "notes" }, notes.map((n) => el("li", {}, n))) : null);

function table(head, rows, attrs) {
  return el("table", attrs || {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

// ------------------------------------------------------------------ curves

function xOf(row) {
  if (xAxis === "epoch") return row.epoch;
  if (xAxis === "tokens") return row.num_input_tokens_seen;
  return row.step;
}

// The four charts of one or more runs; feed() adds rows as they arrive, per run.
function curveCharts(container) {
  const specs = [
    ["loss", "loss (supervised tokens)", [["loss", "train loss", false], ["eval_loss", "validation loss", true]]],
    ["learning_rate", "learning rate", [["learning_rate", "learning rate", false]]],
    ["tokens_per_second", "tokens/s", [["tokens_per_second", "tokens/s", false]]],
  ];
  const charts = specs.map(([id, label, keys]) => {
    const box = el("div", { class: "chart-box", id: "chart-" + id }, el("h4", {}, label));
    container.appendChild(box);
    return { chart: lineChart(box, { xLabel: X_AXES[xAxis], yLabel: label }), keys };
  });
  const runs = new Map(); // id -> rows
  function redraw() {
    const ids = [...runs.keys()];
    for (const { chart, keys } of charts) {
      const series = [];
      ids.forEach((id, i) => {
        const rows = runs.get(id).filter((r) => !r.summary);
        for (const [key, name, isEval] of keys) {
          const points = rows.filter((r) => typeof r[key] === "number" && typeof xOf(r) === "number").map((r) => [xOf(r), r[key]]);
          if (!points.length && isEval) continue;
          series.push({
            name: ids.length > 1 ? `${id} ${name}` : name,
            color: ids.length > 1 ? COLORS[i % COLORS.length] : COLORS[isEval ? 1 : 0],
            dash: isEval && ids.length > 1, dots: isEval, points,
          });
        }
      });
      chart.draw(series);
    }
  }
  return {
    feed(id, rows) {
      if (!runs.has(id)) runs.set(id, []);
      runs.get(id).push(...rows);
      redraw();
    },
  };
}

// Polls metrics.jsonl of a run from the byte offset reached so far.
function followMetrics(id, charts) {
  let offset = 0;
  every(1000, async () => {
    try {
      const m = await api(`/api/metrics?id=${encodeURIComponent(id)}&offset=${offset}`);
      if (m.offset !== offset || offset === 0) {
        offset = m.offset;
        charts.feed(id, m.rows);
      }
    } catch (e) { /* shown by the next successful poll */ }
  });
}

function axisPicker(onChange) {
  const select = el("select", { id: "x-axis", onchange: (e) => { xAxis = e.target.value; onChange(); } },
    Object.entries(X_AXES).map(([k, label]) => el("option", { value: k, selected: k === xAxis }, "by " + label)));
  return el("label", {}, "x axis ", select);
}

// ------------------------------------------------------------------ views

async function viewRuns(main) {
  const selected = new Set();
  const compare = el("button", { id: "compare-selected", class: "primary", disabled: true, onclick: () => {
    location.hash = "#/compare/" + [...selected].map(encodeURIComponent).join(",");
  } }, "Compare selected");
  const body = el("tbody", { id: "runs-body" });
  main.append(el("h2", {}, "Runs"), el("div", { class: "toolbar" }, compare, el("a", { href: "#/new" }, "New run")),
    el("table", { id: "runs" }, el("thead", {}, el("tr", {}, ["", "run", "status", "base model", "settings",
      "steps", "best val loss", "last loss", "tokens/s", "duration", "notes"].map((h) => el("th", {}, h)))), body));
  every(2000, async () => {
    const data = await api("/api/runs");
    document.getElementById("root").textContent = data.root;
    body.textContent = "";
    for (const r of data.runs) {
      const box = el("input", { type: "checkbox", "data-run": r.id, checked: selected.has(r.id), onchange: (e) => {
        e.target.checked ? selected.add(r.id) : selected.delete(r.id);
        compare.disabled = selected.size < 2;
      } });
      const s = r.settings;
      const settings = [s.lora_r !== undefined ? `r=${s.lora_r}` : null, s.learning_rate !== undefined ? `lr=${s.learning_rate}` : null,
        s.batch_size !== undefined ? `batch ${s.batch_size}x${s.gradient_accumulation_steps}` : null,
        s.max_steps ? `${s.max_steps} steps` : s.num_epochs !== undefined ? `${s.num_epochs} epochs` : null].filter(Boolean).join(", ");
      body.append(el("tr", { "data-run": r.id, "data-status": r.status }, el("td", {}, box), el("td", {}, runLink(r), r.group ? el("div", { class: "note" }, "sweep " + r.group) : null),
        el("td", {}, statusBadge(r.status)), el("td", {}, r.base_model), el("td", {}, settings),
        el("td", { class: "num" }, num(r.steps)), el("td", { class: "num" }, num(r.best_eval_loss)),
        el("td", { class: "num" }, num(r.last_loss)), el("td", { class: "num" }, num(r.tokens_per_second, 1)),
        el("td", { class: "num" }, duration(r.duration_s)), el("td", { class: "note" }, r.notes.join("; "))));
    }
    if (!data.runs.length) body.append(el("tr", {}, el("td", { colspan: 11 }, "No run in this directory yet.")));
  });
}

function evalTable(reports, names) {
  // One column per report (and per base/tuned inside it), one row per metric.
  const cols = [];
  reports.forEach((rep, i) => {
    for (const label of ["base", "tuned"]) if (rep && rep[label]) cols.push([names[i] + (reports.length > 1 || rep.base ? " " + label : ""), rep[label]]);
  });
  if (!cols.length) return el("p", {}, "No eval report.");
  const metrics = Object.keys(cols[0][1]).filter((k) => typeof cols[0][1][k] === "number");
  return table(["metric", ...cols.map((c) => c[0])],
    metrics.map((m) => el("tr", {}, el("td", {}, m), cols.map((c) => el("td", { class: "num" }, num(c[1][m]))))),
    { class: "eval" });
}

function failureCard(f) {
  return el("div", { class: "failure" }, el("div", { class: "label" }, `${f.source} · ${f.why} · loss ${num(f.loss)} · F1 ${num(f.token_f1)}`),
    el("div", {}, el("span", { class: "label" }, "prompt: "), f.prompt),
    el("div", {}, el("span", { class: "label" }, "reference: "), f.reference),
    el("div", {}, el("span", { class: "label" }, "answer: "), f.answer));
}

function histogram(lengths, maxLen) {
  const box = el("div", { class: "chart-box" }, el("h4", {}, "token lengths (rows per bin)"));
  const bins = 20, hi = Math.max(...lengths, 1), width = Math.ceil(hi / bins) || 1;
  const counts = new Array(bins).fill(0);
  for (const n of lengths) counts[Math.min(Math.floor(n / width), bins - 1)]++;
  const chart = lineChart(box, { xLabel: "tokens", yLabel: "rows" });
  chart.draw([{ name: "rows", color: COLORS[0], dots: true, points: counts.map((c, i) => [i * width + width / 2, c]) }]);
  return box;
}

function dataCheckSection(d) {
  if (!d) return el("p", {}, "No data check report (write one with `lorakit data check --output RUN/data_check.json`).");
  if (!d.lengths) return notesList(d.notes);
  const pct = d.length_percentiles || {};
  const parts = [el("p", {}, `${d.rows} rows (${d.train_rows} train / ${d.validation_rows} validation), ${d.tokens} tokens, `,
    el("strong", {}, `${(100 * d.supervised_fraction).toFixed(1)}% supervised`), "; lengths " +
    Object.entries(pct).map(([k, v]) => `${k} ${v}`).join(", ")), histogram(d.lengths)];
  for (const p of d.preview || []) {
    parts.push(el("div", { class: "failure mask" }, el("div", { class: "label" }, p.source + " (supervised tokens highlighted)"),
      p.pieces.map(([text, sup]) => el("span", { class: sup ? "sup" : "ctx" }, text))));
  }
  return el("div", {}, parts);
}

async function viewRun(main, id) {
  const d = await api("/api/run?id=" + encodeURIComponent(id));
  const s = d.summary;
  const charts = el("div", { class: "charts", id: "charts" });
  const rerender = () => { timers.forEach(clearInterval); timers = []; route(); };
  main.append(el("h2", {}, s.id, " ", statusBadge(s.status)), notesList(s.notes),
    el("p", {}, `base ${s.base_model} · ${num(s.steps)} steps · best val loss ${num(s.best_eval_loss)} · ${num(s.tokens_per_second, 1)} tokens/s · ${duration(s.duration_s)}`),
    el("div", { class: "toolbar" }, axisPicker(rerender), el("a", { href: "#/chat/" + encodeURIComponent(s.id) }, "Chat with this run")),
    charts);
  followMetrics(id, curveCharts(charts));
  main.append(el("h3", {}, "Eval"));
  if (!d.evals.length) main.append(el("p", {}, "No eval report (`lorakit eval --adapter RUN --output_dir RUN/eval`)."));
  for (const rep of d.evals) {
    main.append(el("h4", {}, rep.where === "." ? "eval.json" : rep.where + "/eval.json"), notesList(rep.notes), evalTable([rep], [""]));
    if (rep.failures && rep.failures.length) main.append(el("h4", {}, "Failures"), rep.failures.map(failureCard));
  }
  main.append(el("h3", {}, "Data"), dataCheckSection(d.data_check));
  main.append(el("h3", {}, "Settings"), notesList(d.settings_notes),
    table(["key", "value"], Object.entries(d.settings).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, JSON.stringify(v))))));
  if (d.checkpoints.length) main.append(el("p", {}, "checkpoints: " + d.checkpoints.join(", ")));
}

async function viewCompare(main, arg) {
  const ids = (arg || "").split(",").filter(Boolean).map(decodeURIComponent);
  if (ids.length < 2) {
    main.append(el("h2", {}, "Compare"), el("p", {}, "Tick two or more runs in the ", el("a", { href: "#/runs" }, "runs list"), " and press Compare selected."));
    return;
  }
  const d = await api("/api/compare?" + ids.map((i) => "id=" + encodeURIComponent(i)).join("&"));
  const charts = el("div", { class: "charts", id: "charts" });
  const rerender = () => { timers.forEach(clearInterval); timers = []; route(); };
  main.append(el("h2", {}, "Compare ", ids.length, " runs"),
    el("p", {}, d.runs.map((r, i) => el("span", { style: `color:${COLORS[i % COLORS.length]}; margin-right:1em` }, "■ ", r.id, " ", statusBadge(r.status)))),
    el("div", { class: "toolbar" }, axisPicker(rerender)), charts);
  const curves = curveCharts(charts);
  ids.forEach((id) => followMetrics(id, curves));
  const keys = Object.keys(d.diff);
  main.append(el("h3", {}, `Settings that differ (${keys.length}; output_dir aside)`),
    keys.length ? table(["key", ...ids], keys.map((k) => el("tr", { class: "diff-row", "data-key": k }, el("td", {}, k),
      d.diff[k].map((v) => el("td", {}, v === null ? "–" : JSON.stringify(v))))), { id: "diff" })
      : el("p", { id: "diff" }, "The runs have the same settings."));
  main.append(el("h3", {}, "Eval"), evalTable(d.evals.map((reps) => reps[0]), ids));
  if (d.evals.some((reps) => reps[0] && reps[0].failures && reps[0].failures.length)) {
    main.append(el("h3", {}, "Failures"), el("div", { class: "side" }, d.evals.map((reps, i) =>
      el("div", {}, el("h4", {}, ids[i]), ((reps[0] || {}).failures || []).map(failureCard)))));
  }
}

async function viewChat(main, arg) {
  const runs = (await api("/api/runs")).runs;
  const pick = el("select", { id: "chat-run" }, runs.map((r) => el("option", { value: r.id, selected: r.id === decodeURIComponent(arg || "") },
    `${r.id} (${r.has_adapter ? "adapter" : "base only"}, ${r.status})`)));
  const model = el("select", { id: "chat-model" }, el("option", { value: "adapter" }, "the run's adapter"), el("option", { value: "base" }, "its base model"));
  const temperature = el("input", { id: "chat-temperature", type: "number", step: "0.1", min: "0", max: "2", value: "0.3", style: "width:5em" });
  const maxTokens = el("input", { id: "chat-max-tokens", type: "number", min: "1", value: "256", style: "width:6em" });
  const log = el("div", { id: "chat-log" });
  const input = el("textarea", { id: "chat-input", rows: 3, placeholder: "Message (Enter sends, Shift+Enter for a new line)" });
  const send = el("button", { id: "chat-send", class: "primary" }, "Send");
  let messages = [];
  const reset = () => { messages = []; log.textContent = ""; };
  pick.onchange = reset;
  main.append(el("div", { class: "chat" }, el("h2", {}, "Chat"),
    el("div", { class: "toolbar" }, "run ", pick, " model ", model, " temperature ", temperature, " max tokens ", maxTokens,
      el("button", { onclick: reset }, "New conversation")),
    el("p", { class: "note" }, "The first message loads the model (same engine as lorakit serve); answers stream in."),
    log, input, el("div", { class: "toolbar" }, send)));
  async function ask() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    messages.push({ role: "user", content: text });
    log.append(el("div", { class: "msg user" }, text));
    const answer = el("div", { class: "msg assistant", "data-chunks": "0", "data-done": "false" });
    log.append(answer);
    send.disabled = true;
    try {
      const body = { model: model.value === "adapter" && !runs.find((r) => r.id === pick.value)?.has_adapter ? "base" : model.value,
        messages, stream: true, temperature: +temperature.value, max_tokens: +maxTokens.value };
      const r = await fetch("/chat/v1/chat/completions?run=" + encodeURIComponent(pick.value),
        { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
      if (!r.ok) throw new Error(((await r.json()).error || {}).message || r.statusText);
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "", chunks = 0;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut).replace(/^data: /, "");
          buffer = buffer.slice(cut + 2);
          if (event === "[DONE]") continue;
          const obj = JSON.parse(event);
          if (obj.error) throw new Error(obj.error.message);
          const delta = (obj.choices[0] || {}).delta || {};
          if (delta.content) {
            answer.append(delta.content);
            answer.setAttribute("data-chunks", ++chunks);
          }
        }
      }
      messages.push({ role: "assistant", content: answer.textContent });
    } catch (e) {
      answer.append(el("span", { class: "error" }, String(e.message || e)));
    } finally {
      answer.setAttribute("data-done", "true");
      send.disabled = false;
    }
  }
  send.onclick = ask;
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); } });
}

function fieldInput(f, outputDir) {
  const value = f.name === "output_dir" ? outputDir : f.default;
  if (f.type === "bool") return el("input", { type: "checkbox", name: f.name, checked: !!value });
  if (f.choices) return el("select", { name: f.name }, f.choices.map((c) => el("option", { value: c, selected: c === value }, c)));
  const shown = value === null ? "" : Array.isArray(value) ? value.join(" ") : String(value);
  return el("input", { type: "text", name: f.name, value: shown, placeholder: value === null ? "unset" : "" });
}

async function viewNew(main) {
  const form = await api("/api/form");
  const grid = el("div", { class: "form", id: "train-form" });
  for (const f of form.fields) {
    if (f.name === "gpu") grid.append(el("h3", { style: "grid-column: 1 / -1" }, "Plan for a GPU (optional)"));
    grid.append(el("label", { for: "f-" + f.name }, f.name), Object.assign(fieldInput(f, form.output_dir), { id: "f-" + f.name }), el("span", { class: "help" }, f.help));
  }
  function values() {
    const out = {};
    for (const f of form.fields) {
      const input = grid.querySelector(`[name="${f.name}"]`);
      if (f.type === "bool") out[f.name] = input.checked;
      else if (f.default === null && input.value === "") out[f.name] = null;
      else out[f.name] = input.value;
    }
    return out;
  }
  const planOut = el("div", { id: "plan" });
  const start = el("button", { id: "start", class: "primary", disabled: true }, "Start training");
  const planBtn = el("button", { id: "plan-button" }, "Plan");
  const job = el("div", { id: "job" });
  grid.addEventListener("input", () => { start.disabled = true; });
  planBtn.onclick = async () => {
    planOut.textContent = "planning…";
    try {
      const p = await api("/api/plan", values());
      const verdict = p.fits === null ? el("span", { class: "verdict" }, "no GPU given: memory planned for a GPU, not checked against one")
        : el("span", { class: "verdict " + (p.fits ? "fits" : "nofit") }, p.fits ? `fits: ${p.total_gib} GiB of ${p.budget_gib} GiB (${p.gpu})` : `does not fit: ${p.total_gib} GiB of ${p.budget_gib} GiB (${p.gpu})`);
      planOut.textContent = "";
      planOut.append(el("p", {}, verdict), el("p", {}, `${p.model}: ${p.trainable.toLocaleString()} trainable of ${p.total.toLocaleString()} parameters, ${p.precision}, micro-batch ${p.batch}`),
        p.tokens_per_second ? el("p", {}, `~${p.tokens_per_second} tokens/s` + (p.epoch_minutes ? `, one epoch ~${p.epoch_minutes} min` : "")) : null,
        table(["memory", "GiB"], p.memory.map((m) => el("tr", {}, el("td", {}, m.what), el("td", { class: "num" }, m.gib)))),
        el("p", {}, el("code", {}, p.command)));
      start.disabled = false;
    } catch (e) {
      planOut.textContent = "";
      planOut.append(el("p", { class: "error" }, e.message));
    }
  };
  start.onclick = async () => {
    start.disabled = true;
    try { followJob(job, await api("/api/train", values())); } catch (e) { job.append(el("p", { class: "error" }, e.message)); }
  };
  main.append(el("h2", {}, "New run"), el("p", {}, "The fields of lorakit train. Plan first: the planner's answer comes before the run starts."),
    grid, el("div", { class: "toolbar" }, planBtn, start), planOut, job);
}

function followJob(box, j) {
  const out = el("pre", { id: "job-output" });
  const head = el("p", {});
  const stop = el("button", { onclick: () => api(`/api/jobs/${j.number}/stop`, {}) }, "Stop (saves a checkpoint)");
  box.textContent = "";
  box.append(el("h3", {}, "Training"), head, stop, out);
  let offset = 0;
  every(1000, async () => {
    const s = await api(`/api/jobs/${j.number}?offset=${offset}`);
    offset = s.offset;
    out.append(s.output);
    if (s.output) out.scrollTop = out.scrollHeight;
    head.textContent = "";
    head.append(s.running ? "running: " : `exited with code ${s.returncode}: `, el("code", {}, s.command), " ",
      s.run ? el("a", { href: "#/run/" + encodeURIComponent(s.run) }, "follow its curves") : "");
    stop.disabled = !s.running;
  });
}

// ------------------------------------------------------------------ routing

async function route() {
  timers.forEach(clearInterval);
  timers = [];
  const [view, ...rest] = (location.hash.replace(/^#\/?/, "") || "runs").split("/");
  const arg = rest.join("/");
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  const main = document.getElementById("main");
  main.textContent = "";
  const views = { runs: viewRuns, run: (m) => viewRun(m, decodeURIComponent(arg)), compare: (m) => viewCompare(m, arg),
    chat: (m) => viewChat(m, arg), new: viewNew };
  try {
    await (views[view] || viewRuns)(main);
  } catch (e) {
    main.append(el("p", { class: "error" }, String(e.message || e)));
  }
}

// `lorakit dashboard` prints its URL with a per-launch token (?token=...): keep it for this tab
// and take it out of the address bar and the history.
function takeToken() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (!token) return;
  sessionStorage.setItem("lorakit-key", token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
}

takeToken();
document.getElementById("keysave").onclick = () => {
  sessionStorage.setItem("lorakit-key", document.getElementById("key").value);
  document.getElementById("keybar").hidden = true;
  route();
};
window.addEventListener("hashchange", route);
route();
