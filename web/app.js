// smtpd's live view. Everything the server sends is put into the page as text
// (textContent, attributes), never as markup: HELO names, addresses and subjects come
// from the wire.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const MAX_LINES = 400;          // dialogue lines kept per session, as the server keeps
const MARKERS_PER_ROW = 6;
const MARKER_GAP = 13;
const HIGHLIGHT_MS = 4000;      // how long a move stays highlighted on the diagram

const view = {
  sessions: new Map(),          // id -> {info, lines: Map n -> line}
  history: [],                  // session infos, newest first
  followed: null,               // the id of the session whose dialogue is shown
  queueOffset: 0,               // server clock - this clock, in seconds
  mailbox: null,                // [domain, user] shown
  mailboxRequests: 0,           // loadMailboxes calls so far
};

function $(id) { return document.getElementById(id); }

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

function moveText(move) { return move ? `${move.from} \u2192 ${move.to} (${move.verb})` : ""; }

// --- the event stream ---------------------------------------------------------------

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("open", () => setStatus("live"));
  source.addEventListener("error", () => setStatus("reconnecting"));
  source.addEventListener("snapshot", (event) => snapshot(JSON.parse(event.data)));
  source.addEventListener("opened", (event) => opened(JSON.parse(event.data).session));
  source.addEventListener("line", (event) => {
    const data = JSON.parse(event.data);
    addLine(data.session, data.line);
  });
  source.addEventListener("closed", (event) => closed(JSON.parse(event.data).session));
  source.addEventListener("queue", (event) => renderQueue(JSON.parse(event.data)));
  source.addEventListener("mailbox", () => loadMailboxes());
}

function setStatus(text) {
  const status = $("status");
  status.textContent = text;
  status.dataset.status = text;
}

function snapshot(data) {
  const kept = view.sessions;
  view.sessions = new Map();
  for (const info of data.live) {
    const old = kept.get(info.id);
    view.sessions.set(info.id, {info, lines: old ? old.lines : new Map()});
  }
  view.history = data.history;
  renderQueue(data.queue);
  renderSessions();
  if (view.followed) follow(view.followed);
}

function opened(info) {
  if (!view.sessions.has(info.id)) view.sessions.set(info.id, {info, lines: new Map()});
  highlight("", "START");
  renderSessions();
}

function addLine(info, line) {
  let entry = view.sessions.get(info.id);
  if (!entry) {
    entry = {info, lines: new Map()};
    view.sessions.set(info.id, entry);
  }
  entry.info = info;
  entry.lines.set(line.n, line);
  if (entry.lines.size > MAX_LINES) entry.lines.delete(entry.lines.keys().next().value);
  if (line.move) highlight(line.move.from, line.move.to, info.id);
  renderSessions();
  if (view.followed === info.id) appendLine(line);
}

function closed(info) {
  const entry = view.sessions.get(info.id);
  view.sessions.delete(info.id);
  view.history.unshift(info);
  view.history = view.history.slice(0, 20);
  if (entry) view.finishedLines = Object.assign(view.finishedLines || {}, {[info.id]: entry});
  renderSessions();
  if (view.followed === info.id) $("followed").textContent = `[${info.id}] (finished)`;
}

// --- the diagram ------------------------------------------------------------------

function renderDiagram() {
  const byState = new Map();
  for (const {info} of view.sessions.values()) {
    if (!byState.has(info.state)) byState.set(info.state, []);
    byState.get(info.state).push(info);
  }
  for (const group of document.querySelectorAll("#fsm g.state")) {
    const here = byState.get(group.dataset.state) || [];
    group.querySelector("text.count").textContent = String(here.length);
    group.classList.toggle("occupied", here.length > 0);
    const markers = group.querySelector("g.markers");
    clear(markers);
    here.forEach((info, index) => markers.appendChild(marker(markers, info, index)));
  }
}

function marker(markers, info, index) {
  const dot = document.createElementNS(SVG, "circle");
  const x = Number(markers.dataset.x) + (index % MARKERS_PER_ROW) * MARKER_GAP;
  const y = Number(markers.dataset.y) + Math.floor(index / MARKERS_PER_ROW) * MARKER_GAP;
  dot.setAttribute("cx", String(x));
  dot.setAttribute("cy", String(y));
  dot.setAttribute("r", "5.5");
  dot.setAttribute("class", "marker" + (info.id === view.followed ? " followed" : ""));
  dot.dataset.session = info.id;
  const title = document.createElementNS(SVG, "title");
  title.textContent = `[${info.id}] ${info.peer} ${info.helo || ""}`;
  dot.appendChild(title);
  dot.addEventListener("click", () => follow(info.id));
  return dot;
}

