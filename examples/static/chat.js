// The demo page: rooms, a personal notification channel, who is here, and
// the connection's state — all through wsrelay.js.
import { WsRelay } from "/wsrelay.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const me = params.get("user") || "alice"; // the app set our session cookie from it
let room = params.get("room") || "lobby";
let roomSub = null;
const shown = new Set(); // offsets of the messages on screen
// For the browser test (and the curious): what the page went through.
const stats = (window.chatStats = { reconnects: 0, disconnects: 0, duplicates: 0, reloads: 0 });

const relay = new WsRelay("/ws"); // same origin: the session cookie authenticates
window.relay = relay;

// --- connection indicator ---------------------------------------------------

const nodeOf = (connection) => (connection ? connection.slice(0, connection.lastIndexOf(".")) : "");
relay.on("state", (s) => {
  const el = $("conn");
  el.dataset.state = s.state;
  el.dataset.retry = s.willReconnect === false ? "no" : "yes";
  let text = s.state;
  if (s.state === "connected") {
    el.dataset.node = nodeOf(relay.connection);
    text = `connected · ${el.dataset.node}`;
    if (stats.reconnects) text += ` · reconnected ${stats.reconnects}×`;
  } else if (s.state === "connecting") {
    text = "connecting…";
  } else if (s.state === "disconnected") {
    stats.disconnects++;
    const why = s.reason || (s.code ? `close ${s.code}` : "connection lost");
    text = s.willReconnect ? `reconnecting in ${(s.delay / 1000).toFixed(1)} s · ${why}` : `disconnected · ${why}`;
  }
  $("conn-text").textContent = text;
});
relay.on("connected", (w) => {
  if (w.reconnected) {
    stats.reconnects++;
    $("conn-text").textContent += ` · reconnected ${stats.reconnects}×`;
  }
  $("conn").dataset.reconnects = String(stats.reconnects);
  loadRooms();
});

// --- rooms ------------------------------------------------------------------

function addMessage(data, offset) {
  if (offset && shown.has(offset)) {
    stats.duplicates++;
    return;
  }
  if (offset) shown.add(offset);
  const li = document.createElement("li");
  if (offset) li.dataset.offset = offset;
  const who = document.createElement("b");
  who.textContent = data && data.from ? data.from : "?";
  li.append(who, document.createTextNode(data && data.text != null ? String(data.text) : JSON.stringify(data)));
  $("messages").append(li);
  li.scrollIntoView({ block: "nearest" });
}

function systemLine(text) {
  const li = document.createElement("li");
  li.className = "system";
  li.textContent = text;
  $("messages").append(li);
}

// The last messages from the app (which reads the sidecar's history API),
// and the offset to subscribe from: nothing in between is missed or doubled.
async function loadHistory() {
  const r = await fetch(`/history?room=${encodeURIComponent(room)}`);
  if (!r.ok) {
    systemLine(`cannot load #${room} (${r.status})`);
    return null;
  }
  const h = await r.json();
  $("messages").textContent = "";
  shown.clear();
  for (const m of h.messages) addMessage(m.data, m.offset);
  return h.offset;
}

async function reloadRoom() {
  stats.reloads++;
  await loadHistory();
}

let presenceTimer = null;
function refreshPresence() {
  clearTimeout(presenceTimer);
  presenceTimer = setTimeout(async () => {
    if (!roomSub || roomSub.state !== "subscribed") return;
    const list = $("presence");
    try {
      const p = await roomSub.presence();
      const users = [...new Set((p.clients || []).map((c) => c.user || "anonymous"))].sort();
      list.textContent = "";
      for (const u of users) {
        const li = document.createElement("li");
        li.textContent = u === me ? `${u} (you)` : u;
        list.append(li);
      }
      if (!p.clients) list.textContent = `${p.count} here`;
    } catch (e) {
      list.innerHTML = `<li class="muted">unavailable (${e.code})</li>`;
    }
  }, 100);
}

async function joinRoom(name) {
  if (roomSub) roomSub.unsubscribe();
  delete $("chat").dataset.subscribed;
  room = name;
  $("room-title").textContent = `#${name}`;
  for (const a of document.querySelectorAll("#rooms a")) a.classList.toggle("current", a.dataset.room === name);
  $("presence").innerHTML = '<li class="muted">—</li>';
  const since = await loadHistory();
  const sub = (roomSub = relay.subscribe(`room:${name}`, (data, frame) => addMessage(data, frame.offset), { since }));
  sub.on("subscribed", (e) => {
    // After a reconnect: recovered:true means every missed message follows;
    // anything else means history could not cover the gap: reload.
    if (e.reconnected && e.recovered !== true) reloadRoom();
    $("chat").dataset.subscribed = "yes";
    refreshPresence();
  });
  sub.on("gap", reloadRoom);
  sub.on("join", refreshPresence);
  sub.on("leave", refreshPresence);
  sub.on("error", (e) => systemLine(`cannot join #${name}: ${e.message}`));
}

let roomsLoaded = false;
async function loadRooms() {
  if (roomsLoaded) return;
  try {
    const { rooms } = await relay.send({ action: "rooms" }, { timeout: 5000 }); // the app's message hook
    roomsLoaded = true;
    const ul = $("rooms");
    ul.textContent = "";
    for (const r of rooms) {
      const a = document.createElement("a");
      a.href = `?user=${me}&room=${r}`;
      a.dataset.room = r;
      a.textContent = `#${r}`;
      a.classList.toggle("current", r === room);
      a.onclick = (ev) => {
        ev.preventDefault();
        history.replaceState(null, "", a.href);
        joinRoom(r);
      };
      const li = document.createElement("li");
      li.append(a);
      ul.append(li);
    }
  } catch (e) {
    console.warn("rooms:", e);
  }
}

$("say").onsubmit = (ev) => {
  ev.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  $("text").value = "";
  // Sent now, or as soon as the connection is back (the client buffers it).
  relay.publish(`room:${room}`, { from: me, text }).catch((e) => systemLine(`not sent (${e.code}): ${text}`));
};

// --- personal notifications -----------------------------------------------------

$("me").textContent = `signed in as ${me}`;
$("me-channel").textContent = me;
relay.subscribe(`user:${me}`, (data) => {
  const notes = $("notes");
  notes.querySelector(".muted")?.remove();
  const li = document.createElement("li");
  li.textContent = data && data.text ? data.text : JSON.stringify(data);
  notes.prepend(li);
});

$("notify").onsubmit = async (ev) => {
  ev.preventDefault();
  const user = $("notify-user").value.trim();
  const r = await fetch(`/notify?user=${encodeURIComponent(user)}`, { method: "POST" });
  systemLine(r.ok ? `notification sent to ${user}` : `notification to ${user} failed (${r.status})`);
};

relay.connect();
joinRoom(room);
