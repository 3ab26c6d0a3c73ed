// Runs: filters, sort by any final or best metric, live progress, pick 2..20 runs to compare.
import { api, higherIsBetter } from '../api.js';
import {
  ago, badge, every, h, num, progressBar, query, replace, runLink, status, table, withQuery,
} from '../dom.js';

const STATES = ['queued', 'dispatched', 'running', 'succeeded', 'failed', 'cancelled'];
const LIVE = new Set(['queued', 'dispatched', 'running']);
const TEXT_FILTERS = [
  ['project', 'Project'],
  ['dataset', 'Dataset'],
  ['arch', 'Arch'],
  ['tag', 'Tag'],
  ['name', 'Name contains'],
  ['sweep', 'Sweep'],
];
const MAX_COMPARE = 20;
const PAGE_SIZES = [25, 50, 100, 200];

function sortOptions(metrics) {
  const options = [
    ['created', 'newest first'],
    ['-created', 'oldest first'],
    ['name', 'name'],
    ['state', 'state'],
  ];
  for (const metric of ['valid_loss', 'train_loss', ...metrics]) {
    options.push([`best:${metric}`, `best ${metric}`]);
    options.push([`final:${metric}`, `final ${metric}`]);
  }
  return options;
}

function select(name, options, value) {
  const node = h('select', { name, id: `f-${name}` });
  for (const [optionValue, label] of options) {
    node.append(h('option', { value: optionValue, selected: optionValue === value }, label));
  }
  return node;
}

