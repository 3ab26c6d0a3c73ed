// DOM helpers: every piece of data goes in as text (textContent / attributes), never as HTML.

/** Build an element: h('a', {href: '/x', class: 'c'}, 'text', child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith('on')) throw new Error(`no inline handlers (${key}): use addEventListener`);
    if (key === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

/** Append children (strings become text nodes; null/false are skipped; arrays are flattened). */
export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace the children of `node` with `children`. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

export const enc = encodeURIComponent;

/** The current URL's query parameters. */
export function query() {
  return new URLSearchParams(location.search);
}

/** A URL path with the non-empty params as its query string. */
export function withQuery(path, params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') search.set(key, String(value));
  }
  const text = search.toString();
  return text ? `${path}?${text}` : path;
}

export function runHref(id) {
  return `/dashboard/runs/${enc(id)}`;
}

export function runLink(id, text) {
  return h('a', { href: runHref(id), class: 'run-link', dataset: { runId: id } }, text ?? shortId(id));
}

export function shortId(id) {
  return String(id).length > 12 ? `${String(id).slice(0, 8)}…` : String(id);
}

/** A number for a table: 4 significant digits, exponent for the very small or large. */
export function num(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return '—';
  if (typeof value !== 'number') return String(value);
  if (value === 0) return '0';
  const abs = Math.abs(value);
  if (abs >= 1e5 || abs < 1e-3) return value.toExponential(Math.max(0, digits - 2));
  return Number(value.toPrecision(digits)).toString();
}

export function bytes(value) {
  if (value === null || value === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = value;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

/** Seconds as "4.2 s", "3 min 5 s", "2 h 10 min", "3 d 4 h". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '—';
  const s = Math.max(0, seconds);
  if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

export function parseDate(iso) {
  if (!iso) return null;
  // The API's datetimes are UTC; a naive one (SQLite) is read as UTC too.
  const text = /[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`;
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? null : date;
}

/** "2026-11-30 10:42:07" in the viewer's time zone. */
export function when(iso) {
  const date = parseDate(iso);
  if (!date) return '—';
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

/** "5 min ago", with the full time as a tooltip. */
export function ago(iso) {
  const date = parseDate(iso);
  if (!date) return h('span', { class: 'muted' }, '—');
  const seconds = (Date.now() - date.getTime()) / 1000;
  return h('time', { datetime: date.toISOString(), title: when(iso) }, `${duration(seconds)} ago`);
}

export function badge(state) {
  return h('span', { class: `badge state-${String(state).replace(/[^a-z_]/gi, '')}` }, state);
}

/** A table: columns = [{label, cell(row) -> node|text, class, title}], rows = [...]. */
export function table(columns, rows, { empty = 'Nothing to show.', rowAttrs, caption, cls } = {}) {
  if (!rows.length) return h('p', { class: 'muted empty' }, empty);
  const head = h('tr', {}, columns.map((c) => h('th', { class: c.class, title: c.title, scope: 'col' }, c.label)));
  const body = rows.map((row, i) =>
    h('tr', rowAttrs ? rowAttrs(row, i) : {}, columns.map((c) => h('td', { class: c.class }, c.cell(row, i)))),
  );
  return h(
    'div',
    { class: 'table-wrap' },
    h('table', { class: cls || 'grid' }, caption ? h('caption', {}, caption) : null, h('thead', {}, head), h('tbody', {}, body)),
  );
}

export function section(title, ...children) {
  const id = String(title).toLowerCase().replace(/[^a-z0-9]+/g, '-');
  return h('section', { class: 'panel', id: `section-${id}` }, h('h2', {}, title), children);
}

/** A definition list from [[label, value], ...], skipping empty values. */
export function facts(pairs) {
  const items = [];
  for (const [label, value] of pairs) {
    if (value === null || value === undefined || value === '') continue;
    items.push(h('div', { class: 'fact' }, h('dt', {}, label), h('dd', {}, value)));
  }
  return h('dl', { class: 'facts' }, items);
}

/** The status line under the title (errors, "updated at"). */
export function status(text, kind = 'info') {
  const node = document.getElementById('status');
  if (!node) return;
  replace(node, text ? h('span', { class: `status-${kind}` }, text) : '');
}

export function errorBox(error) {
  return h('div', { class: 'error-box', role: 'alert' }, h('strong', {}, 'Could not load: '), error?.message || String(error));
}

/** Run `tick` now and then every `ms` while it returns true (paused while the tab is hidden). */
export function every(ms, tick) {
  let stopped = false;
  let timer = null;
  const loop = async () => {
    if (stopped) return;
    let again = true;
    if (document.visibilityState !== 'hidden') {
      try {
        again = (await tick()) !== false;
      } catch (error) {
        status(`Refresh failed: ${error.message || error}`, 'error');
      }
    }
    if (again && !stopped) timer = setTimeout(loop, ms);
  };
  timer = setTimeout(loop, ms);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

/** A progress bar (0..1) with its label. */
export function progressBar(fraction, label) {
  const bar = h('div', { class: 'bar' });
  const pct = fraction === null || fraction === undefined ? 0 : Math.max(0, Math.min(1, fraction)) * 100;
  bar.style.width = `${pct.toFixed(1)}%`;
  return h(
    'div',
    { class: 'progress-cell' },
    h('div', { class: 'progress', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': pct.toFixed(0) }, bar),
    h('span', { class: 'progress-label' }, label),
  );
}

/** JSON-ish display of a spec value. */
export function show(value) {
  if (value === undefined) return '';
  if (typeof value === 'string') return value;
  return JSON.stringify(value);
}
