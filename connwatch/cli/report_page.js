/* connwatch report --html: the page's script (inlined into the page; no library, no network).
 * Reads the JSON document in #cw-data (see connwatch/cli/_html.py) and draws: the summary, the
 * processes table, an icicle flame graph of live clients by stack (plain DOM), and per call site a
 * chart of live clients over time (SVG). Every text from the data goes in through textContent. */
"use strict";
(function () {
  const T0 = performance.now();
  const D = JSON.parse(document.getElementById("cw-data").textContent);
  const S = D.strings, F = D.frames, P = D.procs;
  const ROW = 18, MIN_PX = 3, FIRST_SITES = 30, SVGNS = "http://www.w3.org/2000/svg";

  // -- small helpers ---------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function add(parent, ...kids) {
    for (const k of kids) if (k !== null && k !== undefined) parent.append(k);
    return parent;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  // By hand: toLocaleString costs tens of microseconds a call, and a page has thousands.
  function num(n) {
    if (n === null || n === undefined) return "-";
    const neg = n < 0, t = String(Math.abs(Math.round(n)));
    let out = "";
    for (let i = t.length; i > 0; i -= 3) out = t.slice(Math.max(0, i - 3), i) + (out ? "," + out : "");
    return (neg ? "-" : "") + out;
  }
  const two = (n) => (n < 10 ? "0" : "") + n;
  function clock(epoch) {
    const d = new Date(epoch * 1000);
    return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`;
  }
  function dur(s) {
    if (s === null || s === undefined) return "-";
    s = Math.abs(s);
    if (s < 1) return s < 0.001 ? "<1 ms" : (1000 * s).toFixed(0) + " ms";
    if (s < 60) return (s < 10 ? s.toFixed(1) : s.toFixed(0)) + " s";
    if (s < 3600) return (s / 60).toFixed(1) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }
  const rate = (perMin) => (perMin >= 0 ? "+" : "") + (Math.abs(perMin) >= 10 ? perMin.toFixed(0) : perMin.toFixed(1)) + "/min";
  const pct = (a, b) => (b ? (100 * a / b).toFixed(1) + "%" : "-");
  const base = (p) => { const i = p.lastIndexOf("/"); return i >= 0 ? p.slice(i + 1) : p; };
  const fFile = (i) => S[F[i][0]], fLine = (i) => F[i][1], fFunc = (i) => S[F[i][2]];
  const fShort = (i) => base(fFile(i)) + ":" + fLine(i);
  const fLong = (i) => fFile(i) + ":" + fLine(i);
  const kindOf = (s) => S[s.k];
  const isLeak = (s) => s.lk === 1;
  const isChurn = (s) => !!(s.ch && s.ch.s === 1);
  function procName(p) {
    return "pid " + p.pid + (p.service ? " " + p.service : "") + (p.host ? " on " + p.host : "");
  }

  // Colour by kind family: a hue per client library, pale for stack frames, strong for the kind itself.
  const HUES = { socket: 210, grpc: 140, urllib3: 28, requests: 275, httpx: 180, aiohttp: 330 };
  function hue(kind) {
    const fam = kind.split(/[./]/)[0];
    return fam in HUES ? HUES[fam] : 0;
  }
  function hash(str) { let h = 0; for (let i = 0; i < str.length; i++) h = (h * 31 + str.charCodeAt(i)) | 0; return h; }
  function colour(kind, leaf, name) {
    const h = hue(kind), grey = !(kind.split(/[./]/)[0] in HUES);
    if (leaf) return grey ? "hsl(0,0%,62%)" : `hsl(${h},58%,58%)`;
    const l = 78 + (Math.abs(hash(name)) % 9);
    return grey ? `hsl(0,0%,${l}%)` : `hsl(${h},${45 + (Math.abs(hash(name)) % 20)}%,${l}%)`;
  }

  // -- state -----------------------------------------------------------------------------------
  let sel = P.length > 1 ? -1 : 0; // -1: every process together
  let tree = null, zoom = null, query = "";
  const selected = () => (sel < 0 ? P.map((p, i) => [p, i]) : [[P[sel], sel]]);

  // -- page skeleton ---------------------------------------------------------------------------
  const tip = el("div"); tip.id = "cw-tip";
  const header = el("header");

  add(header, el("h1", null, "connwatch report"),
      el("span", "sub", `${P.length} process${P.length === 1 ? "" : "es"}` +
         (D.source ? ` from ${D.source}` : "") + ` · made ${clock(D.t0 + D.now)} · connwatch ${D.version}`));
  let picker = null;
  if (P.length > 1) {
    const label = el("label", null, "process ");
    picker = el("select"); picker.id = "cw-proc";
    add(picker, Object.assign(el("option", null, `all ${P.length} processes`), { value: "-1" }));
    P.forEach((p, i) => add(picker, Object.assign(el("option", null, `${procName(p)} · ${num(p.tot[0])} live`), { value: String(i) })));
    picker.addEventListener("change", () => select(Number(picker.value)));
    add(header, add(label, picker));
  }
  const main = el("main");
  const secSummary = el("section"); secSummary.id = "cw-summary";
  const secProcs = el("section"); secProcs.id = "cw-procs";
  const secFlame = el("section"); secFlame.id = "cw-flamesec";
  const secSites = el("section"); secSites.id = "cw-sites";
  add(main, secSummary, secProcs, secFlame, secSites);
  add(document.body, header, main, tip);

  if (!P.length) {
    add(secSummary, el("p", "empty", "No snapshot to show."));
    window.cwReady = { ms: performance.now() - T0, nodes: 0 };
    return;
  }

  // Flame graph controls (built once; the graph is redrawn on selection, zoom and window resize).
  const search = el("input"); search.id = "cw-search"; search.type = "search";
  search.placeholder = "search a file or function (e.g. handlers.py or get_user)";
  const reset = el("button", null, "reset zoom"); reset.id = "cw-reset";
  const matches = el("span", "muted"); matches.id = "cw-matches";
  const crumbs = el("span", "muted"); crumbs.id = "cw-zoomed";
  const legend = el("div", "legend");
  const box = el("div"); box.id = "cw-flame";
  add(secFlame, el("h2", null, "Live clients by stack"),
      el("p", "muted", "Each bar is a frame of the stacks that created the live clients (outermost at the top, the " +
         "client's kind at the bottom); its width is the number of live clients below it. Hover for counts and " +
         "upstreams, click to zoom, search to highlight a file or function."),
      add(el("div", "toolbar"), search, reset, matches, crumbs), legend, box);
  search.addEventListener("input", () => { query = search.value.trim().toLowerCase(); mark(); });
  reset.addEventListener("click", () => { zoom = tree; draw(); });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && tree) { zoom = tree; draw(); } });
  let resizeTimer = 0;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(draw, 100); });

  // -- summary ---------------------------------------------------------------------------------
  function card(title, ...kids) { return add(el("div", "card"), el("h3", null, title), ...kids); }
  function siteLine(s, p) {
    const li = el("li");
    add(li, el("b", null, num(s.l)), " ", el("span", "muted", kindOf(s)), " ",
        el("span", "mono", fFunc(s.f) + " " + fShort(s.f)));
    if (sel < 0 && P.length > 1) add(li, el("span", "muted", " pid " + p.pid));
    if (isLeak(s)) add(li, " ", el("span", "badge leak", "leak " + rate(s.gpm || 0)));
    if (isChurn(s)) add(li, " ", el("span", "badge churn", "churn"));
    li.title = fLong(s.f);
    return li;
  }
  function allSites() {
    const out = [];
    for (const [p] of selected()) for (const s of p.sites) out.push([s, p]);
    return out;
  }
  function drawSummary() {
    secSummary.textContent = "";
    const ps = selected().map(([p]) => p);
    const one = ps.length === 1 ? ps[0] : null;
    add(secSummary, el("h2", null, one ? `Summary: ${procName(one)}` : `Summary: all ${ps.length} processes`));
    if (one) add(secSummary, el("p", "muted mono", `${one.argv || "?"} · ${one.state} · snapshot ${dur(D.now - one.t)} ago` +
        (one.files > 1 ? ` · ${one.files} snapshot files` : "") + ` · ${one.path}`));
    const cards = el("div", "cards");
    // File descriptors.
    const fdCard = card("File descriptors");
    if (one) {
      const [open, limit] = one.fds;
      const u = open !== null && limit ? open / limit : null;
      add(fdCard, el("div", "big", open === null ? "unknown" : `${num(open)}${limit ? " / " + num(limit) : ""}`),
          el("div", "muted", limit ? `${pct(open, limit)} of the limit used` : "no limit known"));
      if (u !== null) { const b = el("div", "bar" + (u > 0.8 ? " bad" : u > 0.5 ? " warn" : "")); add(b, el("div")).firstChild.style.width = Math.min(100, 100 * u) + "%"; add(fdCard, b); }
      if (one.fdS.length >= 4) add(fdCard, chart(one.fdS, one.t, { w: 250, h: 56, limit: limit, colour: "#4a8bd6", what: "open fds" }));
    } else {
      let sum = 0, worst = null;
      for (const p of ps) {
        sum += p.fds[0] || 0;
        if (p.fds[0] !== null && p.fds[1] && (!worst || p.fds[0] / p.fds[1] > worst.fds[0] / worst.fds[1])) worst = p;
      }
      add(fdCard, el("div", "big", num(sum) + " open"), el("div", "muted", "across the processes"));
      if (worst) add(fdCard, el("div", null, `most used: pid ${worst.pid}: ${num(worst.fds[0])} / ${num(worst.fds[1])} (${pct(worst.fds[0], worst.fds[1])})`));
    }
    // Time to exhaustion.
    const etaCard = card("Time until the fd limit");
    const withEta = ps.filter((p) => p.fdx && p.fdx.eta !== null && p.fdx.eta !== undefined).sort((a, b) => a.fdx.eta - b.fdx.eta);
    if (withEta.length) {
      const p = withEta[0];
      add(etaCard, el("div", "big red", "≈ " + dur(p.fdx.eta)),
          el("div", "muted", `open fds rising ${(p.fdx.rate || 0).toFixed(2)}/s` + (one ? "" : ` in pid ${p.pid} (soonest of ${withEta.length})`)));
      const drivers = p.fdx.drivers || [];
      if (drivers.length) {
        const ol = el("ol");
        for (const d of drivers.slice(0, 3)) {
          const li = add(el("li"), el("span", "mono", fFunc(d.f) + " " + fShort(d.f)), " ",
                         el("span", "muted", `${S[d.k]} ${rate(d.gpm || 0)}, ${Math.round(100 * (d.share || 0))}%`));
          li.title = fLong(d.f);
          if (d.lk) add(li, " ", el("span", "badge leak", "leak"));
          add(ol, li);
        }
        add(etaCard, el("div", "muted", "driven by:"), ol);
      }
    } else {
      const known = ps.some((p) => p.fdx);
      add(etaCard, el("div", "big", known ? "not rising" : "unknown"),
          el("div", "muted", known ? "open fds are not rising across the window" : "the snapshots hold no fd window yet"));
    }
    // Clients.
    const tot = [0, 0, 0, 0];
    for (const p of ps) for (let i = 0; i < 4; i++) tot[i] += p.tot[i];
    const sites = allSites();
    const leaks = sites.filter(([s]) => isLeak(s)).length, churns = sites.filter(([s]) => isChurn(s)).length;
    const clients = card("Clients");
    add(clients, el("div", "big", num(tot[0]) + " live"),
        el("div", "muted", `${num(tot[1])} created, ${num(tot[2])} closed, ${num(tot[3])} released only by GC`),
        el("div", leaks ? "red" : "muted", `${leaks} suspected leak${leaks === 1 ? "" : "s"}`),
        el("div", churns ? "orange" : "muted", `${churns} call site${churns === 1 ? "" : "s"} churning`));
    if (one && one.totS.length >= 4) add(clients, chart(one.totS, one.t, { w: 250, h: 56, colour: "#555", what: "live clients" }));
    // Top call sites.
    const top = card("Top call sites (live)");
    const live = sites.filter(([s]) => s.l > 0).sort((a, b) => b[0].l - a[0].l);
    if (live.length) { const ol = el("ol"); for (const [s, p] of live.slice(0, 5)) add(ol, siteLine(s, p)); add(top, ol); }
    else add(top, el("div", "muted", "no live client"));
    // Upstreams.
    const ups = new Map();
    for (const [s, p] of sites) for (const [u, n] of s.u) {
      const r = ups.get(u) || { n: 0, sites: 0, procs: new Set() };
      r.n += n; r.sites += 1; r.procs.add(p.pid); ups.set(u, r);
    }
    const upCard = card("Upstreams (live clients)");
    const upList = [...ups.entries()].sort((a, b) => b[1].n - a[1].n);
    if (upList.length) {
      const ol = el("ol");
      for (const [u, r] of upList.slice(0, 8)) add(ol, add(el("li"), el("b", null, num(r.n)), " ", el("span", "mono", S[u]), " ",
          el("span", "muted", `${r.sites} call site${r.sites === 1 ? "" : "s"}` + (ps.length > 1 ? `, ${r.procs.size} process${r.procs.size === 1 ? "" : "es"}` : ""))));
      add(upCard, ol);
      if (upList.length > 8) add(upCard, el("div", "muted", `… ${upList.length - 8} more`));
    } else add(upCard, el("div", "muted", "no live client with a known upstream"));
    add(cards, fdCard, etaCard, clients, top, upCard);
    add(secSummary, cards);
  }

  // -- processes table (a folder of several processes) -----------------------------------------
  function drawProcs() {
    secProcs.textContent = "";
    if (P.length < 2) return;
    add(secProcs, el("h2", null, `Processes (${P.length})`));
    const table = el("table"); table.id = "cw-proctable";
    const cols = ["pid", "service", "host", "state", "fds", "fd use", "live", "created", "GC-released", "leaks", "churn", "fd limit in", "files"];
    add(table, add(el("thead"), add(el("tr"), ...cols.map((c) => el("th", null, c)))));
    const body = el("tbody");
    const tot = { open: 0, live: 0, created: 0, gc: 0, leaks: 0, churn: 0, files: 0 };
    P.forEach((p, i) => {
      const leaks = p.sites.filter(isLeak).length, churn = p.sites.filter(isChurn).length;
      const eta = p.fdx && p.fdx.eta !== null && p.fdx.eta !== undefined ? dur(p.fdx.eta) : "-";
      const tr = add(el("tr", i === sel ? "sel" : null), el("td", "mono", p.pid), el("td", null, p.service || "-"),
          el("td", null, p.host), el("td", null, p.state),
          el("td", null, p.fds[0] === null ? "?" : num(p.fds[0]) + (p.fds[1] ? " / " + num(p.fds[1]) : "")),
          el("td", null, p.fds[1] ? pct(p.fds[0], p.fds[1]) : "-"), el("td", null, num(p.tot[0])), el("td", null, num(p.tot[1])),
          el("td", null, num(p.tot[3])), el("td", leaks ? "red" : null, leaks), el("td", churn ? "orange" : null, churn),
          el("td", eta !== "-" ? "red" : null, eta), el("td", null, p.files));
      tr.addEventListener("click", () => select(i === sel ? -1 : i));
      add(body, tr);
      tot.open += p.fds[0] || 0; tot.live += p.tot[0]; tot.created += p.tot[1]; tot.gc += p.tot[3];
      tot.leaks += leaks; tot.churn += churn; tot.files += p.files;
    });
    const foot = add(el("tr", sel < 0 ? "sel" : null), el("td", null, "total"), el("td"), el("td"), el("td"),
        el("td", null, num(tot.open)), el("td"), el("td", null, num(tot.live)), el("td", null, num(tot.created)),
        el("td", null, num(tot.gc)), el("td", null, tot.leaks), el("td", null, tot.churn), el("td"), el("td", null, tot.files));
    foot.addEventListener("click", () => select(-1));
    add(table, body, add(el("tfoot"), foot));
    add(secProcs, table, el("div", "muted", "Click a row to show one process; the total row shows them all."));
  }

  // -- the flame graph (icicle) ----------------------------------------------------------------
  // A node is a frame (f >= 0), a kind leaf (k >= 0) or the root; `at` lists the call sites below it
  // (indices into `flat`), from which the hover text and the colour are worked out when needed.
  let nodes = [], flat = [];
  function newNode(parent, f, k) {
    const n = { id: nodes.length, parent, f, k, v: 0, kids: new Map(), list: null, at: [],
                ownLeak: 0, ownChurn: 0, depth: parent ? parent.depth + 1 : 0, dom: -2 };
    nodes.push(n);
    return n;
  }
  function child(n, key, f, k) {
    let c = n.kids.get(key);
    if (c === undefined) { c = newNode(n, f, k); n.kids.set(key, c); }
    return c;
  }
  function build() {
    nodes = []; flat = [];
    const root = newNode(null, -1, -1);
    for (const [p, pi] of selected()) for (const s of p.sites) {
      if (s.l <= 0) continue;
      const j = flat.length; flat.push([s, pi]);
      let n = root; n.v += s.l; n.at.push(j);
      for (const fi of s.tb) { n = child(n, fi, fi, -1); n.v += s.l; n.at.push(j); }
      const leak = isLeak(s) ? 1 : 0, churn = isChurn(s) ? 1 : 0;
      n.ownLeak += leak; n.ownChurn += churn;
      n = child(n, -1 - s.k, -1, s.k); n.v += s.l; n.at.push(j);
      n.ownLeak += leak; n.ownChurn += churn;
    }
    for (const n of nodes) { n.list = [...n.kids.values()].sort((a, b) => b.v - a.v || a.id - b.id); n.kids = null; }
    return root;
  }
  function maxDepth(n) { let d = n.depth; for (const c of n.list) d = Math.max(d, maxDepth(c)); return d; }
  function dominant(n) {
    if (n.dom === -2) {
      const kinds = new Map();
      for (const j of n.at) { const s = flat[j][0]; kinds.set(s.k, (kinds.get(s.k) || 0) + s.l); }
      let bv = -1; n.dom = -1;
      for (const [k, v] of kinds) if (v > bv) { n.dom = k; bv = v; }
    }
    return n.dom;
  }
  function details(n) {
    const kinds = new Map(), ups = new Map(), procs = new Set();
    let leaks = 0, churn = 0;
    for (const j of n.at) {
      const [s, pi] = flat[j];
      kinds.set(s.k, (kinds.get(s.k) || 0) + s.l); procs.add(pi);
      for (const [u, c] of s.u) ups.set(u, (ups.get(u) || 0) + c);
      if (isLeak(s)) leaks += 1;
      if (isChurn(s)) churn += 1;
    }
    return { kinds, ups, procs, leaks, churn };
  }
  function label(n) {
    if (!n.parent) return `all live clients: ${num(n.v)}` + (sel < 0 && P.length > 1 ? ` in ${P.length} processes` : "");
    if (n.k >= 0) return `${S[n.k]} · ${num(n.v)}`;
    return `${fFunc(n.f)} (${fShort(n.f)})`;
  }
  function matchOf(n) {
    if (!query || !n.parent) return false;
    if (n.k >= 0) return S[n.k].toLowerCase().includes(query);
    return fFunc(n.f).toLowerCase().includes(query) || fLong(n.f).toLowerCase().includes(query);
  }
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (t) => String(t).replace(/[&<>"']/g, (c) => ESC[c]);
  // One bar as HTML text (thousands of bars: the parser builds them far faster than DOM calls);
  // every value from the data goes through esc().
  function bar(out, n, x, w, W, extra) {
    let cls = "fr" + extra, style = `left:${(100 * x).toFixed(4)}%;width:${(100 * w).toFixed(4)}%;top:${n.depth * ROW}px`;
    let attrs = ` data-n="${n.id}" data-live="${n.v}"`;
    if (!n.parent) cls += " root";
    else if (n.k >= 0) { cls += " kind"; attrs += ` data-kind="${esc(S[n.k])}"`; style += ";background:" + colour(S[n.k], true, ""); }
    else {
      attrs += ` data-func="${esc(fFunc(n.f))}" data-file="${esc(fFile(n.f))}" data-line="${fLine(n.f)}"`;
      style += ";background:" + colour(S[dominant(n)] || "", false, fFunc(n.f));
    }
    if (n.parent && n.ownLeak) cls += " leak";
    else if (n.parent && n.ownChurn) cls += " churn";
    if (query) cls += matchOf(n) ? " hit" : n.parent ? " dim" : "";
    // Text only where some of it can be read.
    const px = w * W;
    let text = "";
    if (px >= 24) {
      text = label(n);
      const fit = Math.floor((px - 8) / 6);
      if (text.length > fit) text = text.slice(0, Math.max(1, fit - 1)) + "…";
    }
    out.push(`<div class="${cls}" style="${style}"${attrs}>${esc(text)}</div>`);
  }
  function place(out, n, x, w, W) {
    if (w * W < MIN_PX) return;
    bar(out, n, x, w, W, "");
    let cx = x;
    for (const c of n.list) { const cw = w * c.v / n.v; place(out, c, cx, cw, W); cx += cw; }
  }
  function draw() {
    if (!tree) return;
    if (!tree.v) { box.textContent = ""; add(box, el("div", "empty", "No live client in this selection.")); box.style.height = ""; return; }
    const W = box.clientWidth || 1000;
    const out = [];
    for (let a = zoom.parent; a; a = a.parent) bar(out, a, 0, 1, W, " anc");
    place(out, zoom, 0, 1, W);
    box.innerHTML = out.join("");
    box.style.height = ((maxDepth(zoom) + 1) * ROW + 1) + "px";
    crumbs.textContent = zoom === tree ? "" : `zoomed on ${label(zoom)} (${num(zoom.v)} live): click a bar above it or reset`;
    summarise();
  }
  function summarise() {
    let hits = 0, frames = 0;
    const walk = (n) => { if (matchOf(n)) { hits += n.v; frames += 1; return; } for (const c of n.list) walk(c); };
    if (tree && query) walk(tree);
    matches.textContent = query ? (frames ? `${num(hits)} live client${hits === 1 ? "" : "s"} (${pct(hits, tree.v)}) under ${frames} matching frame${frames === 1 ? "" : "s"}` : "no match") : "";
    matches.dataset.live = query ? hits : "";
  }
  function mark() {
    for (const d of box.children) {
      const n = nodes[Number(d.dataset.n)];
      if (!n) continue;
      const m = matchOf(n);
      d.classList.toggle("hit", !!query && m);
      d.classList.toggle("dim", !!query && !m && n.parent !== null);
    }
    summarise();
  }
  box.addEventListener("click", (e) => {
    const d = e.target.closest(".fr");
    if (!d) return;
    const n = nodes[Number(d.dataset.n)];
    zoom = n && n !== zoom ? n : zoom.parent || tree;
    draw();
  });
  box.addEventListener("mousemove", (e) => {
    const d = e.target.closest(".fr");
    if (!d) { tip.style.display = "none"; return; }
    const n = nodes[Number(d.dataset.n)];
    const x = details(n);
    tip.textContent = "";
    if (!n.parent) add(tip, el("b", null, "all live clients"));
    else if (n.k >= 0) add(tip, el("b", null, S[n.k]), el("div", "path", "clients of this kind created at " + fLong(n.parent.f)));
    else add(tip, el("b", null, fFunc(n.f)), el("div", "path", fLong(n.f)));
    add(tip, el("div", null, `${num(n.v)} live client${n.v === 1 ? "" : "s"}: ${pct(n.v, tree.v)} of the view` +
        (zoom !== tree ? `, ${pct(n.v, zoom.v)} of the zoomed frame` : "")));
    add(tip, el("div", null, `${n.at.length} call site${n.at.length === 1 ? "" : "s"}` + (x.procs.size > 1 ? ` in ${x.procs.size} processes` : "")));
    if (n.k < 0 && x.kinds.size) add(tip, el("div", null, "kinds: " + [...x.kinds].sort((a, b) => b[1] - a[1]).map(([k, v]) => `${S[k]} ${num(v)}`).join(", ")));
    if (x.ups.size) {
      const ups = [...x.ups].sort((a, b) => b[1] - a[1]);
      add(tip, el("div", null, "upstreams: " + ups.slice(0, 5).map(([u, v]) => `${S[u]} ${num(v)}`).join(", ") + (ups.length > 5 ? `, … ${ups.length - 5} more` : "")));
    }
    if (x.leaks) add(tip, el("div", "red", `suspected leak at ${x.leaks} call site${x.leaks === 1 ? "" : "s"} below`));
    if (x.churn) add(tip, el("div", "orange", `churn at ${x.churn} call site${x.churn === 1 ? "" : "s"} below`));
    add(tip, el("div", "muted", n === zoom && n.parent ? "click to zoom out" : "click to zoom"));
    tip.style.display = "block";
    const r = tip.getBoundingClientRect();
    tip.style.left = Math.max(4, Math.min(e.clientX + 14, window.innerWidth - r.width - 8)) + "px";
    tip.style.top = (e.clientY + 18 + r.height > window.innerHeight ? e.clientY - r.height - 10 : e.clientY + 18) + "px";
  });
  box.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  function drawLegend() {
    legend.textContent = "";
    const kinds = new Map();
    for (const [p] of selected()) for (const s of p.sites) if (s.l > 0) kinds.set(s.k, (kinds.get(s.k) || 0) + s.l);
    for (const [k, v] of [...kinds].sort((a, b) => b[1] - a[1])) {
      const i = el("i"); i.style.background = colour(S[k], true, "");
      add(legend, add(el("span"), i, `${S[k]} ${num(v)}`));
    }
    const lk = el("i"); lk.style.boxShadow = "inset 0 0 0 2px var(--leak)";
    const ch = el("i"); ch.style.boxShadow = "inset 0 0 0 2px var(--churn)";
    add(legend, add(el("span"), lk, "suspected leak"), add(el("span"), ch, "churn"));
  }

  // -- charts ----------------------------------------------------------------------------------
  // series: flat [t, v, t, v, ...] (seconds from the page's t0); tEnd: the snapshot's time.
  function chart(series, tEnd, o) {
    const w = o.w || 300, h = o.h || 64, padL = 38, padR = 6, padT = 6, padB = 14;
    const n = series.length / 2;
    const s = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
    s.dataset.points = n;
    let tmin = Infinity, tmax = -Infinity, vmax = 0;
    for (let i = 0; i < series.length; i += 2) {
      tmin = Math.min(tmin, series[i]); tmax = Math.max(tmax, series[i]); vmax = Math.max(vmax, series[i + 1]);
    }
    const showLimit = o.limit && vmax >= 0.5 * o.limit;
    if (showLimit) vmax = Math.max(vmax, o.limit);
    vmax = Math.max(vmax, 1);
    if (tmax - tmin < 1e-6) { tmin -= 1; tmax += 1; }
    const X = (t) => padL + (w - padL - padR) * (t - tmin) / (tmax - tmin);
    const Y = (v) => padT + (h - padT - padB) * (1 - v / vmax);
    const title = svg("title", {}); title.textContent = `${o.what}: ${n} reading${n === 1 ? "" : "s"} over ${dur(tmax - tmin)}`;
    s.append(title);
    s.append(svg("line", { x1: padL, y1: Y(0), x2: w - padR, y2: Y(0), stroke: "#c5ccd3" }));
    if (showLimit) s.append(svg("line", { x1: padL, y1: Y(o.limit), x2: w - padR, y2: Y(o.limit), stroke: "#c62828", "stroke-dasharray": "3 3" }));
    const pts = [];
    for (let i = 0; i < series.length; i += 2) pts.push(X(series[i]).toFixed(1) + "," + Y(series[i + 1]).toFixed(1));
    s.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: o.colour || "#4a8bd6", "stroke-width": 1.6 }));
    if (n <= 80) for (let i = 0; i < series.length; i += 2) s.append(svg("circle", { cx: X(series[i]).toFixed(1), cy: Y(series[i + 1]).toFixed(1), r: 1.8, fill: o.colour || "#4a8bd6" }));
    const text = (x, y, t, anchor) => { const e = svg("text", { x, y, "text-anchor": anchor || "start" }); e.textContent = t; s.append(e); };
    text(padL - 4, padT + 8, num(vmax), "end");
    text(padL - 4, Y(0), "0", "end");
    text(padL, h - 2, tEnd - tmin > 0.05 ? `-${dur(tEnd - tmin)}` : "");
    text(w - padR, h - 2, Math.abs(tEnd - tmax) < 0.05 ? "snapshot" : (tmax < tEnd ? `-${dur(tEnd - tmax)}` : `+${dur(tmax - tEnd)}`), "end");
    return s;
  }

  // -- call sites ------------------------------------------------------------------------------
  function siteBlock(s, p) {
    const leak = isLeak(s), churn = isChurn(s);
    const div = el("div", "site" + (leak ? " leak" : churn ? " churn" : ""));
    div.dataset.func = fFunc(s.f); div.dataset.file = fFile(s.f); div.dataset.line = fLine(s.f);
    const head = el("div", "head");
    if (leak) add(head, el("span", "badge leak", "suspected leak " + rate(s.gpm || 0)));
    if (churn) add(head, el("span", "badge churn", `churn ${rate(s.ch.cpm)}` + (s.ch.life !== null ? `, lives ${dur(s.ch.life)}` : "")));
    if (s.lib) add(head, el("span", "badge lib", "library: no app frame"));
    const where = el("span", "where mono", `${fFunc(s.f)}  ${fLong(s.f)}`);
    add(head, el("b", null, num(s.l) + " live"), el("span", "muted", kindOf(s)), where);
    if (P.length > 1) add(head, el("span", "muted", procName(p)));
    const body = el("div", "body");
    const colourOf = leak ? "#c62828" : churn ? "#e07b00" : "#4a8bd6";
    if (s.s.length >= 2) add(body, chart(s.s, p.t, { w: 320, h: 64, colour: colourOf, what: "live clients" }));
    const facts = el("div", "facts");
    add(facts, el("div", null, `${num(s.c)} created, ${num(s.x)} closed, ${num(s.g)} released only by GC` +
        (s.a !== null && s.a !== undefined ? ` · oldest live ${dur(s.a)}` : "")));
    if (s.gpm !== undefined) add(facts, el("div", leak ? "red" : "muted", `growth ${rate(s.gpm)} over the window`));
    if (s.ch) add(facts, el("div", churn ? "orange" : "muted", `creates ${rate(s.ch.cpm)}` + (s.ch.life !== null ? `, median lifetime ${dur(s.ch.life)}` : "")));
    if (s.u.length) add(facts, el("div", null, "upstreams: " + s.u.slice(0, 6).map(([u, n]) => `${S[u]} (${num(n)})`).join(", ") + (s.u.length > 6 ? ", …" : "")));
    if (s.r && s.r.length) {
      const held = el("ul", "mono held");
      for (const r of s.r) add(held, el("li", null, r));
      add(facts, el("div", null, "held by:"), held);
    }
    add(body, facts);
    const det = el("details");
    add(det, el("summary", null, `traceback (${s.tb.length} frame${s.tb.length === 1 ? "" : "s"}, most recent call last)`));
    const pre = el("div", "tb", s.tb.map((i) => `${fLong(i)} in ${fFunc(i)}`).join("\n"));
    add(det, pre);
    add(div, head, body, det);
    return div;
  }
  function drawSites() {
    secSites.textContent = "";
    const rows = allSites();
    // What to fix first: suspected leaks (fastest growth first), then churn, then by live clients.
    const rank = (s) => (isLeak(s) ? 0 : isChurn(s) ? 1 : 2);
    rows.sort((a, b) => rank(a[0]) - rank(b[0]) || (rank(a[0]) === 0 ? (b[0].gpm || 0) - (a[0].gpm || 0) : 0) ||
              (rank(a[0]) === 1 ? b[0].ch.cpm - a[0].ch.cpm : 0) || b[0].l - a[0].l || b[0].c - a[0].c);
    add(secSites, el("h2", null, `Call sites (${rows.length})`),
        el("p", "muted", "Live clients over time at each call site, from the agent's window of samples in each snapshot " +
           "file (and every snapshot file of the same process in the folder). Suspected leaks first, then churn."));
    const list = el("div"); list.id = "cw-sitelist";
    add(secSites, list);
    let shown = 0;
    const more = el("button", "more");
    const page = (k) => {
      const frag = document.createDocumentFragment();
      for (const [s, p] of rows.slice(shown, shown + k)) frag.append(siteBlock(s, p));
      list.append(frag);
      shown = Math.min(rows.length, shown + k);
      more.textContent = `show all ${num(rows.length)} call sites`;
      more.style.display = shown < rows.length ? "" : "none";
    };
    more.addEventListener("click", () => page(rows.length));
    add(secSites, more);
    page(FIRST_SITES);
  }

  // -- selection -------------------------------------------------------------------------------
  function select(i) {
    sel = i;
    if (picker) picker.value = String(i);
    tree = build(); zoom = tree;
    drawSummary(); drawProcs(); drawLegend(); draw(); drawSites();
  }
  select(sel);
  // For tests and the benchmark: when the page was drawn (ms since navigation start), and painted.
  const ready = window.cwReady = { ms: performance.now() - T0, at: performance.now(), nodes: nodes.length, painted: null };
  document.body.dataset.ready = "1";
  requestAnimationFrame(() => setTimeout(() => { ready.painted = performance.now(); document.body.dataset.painted = "1"; }, 0));
})();