export async function render(root) {
  const params = query();
  const filters = Object.fromEntries(['state', ...TEXT_FILTERS.map(([key]) => key)].map((key) => [key, params.get(key) || '']));
  const sort = params.get('sort') || 'created';
  const limit = Number(params.get('limit')) || 50;
  const offset = Math.max(0, Number(params.get('offset')) || 0);

  let datasets = [];
  try {
    datasets = (await api.datasets()).items;
  } catch {
    datasets = []; // the pickers fall back to free text
  }
  const metrics = [];
  for (const d of datasets) for (const m of d.metrics) if (!metrics.includes(m) && m !== 'valid_loss' && m !== 'train_loss') metrics.push(m);
  for (const m of ['error_rate', 'accuracy']) if (!metrics.includes(m)) metrics.push(m);
  const sorts = sortOptions(metrics);
  if (!sorts.some(([value]) => value === sort)) sorts.push([sort, sort]);

  // Filters: a plain GET form, so every view is a link that can be shared.
  const form = h(
    'form',
    { class: 'filters', method: 'get', action: '/dashboard/runs', id: 'run-filters' },
    h('label', {}, 'State', select('state', [['', 'any'], ...STATES.map((s) => [s, s])], filters.state)),
    TEXT_FILTERS.map(([key, label]) =>
      h('label', {}, label, h('input', { name: key, id: `f-${key}`, value: filters[key], list: key === 'dataset' ? 'datasets' : null, size: 12 })),
    ),
    h('datalist', { id: 'datasets' }, datasets.map((d) => h('option', { value: d.dataset }))),
    h('label', {}, 'Sort', select('sort', sorts, sort)),
    h('label', {}, 'Show', select('limit', PAGE_SIZES.map((n) => [String(n), String(n)]), String(limit))),
    h('button', { type: 'submit' }, 'Apply'),
    h('a', { href: '/dashboard/runs', class: 'button-link' }, 'Reset'),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form).entries());
    if (data.sort === 'created') delete data.sort;
    if (data.limit === '50') delete data.limit;
    location.assign(withQuery('/dashboard/runs', data));
  });
  for (const node of form.querySelectorAll('select')) node.addEventListener('change', () => form.requestSubmit());

  const selected = new Set((params.get('selected') || '').split(',').filter(Boolean));
  const compareButton = h('button', { type: 'button', id: 'compare-selected', disabled: true }, 'Compare');
  const clearButton = h('button', { type: 'button', class: 'secondary', id: 'clear-selection' }, 'Clear selection');
  const selectionNote = h('span', { class: 'muted', id: 'selection-note' });
  const autoRefresh = h('input', { type: 'checkbox', id: 'auto-refresh', checked: true });
  const updated = h('span', { class: 'muted', id: 'updated' });
  const toolbar = h(
    'div',
    { class: 'toolbar' },
    compareButton,
    clearButton,
    selectionNote,
    h('span', { class: 'spacer' }),
    h('label', { class: 'inline' }, autoRefresh, ' auto-refresh'),
    updated,
  );
  const listing = h('div', { id: 'runs-table' });
  const pager = h('div', { class: 'pager' });
  replace(root, form, toolbar, listing, pager);

  const syncSelection = () => {
    const n = selected.size;
    compareButton.disabled = n < 2 || n > MAX_COMPARE;
    compareButton.textContent = n ? `Compare ${n} runs` : 'Compare';
    selectionNote.textContent = n > MAX_COMPARE ? `pick at most ${MAX_COMPARE}` : n < 2 ? 'pick 2 to 20 runs to compare' : '';
  };
  compareButton.addEventListener('click', () => {
    location.assign(`/dashboard/compare?ids=${[...selected].map(encodeURIComponent).join(',')}`);
  });
  clearButton.addEventListener('click', () => {
    selected.clear();
    for (const box of listing.querySelectorAll('input[type=checkbox]')) box.checked = false;
    syncSelection();
  });
  syncSelection();

  const sortedMetric = sort.replace(/^-/, '').includes(':') ? sort.replace(/^-/, '').split(':')[1] : null;
  const sortedKind = sortedMetric ? sort.replace(/^-/, '').split(':')[0] : null;

  const draw = (page) => {
    const names = [];
    for (const row of page.items) for (const m of Object.keys(row.metrics || {})) if (!names.includes(m)) names.push(m);
    names.sort((a, b) => (a === 'valid_loss' ? -1 : b === 'valid_loss' ? 1 : a === 'train_loss' ? -1 : b === 'train_loss' ? 1 : 0));
    const metricColumns = names.map((metric) => ({
      label: [metric, h('span', { class: 'sub' }, 'best · final')],
      title: `${metric}: best (${higherIsBetter(metric) ? 'highest' : 'lowest'}) and final value`,
      class: `num${metric === sortedMetric ? ' sorted' : ''}`,
      cell: (row) => {
        const m = row.metrics?.[metric];
        if (!m) return h('span', { class: 'muted' }, '—');
        return h(
          'span',
          { class: 'metric', dataset: { metric, best: m.best ?? '', final: m.final ?? '' } },
          h('strong', { class: sortedKind === 'best' && metric === sortedMetric ? 'hl' : null }, num(m.best)),
          h('span', { class: `muted final${sortedKind === 'final' && metric === sortedMetric ? ' hl' : ''}` }, ` ${num(m.final)}`),
        );
      },
    }));
    const columns = [
      {
        label: '',
        class: 'pick',
        cell: (row) => {
          const box = h('input', { type: 'checkbox', 'aria-label': `select ${row.name}`, value: row.id, checked: selected.has(row.id) });
          box.addEventListener('change', () => {
            if (box.checked) selected.add(row.id);
            else selected.delete(row.id);
            syncSelection();
          });
          return box;
        },
      },
      {
        label: 'Run',
        cell: (row) => [
          runLink(row.id, row.name),
          row.tags?.length ? h('span', { class: 'tags' }, row.tags.map((t) => h('span', { class: 'tag' }, t))) : null,
        ],
      },
      { label: 'State', cell: (row) => [badge(row.state), row.error ? h('span', { class: 'error-hint', title: row.error }, ' ⚠') : null] },
      {
        label: 'Progress',
        cell: (row) => {
          const where = row.current_stage ? ` · ${row.current_stage}` : '';
          const label = `${row.epochs_done}/${row.epochs_total} ep${LIVE.has(row.state) ? where : ''}`;
          const fraction = row.state === 'succeeded' ? 1 : row.progress;
          return progressBar(fraction, label);
        },
      },
      { label: 'Project', cell: (row) => row.project },
      { label: 'Dataset', cell: (row) => row.dataset },
      { label: 'Arch', cell: (row) => row.arch },
      ...metricColumns,
      { label: 'Created', cell: (row) => ago(row.created_at) },
      { label: 'Sweep', cell: (row) => (row.sweep_id ? h('a', { href: `/dashboard/sweeps/${encodeURIComponent(row.sweep_id)}` }, row.sweep_id.slice(0, 8)) : '') },
    ];
    replace(
      listing,
      table(columns, page.items, {
        empty: 'No runs match these filters.',
        rowAttrs: (row) => ({ dataset: { runId: row.id, state: row.state }, class: `state-row-${row.state}` }),
        cls: 'grid runs',
      }),
    );
    const first = page.count ? page.offset + 1 : 0;
    const last = page.offset + page.items.length;
    const here = Object.fromEntries(params.entries());
    const prev = page.offset > 0 ? withQuery('/dashboard/runs', { ...here, offset: Math.max(0, page.offset - page.limit) || '' }) : null;
    const next = last < page.count ? withQuery('/dashboard/runs', { ...here, offset: page.offset + page.limit }) : null;
    replace(
      pager,
      prev ? h('a', { href: prev }, '← newer') : '',
      h('span', { class: 'muted' }, ` ${first}–${last} of ${page.count} (sorted by ${page.sort}) `),
      next ? h('a', { href: next }, 'older →') : '',
    );
  };

  const refresh = async () => {
    const page = await api.runs({ ...filters, sort, limit, offset });
    draw(page);
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status('');
    return page;
  };

  let page = await refresh();
  // Live progress: every 3 s while a listed run is still going, every 15 s otherwise.
  let lastLive = page.items.some((row) => LIVE.has(row.state));
  let ticks = 0;
  every(3000, async () => {
    ticks += 1;
    if (!autoRefresh.checked) return true;
    if (!lastLive && ticks % 5 !== 0) return true;
    page = await refresh();
    lastLive = page.items.some((row) => LIVE.has(row.state));
    return true;
  });
}
