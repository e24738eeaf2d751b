/* Herald web SDK: visitors, page views and events, and Web Exit Intent pop-ups.
 *
 *   <script src="https://herald.example.com/sdk.js" data-key="hrld_..." async></script>
 *
 * The one global is `herald`:
 *   herald.track(name, properties)                   an event of the visitor
 *   herald.identify(userId, properties, signature)   the visitor signed in (signature: the site
 *                                                    server's HMAC of userId, see the README)
 *   herald.reset()                                   the visitor signed out: a new anonymous id
 *   herald.registerAction(name, fn)                  a function a pop-up's button may call
 *   herald.init({key, endpoint})                     instead of the script tag's data-key
 *
 * Exit intent: on a desktop, the pointer leaving through the top of the viewport; on a touch
 * screen (no pointer to leave), a fast scroll back up after reading down the page. At most one
 * pop-up per page view. Every campaign text is shown as text, in a shadow root the page's CSS
 * cannot reach.
 */
(function () {
  "use strict";
  if (window.herald && window.herald.version) return;

  var VERSION = "1.0.0";
  var SESSION_IDLE_MS = 30 * 60 * 1000;
  var FLUSH_MS = 1000;
  var MAX_BATCH = 50;
  var MAX_QUEUE = 500;
  var PREFETCH_MS = 1500;
  var STORE = "herald:";
  var PROFILE_EVENT = "herald.profile";

  var config = { key: "", endpoint: "" };
  var actions = {};
  var queue = [];
  var flushTimer = null;
  var sending = null;
  var retryMs = 0;
  var retryAt = 0;
  var popups = null;
  var shownThisPage = false;
  var checking = false;
  var pageViewed = false;

  // --- storage ------------------------------------------------------------------------------
  function load(name, fallback) {
    try {
      var raw = window.localStorage.getItem(STORE + name);
      return raw ? JSON.parse(raw) : fallback;
    } catch (e) {
      return fallback;
    }
  }
  function save(name, value) {
    try {
      window.localStorage.setItem(STORE + name, JSON.stringify(value));
    } catch (e) {
      /* private mode or full: the SDK goes on in memory */
    }
  }
  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  // --- visitor and session ------------------------------------------------------------------
  function visitor() {
    var v = load("visitor", null);
    if (!v || !v.anonymousId) {
      v = { anonymousId: "anon:" + uuid(), userId: "", signature: "" };
      save("visitor", v);
    }
    return v;
  }
  function userId() {
    var v = visitor();
    return v.userId || v.anonymousId;
  }
  function utm(name) {
    try {
      return new URL(window.location.href).searchParams.get(name) || "";
    } catch (e) {
      return "";
    }
  }
  // A session ends after 30 idle minutes; it keeps the referrer and UTM tags it began with.
  function session(countPage) {
    var now = Date.now();
    var s = load("session", null);
    if (!s || now - s.lastActivity > SESSION_IDLE_MS) {
      s = {
        id: uuid(),
        started: now,
        pages: 0,
        referrer: document.referrer || "",
        utm_source: utm("utm_source"),
        utm_medium: utm("utm_medium"),
        utm_campaign: utm("utm_campaign")
      };
    }
    s.lastActivity = now;
    if (countPage) s.pages += 1;
    save("session", s);
    return s;
  }
  function zone() {
    try {
      return Intl.DateTimeFormat().resolvedOptions().timeZone || "";
    } catch (e) {
      return "";
    }
  }

  // --- the API ------------------------------------------------------------------------------
  function post(call, body, keepalive) {
    return window.fetch(config.endpoint + "/v1/web/" + encodeURIComponent(config.key) + "/" + call, {
      method: "POST",
      // text/plain keeps it a simple request: no preflight round trip.
      headers: { "Content-Type": "text/plain" },
      body: JSON.stringify(body),
      keepalive: !!keepalive,
      credentials: "omit"
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (json) {
        return { status: response.status, body: json, retryAfter: response.headers.get("Retry-After") };
      });
    });
  }

  // --- events: batched, kept across pages until sent, retried, idempotent by client id ----------
  function enqueue(name, properties, signature) {
    var v = visitor();
    var event = {
      user_id: v.userId || v.anonymousId,
      name: String(name),
      client_event_id: uuid(),
      time: new Date().toISOString(),
      properties: properties || {}
    };
    if (signature) event.user_signature = signature;
    queue.push(event);
    if (queue.length > MAX_QUEUE) queue.splice(0, queue.length - MAX_QUEUE);
    save("queue", queue);
    schedule(queue.length >= MAX_BATCH ? 0 : FLUSH_MS);
  }
  function schedule(ms) {
    if (flushTimer !== null) return;
    flushTimer = window.setTimeout(function () {
      flushTimer = null;
      flush(false);
    }, Math.max(ms, retryAt - Date.now(), 0));
  }
  // One batch in flight at a time, and none before a Retry-After has passed; a page being left
  // sends anyway (the queue stays stored, and the server drops a client event id it already has).
  function flush(leaving) {
    if (!config.key || !queue.length) return Promise.resolve();
    if (!leaving) {
      if (sending) return sending;
      if (Date.now() < retryAt) {
        schedule(0);
        return Promise.resolve();
      }
    }
    var batch = queue.slice(0, MAX_BATCH);
    var sent = post("events", { events: batch }, leaving).then(
      function (answer) {
        if (answer.status === 429 || answer.status >= 500) {
          retry(answer.retryAfter);
          return;
        }
        if (answer.status !== 200 && window.console) {
          window.console.warn("herald: events refused:", answer.body && answer.body.error);
        }
        // Sent, or refused for good: either way these leave the queue.
        var sent = {};
        batch.forEach(function (e) { sent[e.client_event_id] = true; });
        queue = queue.filter(function (e) { return !sent[e.client_event_id]; });
        save("queue", queue);
        retryMs = 0;
        retryAt = 0;
        if (queue.length) schedule(0);
      },
      function () {
        retry(null); // no answer (offline, blocked): back off and keep the events
      }
    );
    if (leaving) return sent;
    sending = sent.then(function () {
      sending = null;
    });
    return sending;
  }
  // The server's Retry-After when it gave one, else a doubling wait from 1 s up to a minute.
  function retry(after) {
    var seconds = parseFloat(after || "");
    retryMs = seconds > 0 ? seconds * 1000 : Math.min(Math.max(retryMs * 2, 1000), 60000);
    retryAt = Date.now() + retryMs;
    schedule(retryMs);
  }

  function pageView() {
    var s = session(true);
    enqueue("Page Viewed", {
      url: window.location.href,
      path: window.location.pathname,
      title: document.title,
      referrer: s.referrer,
      utm_source: s.utm_source,
      utm_medium: s.utm_medium,
      utm_campaign: s.utm_campaign,
      session_id: s.id,
      session_page_count: s.pages
    });
    pageViewed = true;
    // The pop-ups this page view may qualify the visitor for, before they try to leave.
    window.setTimeout(function () { flush(false).then(fetchPopups); }, PREFETCH_MS);
  }

  // --- pop-ups ------------------------------------------------------------------------------
  function visitorBody() {
    var v = visitor();
    var body = {
      user_id: v.userId || v.anonymousId,
      session_id: session(false).id,
      timezone: zone(),
      url: window.location.href
    };
    if (v.userId && v.signature) body.user_signature = v.signature;
    return body;
  }
  function fetchPopups() {
    if (!config.key) return Promise.resolve([]);
    return post("popups", visitorBody()).then(
      function (answer) {
        popups = answer.status === 200 && answer.body.popups ? answer.body.popups : [];
        return popups;
      },
      function () {
        return [];
      }
    );
  }
  function report(popup, kind) {
    var body = visitorBody();
    body.delivery_id = popup.delivery_id;
    body.kind = kind;
    post("interactions", body, kind !== "viewed").catch(function () {});
  }

  // At most one pop-up per page view; leaving again before one qualified asks again.
  function exitIntent() {
    if (shownThisPage || checking || !pageViewed) return;
    checking = true;
    var ready = popups && popups.length ? Promise.resolve(popups) : flush(false).then(fetchPopups);
    ready.then(
      function (found) {
        checking = false;
        if (found && found.length && !shownThisPage) {
          shownThisPage = true;
          show(found[0]);
        }
      },
      function () {
        checking = false;
      }
    );
  }

  // A page whose CSS hides even <html> (`* { display: none }`) leaves nothing for the pointer to
  // leave, nor for the pop-up to show in: <html> alone is given back its default display. Its
  // content stays as hidden as the page made it.
  function keepRootRendered() {
    var root = document.documentElement;
    if (window.getComputedStyle(root).display === "none") root.style.setProperty("display", "block", "important");
  }

  function watchExitIntent() {
    keepRootRendered();
    // Desktop: the pointer leaves through the top of the viewport (towards the tabs or the bar).
    document.documentElement.addEventListener("mouseleave", function (e) {
      if (e.clientY <= 0) exitIntent();
    });
    // Touch screens: a fast scroll back up after reading at least a screen down.
    var lastY = window.scrollY;
    var lastT = Date.now();
    var deepest = 0;
    window.addEventListener(
      "scroll",
      function () {
        var y = window.scrollY;
        var t = Date.now();
        deepest = Math.max(deepest, y);
        var speed = (lastY - y) / Math.max(t - lastT, 1); // px per ms, upwards
        if ("ontouchstart" in window && deepest > window.innerHeight && speed > 2.5) exitIntent();
        lastY = y;
        lastT = t;
      },
      { passive: true }
    );
  }

  var STYLE =
    ":host{all:initial}" +
    ".overlay{position:fixed;inset:0;background:rgba(0,0,0,.55);display:flex;align-items:center;" +
    "justify-content:center;z-index:2147483647;font:16px/1.45 system-ui,-apple-system,sans-serif}" +
    ".dialog{position:relative;background:#fff;color:#1d1d1f;max-width:420px;width:calc(100% - 32px);" +
    "border-radius:12px;padding:24px;box-shadow:0 12px 40px rgba(0,0,0,.35);box-sizing:border-box}" +
    "img{display:block;max-width:100%;border-radius:8px;margin:0 0 16px}" +
    "h2{font-size:20px;margin:0 32px 8px 0}p{margin:0 0 20px;white-space:pre-line}" +
    ".close{position:absolute;top:12px;right:12px;border:0;background:none;font-size:24px;" +
    "line-height:1;cursor:pointer;color:#555;padding:4px 8px}" +
    ".cta{display:inline-block;border:0;border-radius:8px;padding:10px 18px;background:#2f5bea;" +
    "color:#fff;font:inherit;cursor:pointer}" +
    "button:focus-visible{outline:3px solid #ffb000;outline-offset:2px}";

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text) node.textContent = text; // text, never HTML
    return node;
  }

  function show(popup) {
    var host = document.createElement("herald-popup");
    // Inline !important outranks any page rule, even `* { display: none !important }`.
    host.style.setProperty("display", "block", "important");
    host.style.setProperty("position", "static", "important");
    var root = host.attachShadow({ mode: "open" });
    var style = element("style");
    style.textContent = STYLE;
    var overlay = element("div", "overlay");
    var dialog = element("div", "dialog");
    var titleId = "herald-title";
    dialog.setAttribute("role", "dialog");
    dialog.setAttribute("aria-modal", "true");
    dialog.setAttribute("aria-labelledby", titleId);
    var close = element("button", "close", "\u00d7");
    close.setAttribute("aria-label", "Close");
    close.type = "button";
    dialog.appendChild(close);
    if (popup.image_url && /^https:\/\//i.test(popup.image_url)) {
      var image = element("img");
      image.src = popup.image_url;
      image.alt = "";
      dialog.appendChild(image);
    }
    var title = element("h2", "", popup.title);
    title.id = titleId;
    dialog.appendChild(title);
    if (popup.body) {
      var body = element("p", "", popup.body);
      body.id = "herald-body";
      dialog.setAttribute("aria-describedby", body.id);
      dialog.appendChild(body);
    }
    var cta = null;
    if (popup.button) {
      cta = element("button", "cta", popup.button.text);
      cta.type = "button";
      dialog.appendChild(cta);
    }
    overlay.appendChild(dialog);
    root.appendChild(style);
    root.appendChild(overlay);
    var before = document.activeElement;
    var done = false;
    keepRootRendered();

    function dismiss(kind) {
      if (done) return;
      done = true;
      document.removeEventListener("keydown", onKey, true);
      host.remove();
      report(popup, kind);
      if (before && before.focus) before.focus();
    }
    function focusables() {
      return Array.prototype.slice.call(dialog.querySelectorAll("button"));
    }
    function onKey(e) {
      if (e.key === "Escape") {
        e.preventDefault();
        dismiss("closed");
      } else if (e.key === "Tab") {
        // Focus stays inside the pop-up while it is open.
        var items = focusables();
        var at = items.indexOf(root.activeElement);
        var next = e.shiftKey ? (at <= 0 ? items.length - 1 : at - 1) : (at + 1) % items.length;
        e.preventDefault();
        items[next].focus();
      }
    }
    close.addEventListener("click", function () { dismiss("closed"); });
    overlay.addEventListener("click", function (e) {
      if (e.target === overlay) dismiss("closed");
    });
    if (cta) {
      cta.addEventListener("click", function () {
        var button = popup.button;
        dismiss("clicked");
        if (button.action === "open_link" && /^https?:\/\//i.test(button.url)) {
          if (button.new_tab) window.open(button.url, "_blank", "noopener");
          else window.location.assign(button.url);
        } else if (button.action === "call_function") {
          var fn = Object.prototype.hasOwnProperty.call(actions, button.function) ? actions[button.function] : null;
          if (typeof fn === "function") {
            try {
              fn({ campaign: popup.campaign, delivery_id: popup.delivery_id });
            } catch (err) {
              if (window.console) window.console.error("herald: action failed", err);
            }
          }
        }
      });
    }
    document.addEventListener("keydown", onKey, true);
    document.documentElement.appendChild(host);
    (cta || close).focus();
    report(popup, "viewed");
  }

  // --- the public object --------------------------------------------------------------------
  function init(options) {
    config.key = String((options && options.key) || "");
    config.endpoint = String((options && options.endpoint) || "").replace(/\/+$/, "");
    if (!config.key || !config.endpoint) return;
    queue = load("queue", []);
    watchExitIntent();
    pageView();
    window.addEventListener("pagehide", function () { flush(true); });
  }

  window.herald = {
    version: VERSION,
    init: init,
    track: function (name, properties) {
      session(false);
      enqueue(name, properties);
    },
    identify: function (id, properties, signature) {
      if (!signature) {
        // Without the site server's signature the visitor stays anonymous.
        if (window.console) window.console.warn("herald: identify needs the user's signature");
        return;
      }
      var v = visitor();
      var wasAnonymous = !v.userId;
      v.userId = String(id);
      v.signature = String(signature);
      save("visitor", v);
      if (wasAnonymous) {
        post("identify", { anonymous_id: v.anonymousId, user_id: v.userId, user_signature: v.signature }).catch(
          function () {}
        );
      }
      if (properties) enqueue(PROFILE_EVENT, properties, v.signature);
      popups = null;
    },
    reset: function () {
      save("visitor", null);
      save("session", null);
      popups = null;
    },
    registerAction: function (name, fn) {
      if (/^[A-Za-z_$][A-Za-z0-9_$]*$/.test(String(name)) && typeof fn === "function") actions[name] = fn;
    }
  };

  var script = document.currentScript;
  if (script && script.getAttribute("data-key")) {
    init({ key: script.getAttribute("data-key"), endpoint: new URL(script.src).origin });
  }
})();
