// codebook-lens web browser: hover tooltips for tokens, pinned token details, busy buttons.
// Plain JS, no build step. Token spans carry data-codes='[{"codebook":..,"code":..,"url":..}]'.
"use strict";

(function () {
  const tip = () => document.getElementById("tooltip");

  function chip(c, asLink) {
    const el = document.createElement(asLink ? "a" : "span");
    el.className = "code-chip";
    el.textContent = c.short || c.label;
    el.title = c.label;
    if (asLink && c.url) el.href = c.url;
    return el;
  }

  // Codes grouped by codebook: the name once, then one chip per (head, code).
  function codeList(codes, asLink) {
    const box = document.createElement("div");
    let current = null;
    let row = null;
    for (const c of codes) {
      if (c.codebook !== current) {
        current = c.codebook;
        const name = document.createElement("div");
        name.className = "tt-cb";
        name.textContent = c.codebook;
        row = document.createElement("div");
        box.append(name, row);
      }
      row.append(chip(c, asLink), " ");
    }
    return box;
  }

  function codesOf(el) {
    try {
      return JSON.parse(el.dataset.codes || "[]");
    } catch (e) {
      return [];
    }
  }

  function showTip(el, ev) {
    const t = tip();
    if (!t) return;
    t.replaceChildren();
    const head = document.createElement("div");
    const tok = document.createElement("span");
    tok.className = "tt-token";
    tok.textContent = JSON.stringify(el.dataset.token || el.textContent);
    head.append(tok, " · position " + (el.dataset.pos || "?"));
    t.append(head);
    t.append(codeList(codesOf(el), false));
    t.hidden = false;
    moveTip(ev);
  }

  function moveTip(ev) {
    const t = tip();
    if (!t || t.hidden) return;
    const pad = 14;
    let x = ev.clientX + pad;
    let y = ev.clientY + pad;
    const r = t.getBoundingClientRect();
    if (x + r.width > window.innerWidth) x = ev.clientX - r.width - pad;
    if (y + r.height > window.innerHeight) y = ev.clientY - r.height - pad;
    t.style.left = Math.max(0, x) + "px";
    t.style.top = Math.max(0, y) + "px";
  }

  function pin(el) {
    const box = document.getElementById("token-detail");
    if (!box) return;
    document.querySelectorAll(".tok.pinned").forEach((p) => p.classList.remove("pinned"));
    el.classList.add("pinned");
    box.replaceChildren();
    const h = document.createElement("h3");
    h.textContent = "Token " + JSON.stringify(el.dataset.token || el.textContent) +
      " at position " + (el.dataset.pos || "?");
    box.append(h);
    box.append(codeList(codesOf(el), true));
    box.hidden = false;
  }

  document.addEventListener("mouseover", (ev) => {
    const el = ev.target.closest && ev.target.closest(".tok[data-codes]");
    if (el) showTip(el, ev);
  });
  document.addEventListener("mousemove", moveTip);
  document.addEventListener("mouseout", (ev) => {
    const el = ev.target.closest && ev.target.closest(".tok[data-codes]");
    if (el && tip()) tip().hidden = true;
  });
  document.addEventListener("click", (ev) => {
    const el = ev.target.closest && ev.target.closest(".tok[data-codes]");
    if (el) pin(el);
  });

  // A long request (search, generation) disables its button so it is not sent twice.
  document.addEventListener("submit", (ev) => {
    const form = ev.target;
    const btn = form.querySelector("button[type=submit]");
    if (btn) {
      btn.disabled = true;
      btn.dataset.label = btn.textContent;
      btn.textContent = btn.dataset.busy || "Working…";
    }
  });
  // Coming back with the browser's back button must not leave buttons stuck.
  window.addEventListener("pageshow", () => {
    document.querySelectorAll("button[data-label]").forEach((b) => {
      b.disabled = false;
      b.textContent = b.dataset.label;
    });
  });
})();

// Selects marked data-autosubmit submit their form on change (no inline handlers: CSP).
document.addEventListener("change", (ev) => {
  const el = ev.target;
  if (el.matches && el.matches("select[data-autosubmit]") && el.form) el.form.submit();
});