function highlight(from, to, sessionId) {
  const selector = `#fsm g.edge[data-from="${CSS.escape(from)}"][data-to="${CSS.escape(to)}"]`;
  for (const edge of document.querySelectorAll(selector)) {
    edge.classList.add("taken");
    if (sessionId && sessionId === view.followed) {
      for (const old of document.querySelectorAll("#fsm g.edge.followed")) {
        old.classList.remove("followed");
      }
      edge.classList.add("followed");
    }
    clearTimeout(edge.fadeTimer);
    edge.fadeTimer = setTimeout(() => edge.classList.remove("taken"), HIGHLIGHT_MS);
  }
}

// --- the sessions -----------------------------------------------------------------

function renderSessions() {
  renderDiagram();
  const live = $("live-sessions");
  clear(live);
  for (const {info} of view.sessions.values()) live.appendChild(sessionRow(info, info.state));
  $("no-sessions").hidden = view.sessions.size > 0;
  const finished = $("finished-sessions");
  clear(finished);
  for (const info of view.history) finished.appendChild(sessionRow(info, info.state));
}

function sessionRow(info, state) {
  const row = element("tr");
  row.dataset.session = info.id;
  if (info.id === view.followed) row.className = "followed";
  for (const text of [info.id, info.peer, info.helo || "", state, moveText(info.move)]) {
    row.appendChild(element("td", text));
  }
  row.addEventListener("click", () => follow(info.id));
  return row;
}

async function follow(id) {
  view.followed = id;
  $("followed").textContent = `[${id}]`;
  $("dialogue-hint").hidden = true;
  renderSessions();
  const response = await fetch(`/api/sessions/${encodeURIComponent(id)}`);
  if (view.followed !== id) return;
  const entry = view.sessions.get(id) || (view.finishedLines || {})[id] ||
    {info: null, lines: new Map()};
  if (response.ok) {
    const data = await response.json();
    for (const line of data.lines) entry.lines.set(line.n, line);
    if (!data.closed && !view.sessions.has(id)) view.sessions.set(id, {info: data, lines: entry.lines});
    if (data.closed) $("followed").textContent = `[${id}] (finished)`;
  }
  const list = $("dialogue-lines");
  clear(list);
  [...entry.lines.values()].sort((a, b) => a.n - b.n).forEach(appendLine);
}

function appendLine(line) {
  const list = $("dialogue-lines");
  if (list.querySelector(`li[data-n="${line.n}"]`)) return;
  const item = element("li", null, "line " + directionClass(line.dir));
  item.dataset.n = String(line.n);
  for (const text of line.text) {
    item.appendChild(element("div", `${line.dir} ${text}`, "wire"));
  }
  if (line.move || line.rfc) {
    const note = element("div", null, "note");
    if (line.move) note.appendChild(element("span", moveText(line.move), "move"));
    if (line.rfc) note.appendChild(element("span", line.rfc, "rfc"));
    if (line.explain) note.appendChild(element("span", line.explain, "explain"));
    item.appendChild(note);
  }
  list.appendChild(item);
  while (list.children.length > MAX_LINES) list.removeChild(list.firstChild);
  item.scrollIntoView({block: "nearest"});
}

function directionClass(dir) {
  return {"<-": "received", "->": "sent", "=>": "moved", "..": "noted"}[dir] || "noted";
}

// --- the queue --------------------------------------------------------------------

function renderQueue(data) {
  view.queueOffset = data.now - Date.now() / 1000;
  const rows = $("queue-rows");
  clear(rows);
  for (const message of data.messages) rows.appendChild(queueRow(message, data.now));
  $("queue-empty").hidden = data.messages.length > 0;
  $("queue-listing").textContent = data.listing.join("\n");
  tick();
}

