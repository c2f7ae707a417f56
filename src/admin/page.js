"use strict";
// Everything is built with textContent: addresses, reasons and names come from
// DNS, backends and the config, and are never parsed as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}
function seconds(value) { return value == null ? "" : value < 10 ? value.toFixed(1) + " s" : Math.round(value) + " s"; }
// One word for a backend's state, most important first.
function stateOf(b) {
  if (b.admin_state === "disabled") return "disabled";
  if (b.admin_state === "draining") return b.drained ? "drained" : "draining";
  if (b.ejected_for_seconds != null) return "ejected";
  if (!b.healthy) return "down";
  if (b.circuit === "open" || b.circuit === "half-open") return "circuit-open";
  if (!b.eligible) return "busy";
  if (b.effective_weight < b.weight) return "slow-start";
  return "up";
}
function backendRow(b) {
  const state = stateOf(b);
  const limit = b.max_concurrency == null ? "" : " / " + b.max_concurrency;
  const check = b.active_check ? (b.active_check.last_reason || "no result yet") : "";
  const errors = b.failed_requests > 0 ? el("span", { class: "bad" }, b.failed_requests) : "0";
  return el("tr", { "data-backend": b.address, "data-state": state },
    el("td", {}, b.address),
    el("td", {}, el("span", { class: "state " + state }, state.replace("-", " "))),
    el("td", {}, b.in_flight + limit),
    el("td", {}, b.circuit || ""),
    el("td", {}, check),
    el("td", {}, b.requests),
    el("td", {}, errors),
    el("td", {}, b.weight),
    el("td", { class: "why" }, b.why));
}
function upstreamSection(u) {
  const title = el("h2", {}, u.name, el("small", {}, u.policy));
  if (u.queue_waiting != null) title.append(el("small", {}, "queue: " + u.queue_waiting + " waiting"));
  if (u.discovery) {
    const d = u.discovery;
    const text = d.source + (d.ok ? " (ok)" : " (failing: " + (d.last_failure ? d.last_failure.reason : "no answer yet") + ", keeping " + d.backends + ")");
    title.append(el("small", d.ok ? {} : { class: "bad" }, text));
  }
  const head = el("tr", {}, ...["backend", "state", "in flight", "circuit", "last check", "requests", "errors", "weight", "why"].map(h => el("th", {}, h)));
  const table = el("table", {}, el("thead", {}, head), el("tbody", {}, ...u.backends.map(backendRow)));
  if (u.backends.length === 0) table.append(el("tr", {}, el("td", { colspan: 9 }, "no backends")));
  return el("section", { "data-upstream": u.name }, title, el("div", { class: "scroll" }, table));
}
function render(status) {
  const backends = status.upstreams.flatMap(u => u.backends);
  const down = backends.filter(b => stateOf(b) !== "up").length;
  document.getElementById("summary").textContent =
    "generation " + status.generation + " · " + status.upstreams.length + " upstreams · " +
    backends.length + " backends, " + down + " not up" + (status.draining ? " · DRAINING" : "");
  document.getElementById("upstreams").replaceChildren(...status.upstreams.map(upstreamSection));
}
async function refresh() {
  const error = document.getElementById("error");
  try {
    const response = await fetch("status", { cache: "no-store" });
    if (!response.ok) throw new Error("/status answered " + response.status);
    render(await response.json());
    error.style.display = "none";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    error.textContent = "Cannot refresh: " + e.message + " (showing the last data)";
    error.style.display = "block";
  }
}
refresh();
setInterval(refresh, 2000);
