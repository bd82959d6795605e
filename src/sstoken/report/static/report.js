// The sstoken report page's code (sstoken/report/page.py inlines it after the data block).
// Data format: sstoken/report/codec.py. Everything that reaches innerHTML goes through esc();
// token text is also shown in the tooltip via textContent only.
'use strict';
const DATA = JSON.parse(document.getElementById('sstoken-data').textContent);
const T0 = performance.now();
const ALPHA = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_';
const DIGIT = {}; for (let i = 0; i < 64; i++) DIGIT[ALPHA[i]] = i;
const FIELDS = DATA.fields;      // [[name, tooltip label], ...]: the per-token numbers (sstoken.records)
const CLS = {p: 'tok prompt', d: 'tok drop', k: 'tok kept', a: 'tok kept attn'};
const STATE = {p: 'prompt (not trained)', d: 'response, not kept', k: 'kept', a: 'kept, mainly because of attention'};
const $ = s => document.querySelector(s);
const esc = s => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;').replace(/'/g, '&#39;');
function unpack(s, w) {
  const n = s.length / w, out = new Array(n);
  for (let i = 0; i < n; i++) { let x = 0; for (let k = 0; k < w; k++) x = x * 64 + DIGIT[s[i * w + k]]; out[i] = x; }
  return out;
}
const cache = new Map();
function decoded(r) {            // tokens and per-position values of run r, decoded on first use
  if (cache.has(r)) return cache.get(r);
  const run = DATA.runs[r];
  const toks = unpack(DATA.seqs[run.seq], DATA.w).map(i => DATA.vocab[i]);
  const vals = {};
  for (const [k] of FIELDS) {
    const f = run.v[k]; if (!f) continue;
    const nul = Math.pow(64, f.w) - 1;
    vals[k] = unpack(f.s, f.w).map(x => x === nul ? null : (x + f.o) / 1000);
  }
  const ridx = []; let j = 0;    // position -> index among response positions
  for (const c of run.state) ridx.push(c === 'p' ? -1 : j++);
  const d = {toks, vals, ridx}; cache.set(r, d); return d;
}
const byId = new Map();
DATA.runs.forEach((r, i) => { if (!byId.has(r.id)) byId.set(r.id, []); byId.get(r.id).push(i); });
const ids = [...byId.keys()];
const methods = [...new Set(DATA.runs.map(r => r.method))];
let page = 0, perPage = 20;

