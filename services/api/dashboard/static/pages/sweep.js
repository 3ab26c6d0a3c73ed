// One sweep: its trials with their values and states, links to its leaderboard and comparison.
import { api } from '../api.js';
import { badge, every, facts, h, num, progressBar, replace, runLink, section, show, table, when } from '../dom.js';
import { stateSummary } from './sweeps.js';

const LIVE = new Set(['queued', 'dispatched', 'running']);

export async function render(root, data) {
  const id = data.sweepId;
  const draw = async () => {
    const [sweep, runs] = await Promise.all([api.sweep(id), api.runs({ sweep: id, limit: 200 }).catch(() => ({ items: [] }))]);
    document.getElementById('title').textContent = `Sweep ${sweep.name}`;
    const byId = new Map(runs.items.map((r) => [r.id, r]));
    const metricNames = [];
    for (const r of runs.items) for (const m of Object.keys(r.metrics || {})) if (!metricNames.includes(m)) metricNames.push(m);
    const main = ['error_rate', ...metricNames].find((m) => metricNames.includes(m) && m !== 'valid_loss' && m !== 'train_loss') || 'valid_loss';
    const paramNames = [];
    for (const t of sweep.trials) for (const k of Object.keys(t.values || {})) if (!paramNames.includes(k)) paramNames.push(k);
    const links = h(
      'p',
      { class: 'links' },
      h('a', { href: `/dashboard/leaderboard?sweep=${encodeURIComponent(id)}&metric=${encodeURIComponent(main)}` }, `Leaderboard by ${main}`),
      ' · ',
      sweep.trials.length >= 2 ? h('a', { href: `/dashboard/compare?sweep=${encodeURIComponent(id)}` }, 'Compare all trials') : 'one trial: nothing to compare',
      ' · ',
      h('a', { href: `/dashboard/runs?sweep=${encodeURIComponent(id)}` }, 'Trials on the runs page'),
    );
    replace(
      root,
      facts([
        ['Project', sweep.project],
        ['Strategy', `${sweep.strategy}${sweep.strategy === 'random' ? ` (seed ${sweep.seed})` : ''}`],
        ['Trials', String(sweep.count)],
        ['States', h('span', {}, stateSummary(sweep.states))],
        ['Created', when(sweep.created_at)],
      ]),
      links,
      section('Parameters', h('pre', { class: 'spec' }, JSON.stringify(sweep.parameters, null, 2))),
      section(
        'Trials',
        table(
          [
            { label: 'Run', cell: (t) => runLink(t.experiment_id, byId.get(t.experiment_id)?.name) },
            { label: 'State', cell: (t) => (byId.get(t.experiment_id) ? badge(byId.get(t.experiment_id).state) : '—') },
            ...paramNames.map((p) => ({ label: p, cell: (t) => h('code', {}, show(t.values?.[p])) })),
            {
              label: 'Progress',
              cell: (t) => {
                const r = byId.get(t.experiment_id);
                return r ? progressBar(r.state === 'succeeded' ? 1 : r.progress, `${r.epochs_done}/${r.epochs_total}`) : '—';
              },
            },
            ...metricNames.map((m) => ({
              label: `best ${m}`,
              class: 'num',
              cell: (t) => num(byId.get(t.experiment_id)?.metrics?.[m]?.best),
            })),
          ],
          sweep.trials,
          { cls: 'grid trials', rowAttrs: (t) => ({ dataset: { runId: t.experiment_id } }) },
        ),
      ),
    );
    return runs.items.some((r) => LIVE.has(r.state));
  };
  const live = await draw();
  if (live) every(5000, draw);
}
