// Compare: overlaid curves per metric, only the spec fields that differ, final and best side by side.
import { api, higherIsBetter } from '../api.js';
import { color, lineChart } from '../charts.js';
import { badge, h, num, query, replace, runLink, section, show, table } from '../dom.js';
import { LOSSES, curve, metricNames, orderEpochs, stageBands } from '../epochs.js';

function swatch(index) {
  const node = h('span', { class: 'swatch' });
  node.style.borderColor = color(index);
  return node;
}

export async function render(root) {
  const params = query();
  const ids = (params.get('ids') || '').split(',').map((s) => s.trim()).filter(Boolean);
  const sweep = params.get('sweep') || '';
  if (!sweep && ids.length < 2) {
    replace(
      root,
      h('p', {}, 'Pick 2 to 20 runs on the ', h('a', { href: '/dashboard/runs' }, 'runs page'), ' and press Compare, or open a sweep\'s comparison from its page.'),
    );
    return;
  }
  const data = await api.compare(sweep ? { sweep } : { ids: ids.join(',') });
  const runs = data.runs;
  const names = runs.map((r) => r.experiment.name);
  // Two runs with one name are told apart by their ids.
  const label = (r, i) => (names.indexOf(names[i]) !== names.lastIndexOf(names[i]) ? `${r.experiment.name} (${r.experiment.id.slice(0, 6)})` : r.experiment.name);

  const legend = table(
    [
      { label: '', cell: (_r, i) => swatch(i) },
      { label: 'Run', cell: (r, i) => runLink(r.experiment.id, label(r, i)) },
      { label: 'State', cell: (r) => badge(r.experiment.state) },
      { label: 'Project', cell: (r) => r.experiment.project },
      { label: 'Dataset', cell: (r) => r.experiment.dataset },
      { label: 'Arch', cell: (r) => r.experiment.arch },
      { label: 'Epochs', class: 'num', cell: (r) => String(orderEpochs(r.epochs).length) },
    ],
    runs,
    { cls: 'grid legend-table', rowAttrs: (r) => ({ dataset: { runId: r.experiment.id } }) },
  );

  // Spec differences: one row per differing field, one column per run.
  const diffs = Object.entries(data.spec_differences || {}).sort(([a], [b]) => a.localeCompare(b));
  const diffTable = diffs.length
    ? h(
        'div',
        { class: 'table-wrap' },
        h(
          'table',
          { class: 'grid diff', id: 'spec-differences' },
          h('thead', {}, h('tr', {}, h('th', {}, 'spec field'), runs.map((r, i) => h('th', {}, swatch(i), ' ', label(r, i))))),
          h(
            'tbody',
            {},
            diffs.map(([path, values]) =>
              h(
                'tr',
                { dataset: { path } },
                h('th', { scope: 'row' }, h('code', {}, path)),
                values.map((v) => h('td', { class: v === '<absent>' ? 'muted' : null }, show(v))),
              ),
            ),
          ),
        ),
      )
    : h('p', { class: 'muted', id: 'spec-differences' }, 'The specs are the same.');

  // Final and best values side by side; the best run of each row is highlighted.
  const ordered = runs.map((r) => orderEpochs(r.epochs));
  const metrics = ['valid_loss', 'train_loss'];
  for (const rows of ordered) for (const m of metricNames(rows)) if (!metrics.includes(m)) metrics.push(m);
  for (const r of runs) for (const m of Object.keys(r.best || {})) if (!metrics.includes(m)) metrics.push(m);
  const finalOf = (r, m) => {
    const v = r.final ? (LOSSES.includes(m) ? r.final[m] : r.final.metrics?.[m]) : null;
    return typeof v === 'number' ? v : null;
  };
  const valueRows = [];
  for (const m of metrics) {
    valueRows.push({ metric: m, kind: 'best', values: runs.map((r) => (typeof r.best?.[m] === 'number' ? r.best[m] : null)) });
    valueRows.push({ metric: m, kind: 'final', values: runs.map((r) => finalOf(r, m)) });
  }
  const pickBest = (values, metric) => {
    const present = values.filter((v) => v !== null);
    if (!present.length) return null;
    return higherIsBetter(metric) ? Math.max(...present) : Math.min(...present);
  };
  const metricsTable = h(
    'div',
    { class: 'table-wrap' },
    h(
      'table',
      { class: 'grid values', id: 'metric-values' },
      h('thead', {}, h('tr', {}, h('th', {}, 'metric'), h('th', {}, ''), runs.map((r, i) => h('th', {}, swatch(i), ' ', label(r, i))))),
      h(
        'tbody',
        {},
        valueRows.map((row) => {
          const best = pickBest(row.values, row.metric);
          return h(
            'tr',
            { dataset: { metric: row.metric, kind: row.kind }, class: row.kind === 'best' ? 'best-row' : 'final-row' },
            h('th', { scope: 'row' }, row.kind === 'best' ? row.metric : ''),
            h('td', { class: 'muted' }, row.kind),
            row.values.map((v) => h('td', { class: `num${v !== null && v === best && runs.length > 1 ? ' hl' : ''}` }, num(v))),
          );
        }),
      ),
    ),
  );

  // One chart per metric, one line per run.
  const charts = metrics
    .filter((m) => ordered.some((rows) => rows.some((row) => (LOSSES.includes(m) ? row[m] : row.metrics?.[m]) !== null && (LOSSES.includes(m) ? row[m] : row.metrics?.[m]) !== undefined)))
    .map((m) => {
      const chart = lineChart({
        title: m,
        xLabel: 'epoch (all stages)',
        yLabel: m,
        integerX: true,
        bands: runs.length === 1 ? stageBands(ordered[0]) : [],
        legend: false,
        series: runs.map((r, i) => ({ name: label(r, i), points: curve(ordered[i], m), color: color(i) })),
      });
      chart.dataset.metric = m;
      return chart;
    });

  replace(
    root,
    section('Runs', legend),
    section('Curves', h('div', { class: 'charts', id: 'compare-charts' }, charts)),
    section('Spec differences', diffTable),
    section('Final and best', metricsTable),
  );
}