function tokenHtml(t) {
  if (t === '') return '<span class="empty">\u2205</span>';
  return t.split(/\r?\n/).map(esc).join('<span class="nl">\u21b5</span>\n');
}
// With --weighting, a kept token's colour is as intense as its weight (0.15 + 0.85 w).
const KEPT_RGB = {k: '207,226,255', a: '255,216,168'};
function weightStyle(d, st, i) {
  const w = d.vals.weight, j = d.ridx[i];
  if (!w || !(st[i] in KEPT_RGB) || j < 0 || w[j] === null) return '';
  const a = 0.15 + 0.85 * Math.min(1, Math.max(0, w[j]));
  return ' style="background-color:rgba(' + KEPT_RGB[st[i]] + ',' + a.toFixed(2) + ')"';
}
function spans(r, from, to) {
  const d = decoded(r), st = DATA.runs[r].state;
  let out = '';
  for (let i = from; i < to; i++) out += '<span class="' + CLS[st[i]] + '" data-i="' + i + '"' + weightStyle(d, st, i) + '>' + tokenHtml(d.toks[i]) + '</span>';
  return out;
}
function count(s, chars) { let n = 0; for (const c of s) if (chars.includes(c)) n++; return n; }
function column(r, from) {
  const run = DATA.runs[r], st = run.state;
  const resp = count(st, 'dka'), kept = count(st, 'ka'), attn = count(st, 'a');
  const meta = ['kept ' + kept + ' / ' + resp + (resp ? ' (' + Math.round(100 * kept / resp) + '%)' : '')];
  if (attn) meta.push(attn + ' by attention');
  if (run.gamma !== null && run.gamma !== undefined) meta.push('\u03b3 ' + run.gamma);
  if (run.rho !== null && run.rho !== undefined) meta.push('\u03c1 ' + run.rho);
  if (run.step !== null && run.step !== undefined) meta.push('step ' + run.step);
  return '<div class="col" data-r="' + r + '"><h3>' + esc(run.method) + '</h3><div class="meta">' +
    esc(meta.join(' \u00b7 ')) + '</div><div class="text">' + spans(r, from, st.length) + '</div></div>';
}
function firstResponse(st) { const i = st.search(/[dka]/); return i < 0 ? st.length : i; }
function renderExample(id, rs) {
  // one token sequence for all methods: show its leading prompt once, then responses side by side
  const shared = new Set(rs.map(r => DATA.runs[r].seq)).size === 1;
  const from = shared ? Math.min(...rs.map(r => firstResponse(DATA.runs[r].state))) : 0;
  let h = '<section class="example"><h2>' + esc(id) + ' <span class="n">\u00b7 ' + rs.length +
    (rs.length === 1 ? ' run' : ' runs side by side') + '</span></h2>';
  if (from > 0) h += '<div class="label">prompt</div><div class="promptbox text" data-r="' + rs[0] + '">' + spans(rs[0], 0, from) + '</div>';
  return h + '<div class="cols">' + rs.map(r => column(r, from)).join('') + '</div></section>';
}
function selectedMethods() { return new Set([...document.querySelectorAll('#methods input:checked')].map(i => i.value)); }
function visible() {
  const q = $('#filter').value.trim().toLowerCase(), ms = selectedMethods(), out = [];
  for (const id of ids) {
    if (q && !id.toLowerCase().includes(q)) continue;
    const rs = byId.get(id).filter(r => ms.has(DATA.runs[r].method));
    if (rs.length) out.push([id, rs]);
  }
  return out;
}
function render() {
  const vis = visible(), pages = Math.max(1, Math.ceil(vis.length / perPage));
  page = Math.max(0, Math.min(page, pages - 1));
  const html = vis.slice(page * perPage, (page + 1) * perPage).map(([id, rs]) => renderExample(id, rs)).join('');
  $('#examples').innerHTML = html || '<p id="empty">No example matches the filters.</p>';
  const info = 'page ' + (page + 1) + ' / ' + pages + ' \u00b7 ' + vis.length + ' of ' + ids.length + ' examples';
  for (const el of document.querySelectorAll('.pageinfo')) el.textContent = info;
  for (const el of document.querySelectorAll('.prev')) el.disabled = page === 0;
  for (const el of document.querySelectorAll('.next')) el.disabled = page >= pages - 1;
}
function go(delta, top) { page += delta; render(); if (top) window.scrollTo(0, 0); }
function tipText(t, holder) {
  const r = +holder.dataset.r, i = +t.dataset.i, run = DATA.runs[r], d = decoded(r), j = d.ridx[i];
  const lines = [JSON.stringify(d.toks[i]) + '   #' + i + ' \u00b7 ' + STATE[run.state[i]]];
  if (j >= 0) {
    for (const [k, label] of FIELDS) {
      const v = d.vals[k] ? d.vals[k][j] : null;
      lines.push((label + '          ').slice(0, 11) + (v === null || v === undefined ? '-' : v.toFixed(3)));
    }
    const an = d.vals.attn_norm ? d.vals.attn_norm[j] : null;        // --normalize rank
    const g = run.gamma, rn = d.vals.rel_norm && d.vals.rel_norm[j];
    const at = an !== null && an !== undefined ? an : d.vals.attn_score && d.vals.attn_score[j];
    if (g !== null && g !== undefined && rn !== null && rn !== undefined && at !== null && at !== undefined)
      lines.push('score = \u03b3\u00b7normREL + (1-\u03b3)\u00b7' + (an !== null && an !== undefined ? 'normAttn' : 'attn') + ' = ' + (g * rn).toFixed(3) + ' + ' + ((1 - g) * at).toFixed(3));
  }
  return lines.join('\n');
}
document.addEventListener('mouseover', e => {
  const tip = $('#tip'), t = e.target.closest ? e.target.closest('.tok[data-i]') : null;
  const holder = t && t.closest('[data-r]');
  if (!holder) { tip.style.display = 'none'; return; }
  tip.textContent = tipText(t, holder);
  tip.style.display = 'block';
});
document.addEventListener('mousemove', e => {
  const tip = $('#tip'); if (tip.style.display !== 'block') return;
  const x = Math.min(e.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = e.clientY + 16 + tip.offsetHeight > window.innerHeight ? e.clientY - tip.offsetHeight - 10 : e.clientY + 16;
  tip.style.left = Math.max(4, x) + 'px'; tip.style.top = Math.max(4, y) + 'px';
});
document.addEventListener('keydown', e => {
  if (e.target.tagName === 'INPUT' || e.target.tagName === 'SELECT') return;
  if (e.key === 'ArrowRight') go(1); else if (e.key === 'ArrowLeft') go(-1);
});
for (const b of document.querySelectorAll('.prev')) b.onclick = () => go(-1, b.classList.contains('bottom'));
for (const b of document.querySelectorAll('.next')) b.onclick = () => go(1, b.classList.contains('bottom'));
$('#perpage').onchange = e => { perPage = +e.target.value; page = 0; render(); };
$('#filter').addEventListener('input', () => { page = 0; render(); });
const box = $('#methods');
for (const m of methods) {
  const l = document.createElement('label');
  const n = DATA.runs.filter(r => r.method === m).length;
  l.innerHTML = '<input type="checkbox" checked value="' + esc(m) + '"> ' + esc(m) + ' <span class="n">(' + n + ')</span>';
  box.appendChild(l);
}
box.addEventListener('change', () => { page = 0; render(); });
for (const img of document.querySelectorAll('.plotgrid img')) img.onclick = () => {
  const g = img.closest('.plotgrid'); g.classList.toggle('big');
  for (const i of g.querySelectorAll('img')) {    // natural size when enlarged, else the page scale
    if (!i.dataset.w) i.dataset.w = i.style.width;
    i.style.width = g.classList.contains('big') ? '' : i.dataset.w;
  }
};
render();
document.body.dataset.renderMs = (performance.now() - T0).toFixed(1);
