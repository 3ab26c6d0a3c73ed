// Leaderboard: runs ranked by the best value of a metric (not the last), per dataset or per sweep.
import { api, higherIsBetter } from '../api.js';
import { ago, badge, h, num, query, replace, runLink, withQuery, table } from '../dom.js';

export async function render(root) {
  const params = query();
  const datasets = (await api.datasets()).items;
  const sweep = params.get('sweep') || '';
  let dataset = params.get('dataset') || '';
  if (!sweep && !dataset && datasets.length) dataset = datasets[0].dataset;
  const info = datasets.find((d) => d.dataset === dataset);
  const metricChoices = [...(info?.metrics || [])];
  for (const m of ['valid_loss', 'train_loss']) if (!metricChoices.includes(m)) metricChoices.push(m);
  if (sweep) for (const d of datasets) for (const m of d.metrics) if (!metricChoices.includes(m)) metricChoices.unshift(m);
  let metric = params.get('metric') || '';
  // fastai's usual metric first, then any other the runs logged, then the validation loss.
  if (!metric) metric = ['error_rate', ...metricChoices].find((m) => metricChoices.includes(m) && m !== 'valid_loss' && m !== 'train_loss') || 'valid_loss';
  if (!metricChoices.includes(metric)) metricChoices.unshift(metric);
  const limit = params.get('limit') || '';

  const datasetSelect = h(
    'select',
    { name: 'dataset', id: 'f-dataset', disabled: Boolean(sweep) },
    datasets.map((d) => h('option', { value: d.dataset, selected: d.dataset === dataset }, `${d.dataset} (${d.runs} runs)`)),
  );
  const metricSelect = h('select', { name: 'metric', id: 'f-metric' }, metricChoices.map((m) => h('option', { value: m, selected: m === metric }, m)));
  const form = h(
    'form',
    { class: 'filters', method: 'get', action: '/dashboard/leaderboard' },
    sweep ? h('label', {}, 'Sweep', h('input', { name: 'sweep', value: sweep, readonly: true, size: 14 })) : h('label', {}, 'Dataset', datasetSelect),
    h('label', {}, 'Metric', metricSelect),
    h('button', { type: 'submit' }, 'Show'),
    sweep ? h('a', { href: '/dashboard/leaderboard', class: 'button-link' }, 'All datasets') : null,
  );
  const submit = () => {
    const next = sweep ? { sweep, metric: metricSelect.value } : { dataset: datasetSelect.value, metric: metricSelect.value };
    if (!sweep && datasetSelect.value !== dataset) delete next.metric; // another dataset, its own metrics
    location.assign(withQuery('/dashboard/leaderboard', { ...next, limit }));
  };
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });
  datasetSelect.addEventListener('change', submit);
  metricSelect.addEventListener('change', submit);

  if (!sweep && !dataset) {
    replace(root, form, h('p', { class: 'muted' }, 'No runs have logged metrics yet.'));
    return;
  }
  const board = await api.leaderboard(sweep ? { sweep, metric, limit } : { dataset, metric, limit });
  const direction = board.higher_is_better ?? higherIsBetter(metric);
  const entries = board.entries;
  const top = entries.slice(0, Math.min(entries.length, 5)).map((e) => e.run.id);
  const rows = table(
    [
      { label: '#', class: 'num rank', cell: (e) => String(e.rank) },
      { label: 'Run', cell: (e) => runLink(e.run.id, e.run.name) },
      { label: 'State', cell: (e) => badge(e.run.state) },
      { label: `best ${board.metric}`, class: 'num sorted', cell: (e) => h('strong', { dataset: { best: e.best } }, num(e.best)) },
      { label: 'reached at', cell: (e) => (e.best_stage ? `${e.best_stage} · epoch ${e.best_epoch}` : '—') },
      { label: `final ${board.metric}`, class: 'num', cell: (e) => num(e.final) },
      { label: 'Arch', cell: (e) => e.run.arch },
      { label: 'Project', cell: (e) => e.run.project },
      { label: 'Epochs', class: 'num', cell: (e) => `${e.run.epochs_done}/${e.run.epochs_total}` },
      { label: 'Created', cell: (e) => ago(e.run.created_at) },
    ],
    entries,
    { empty: 'No run has logged this metric yet.', cls: 'grid leaderboard', rowAttrs: (e) => ({ dataset: { runId: e.run.id, rank: e.rank } }) },
  );
  replace(
    root,
    form,
    h(
      'p',
      { class: 'muted', id: 'leaderboard-note' },
      `${board.count} runs on ${board.sweep ? `sweep ${board.sweep}` : `dataset ${board.dataset}`}, ranked by the best ${board.metric} each reached (${direction ? 'higher' : 'lower'} is better), not its last value. `,
      top.length >= 2 ? h('a', { href: `/dashboard/compare?ids=${top.map(encodeURIComponent).join(',')}` }, `Compare the top ${top.length}`) : null,
    ),
    rows,
  );
}
