// Sweeps: every sweep the caller may see, and where its trials are.
import { api } from '../api.js';
import { ago, h, replace, table } from '../dom.js';

export function stateSummary(states) {
  return Object.entries(states || {})
    .filter(([, n]) => n)
    .map(([state, n]) => h('span', { class: `badge state-${state.replace(/[^a-z_]/gi, '')}` }, `${n} ${state}`));
}

export async function render(root) {
  const data = await api.sweeps();
  replace(
    root,
    table(
      [
        { label: 'Sweep', cell: (s) => h('a', { href: `/dashboard/sweeps/${encodeURIComponent(s.id)}` }, s.name) },
        { label: 'Project', cell: (s) => s.project },
        { label: 'Strategy', cell: (s) => s.strategy },
        { label: 'Parameters', cell: (s) => Object.keys(s.parameters || {}).map((p) => h('code', { class: 'param' }, p)) },
        { label: 'Trials', class: 'num', cell: (s) => String(s.count) },
        { label: 'States', cell: (s) => stateSummary(s.states) },
        { label: 'Created', cell: (s) => ago(s.created_at) },
      ],
      data.items,
      { empty: 'No sweeps yet (POST /v1/sweeps or `fitfleet sweep`).', cls: 'grid sweeps' },
    ),
  );
}