function queueRow(message, now) {
  const row = element("tr");
  row.dataset.queueId = message.queue_id;
  row.appendChild(element("td", message.queue_id, "mono"));
  row.appendChild(element("td", message.created ? age(now - message.created) : ""));
  row.appendChild(element("td", message.size === undefined ? "" : `${message.size} octets`));
  row.appendChild(element("td", message.sender === undefined ? "" : `<${message.sender}>`));
  const cell = element("td");
  if (message.problem) cell.appendChild(element("div", message.problem, "problem"));
  for (const recipient of message.recipients) cell.appendChild(recipientLine(recipient));
  if (message.notices) cell.appendChild(element("div", message.notices, "problem"));
  row.appendChild(cell);
  const action = element("td");
  const button = element("button", "Deliver now");
  button.type = "button";
  button.className = "flush-one";
  button.addEventListener("click", () => flush(message.queue_id));
  action.appendChild(button);
  row.appendChild(action);
  return row;
}

function recipientLine(recipient) {
  const line = element("div", null, "recipient " + recipient.status);
  line.appendChild(element("span", `<${recipient.address}> `, "mono"));
  line.appendChild(element("span", recipient.status, "status"));
  line.appendChild(element("span", `, ${recipient.attempts} attempt(s)`));
  if (recipient.status === "pending") {
    const due = element("span", "", "countdown");
    due.dataset.due = String(recipient.next_attempt);
    line.appendChild(due);
  }
  if (recipient.last_error) line.appendChild(element("div", recipient.last_error, "error"));
  return line;
}

function tick() {
  const now = Date.now() / 1000 + view.queueOffset;
  for (const due of document.querySelectorAll(".countdown")) {
    const wait = Number(due.dataset.due) - now;
    due.textContent = wait > 0 ? `, next attempt in ${age(wait)}` : ", due now";
  }
}

function age(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 120) return `${seconds}s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
  return `${Math.round(seconds / 3600)}h`;
}

async function flush(queueId) {
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const body = queueId ? {queue_id: queueId} : {};
  await fetch("/api/queue/flush", {
    method: "POST",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": token},
    body: JSON.stringify(body),
  });
}

// --- the mailboxes ----------------------------------------------------------------

async function loadMailboxes() {
  const asked = ++view.mailboxRequests;     // an older answer arriving late is dropped
  const response = await fetch("/api/mailboxes");
  if (!response.ok || asked !== view.mailboxRequests) return;
  const data = await response.json();
  if (asked !== view.mailboxRequests) return;
  const list = $("mailbox-list");
  clear(list);
  for (const box of data.mailboxes) {
    const item = element("li");
    const link = element("a", `${box.user}@${box.domain}`);
    link.href = "#mailboxes";
    link.dataset.mailbox = `${box.user}@${box.domain}`;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      openMailbox(box.domain, box.user);
    });
    item.appendChild(link);
    item.appendChild(element("span", ` ${box.messages}`, "count"));
    list.appendChild(item);
  }
  if (view.mailbox) openMailbox(...view.mailbox);
}

async function openMailbox(domain, user) {
  view.mailbox = [domain, user];
  const response = await fetch(`/api/mailboxes/${encodeURIComponent(domain)}/` +
                               `${encodeURIComponent(user)}`);
  if (!response.ok) return;
  const data = await response.json();
  $("mailbox-title").textContent = `${user}@${domain}`;
  const rows = $("message-rows");
  clear(rows);
  for (const message of data.messages) {
    const row = element("tr");
    row.dataset.message = message.id;
    row.appendChild(element("td", message.date || message.received_text));
    row.appendChild(element("td", message.sender));
    row.appendChild(element("td", message.subject || "(no subject)"));
    row.appendChild(element("td", `${message.size} octets`));
    row.addEventListener("click", () => openMessage(domain, user, message.id));
    rows.appendChild(row);
  }
}

async function openMessage(domain, user, id) {
  const path = [domain, user, id].map(encodeURIComponent).join("/");
  const response = await fetch(`/api/mailboxes/${path}`);
  if (!response.ok) return;
  const data = await response.json();
  $("message-view").hidden = false;
  $("message-title").textContent = data.summary.subject || "(no subject)";
  const headers = $("message-headers");
  clear(headers);
  for (const [name, value] of data.headers) {
    const row = element("tr");
    row.appendChild(element("th", name));
    row.appendChild(element("td", value));
    headers.appendChild(row);
  }
  $("message-source").textContent = data.source + (data.truncated ? "\n[\u2026 cut short]" : "");
}

// --- start ------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("flush-all").addEventListener("click", () => flush(null));
  setInterval(tick, 1000);
  connect();
  loadMailboxes();
});
