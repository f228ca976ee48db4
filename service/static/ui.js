// The page at /ui: a user's history, the recommendations with where each score comes from, the
// memories retrieved, and an "interact" button that records an interaction and shows what moved.
// Plain JavaScript, no dependencies; every path is relative, so the page works behind a path prefix.
"use strict";

(() => {
  const N = 10; // recommendations shown
  const HISTORY_SHOWN = 50;
  const FOLLOWS_SHOWN = 3; // recent items named per recommendation (the rest in a tooltip)
  const KEY_STORAGE = "memrec-api-key";
  const state = { info: null, user: null, recs: [], titles: new Map() };
  const $ = (selector) => document.querySelector(selector);

  // ------------------------------------------------------------------------------------------ DOM

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "style") Object.assign(node.style, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children.flat()) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function notice(text, isError = false) {
    const box = $("#notice");
    box.textContent = text;
    box.className = isError ? "error" : "";
    box.hidden = !text;
  }

  function setState(name) {
    document.body.dataset.state = name;
  }

  const fmt = (p) => (p > 0 && p < 0.001 ? p.toExponential(1) : p.toFixed(3));
  const pct = (w) => (w > 0 && w < 0.005 ? "<1%" : `${Math.round(w * 100)}%`);

  // ------------------------------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function detailOf(body, status) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    return `HTTP ${status}`;
  }

  async function api(path, options = {}) {
    const headers = options.body ? { "Content-Type": "application/json" } : {};
    const key = $("#api-key").value.trim();
    if (key) headers["X-API-Key"] = key;
    const response = await fetch(path, { ...options, headers });
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_) {
      body = null;
    }
    if (response.status === 401) {
      $("#api-key").classList.add("needs-key");
      setState("needs-key");
      throw new ApiError(401, "This server needs its API key: type it in the field at the top right.");
    }
    if (!response.ok) throw new ApiError(response.status, detailOf(body, response.status));
    $("#api-key").classList.remove("needs-key");
    return body;
  }

  async function ensureTitles(ids) {
    if (!state.info || state.info.titles === 0) return;
    const missing = [...new Set(ids)].filter((id) => !state.titles.has(id));
    for (let i = 0; i < missing.length; i += 100) {
      const chunk = missing.slice(i, i + 100);
      const query = chunk.map((id) => `ids=${encodeURIComponent(id)}`).join("&");
      const body = await api(`items/titles?${query}`);
      for (const id of chunk) state.titles.set(id, body.titles[id] || null);
    }
  }

  function label(id) {
    const title = state.titles.get(id);
    if (!title) return el("span", { class: "name" }, id);
    return el("span", {}, el("span", { class: "name" }, title), " ", el("code", {}, id));
  }

  // --------------------------------------------------------------------------------------- header

  async function loadInfo() {
    const info = await api("ui/info");
    state.info = info;
    const sources = ["model"];
    if (info.vote) sources.push("memory vote");
    if (info.transitions) sources.push("transitions");
    const fields = {
      model_version: info.model_version,
      dataset: info.dataset || "?",
      k: info.retrieval ? String(info.k) : "0 (encoder only)",
      sources: sources.join(" + "),
      store: `${info.store_backend} · ${info.namespace}`,
      memories: info.memories.toLocaleString(),
    };
    for (const [name, value] of Object.entries(fields)) {
      $(`#info [data-field="${name}"]`).textContent = value;
    }
    $("#docs-link").href = info.docs_url;
    $("#metrics-link").href = info.metrics_url;
    $("#metrics-link").title = info.metrics_require_key ? "needs the API key (send it as X-API-Key)" : "";
  }

  async function loadUsers() {
    const body = await api("users/sample?n=6");
    const chips = $("#user-chips");
    const list = $("#user-suggestions");
    chips.replaceChildren(
      ...body.users.map((user) =>
        el("button", { type: "button", class: "chip user-chip", onclick: () => showUser(user) }, user),
      ),
    );
    list.replaceChildren(...body.users.map((user) => el("option", { value: user })));
  }

  // ------------------------------------------------------------------------------------ rendering

  function renderHistory(items, freshId) {
    $("#history-count").textContent =
      items.length >= HISTORY_SHOWN ? `latest ${items.length}` : `${items.length} items`;
    const rows = items.map((item, i) =>
      el(
        "li",
        { class: i === 0 && item.item_id === freshId ? "fresh" : "", dataset: { item: item.item_id } },
        el("span", { class: "pos" }, i + 1),
        item.title ? el("span", {}, item.title, " ", el("code", {}, item.item_id)) : el("span", {}, item.item_id),
      ),
    );
    if (!rows.length) rows.push(el("li", { class: "hint" }, "no history yet: a cold start (popular items)"));
    $("#history").replaceChildren(...rows);
  }

  function movement(rank, previous) {
    if (!previous) return { cls: "", text: "" };
    const before = previous.get(rank.item);
    if (before === undefined) return { cls: "new", text: "new" };
    if (before > rank.at) return { cls: "up", text: `▲${before - rank.at}` };
    if (before < rank.at) return { cls: "down", text: `▼${rank.at - before}` };
    return { cls: "", text: "" };
  }

  const total = (why) => why.model + why.vote + why.transitions;

  function bar(why, scale) {
    const seg = (name) =>
      el("span", { class: `seg ${name}`, style: { width: `${(100 * why[name]) / scale}%` } });
    return el(
      "div",
      { class: "bar", title: `model ${fmt(why.model)} · vote ${fmt(why.vote)} · transitions ${fmt(why.transitions)}` },
      seg("model"),
      seg("vote"),
      seg("transitions"),
    );
  }

  function parts(why) {
    const shown = [el("b", {}, `p ${fmt(total(why))}`), " = ", el("span", { class: "model" }, `model ${fmt(why.model)}`)];
    for (const name of ["vote", "transitions"]) {
      if (why[name] > 0 || (state.info && state.info[name])) {
        shown.push(" + ", el("span", { class: name }, `${name === "vote" ? "vote" : "transitions"} ${fmt(why[name])}`));
      }
    }
    return el("div", { class: "parts" }, shown);
  }

  function encoderLine(why, rank) {
    const shift = why.encoder_rank - rank;
    const effect = shift > 0 ? `${shift} lower than here` : shift < 0 ? `${-shift} higher than here` : "same place";
    return el(
      "div",
      { class: "encoder-rank" },
      el("span", { class: "label" }, "encoder alone:"),
      el("b", {}, `#${why.encoder_rank}`),
      ` (${effect})`,
    );
  }

  function followsLine(why) {
    if (!why.follows.length) return null;
    const sum = why.follows.reduce((acc, f) => acc + f.weight, 0) || 1; // shares of the item's transitions
    const ranked = [...why.follows].sort((a, b) => b.weight - a.weight);
    const rest = ranked.slice(FOLLOWS_SHOWN);
    return el(
      "div",
      { class: "follows" },
      el("span", { class: "label" }, "follows your"),
      ranked.slice(0, FOLLOWS_SHOWN).map((f) => el("span", { class: "chip follow" }, label(f.item_id), ` ${pct(f.weight / sum)}`)),
      rest.length ? el("span", { class: "label", title: rest.map((f) => `${f.item_id} ${pct(f.weight / sum)}`).join(", ") }, `+${rest.length} more`) : null,
    );
  }

  function supportLine(why, memories) {
    if (!why.memories.length) return null;
    const byId = new Map(memories.map((m) => [m.memory_id, m]));
    return el(
      "div",
      { class: "supports" },
      el("span", { class: "label" }, `${why.memories.length} retrieved ${why.memories.length > 1 ? "memories" : "memory"} led here:`),
      why.memories.map((id) => {
        const m = byId.get(id);
        return el("span", { class: "chip support" }, m ? `${m.user_id} · sim ${m.similarity.toFixed(2)}` : `#${id}`);
      }),
    );
  }

  function explanation(item, rank, scale, body) {
    const why = item.why;
    if (!why) {
      const reason = body.strategy === "popular" ? "popular overall: no history to go on yet" : "no per-item explanation in this answer";
      return el("div", { class: "no-why" }, reason);
    }
    const memories = body.memories || [];
    return el(
      "div",
      { class: "why" },
      bar(why, scale),
      parts(why),
      encoderLine(why, rank),
      followsLine(why),
      supportLine(why, memories),
    );
  }

  function renderRecs(body, previous) {
    const meta = [`${body.strategy}`, `K used ${body.k_used}`];
    if (body.degraded) meta.push("degraded: store unreachable");
    $("#rec-meta").textContent = meta.join(" · ");
    const scale = Math.max(1e-12, ...body.items.map((item) => (item.why ? total(item.why) : 0)));
    const rows = body.items.map((item, i) => {
      const move = movement({ item: item.item_id, at: i + 1 }, previous);
      return el(
        "li",
        { class: `rec ${move.cls}`.trim(), dataset: { item: item.item_id, rank: i + 1 } },
        el("div", { class: "rank" }, i + 1, el("span", { class: "move" }, move.text)),
        el(
          "div",
          {},
          label(item.item_id),
          el("span", { class: "score" }, `score ${item.score.toFixed(3)}`),
          explanation(item, i + 1, scale, body),
        ),
        el("button", { type: "button", class: "interact", onclick: () => interact(item.item_id) }, "interact"),
      );
    });
    $("#recs").replaceChildren(...rows);
  }

  function renderMemories(body) {
    const memories = body.memories || [];
    const supports = new Map();
    body.items.forEach((item, i) => {
      for (const id of item.why ? item.why.memories : []) {
        supports.set(id, [...(supports.get(id) || []), i + 1]);
      }
    });
    $("#memories-count").textContent = memories.length ? `${memories.length}` : "";
    const rows = memories.map((m) => {
      const ranks = supports.get(m.memory_id) || [];
      return el(
        "li",
        { class: ranks.length ? "supporting" : "", dataset: { memory: m.memory_id } },
        el("div", { class: "led" }, "→ ", label(m.item_id), ranks.map((r) => el("span", { class: "chip support" }, `#${r}`))),
        el("div", { class: "who" }, `${m.user_id}'s history, after ${m.prefix_len} items`),
        el(
          "div",
          { class: "sim" },
          el("div", { class: "bar" }, el("span", { class: "seg", style: { width: `${Math.max(0, m.similarity) * 100}%` } })),
          el("span", { class: "val" }, m.similarity.toFixed(2)),
        ),
      );
    });
    if (!rows.length) rows.push(el("li", { class: "hint" }, "none retrieved for this answer"));
    $("#memories").replaceChildren(...rows);
  }

  // -------------------------------------------------------------------------------------- actions

  async function refresh(previous, freshId) {
    const user = state.user;
    setState("loading");
    const [hist, recs] = await Promise.all([
      api(`users/${encodeURIComponent(user)}/history?n=${HISTORY_SHOWN}`),
      api("recommend", { method: "POST", body: JSON.stringify({ user_id: user, n: N, explain: true }) }),
    ]);
    const ids = recs.items.map((item) => item.item_id);
    for (const m of recs.memories || []) ids.push(m.item_id);
    for (const item of recs.items) for (const f of item.why ? item.why.follows : []) ids.push(f.item_id);
    await ensureTitles(ids);
    if (user !== state.user) return; // another user was picked meanwhile
    renderHistory(hist.items, freshId);
    renderRecs(recs, previous);
    renderMemories(recs);
    state.recs = recs.items;
    document.body.dataset.renders = String(Number(document.body.dataset.renders) + 1);
    setState("ready");
  }

  async function showUser(user) {
    const id = user.trim();
    if (!id) return;
    state.user = id;
    $("#user-input").value = id;
    history.replaceState(null, "", `#user=${encodeURIComponent(id)}`);
    notice("");
    await guarded(() => refresh(null, null));
  }

  async function interact(itemId) {
    const user = state.user;
    const previous = new Map(state.recs.map((item, i) => [item.item_id, i + 1]));
    const buttons = [...document.querySelectorAll("button.interact")];
    for (const button of buttons) button.disabled = true;
    await guarded(async () => {
      const events = [{ user_id: user, item_id: itemId }];
      await api("interactions", { method: "POST", body: JSON.stringify({ events }) });
      await refresh(previous, itemId);
      const moved = document.querySelectorAll("li.rec.up, li.rec.down, li.rec.new").length;
      const name = state.titles.get(itemId) || itemId;
      notice(`${user} interacted with ${name}: the history grew by one and ${moved} of the top ${N} moved.`);
    });
    for (const button of buttons) button.disabled = false; // still on the page when the refresh failed
  }

  async function guarded(action) {
    try {
      await action();
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 401) setState("error");
      notice(error.message, true);
    }
  }

  async function start() {
    notice("");
    await guarded(async () => {
      await loadInfo();
      await loadUsers();
      setState("ready");
      const match = /user=([^&]+)/.exec(location.hash);
      if (match) await showUser(decodeURIComponent(match[1]));
      else if (!state.user) notice("Pick a user: one of the suggestions, or type an id.");
      else await refresh(null, null);
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const key = $("#api-key");
    key.value = sessionStorage.getItem(KEY_STORAGE) || "";
    key.addEventListener("change", () => {
      sessionStorage.setItem(KEY_STORAGE, key.value.trim());
      start();
    });
    $("#user-form").addEventListener("submit", (event) => {
      event.preventDefault();
      showUser($("#user-input").value);
    });
    $("#more-users").addEventListener("click", () => guarded(loadUsers));
    start();
  });
})();
