/* The participant's chat page. It talks to the study server's JSON API:
 *   POST /api/sessions              start (or resume) a conversation; the page's query string is forwarded
 *   GET  /api/sessions/{id}         the transcript so far, so a refresh or a reopened tab resumes
 *   POST /api/sessions/{id}/messages  one participant message -> the bot's replies
 * Creating a session or a decline carries this tab's client_key (kept in sessionStorage), so a retry
 * or a reload never makes a second participant. Each message carries the turn the page showed; a
 * 409 means another tab moved the conversation on: the page shows it as it is and keeps the text.
 * Every text from the server or the participant goes into the page with textContent, never as HTML;
 * the survey link is built as an element and only gets an http(s) href.
 */
(function () {
  "use strict";

  // The session is remembered per study URL (path + query), so a different study link starts afresh.
  var STORAGE_KEY = "combot:session:" + location.pathname + location.search;
  // This tab's idempotency key for starting (or declining): sessionStorage, so a reload reuses it.
  var CLIENT_KEY_STORAGE = "combot:client-key:" + location.pathname + location.search;
  // Waits between automatic retries of a request that failed on the network or with a 5xx.
  var RETRY_DELAYS_MS = [800, 1600, 3200, 6400];
  // After those, a message the server could not take is tried again this often (and at once on `online`).
  var LATER_RETRY_MS = 15000;
  // Within this many pixels of the end the participant counts as reading the newest message.
  var PINNED_SLACK_PX = 48;
  // The server answers 503 itself when a reply takes too long; this only catches a connection that hangs.
  var REQUEST_TIMEOUT_MS = 45000;
  var DEFAULT_MAX_CHARS = 2000;
  // A reply's delay after the first of its answer never exceeds this, whatever the server says.
  var MAX_REPLY_DELAY_MS = 30000;
  var DEFAULT_COLOUR = "#4a5868";

  var el = {
    barLogoWrap: document.getElementById("bot-logo-wrap"),
    barLogo: document.getElementById("bot-logo"),
    barName: document.getElementById("bot-name"),
    scroller: document.getElementById("scroller"),
    loading: document.getElementById("loading"),
    log: document.getElementById("log"),
    typing: document.getElementById("typing"),
    typingAvatar: document.getElementById("typing-avatar"),
    typingText: document.getElementById("typing-text"),
    ended: document.getElementById("ended"),
    handoff: document.getElementById("handoff"),
    handoffText: document.getElementById("handoff-text"),
    consent: document.getElementById("consent"),
    consentTitle: document.getElementById("consent-title"),
    consentText: document.getElementById("consent-text"),
    consentAgree: document.getElementById("consent-agree"),
    consentDecline: document.getElementById("consent-decline"),
    declined: document.getElementById("declined"),
    status: document.getElementById("status"),
    notice: document.getElementById("notice"),
    noticeText: document.getElementById("notice-text"),
    noticeAction: document.getElementById("notice-action"),
    form: document.getElementById("composer"),
    message: document.getElementById("message"),
    email: document.getElementById("email"),
    send: document.getElementById("send"),
    hint: document.getElementById("hint"),
    counter: document.getElementById("counter"),
    jump: document.getElementById("jump"),
    kept: document.getElementById("kept"),
    keptText: document.getElementById("kept-text")
  };

  var state = {
    sessionId: null,
    expects: "message",
    maxChars: DEFAULT_MAX_CHARS,
    bot: { name: "", logo: null },
    busy: false, // a message is on its way: sent, or being retried, and not yet answered
    failed: null, // the message that could not be sent: {id, text, turn, row}
    retryTimer: null,
    noticeHandler: null,
    noticeRetries: false, // the notice's action is a retry, so coming back online does it by itself
    pinned: true, // the participant is at the newest message (not scrolled up to read)
    declinedText: "",
    redirectTimer: null,
    turn: null, // the turn number the server expects next, as this page last heard it
    clientKey: null
  };

  // --- small helpers ------------------------------------------------------------------------------

  function newMessageId() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") {
      return window.crypto.randomUUID();
    }
    var bytes = new Uint8Array(16);
    if (window.crypto && window.crypto.getRandomValues) {
      window.crypto.getRandomValues(bytes);
    } else {
      for (var i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) { return (b + 0x100).toString(16).slice(1); }).join("");
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" + hex.slice(16, 20) + "-" + hex.slice(20);
  }

  // The server counts characters as code points (Python's len), not UTF-16 units.
  function charCount(text) {
    return Array.from(text).length;
  }

  function make(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Even reading window.localStorage throws where storage is blocked (private modes, strict settings,
  // a frame inside another site's page that may not keep third-party data): carry on without it.
  var STORES = ["localStorage", "sessionStorage"];

  function storageGet() {
    for (var i = 0; i < STORES.length; i++) {
      try {
        var store = window[STORES[i]];
        var value = store && store.getItem(STORAGE_KEY);
        if (value) return value;
      } catch (e) { /* blocked: try the next one */ }
    }
    return null;
  }

  function storageSet(value) {
    STORES.forEach(function (name) {
      try {
        var store = window[name];
        if (value) store.setItem(STORAGE_KEY, value); else store.removeItem(STORAGE_KEY);
      } catch (e) { /* see storageGet */ }
    });
  }

  // Per session, in this tab only: what is typed but not sent, and a message sent but not yet answered.
  function tabGet(kind) {
    if (!state.sessionId) return null;
    try {
      return window.sessionStorage.getItem("combot:" + kind + ":" + state.sessionId);
    } catch (e) {
      return null; // see storageGet
    }
  }

  function tabSet(kind, value) {
    if (!state.sessionId) return;
    try {
      var key = "combot:" + kind + ":" + state.sessionId;
      if (value) window.sessionStorage.setItem(key, value); else window.sessionStorage.removeItem(key);
    } catch (e) { /* see storageGet */ }
  }

  function clientKey() {
    if (state.clientKey) return state.clientKey;
    try {
      state.clientKey = window.sessionStorage.getItem(CLIENT_KEY_STORAGE);
    } catch (e) { /* see storageGet: the key then lives as long as the page */ }
    if (!state.clientKey || !/^[A-Za-z0-9_-]{16,100}$/.test(state.clientKey)) {
      state.clientKey = newMessageId();
      try {
        window.sessionStorage.setItem(CLIENT_KEY_STORAGE, state.clientKey);
      } catch (e) { /* see above */ }
    }
    return state.clientKey;
  }

  function safeHttpUrl(raw) {
    if (typeof raw !== "string" || !raw) return null;
    try {
      var url = new URL(raw, location.href);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  // --- colours ------------------------------------------------------------------------------------

  function parseHex(colour) {
    var m = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.exec(typeof colour === "string" ? colour.trim() : "");
    if (!m) return null;
    var hex = m[1].length === 3 ? m[1].replace(/./g, "$&$&") : m[1];
    return [0, 2, 4].map(function (i) { return parseInt(hex.slice(i, i + 2), 16); });
  }

  function luminance(rgb) {
    var c = rgb.map(function (v) {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  }

  function contrast(a, b) {
    var la = luminance(a), lb = luminance(b);
    return (Math.max(la, lb) + 0.05) / (Math.min(la, lb) + 0.05);
  }

  // The bot's colour comes from the study file: white text on it only if that is readable (WCAG AA),
  // otherwise near-black text, so a researcher's light brand colour never makes the page unreadable.
  function applyColour(colour) {
    var rgb = parseHex(colour) || parseHex(DEFAULT_COLOUR);
    var hex = "#" + rgb.map(function (v) { return (v + 0x100).toString(16).slice(1); }).join("");
    var onColour = contrast(rgb, [255, 255, 255]) >= 4.5 ? "#ffffff" : "#111418";
    var root = document.documentElement.style;
    root.setProperty("--bot", hex);
    root.setProperty("--on-bot", onColour);
    var meta = document.querySelector('meta[name="theme-color"]');
    if (!meta) {
      meta = document.createElement("meta");
      meta.name = "theme-color";
      document.head.appendChild(meta);
    }
    meta.content = hex;
  }

  // --- the bot's presentation ---------------------------------------------------------------------

  function applyBot(bot) {
    bot = bot && typeof bot === "object" ? bot : {};
    var name = typeof bot.name === "string" && bot.name.trim() ? bot.name.trim() : "Assistant";
    var logo = typeof bot.logo === "string" && bot.logo ? safeHttpUrl(bot.logo) : null;
    state.bot = { name: name, logo: logo };
    el.barName.textContent = name;
    document.title = name;
    applyColour(bot.colour);
    if (logo) {
      el.barLogo.src = logo;
      el.barLogoWrap.hidden = false;
    } else {
      el.barLogo.removeAttribute("src");
      el.barLogoWrap.hidden = true;
    }
    el.typingAvatar.replaceChildren(avatar());
  }

  function avatar() {
    var box = make("span", "avatar");
    box.setAttribute("aria-hidden", "true");
    if (state.bot.logo) {
      var img = make("img");
      img.src = state.bot.logo;
      img.alt = "";
      img.width = 32;
      img.height = 32;
      box.appendChild(img);
    } else {
      box.textContent = state.bot.name.charAt(0).toUpperCase();
      box.classList.add("avatar--letter");
    }
    return box;
  }

  // --- the transcript -----------------------------------------------------------------------------

  function surveyLink(link) {
    var label = link && typeof link.label === "string" && link.label.trim() ? link.label : "Continue";
    var href = link ? safeHttpUrl(link.url) : null;
    if (!href) return make("p", "bubble__linklabel", label);
    var a = make("a", "survey-link", label);
    a.href = href;
    a.rel = "noopener";
    return a;
  }

  function addMessage(from, text, link) {
    var mine = from === "participant";
    notePosition();
    var wasPinned = state.pinned;
    var row = make("div", "msg " + (mine ? "msg--participant" : "msg--bot"));
    if (!mine) row.appendChild(avatar());
    // Consecutive bot bubbles form one group, as chat widgets show them: close together, one avatar
    // beside the newest.
    var previous = el.log.lastElementChild;
    if (!mine && previous && previous.classList.contains("msg--bot")) {
      previous.classList.add("msg--group-next");
      row.classList.add("msg--group-prev");
    }
    var bubble = make("div", "bubble");
    // Screen readers hear who said what; sighted readers see it from the side and colour.
    bubble.appendChild(make("span", "visually-hidden", mine ? "You: " : state.bot.name + ": "));
    var body = make("p", "bubble__text", typeof text === "string" ? text : "");
    // Hebrew or Arabic reads right to left, with its punctuation and emoji where the writer put them.
    body.dir = "auto";
    bubble.appendChild(body);
    if (link && typeof link === "object") {
      row.classList.add("msg--has-link");
      bubble.appendChild(surveyLink(link));
    }
    row.appendChild(bubble);
    el.log.appendChild(row);
    // The participant's own message always brings them to the end; a reply does only if they were
    // there already, and otherwise says that it came, without pulling them away from what they read.
    if (mine || wasPinned) {
      scrollToEnd();
    } else {
      el.jump.hidden = false;
    }
    return row;
  }

  // The message's own state, under its bubble: "not sent" with why and a way to send it again, or
  // that it is being tried again. Shown in place, so nothing pushes it out of view.
  function markRow(row, failed, note, retry) {
    row.classList.toggle("msg--failed", failed);
    var old = row.querySelector(".msg__state");
    if (old) old.remove();
    if (!failed && !note) return;
    var box = make("div", "msg__state");
    if (failed) box.appendChild(make("span", "msg__flag", "Not sent"));
    if (note) box.appendChild(make("span", "msg__note", note));
    if (retry) {
      var button = make("button", "msg__retry", "Send again");
      button.type = "button";
      button.addEventListener("click", retryFailed);
      box.appendChild(button);
    }
    row.appendChild(box);
    if (state.pinned) scrollToEnd();
  }

  function markFailed(row, failed) {
    markRow(row, failed, null, false);
  }

  // Only a move up unpins: a scroll event can also come from a layout change (the composer appearing
  // under a reloaded transcript), which must not count as the participant scrolling away. Also called
  // before a message is added, in case its scroll event has not been dispatched yet.
  var lastScrollTop = 0;
  function notePosition() {
    var top = el.scroller.scrollTop;
    if (distanceFromEnd() <= PINNED_SLACK_PX) {
      state.pinned = true;
      el.jump.hidden = true;
    } else if (top < lastScrollTop - 1) {
      state.pinned = false;
    }
    lastScrollTop = top;
  }

  function distanceFromEnd() {
    return el.scroller.scrollHeight - el.scroller.scrollTop - el.scroller.clientHeight;
  }

  function scrollToEnd() {
    el.scroller.scrollTop = el.scroller.scrollHeight;
    lastScrollTop = el.scroller.scrollTop;
    state.pinned = true;
    el.jump.hidden = true;
  }

  function renderSession(data) {
    if (!data || typeof data.session_id !== "string") throw new Error("unexpected answer from the server");
    state.sessionId = data.session_id;
    storageSet(data.session_id);
    state.maxChars = Number.isInteger(data.max_message_chars) && data.max_message_chars > 0
      ? data.max_message_chars : DEFAULT_MAX_CHARS;
    applyBot(data.bot);
    el.loading.hidden = true;
    renderConversation(data);
  }

  // The transcript, what comes next and the turn, from a session answer or a 409's body.
  function renderConversation(data) {
    el.log.replaceChildren();
    // Focusable (to scroll it from the keyboard) once there is a conversation, so the consent page has
    // no empty stop for Tab; the live region itself is there from the start, as screen readers need.
    el.log.tabIndex = 0;
    state.pinned = true; // a reload or a resync starts at the newest message
    (Array.isArray(data.messages) ? data.messages : []).forEach(function (m) {
      if (m && typeof m === "object") addMessage(m.from === "participant" ? "participant" : "bot", m.text, m.link);
    });
    state.failed = null;
    clearTimeout(state.retryTimer);
    setTurn(data.turn);
    setExpects(data.expects, data.redirect);
    restoreDraft();
    tellParent(data);
  }

  // --- inside another site's page (a Qualtrics question) ----------------------------------------------

  // The origin of the page that frames this one: ancestorOrigins (Chromium, Safari), else the referrer.
  function parentOrigin() {
    if (window.parent === window) return null;
    try {
      if (location.ancestorOrigins && location.ancestorOrigins.length) return location.ancestorOrigins[0];
    } catch (e) { /* fall back to the referrer */ }
    try {
      return document.referrer ? new URL(document.referrer).origin : null;
    } catch (e) {
      return null;
    }
  }

  // Does an origin match one of [embed] frame_ancestors (scheme://host[:port], the host may start with "*.")?
  function originAllowed(origin, patterns) {
    var url;
    try { url = new URL(origin); } catch (e) { return false; }
    var host = url.hostname.toLowerCase();
    var port = url.port || (url.protocol === "https:" ? "443" : "80");
    return patterns.some(function (pattern) {
      var m = typeof pattern === "string" ? /^(https?):\/\/(\*\.)?([^:/]+)(?::(\d+))?$/i.exec(pattern) : null;
      if (!m || url.protocol !== m[1].toLowerCase() + ":") return false;
      if (port !== (m[4] || (m[1].toLowerCase() === "https" ? "443" : "80"))) return false;
      var want = m[3].toLowerCase();
      return m[2] ? host.length > want.length && host.slice(-want.length - 1) === "." + want : host === want;
    });
  }

  // At the end, tell the framing page (a Qualtrics question waiting to show its Next button), addressed
  // to its exact origin and only when the study allows that origin: never "*", which any page could read.
  function postToParent(message, origins) {
    var origin = parentOrigin();
    if (!origin || !originAllowed(origin, Array.isArray(origins) ? origins : [])) return;
    try {
      window.parent.postMessage(message, origin);
    } catch (e) { /* the parent went away */ }
  }

  function tellParent(data) {
    if (!data || data.expects !== "done" || typeof data.participant_id !== "string") return;
    postToParent({ type: "combot:done", participant_id: data.participant_id }, data.embed_origins);
  }

  function setTurn(turn) {
    state.turn = Number.isInteger(turn) && turn >= 0 ? turn : null;
  }

  // --- the composer -------------------------------------------------------------------------------

  function currentInput() {
    return state.expects === "email" ? el.email : el.message;
  }

  function setExpects(expects, redirect) {
    var previous = currentInput();
    state.expects = expects === "email" || expects === "done" ? expects : "message";
    if (state.expects === "done") {
      // Typed here while another window finished the conversation: keep it in sight, not dropped.
      if (el.message.value.trim()) keepText(el.message.value);
      el.message.value = "";
      el.form.hidden = true;
      el.ended.hidden = false;
      hideNotice();
      showHandoff(redirect);
      var link = el.log.querySelector(".survey-link") || el.handoff.querySelector("a");
      if (link) link.focus({ preventScroll: true });
      scrollToEnd();
      return;
    }
    el.form.hidden = false;
    el.ended.hidden = true;
    var input = currentInput();
    if (input !== previous && previous.value && !input.value) {
      input.value = state.expects === "email" ? previous.value.trim() : previous.value;
      previous.value = "";
      saveDraft();
    }
    el.form.classList.toggle("is-email", state.expects === "email");
    el.message.hidden = state.expects === "email";
    el.email.hidden = state.expects !== "email";
    el.hint.textContent = state.expects === "email"
      ? "Type your e-mail address and press Enter to send."
      : "Press Enter to send, Shift+Enter for a new line.";
    updateComposer();
  }

  // The way back to the recruitment platform (e.g. Prolific's completion URL), when the study has one.
  // With a delay the page follows it by itself; without one (there is a survey to do first) it only
  // offers the link.
  function showHandoff(redirect) {
    if (state.redirectTimer) clearTimeout(state.redirectTimer);
    state.redirectTimer = null;
    Array.prototype.forEach.call(el.handoff.querySelectorAll("a"), function (a) { a.remove(); });
    el.handoff.hidden = true;
    var href = redirect && typeof redirect === "object" ? safeHttpUrl(redirect.url) : null;
    if (!href) return;
    var label = typeof redirect.label === "string" && redirect.label.trim() ? redirect.label : "Continue";
    var delay = redirect.after_seconds;
    var surveyFirst = el.log.querySelector(".survey-link") !== null;
    var a = make("a", surveyFirst ? "survey-link survey-link--secondary" : "survey-link", label);
    a.href = href;
    a.rel = "noopener";
    if (typeof delay === "number" && isFinite(delay) && delay >= 0) {
      el.handoffText.textContent = "You will be taken there automatically in " + Math.round(delay) +
        (Math.round(delay) === 1 ? " second." : " seconds.");
      state.redirectTimer = setTimeout(function () { location.assign(href); }, delay * 1000);
    } else {
      el.handoffText.textContent = surveyFirst
        ? "When you have finished the survey, use this button to return to the study platform."
        : "";
    }
    el.handoffText.hidden = !el.handoffText.textContent;
    el.handoff.appendChild(a);
    el.handoff.hidden = false;
  }

  function updateComposer() {
    var input = currentInput();
    var count = charCount(input.value.trim());
    var over = count > state.maxChars;
    el.counter.textContent = over
      ? count + " / " + state.maxChars + " characters: please shorten your message"
      : count + " / " + state.maxChars;
    el.counter.classList.toggle("is-near", !over && count >= state.maxChars * 0.9);
    el.counter.classList.toggle("is-over", over);
    input.setAttribute("aria-invalid", over ? "true" : "false");
    el.send.disabled = state.busy || state.failed !== null || over || !state.sessionId;
    if (input === el.message) autoGrow();
  }

  function autoGrow() {
    el.message.style.height = "auto";
    el.message.style.height = Math.min(el.message.scrollHeight + 2, 180) + "px";
  }

  function focusInput() {
    if (state.expects === "done" || el.form.hidden) return;
    currentInput().focus({ preventScroll: true });
  }

  function setBusy(busy) {
    state.busy = busy;
    updateComposer();
  }

  // "... is typing" only while a request is really on its way to the server, or while the next reply
  // of an answer is due; never while the page merely waits to try again (offline, or between retries).
  function setTyping(typing) {
    el.typing.hidden = !typing;
    el.typingText.textContent = typing ? state.bot.name + " is typing" : "";
    el.status.textContent = typing ? state.bot.name + " is typing\u2026" : "";
    el.log.setAttribute("aria-busy", typing ? "true" : "false");
    if (typing && state.pinned) scrollToEnd();
  }

  // --- drafts: nothing typed is lost to a reload ----------------------------------------------------

  function saveDraft() {
    tabSet("draft", el.message.value.trim() ? el.message.value : null);
  }

  function restoreDraft() {
    var draft = tabGet("draft");
    if (!draft) return;
    if (state.expects === "done") {
      keepText(draft);
    } else if (state.expects === "message" && !el.message.value) {
      el.message.value = draft;
      updateComposer();
    }
  }

  // Text that can no longer be sent (the conversation finished in another window) stays on the page,
  // where the participant can read and copy it.
  function keepText(text) {
    el.keptText.textContent = text;
    el.kept.hidden = false;
    tabSet("draft", text);
  }

  // --- notices ------------------------------------------------------------------------------------

  // `retries`: the action tries the same request again, so the page also does it when back online.
  function showNotice(text, actionLabel, handler, retries) {
    el.noticeText.textContent = text;
    state.noticeHandler = handler || null;
    state.noticeRetries = Boolean(handler && retries);
    if (actionLabel && handler) {
      el.noticeAction.textContent = actionLabel;
      el.noticeAction.hidden = false;
    } else {
      el.noticeAction.hidden = true;
    }
    el.notice.hidden = false;
  }

  function hideNotice() {
    el.notice.hidden = true;
    el.noticeText.textContent = "";
    state.noticeHandler = null;
    state.noticeRetries = false;
  }

  el.noticeAction.addEventListener("click", function () {
    var handler = state.noticeHandler;
    hideNotice();
    if (handler) handler();
  });

  // --- HTTP ---------------------------------------------------------------------------------------

  function ApiError(status, message, data) {
    this.status = status; // 0 for a network failure
    this.message = message || "";
    this.data = data && typeof data === "object" ? data : null;
  }

  function request(method, path, body) {
    var controller = typeof AbortController === "function" ? new AbortController() : null;
    var timer = controller ? setTimeout(function () { controller.abort(); }, REQUEST_TIMEOUT_MS) : null;
    var options = { method: method, cache: "no-store", credentials: "same-origin", headers: { Accept: "application/json" } };
    if (controller) options.signal = controller.signal;
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(path, options).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (data) {
        if (!response.ok) {
          throw new ApiError(response.status, data && typeof data.error === "string" ? data.error : "", data);
        }
        // A 2xx without a JSON object (a proxy's error page) counts as a server error worth retrying.
        if (!data || typeof data !== "object") throw new ApiError(502, "");
        return { status: response.status, data: data };
      });
    }, function () {
      throw new ApiError(0, "");
    }).finally(function () {
      if (timer) clearTimeout(timer);
    });
  }

  function retryable(error) {
    return error instanceof ApiError && (error.status === 0 || error.status >= 500);
  }

  function offline() {
    return navigator.onLine === false;
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  // A backoff wait that ends early when the connection comes back.
  function pause(i) {
    return new Promise(function (resolve) {
      var timer = setTimeout(done, RETRY_DELAYS_MS[i] * (0.75 + Math.random() * 0.5));
      function done() {
        clearTimeout(timer);
        window.removeEventListener("online", done);
        resolve();
      }
      window.addEventListener("online", done);
    });
  }

  // Network errors and 5xx are retried with backoff (not while offline: the `online` event retries);
  // the caller makes the request idempotent (a message keeps its client_message_id, so the server
  // answers a repeat with the stored replies).
  async function withRetry(attempt) {
    for (var i = 0; ; i++) {
      try {
        return await attempt();
      } catch (error) {
        if (!retryable(error) || i >= RETRY_DELAYS_MS.length || offline()) throw error;
        await pause(i);
      }
    }
  }

  function sessionPath(suffix) {
    return "api/sessions/" + encodeURIComponent(state.sessionId) + (suffix || "");
  }

  // --- starting and resuming ----------------------------------------------------------------------

  async function start() {
    hideNotice();
    el.loading.hidden = false;
    var stored = storageGet();
    if (stored) {
      state.sessionId = stored;
      try {
        renderSession((await withRetry(function () { return request("GET", sessionPath()); })).data);
        resumeUnsent();
        focusInput();
        return;
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 404) return startFailed();
        storageSet(null); // the server no longer knows this session: begin a new one
        state.sessionId = null;
      }
    }
    try {
      // The query string (PROLIFIC_PID, STUDY_ID, ...) goes along as it is; the server keeps what it needs.
      var created = await withRetry(function () {
        return request("POST", "api/sessions" + location.search, { client_key: clientKey() });
      });
      renderSession(created.data);
      focusInput();
    } catch (error) {
      // 403: the study asks for consent before a session starts.
      if (error instanceof ApiError && error.status === 403) return showConsent();
      if (closed(error)) return;
      startFailed();
    }
  }

  // --- consent ------------------------------------------------------------------------------------

  async function showConsent() {
    var info;
    try {
      info = (await withRetry(function () { return request("GET", "api/consent"); })).data;
    } catch (error) {
      return startFailed();
    }
    el.loading.hidden = true;
    el.consentTitle.textContent = typeof info.title === "string" && info.title ? info.title : "Before you start";
    el.consentText.replaceChildren();
    (Array.isArray(info.paragraphs) ? info.paragraphs : []).forEach(function (text) {
      if (typeof text !== "string") return;
      var paragraph = make("p", null, text);
      paragraph.dir = "auto"; // a study in Hebrew or Arabic reads right to left
      el.consentText.appendChild(paragraph);
    });
    el.consentAgree.textContent = typeof info.agree_label === "string" && info.agree_label
      ? info.agree_label : "I agree, start the chat";
    el.consentDecline.textContent = typeof info.decline_label === "string" && info.decline_label
      ? info.decline_label : "I do not want to take part";
    state.declinedText = typeof info.declined_text === "string" ? info.declined_text : "";
    setConsentBusy(false);
    el.consent.hidden = false;
    el.consentTitle.setAttribute("tabindex", "-1");
    el.consentTitle.focus({ preventScroll: true });
  }

  function setConsentBusy(busy) {
    el.consentAgree.disabled = busy;
    el.consentDecline.disabled = busy;
  }

  async function agree() {
    hideNotice();
    setConsentBusy(true);
    try {
      var created = await withRetry(function () {
        return request("POST", "api/sessions" + location.search, { consent: true, client_key: clientKey() });
      });
      el.consent.hidden = true;
      renderSession(created.data);
      focusInput();
    } catch (error) {
      setConsentBusy(false);
      if (closed(error)) return;
      showNotice("Sorry, the chat could not be started. Please check your internet connection and try again.",
        "Try again", agree, true);
    }
  }

  async function decline() {
    hideNotice();
    setConsentBusy(true);
    try {
      var answer = await withRetry(function () {
        return request("POST", "api/declines" + location.search, { client_key: clientKey() });
      });
      el.consent.hidden = true;
      el.declined.textContent = typeof answer.data.text === "string" && answer.data.text
        ? answer.data.text : state.declinedText || "Thank you. You can close this page now.";
      el.declined.hidden = false;
      // Inside a survey: it may go on without the chat.
      postToParent({ type: "combot:declined" }, answer.data.embed_origins);
    } catch (error) {
      setConsentBusy(false);
      showNotice("Sorry, that did not go through. Please check your internet connection and try again.",
        "Try again", decline, true);
    }
  }

  el.consentAgree.addEventListener("click", agree);
  el.consentDecline.addEventListener("click", decline);

  // 410: the researcher has closed data collection; nothing will be stored, so nothing is retried.
  function closed(error) {
    if (!(error instanceof ApiError) || error.status !== 410) return false;
    el.loading.hidden = true;
    el.consent.hidden = true;
    showNotice(politely(error.message) || "This study is no longer collecting data. Thank you for your interest.");
    return true;
  }

  function startFailed() {
    el.loading.hidden = true;
    showNotice("Sorry, the chat could not be loaded. Please check your internet connection and try again.",
      "Try again", start, true);
  }

  // --- sending ------------------------------------------------------------------------------------

  // Text that was not sent goes back into the box (or, once the conversation has ended, stays in sight).
  function restoreText(text) {
    if (state.expects === "done") {
      keepText(text);
      return;
    }
    var input = currentInput();
    if (!input.value.trim()) input.value = text;
    if (input === el.message) saveDraft();
    updateComposer();
  }

  async function submit() {
    if (state.busy || !state.sessionId || state.expects === "done") return;
    if (state.failed) {
      retryFailed();
      return;
    }
    var input = currentInput();
    var text = input.value.trim();
    if (!text) {
      input.focus();
      return;
    }
    if (charCount(text) > state.maxChars) {
      showNotice("Your message is longer than " + state.maxChars + " characters. Please shorten it a little.");
      return;
    }
    hideNotice();
    input.value = "";
    saveDraft();
    // The turn goes with the message: the server refuses it if the conversation has moved on since.
    var pending = { id: newMessageId(), text: text, turn: state.turn, row: addMessage("participant", text) };
    updateComposer();
    await deliver(pending);
  }

  function retryFailed() {
    var pending = state.failed;
    if (!pending || state.busy) return;
    state.failed = null;
    clearTimeout(state.retryTimer);
    deliver(pending);
  }

  function participantCount() {
    return el.log.querySelectorAll(".msg--participant").length;
  }

  // A message sent but not answered is remembered in this tab until it is, so a reload neither loses it
  // nor sends it twice: it goes again with the same client_message_id (and turn).
  function rememberUnsent(pending) {
    tabSet("unsent", JSON.stringify({ id: pending.id, text: pending.text, turn: pending.turn, before: pending.before }));
  }

  function resumeUnsent() {
    var unsent = null;
    try {
      unsent = JSON.parse(tabGet("unsent") || "null");
    } catch (e) { /* unreadable: nothing to resume */ }
    if (!unsent || typeof unsent.id !== "string" || typeof unsent.text !== "string") return;
    if (participantCount() !== unsent.before) {
      tabSet("unsent", null); // the server has it: the transcript just shown includes it
      return;
    }
    if (state.expects !== "message" && state.expects !== "email") {
      tabSet("unsent", null);
      keepText(unsent.text);
      return;
    }
    var pending = { id: unsent.id, text: unsent.text, turn: state.turn, before: unsent.before,
      row: addMessage("participant", unsent.text) };
    deliver(pending);
  }

  async function deliver(pending) {
    setBusy(true);
    if (typeof pending.before !== "number") pending.before = participantCount() - 1;
    rememberUnsent(pending);
    markRow(pending.row, false, null, false);
    pending.row.classList.add("msg--sending");
    var body = { text: pending.text, client_message_id: pending.id };
    if (pending.turn !== null) body.turn = pending.turn;
    var answer = null;
    var failure = null;
    for (var i = 0; !answer; i++) {
      if (offline()) {
        failure = new ApiError(0, "");
        break;
      }
      setTyping(true);
      try {
        answer = await request("POST", sessionPath("/messages"), body);
      } catch (error) {
        failure = error;
      }
      setTyping(false);
      if (answer || !retryable(failure) || i >= RETRY_DELAYS_MS.length || offline()) break;
      markRow(pending.row, false, "Trying again\u2026", false);
      await pause(i);
    }
    pending.row.classList.remove("msg--sending");
    if (answer) {
      tabSet("unsent", null);
      markRow(pending.row, false, null, false);
      var replies = Array.isArray(answer.data.replies) ? answer.data.replies : [];
      // The server held the answer until its first reply was due; the rest follow at their delay_ms.
      await showInSequence(replies.filter(function (r) { return r && typeof r === "object"; }));
      setBusy(false);
      setTurn(answer.data.turn);
      setExpects(answer.data.expects, answer.data.redirect);
      announce();
      tellParent(answer.data);
    } else {
      setBusy(false);
      await handleSendError(failure, pending);
    }
    focusInput();
  }

  // A turn's replies one after another: the first at once, each later one at its `delay_ms` after
  // the first, with the typing indicator until it is due.
  async function showInSequence(replies) {
    var first = Date.now();
    for (var i = 0; i < replies.length; i++) {
      var delay = Number(replies[i].delay_ms);
      var wait = i === 0 || !isFinite(delay) ? 0 : first + Math.min(Math.max(delay, 0), MAX_REPLY_DELAY_MS) - Date.now();
      if (wait > 0) {
        setTyping(true);
        await sleep(wait);
        setTyping(false);
      }
      addMessage("bot", replies[i].text, replies[i].link);
    }
  }

  async function handleSendError(error, pending) {
    var status = error instanceof ApiError ? error.status : -1;
    if (status === 409) {
      // The conversation moved on elsewhere (another tab, or it has ended): show what the server has.
      tabSet("unsent", null);
      return reloadTranscript(pending, error.data);
    }
    if (status === 400 || status === 410 || status === 413 || status === 422 || status === 429) {
      tabSet("unsent", null);
      pending.row.remove();
      restoreText(pending.text);
      var fallback = status === 429
        ? "You are sending messages a little too quickly. Please wait a moment and send it again."
        : "Your message could not be sent. Please check it and send it again.";
      showNotice(politely(error.message) || fallback);
      return;
    }
    if (status === 404) {
      storageSet(null);
      tabSet("unsent", null);
      markFailed(pending.row, true);
      showNotice("Sorry, this conversation could not be found on the server any more.", "Start again", function () {
        location.reload();
      });
      state.failed = pending;
      updateComposer();
      return;
    }
    // The network or the server: the message stays where it is, marked, with its own button; it goes
    // again by itself when the connection comes back, and every little while until then.
    state.failed = pending;
    var note = offline()
      ? "You seem to be offline. It will be sent when you are back online."
      : "The connection failed. It will be tried again in a moment.";
    markRow(pending.row, true, note, true); // inside the log: screen readers hear it as it is added
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(function () {
      if (!offline()) retryFailed();
    }, LATER_RETRY_MS);
    updateComposer();
  }

  // The server's messages are short lower-case phrases ("the message is empty"): make them a sentence.
  function politely(message) {
    var text = (message || "").trim();
    if (!text) return "";
    text = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?]$/.test(text) ? text : text + ".";
  }

  async function reloadTranscript(pending, conflict) {
    try {
      if (conflict && Array.isArray(conflict.messages)) {
        // The 409 carries the conversation as it is now: no second request needed.
        renderConversation(conflict);
      } else {
        renderSession((await withRetry(function () { return request("GET", sessionPath()); })).data);
      }
      // A 409 is never stored (a repeat of a stored message is answered 200), so the text goes back
      // into the box, or stays in sight when the conversation has ended meanwhile.
      restoreText(pending.text);
      if (state.expects !== "done") {
        showNotice("This conversation moved on in another window, so it is shown here as it is now. " +
          "Your message was not sent: it is back in the box below.");
      }
    } catch (error) {
      state.failed = pending;
      markFailed(pending.row, true);
      updateComposer();
      showNotice("Sorry, the conversation could not be reloaded. Please reload the page.", "Reload", function () {
        location.reload();
      });
    }
  }

  // --- keeping tabs of one session in step ------------------------------------------------------------

  // Another tab of this study sends a message: this one hears of it at once (BroadcastChannel), and
  // looks again whenever it is shown or focused, so it never offers a question that has been answered.
  var channel = null;
  try {
    channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(STORAGE_KEY) : null;
  } catch (e) { channel = null; }

  function announce() {
    if (channel && state.sessionId) {
      try { channel.postMessage({ session: state.sessionId, turn: state.turn }); } catch (e) { /* closed */ }
    }
  }

  var resyncing = false;

  async function resync() {
    if (resyncing || state.busy || !state.sessionId || state.expects === "done") return;
    resyncing = true;
    try {
      var answer = await request("GET", sessionPath());
      if (state.busy) return; // a message went out meanwhile: its own answer updates the page
      var data = answer.data;
      if (data.turn === state.turn && data.expects === state.expects) return;
      var failed = state.failed;
      renderSession(data);
      if (failed) restoreText(failed.text); // back in the box, or kept in sight if it has ended
      showNotice("This conversation continued in another window, so it is shown here as it is now.");
    } catch (error) {
      /* offline or gone: the next message finds out and says so */
    } finally {
      resyncing = false;
    }
  }

  if (channel) {
    channel.onmessage = function (event) {
      var data = event.data;
      if (data && data.session === state.sessionId && data.turn !== state.turn) resync();
    };
  }
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") resync();
  });
  window.addEventListener("focus", resync);

  // --- events -------------------------------------------------------------------------------------

  el.form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit();
  });

  function onKeydown(event) {
    // Enter sends; Shift+Enter makes a new line; never interrupt an IME composition.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      if (!el.send.disabled) submit();
    }
  }

  [el.message, el.email].forEach(function (input) {
    input.addEventListener("input", updateComposer);
    input.addEventListener("keydown", onKeydown);
  });

  [el.message].forEach(function (input) {
    input.addEventListener("input", saveDraft);
  });

  // --- staying at the newest message ----------------------------------------------------------------

  // Scrolled up to read: stay there. At the end: stay at the end whatever changes size (the on-screen
  // keyboard, the composer growing, a notice, the typing indicator, a reload's late layout).
  el.scroller.addEventListener("scroll", notePosition, { passive: true });

  el.jump.addEventListener("click", function () {
    scrollToEnd();
  });

  function keepPinned() {
    if (state.pinned) scrollToEnd();
  }

  if (typeof ResizeObserver === "function") {
    var observer = new ResizeObserver(keepPinned);
    observer.observe(el.scroller);
    observer.observe(el.log);
  }
  window.addEventListener("resize", keepPinned);

  // Where the keyboard only shrinks the visual viewport (iOS Safari; Chrome without the viewport's
  // interactive-widget=resizes-content), the page takes the visual viewport's height, so the composer
  // and the newest message sit above the keyboard instead of under it. Not while pinch-zoomed.
  if (window.visualViewport) {
    var fitVisualViewport = function () {
      var vv = window.visualViewport;
      var zoomed = Math.abs(vv.scale - 1) > 0.01;
      var root = document.documentElement.style;
      if (!zoomed && vv.height < window.innerHeight - 1) {
        root.setProperty("--app-height", Math.round(vv.height) + "px");
        if (window.scrollY) window.scrollTo(0, 0);
      } else {
        root.removeProperty("--app-height");
      }
      keepPinned();
    };
    window.visualViewport.addEventListener("resize", fitVisualViewport);
  }

  // Back online: whatever was waiting for the connection goes again, without the participant's help.
  window.addEventListener("online", function () {
    if (state.failed) {
      retryFailed();
    } else if (state.noticeRetries && state.noticeHandler) {
      var handler = state.noticeHandler;
      hideNotice();
      handler();
    }
  });

  window.addEventListener("offline", function () {
    if (state.failed) {
      markRow(state.failed.row, true, "You seem to be offline. It will be sent when you are back online.", true);
    }
  });

  start();
})();
