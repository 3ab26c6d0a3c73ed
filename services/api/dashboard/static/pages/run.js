// One run: header, curves, LR finder, plots, interpretation, epochs, artifacts, events.
import { api, artifactUrl } from '../api.js';
import { color, lineChart } from '../charts.js';
import {
  badge, bytes, duration, every, facts, h, num, parseDate, progressBar, replace, section, status, table, when,
} from '../dom.js';
import { curve, metricNames, orderEpochs, stageBands } from '../epochs.js';

const LIVE = new Set(['queued', 'dispatched', 'running']);

// The worker's figures (workers/training/engine.py), in the order a reader wants them.
const PLOT_ORDER = [
  'plots/show_batch.png',
  'plots/losses.png',
  'plots/metrics.png',
  'plots/lr_find.png',
  'plots/lr_find-',
  'plots/top_losses.png',
  'plots/confusion_matrix.png',
];
const PLOT_TITLES = {
  'plots/show_batch.png': 'show_batch: a training batch',
  'plots/losses.png': 'losses (per batch)',
  'plots/metrics.png': 'metrics',
  'plots/lr_find.png': 'LR finder',
  'plots/top_losses.png': 'top losses',
  'plots/confusion_matrix.png': 'confusion matrix',
};

function header(run) {
  const started = parseDate(run.started_at);
  const finished = parseDate(run.finished_at);
  const ran = started ? ((finished || new Date()) - started) / 1000 : null;
  const latest = run.latest_metrics;
  const parts = [
    h(
      'div',
      { class: 'run-title' },
      badge(run.state),
      h('code', { class: 'muted', title: 'run id' }, run.id),
      run.cancel_requested && LIVE.has(run.state) ? h('span', { class: 'badge state-cancelled' }, 'cancel requested') : null,
    ),
  ];
  if (run.waiting_reason) {
    parts.push(h('p', { class: 'notice', id: 'waiting-reason' }, h('strong', {}, 'Waiting: '), run.waiting_reason));
  }
  if (run.error) {
    parts.push(h('div', { class: 'error-box', id: 'run-error' }, h('strong', {}, 'Error'), h('pre', {}, run.error)));
  }
  parts.push(
    facts([
      ['Project', run.project],
      ['Dataset', run.dataset],
      ['Arch', run.arch],
      ['Queue', `${run.queue} (priority ${run.priority})`],
      ['Attempt', String(run.attempt)],
      ['Stage', LIVE.has(run.state) && run.current_stage ? `${run.current_stage} · epoch ${run.current_epoch ?? '—'}` : null],
      ['Latest valid_loss', latest ? num(latest.valid_loss) : null],
      ['Created', when(run.created_at)],
      ['Started', run.started_at ? when(run.started_at) : null],
      ['Finished', run.finished_at ? when(run.finished_at) : null],
      ['Ran for', ran !== null ? duration(ran) : null],
      ['Submitted by', run.submitted_by],
      ['Tags', run.tags?.length ? h('span', { class: 'tags' }, run.tags.map((t) => h('span', { class: 'tag' }, t))) : null],
    ]),
  );
  return parts;
}

function progress(run, rows) {
  if (!LIVE.has(run.state)) return null;
  const total = (run.spec?.stages || []).reduce((sum, stage) => sum + (Number(stage.epochs) || 0), 0);
  const done = rows.length;
  return progressBar(total ? done / total : null, `${done}/${total || '?'} epochs`);
}

function curves(rows, run) {
  if (!rows.length) return [h('p', { class: 'muted' }, LIVE.has(run.state) ? 'No epoch finished yet.' : 'No epoch finished.')];
  const bands = stageBands(rows);
  const charts = [
    lineChart({
      title: 'Losses per epoch',
      xLabel: 'epoch (all stages)',
      yLabel: 'loss',
      integerX: true,
      bands,
      series: [
        { name: 'train_loss', points: curve(rows, 'train_loss'), color: color(0) },
        { name: 'valid_loss', points: curve(rows, 'valid_loss'), color: color(1) },
      ],
    }),
  ];
  const metrics = metricNames(rows);
  if (metrics.length) {
    charts.push(
      lineChart({
        title: 'Metrics per epoch',
        xLabel: 'epoch (all stages)',
        yLabel: metrics.length === 1 ? metrics[0] : 'value',
        integerX: true,
        bands,
        series: metrics.map((m, i) => ({ name: m, points: curve(rows, m), color: color(i + 2) })),
      }),
    );
  }
  return [h('div', { class: 'charts' }, charts)];
}

