// jfsync status page: polls /status with the bearer token and updates the page in place.
// No framework, no build step, nothing loaded from elsewhere. Every text from the server is set
// with textContent (item and user names come from Jellyfin servers and are never HTML).
"use strict";

(function () {
  const TOKEN_KEY = "jfsync-status-token";
  const params = new URLSearchParams(window.location.search);
  const POLL_MS = Math.max(100, Number(params.get("poll")) || 3000);

  let token = sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
  let lastOk = null; // Date.now() of the last good answer
  let failingSince = null; // Date.now() when answers stopped
  let lastError = "";
  let snapshot = null;
  let timer = null;
  let busy = false;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.includes("-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    let total = Math.max(0, Math.floor(seconds));
    const d = Math.floor(total / 86400); total -= d * 86400;
    const h = Math.floor(total / 3600); total -= h * 3600;
    const m = Math.floor(total / 60); const s = total - m * 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
    return `${s}s`;
  }

  function since(nowMs, thenMs) {
    return thenMs === null || thenMs === undefined ? "-" : duration((nowMs - thenMs) / 1000);
  }

  function clockTime(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function latency(seconds) {
    return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : duration(seconds);
  }

  // ------------------------------------------------------------------ requests

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  async function request(path, options) {
    const response = await fetch(path, Object.assign({ cache: "no-store", credentials: "omit" }, options));
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    return { status: response.status, body };
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const { status, body } = await request("status", { headers: headers() });
      if (status === 401) {
        askForToken(token ? "The token was refused: enter the status token of this jfsync." : null);
      } else if (status === 200 && body && typeof body === "object") {
        snapshot = body;
        lastOk = Date.now();
        failingSince = null;
        lastError = "";
        $("token-panel").hidden = true;
        $("content").hidden = false;
        $("token-button").hidden = !token;
        render(body);
      } else {
        noAnswer(`HTTP ${status}${body && body.error ? ": " + body.error : ""}`);
      }
    } catch (err) {
      noAnswer("jfsync does not answer");
    }
    freshness();
    timer = setTimeout(poll, POLL_MS);
  }

  function noAnswer(reason) {
    if (failingSince === null) failingSince = Date.now();
    lastError = reason;
  }

  function freshness() {
    const node = $("freshness");
    document.body.classList.toggle("stale", failingSince !== null);
    if (failingSince !== null) {
      node.textContent = `${lastError} (since ${clockTime(failingSince)}); showing what it said last`;
      node.className = "error";
    } else if (lastOk !== null) {
      node.textContent = `updated ${duration((Date.now() - lastOk) / 1000)} ago`;
      node.className = "muted";
    }
  }

  // ------------------------------------------------------------------ token

  function askForToken(reason) {
    $("content").hidden = snapshot === null;
    $("token-panel").hidden = false;
    $("token-button").hidden = true;
    if (reason) $("token-reason").textContent = reason;
    $("summary").textContent = "status token needed";
    $("token-input").focus();
  }

  function saveToken(value, remember) {
    token = value;
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
    if (value) (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, value);
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("token-input");
    saveToken(input.value.trim(), $("token-remember").checked);
    input.value = "";
    poll();
  });

  $("token-button").addEventListener("click", () => {
    saveToken("", false);
    askForToken("Enter the status token of this jfsync.");
  });

  // ------------------------------------------------------------------ actions

  function message(text, bad) {
    const node = $("message");
    node.textContent = text;
    node.className = bad ? "bad" : "";
    node.hidden = false;
  }

  async function act(button, path, options, describe) {
    if (busy) return;
    busy = true;
    button.disabled = true;
    try {
      const { status, body } = await request(path, Object.assign({ method: "POST" }, options));
      if (status === 401) {
        askForToken("The token was refused: enter the status token to do this.");
      } else if (status === 200) {
        message(describe(body), false);
      } else {
        message(`Not done (HTTP ${status}): ${(body && body.error) || "no reason given"}`, true);
      }
    } catch (err) {
      message("Not done: jfsync does not answer.", true);
    } finally {
      busy = false;
      button.disabled = false;
      poll();
    }
  }

  function retryDead(server, button) {
    act(button, `retry-dead?server=${encodeURIComponent(server)}`, { headers: headers() }, (body) => {
      const n = (body && body.revived && body.revived[server]) || 0;
      return `${server}: ${n} dead row${n === 1 ? "" : "s"} revived; they are tried again now.`;
    });
  }

  function decideHold(hold, restore, button) {
    const verb = restore ? "Write the other servers' state back to" : "Take the state of";
    if (!window.confirm(`${verb} ${hold.server} for ${hold.user}?`)) return;
    act(
      button,
      "reset-holds/accept",
      {
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify({ server: hold.server, user: hold.user, restore }),
      },
      (body) => ((body && body.resolved) || []).join("; ") || "Decided.",
    );
  }

  // ------------------------------------------------------------------ rendering

  function render(snap) {
    const now = snap.now_ms;
    $("summary").textContent = `${snap.version} · up ${duration(snap.uptime_s)} · ${snap.servers.length} servers`;
    renderProblems(snap);
    renderServers(snap, now);
    renderHolds(snap, now);
    renderMatching(snap, now);
    renderActivity(snap, now);
  }

  function serverState(server) {
    const users = server.users || [];
    const connected = users.filter((u) => u.state === "connected").length;
    if (!server.reachable) return "down";
    if (users.length > 0 && connected === 0) return "down";
    if (connected < users.length || server.outbox.pause_reason || server.outbox.dead_count) return "warn";
    return "ok";
  }

  function stateText(server, now) {
    const users = server.users || [];
    const outbox = server.outbox;
    if (outbox.down_since_ms !== null && outbox.down_since_ms !== undefined) {
      return `unreachable for ${since(now, outbox.down_since_ms)} (since ${clockTime(outbox.down_since_ms)})`;
    }
    if (!server.reachable) return "not reached yet";
    const lost = users.filter((u) => u.state !== "connected").length;
    if (users.length > 0 && lost === users.length) return "no live connection";
    if (outbox.pause_reason) return "paused: API key refused";
    if (lost) return `${lost} of ${users.length} sockets not connected`;
    if (outbox.dead_count) return `${outbox.dead_count} dead row${outbox.dead_count === 1 ? "" : "s"}`;
    return "up";
  }

  function userName(snap, key) {
    const entry = (snap.activity || []).find((e) => e.user === key);
    return entry ? entry.user_name : key.replace(/^name:/, "");
  }

  function socketClass(state) {
    if (state === "connected") return "ok";
    if (state === "auth_failed" || state === "stopped") return "down";
    return "warn";
  }

  function renderServers(snap, now) {
    const cards = snap.servers.map((server) => {
      const state = serverState(server);
      const outbox = server.outbox;
      const card = el("article", { class: `card ${state}`, "data-server": server.name });
      card.append(
        el("div", { class: "card-head" },
          el("h3", { text: server.name }),
          el("span", { class: `state ${state}`, "data-role": "state", text: stateText(server, now) })),
        el("dl", {},
          el("dt", { text: "Jellyfin" }), el("dd", { text: server.version || "-" }),
          el("dt", { text: "Queued for it" }),
          el("dd", { "data-role": "depth", text: `${outbox.depth}${outbox.oldest_age_s !== null ? ", oldest " + duration(outbox.oldest_age_s) : ""}` }),
          el("dt", { text: "Writes" }),
          el("dd", { text: `${outbox.writes_done} done, ${outbox.writes_skipped} already there, ${outbox.failures} failed, ${outbox.in_flight} under way` })),
      );
      const users = server.users || [];
      if (users.length) {
        const chips = el("ul", { class: "chips", "aria-label": "sockets" });
        for (const user of users) {
          const why = user.pause_reason || (user.state !== "connected" ? user.last_error : null);
          chips.append(el("li", {
            class: `chip ${socketClass(user.state)}`,
            title: why || `connected for ${since(now, user.connected_since_ms)}`,
            text: `${user.user}: ${user.state.replace("_", " ")}`,
          }));
        }
        card.append(chips);
      }
      const error = outbox.pause_reason || (state !== "ok" ? server.last_error || outbox.last_error : null);
      if (error) card.append(el("p", { class: "error", text: error }));
      if (outbox.dead_count) {
        card.append(el("p", { "data-role": "dead", text: `${outbox.dead_count} dead row${outbox.dead_count === 1 ? "" : "s"} (parked, not retried by themselves):` }));
        const list = el("ul", { class: "dead" });
        for (const row of outbox.dead.slice(0, 5)) {
          list.append(el("li", { text: `${userName(snap, row.user)} / ${row.name || row.item}: ${row.reason || "?"}` }));
        }
        if (outbox.dead_count > 5) list.append(el("li", { class: "muted", text: `… and ${outbox.dead_count - 5} more` }));
        const button = el("button", { type: "button", "data-action": "retry-dead", text: "Retry dead rows" });
        button.addEventListener("click", () => retryDead(server.name, button));
        card.append(list, button);
      }
      return card;
    });
    $("servers").replaceChildren(...cards);
  }

  function renderProblems(snap) {
    const items = [];
    for (const server of snap.servers) {
      const outbox = server.outbox;
      if (outbox.pause_reason) items.push(["blocking", `${server.name} is paused: ${outbox.pause_reason}`]);
      if (outbox.dead_count) items.push(["blocking", `${server.name} has ${outbox.dead_count} dead row(s): retry them once the cause is fixed`]);
      if (!server.reachable) items.push(["warning", `${server.name} cannot be reached; writes for it queue (${outbox.depth}) and are delivered when it returns`]);
    }
    for (const hold of (snap.reset_guard && snap.reset_guard.holds) || []) {
      if (!hold.resolution) items.push(["blocking", `${hold.user} on ${hold.server} is held by the reset guard: decide below`]);
    }
    for (const pair of (snap.identity && snap.identity.pairs) || []) {
      if (pair.ambiguous) items.push(["warning", `${pair.ambiguous} item(s) match ambiguously between ${pair.servers.join(" and ")} (not synced)`]);
    }
    for (const target of (snap.alerts && snap.alerts.targets) || []) {
      if (target.failed || target.dropped) items.push(["warning", `alerts to ${target.target}: ${target.failed} not delivered, ${target.dropped} dropped (does it answer?)`]);
    }
    $("problems").hidden = items.length === 0;
    $("problem-list").replaceChildren(...items.map(([kind, text]) => el("li", { class: kind, text })));
  }

  function renderHolds(snap, now) {
    const holds = (snap.reset_guard && snap.reset_guard.holds) || [];
    $("holds-section").hidden = holds.length === 0;
    $("holds").replaceChildren(...holds.map((hold) => {
      const item = el("li", { "data-hold": `${hold.server}/${hold.user}` },
        `${hold.user} on ${hold.server}: ${hold.items} of ${hold.known} items read as never touched, for ${since(now, hold.since_ms)} `);
      if (hold.resolution) {
        item.append(el("span", { class: "muted", text: `(decided: ${hold.resolution}; applied at the user's next catch-up)` }));
      } else {
        const accept = el("button", { type: "button", "data-action": "accept", text: "Accept" });
        const restore = el("button", { type: "button", class: "secondary", "data-action": "restore", text: "Restore" });
        accept.addEventListener("click", () => decideHold(hold, false, accept));
        restore.addEventListener("click", () => decideHold(hold, true, restore));
        item.append(accept, " ", restore);
      }
      return item;
    }));
  }

  function count(value) { return value === null || value === undefined ? "-" : String(value); }

  function renderMatching(snap, now) {
    const pairs = (snap.identity && snap.identity.pairs) || [];
    $("matching").tBodies[0].replaceChildren(...pairs.map((pair) => el("tr", {},
      el("td", { text: pair.servers.join(" ⇄ ") }),
      el("td", { text: count(pair.matched) }),
      el("td", { text: count(pair.unmatched) }),
      el("td", { text: count(pair.ambiguous) }))));
    const reconcile = snap.reconcile || {};
    $("reconcile").textContent = reconcile.last_at_ms === null || reconcile.last_at_ms === undefined
      ? "Last full reconcile: not yet."
      : `Last full reconcile ${since(now, reconcile.last_at_ms)} ago: ${reconcile.last_result || "-"}`;
  }

  function renderActivity(snap, now) {
    const entries = snap.activity || [];
    $("activity-empty").hidden = entries.length > 0;
    $("activity").tBodies[0].replaceChildren(...entries.map((entry) => {
      const delivery = (entry.to || []).map((t) => {
        if (t.state === "written" && t.latency_s !== null) return `${t.server} ${latency(t.latency_s)}`;
        return `${t.server} ${t.state}`;
      }).join("; ");
      return el("tr", { "data-seq": String(entry.seq) },
        el("td", { title: clockTime(entry.at_ms), text: `${since(now, entry.at_ms)} ago` }),
        el("td", { text: entry.user_name || entry.user }),
        el("td", { text: entry.name || entry.item }),
        el("td", { text: `${entry.from || "?"} → ${(entry.to || []).map((t) => t.server).join(", ") || "-"}` }),
        el("td", { text: (entry.registers || []).join(", ").replace("play_state", "played/position") }),
        el("td", { text: delivery || "-" }));
    }));
  }

  setInterval(freshness, 1000);
  poll();
})();
