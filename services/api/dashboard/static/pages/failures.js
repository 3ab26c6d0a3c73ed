// Failures: failed runs grouped by reason, with counts and links to the runs.
import { api } from '../api.js';
import { h, query, replace, runLink, when, withQuery } from '../dom.js';

export async function render(root) {
  const params = query();
  const project = params.get('project') || '';
  const form = h(
    'form',
    { class: 'filters', method: 'get', action: '/dashboard/failures' },
    h('label', {}, 'Project', h('input', { name: 'project', value: project, size: 14 })),
    h('button', { type: 'submit' }, 'Filter'),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    location.assign(withQuery('/dashboard/failures', { project: new FormData(form).get('project') }));
  });
  const data = await api.failures({ project });
  const groups = data.groups.map((g) =>
    h(
      'article',
      { class: 'failure-group panel', dataset: { reason: g.reason } },
      h('header', {}, h('span', { class: 'count' }, String(g.count)), h('h2', { class: 'reason' }, g.reason)),
      h('p', { class: 'muted' }, `first ${when(g.first_at)} · last ${when(g.last_at)}`),
      h('pre', { class: 'example' }, g.example),
      h('div', { class: 'run-links' }, g.experiment_ids.map((id) => runLink(id)), g.count > g.experiment_ids.length ? h('span', { class: 'muted' }, ` and ${g.count - g.experiment_ids.length} more`) : null),
    ),
  );
  replace(
    root,
    form,
    h('p', { class: 'muted' }, `${data.total} failed runs in ${data.groups.length} groups (numbers, ids and paths blanked out to group them).`),
    groups.length ? h('div', { id: 'failure-groups' }, groups) : h('p', { class: 'muted', id: 'failure-groups' }, 'No failed runs.'),
  );
}