function lrFind(data) {
  const stages = (data?.stages || []).filter((s) => s.points?.length);
  if (!stages.length) return null;
  return section(
    'LR finder',
    h(
      'div',
      { class: 'charts', id: 'lr-find' },
      stages.map((stage) =>
        lineChart({
          title: `${stage.stage}: loss vs learning rate${stage.suggestion ? ` (suggested ${num(stage.suggestion, 3)})` : ''}`,
          xLabel: 'learning rate (log)',
          yLabel: 'smoothed loss',
          logX: true,
          series: [{ name: stage.stage, points: stage.points.map(([lr, loss]) => [lr, loss]), color: color(0) }],
          marks: stage.suggestion ? [{ x: stage.suggestion, label: `suggestion ${num(stage.suggestion, 3)}${stage.method ? ` (${stage.method})` : ''}` }] : [],
        }),
      ),
    ),
  );
}

function plots(id, artifacts) {
  let pngs = artifacts.filter((a) => a.name.startsWith('plots/') && a.name.endsWith('.png'));
  // plots/lr_find.png repeats the last stage's plots/lr_find-<stage>.png: show each once.
  if (pngs.some((a) => a.name.startsWith('plots/lr_find-'))) pngs = pngs.filter((a) => a.name !== 'plots/lr_find.png');
  if (!pngs.length) return null;
  const rank = (name) => {
    const i = PLOT_ORDER.indexOf(name.startsWith('plots/lr_find-') ? 'plots/lr_find-' : name);
    return i === -1 ? PLOT_ORDER.length : i;
  };
  pngs.sort((a, b) => rank(a.name) - rank(b.name) || a.name.localeCompare(b.name));
  return section(
    'Plots',
    h(
      'div',
      { class: 'gallery', id: 'plots' },
      pngs.map((a) =>
        h(
          'figure',
          { class: 'plot', dataset: { artifact: a.name } },
          h('a', { href: artifactUrl(id, a.name), title: 'download' }, h('img', { src: artifactUrl(id, a.name), alt: a.name, loading: 'eager' })),
          h('figcaption', {}, PLOT_TITLES[a.name] || a.name.replace(/^plots\//, '').replace(/^lr_find-(.*)\.png$/, 'LR finder: $1')),
        ),
      ),
    ),
  );
}

function confusion(classes, matrix) {
  if (!matrix?.length) return null;
  const max = Math.max(1, ...matrix.flat());
  const head = h('tr', {}, h('th', { class: 'corner' }, 'actual \\ predicted'), classes.map((c) => h('th', { scope: 'col' }, c)));
  const body = matrix.map((row, i) =>
    h(
      'tr',
      {},
      h('th', { scope: 'row' }, classes[i] ?? String(i)),
      row.map((count, j) => {
        const cell = h('td', { class: `num cm${i === j ? ' diag' : ''}` }, String(count));
        const alpha = count / max;
        cell.style.backgroundColor = i === j ? `rgba(31, 119, 180, ${0.12 + 0.6 * alpha})` : count ? `rgba(214, 39, 40, ${0.12 + 0.6 * alpha})` : '';
        return cell;
      }),
    ),
  );
  return h('div', { class: 'table-wrap' }, h('table', { class: 'grid confusion', id: 'confusion-matrix' }, h('thead', {}, head), h('tbody', {}, body)));
}

function interpretationSection(report) {
  if (!report) {
    return section('Interpretation', h('p', { class: 'muted' }, 'No report yet: report.json is written when the run ends.'));
  }
  const interp = report.interpretation;
  const children = [];
  const findings = report.findings || [];
  children.push(h('h3', {}, 'Findings'));
  if (findings.length) {
    children.push(
      h(
        'ul',
        { class: 'findings', id: 'findings' },
        findings.map((f) =>
          h(
            'li',
            { class: `finding severity-${f.severity}` },
            h('span', { class: `badge sev-${f.severity}` }, f.severity),
            h('strong', {}, ` ${f.code}`),
            h('span', { class: 'muted' }, ` (${f.stage})`),
            h('p', {}, f.message),
            f.advice ? h('p', { class: 'advice' }, f.advice) : null,
            f.evidence && Object.keys(f.evidence).length ? h('details', {}, h('summary', {}, 'evidence'), h('pre', {}, JSON.stringify(f.evidence, null, 2))) : null,
          ),
        ),
      ),
    );
  } else {
    children.push(h('p', { class: 'muted', id: 'findings' }, 'Nothing went wrong by the notes\' rules.'));
  }
  if (interp) {
    const split = h('div', { class: 'split' });
    const cm = confusion(interp.classes || report.classes || [], interp.confusion_matrix);
    if (cm) split.append(h('div', {}, h('h3', {}, 'Confusion matrix'), cm));
    split.append(
      h(
        'div',
        {},
        h('h3', {}, `Most confused (≥ ${interp.most_confused_min ?? 1})`),
        table(
          [
            { label: 'actual', cell: (r) => r[0] },
            { label: 'predicted', cell: (r) => r[1] },
            { label: 'count', class: 'num', cell: (r) => String(r[2]) },
          ],
          interp.most_confused || [],
          { empty: 'No pair of classes confused that often.' },
        ),
      ),
    );
    children.push(split);
    children.push(h('h3', {}, 'Top losses'));
    children.push(
      table(
        [
          { label: '#', class: 'num', cell: (_r, i) => String(i + 1) },
          { label: 'file', cell: (r) => h('code', {}, r.file) },
          { label: 'predicted', cell: (r) => r.predicted },
          { label: 'actual', cell: (r) => r.actual },
          { label: 'loss', class: 'num', cell: (r) => num(r.loss) },
          { label: 'p(actual)', class: 'num', cell: (r) => num(r.probability, 3) },
        ],
        interp.top_losses || [],
        { empty: 'No validation items.', cls: 'grid top-losses' },
      ),
    );
  }
  return section('Interpretation', children);
}

function epochTable(rows) {
  const metrics = metricNames(rows);
  return table(
    [
      { label: 'stage', cell: (r) => r.stage },
      { label: 'epoch', class: 'num', cell: (r) => String(r.epoch) },
      { label: 'train_loss', class: 'num', cell: (r) => num(r.train_loss) },
      { label: 'valid_loss', class: 'num', cell: (r) => num(r.valid_loss) },
      ...metrics.map((m) => ({ label: m, class: 'num', cell: (r) => num(r.metrics?.[m]) })),
      { label: 'lr', class: 'num', cell: (r) => num(r.lr, 3) },
      { label: 'time', class: 'num', cell: (r) => duration(r.seconds) },
      { label: 'img/s', class: 'num', cell: (r) => num(r.images_per_second, 4) },
      { label: 'bs', class: 'num', cell: (r) => (r.batch_size ?? '—').toString() },
      { label: 'attempt', class: 'num', cell: (r) => String(r.attempt) },
    ],
    rows,
    { empty: 'No epoch finished yet.', cls: 'grid epochs' },
  );
}

function artifactTable(id, artifacts) {
  return table(
    [
      { label: 'name', cell: (a) => h('a', { href: artifactUrl(id, a.name), download: a.name.split('/').pop() }, a.name) },
      { label: 'kind', cell: (a) => a.kind },
      { label: 'size', class: 'num', cell: (a) => bytes(a.bytes) },
      { label: 'sha256', cell: (a) => h('code', { title: a.sha256 }, a.sha256.slice(0, 12)) },
      { label: 'created', cell: (a) => when(a.created_at) },
    ],
    artifacts,
    { empty: 'No artifacts yet.', cls: 'grid artifacts' },
  );
}

function eventItem(event) {
  const data = event.data && Object.keys(event.data).length ? h('details', {}, h('summary', {}, 'data'), h('pre', {}, JSON.stringify(event.data, null, 2))) : null;
  return h(
    'li',
    { class: `event kind-${String(event.kind).replace(/[^a-z_]/gi, '')}`, dataset: { eventId: event.id } },
    h('time', { title: event.created_at }, when(event.created_at)),
    h('span', { class: 'badge event-kind' }, event.kind),
    h('span', { class: 'event-message' }, event.message),
    event.actor ? h('span', { class: 'muted' }, ` by ${event.actor}`) : null,
    data,
  );
}

export async function render(root, data) {
  const id = data.runId;
  const head = h('div', { id: 'run-header' });
  const live = h('div', { id: 'run-progress' });
  const curvesBox = h('div', { id: 'curves' });
  const lrBox = h('div');
  const plotsBox = h('div');
  const interpBox = h('div');
  const epochsBox = h('div', { id: 'epochs' });
  const artifactsBox = h('div', { id: 'artifacts' });
  const eventList = h('ol', { class: 'timeline', id: 'events' });
  const specBox = h('div');
  replace(
    root,
    head,
    live,
    section('Curves', curvesBox),
    lrBox,
    plotsBox,
    interpBox,
    section('Epochs', h('p', {}, h('a', { href: api.metricsCsvUrl(id) }, 'download CSV')), epochsBox),
    section('Artifacts', artifactsBox),
    section('Events', eventList),
    specBox,
  );

  let lastEvent = null;
  const addEvents = async () => {
    const page = await api.events(id, lastEvent ?? undefined);
    for (const event of page.items) eventList.append(eventItem(event));
    if (page.last_id !== null && page.last_id !== undefined) lastEvent = page.last_id;
    if (!eventList.children.length) replace(eventList, h('li', { class: 'muted' }, 'No events.'));
    else eventList.querySelector('li.muted')?.remove();
  };

  // The parts that change while a run trains.
  const refreshLive = async () => {
    const [run, metrics] = await Promise.all([api.run(id), api.metrics(id)]);
    document.title = `${run.name} · fitfleet`;
    document.getElementById('title').textContent = run.name;
    const rows = orderEpochs(metrics, (run.spec?.stages || []).map((s) => s.name));
    replace(head, header(run));
    replace(live, progress(run, rows));
    replace(curvesBox, curves(rows, run));
    replace(epochsBox, epochTable(rows));
    try {
      await addEvents();
    } catch (error) {
      replace(eventList, h('li', { class: 'muted' }, `Events unavailable: ${error.message}`));
    }
    return run;
  };

  // The parts a run writes as it goes or at its end.
  const refreshFiles = async (run) => {
    const [artifacts, lr] = await Promise.all([api.artifacts(id).then((a) => a.items), api.lrFind(id).catch(() => null)]);
    // report.json is written when the run ends; ask for it only once it is there (no 404 noise).
    const report = artifacts.some((a) => a.name === 'report.json') ? await api.interpretation(id).catch(() => null) : null;
    replace(lrBox, lrFind(lr));
    replace(plotsBox, plots(id, artifacts));
    replace(interpBox, interpretationSection(report));
    replace(artifactsBox, artifactTable(id, artifacts));
    replace(specBox, section('Spec', h('details', {}, h('summary', {}, 'the spec as submitted'), h('pre', { class: 'spec' }, JSON.stringify(run.spec, null, 2)))));
  };

  let run = await refreshLive();
  await refreshFiles(run);
  status(LIVE.has(run.state) ? 'Live: refreshing every 3 s.' : '');
  if (LIVE.has(run.state)) {
    let ticks = 0;
    every(3000, async () => {
      ticks += 1;
      run = await refreshLive();
      if (!LIVE.has(run.state) || ticks % 10 === 0) await refreshFiles(run);
      if (!LIVE.has(run.state)) status(`Finished: ${run.state}.`);
      return LIVE.has(run.state);
    });
  }
}

