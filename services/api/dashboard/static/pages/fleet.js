// Fleet: workers (GPUs, heartbeat age, state, current run) and queues (depths, oldest waiting, why runs wait).
import { api } from '../api.js';
import { ago, badge, bytes, duration, every, h, replace, runLink, section, status, table } from '../dom.js';

function workersTable(list) {
  return table(
    [
      { label: 'Worker', cell: (w) => h('code', { class: 'worker-name' }, w.id) },
      { label: 'Host', cell: (w) => w.hostname },
      { label: 'State', cell: (w) => badge(w.state) },
      { label: 'GPUs', cell: (w) => (w.gpus ? `${w.gpus} × ${w.gpu_model || 'GPU'}` : 'CPU') },
      { label: 'Memory', class: 'num', cell: (w) => bytes(w.memory_bytes) },
      { label: 'Queues', cell: (w) => w.queues.join(', ') },
      {
        label: 'Heartbeat',
        class: 'num',
        cell: (w) => h('span', { class: w.seconds_since_heartbeat > list.lost_after_s ? 'late' : null, title: w.last_heartbeat }, `${duration(w.seconds_since_heartbeat)} ago`),
      },
      { label: 'Current run', cell: (w) => (w.current_experiment_id ? runLink(w.current_experiment_id) : h('span', { class: 'muted' }, 'idle')) },
      { label: 'Up since', cell: (w) => ago(w.started_at) },
      {
        label: 'Versions',
        cell: (w) => h('span', { class: 'muted small' }, Object.entries(w.versions || {}).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`).join(' · ')),
      },
    ],
    list.workers,
    { empty: 'No worker has registered yet.', cls: 'grid workers', rowAttrs: (w) => ({ dataset: { worker: w.id, state: w.state } }) },
  );
}

function queuesTable(list) {
  return table(
    [
      { label: 'Queue', cell: (q) => h('code', {}, q.name) },
      { label: 'Waiting (db)', class: 'num', cell: (q) => String(q.database_depth) },
      { label: 'Queued', class: 'num', cell: (q) => String(q.queued) },
      { label: 'Dispatched', class: 'num', cell: (q) => String(q.dispatched) },
      { label: 'Running', class: 'num', cell: (q) => String(q.running) },
      { label: 'Broker', class: 'num', cell: (q) => (q.broker_depth === null ? h('span', { class: 'muted', title: list.broker_error || '' }, '?') : String(q.broker_depth)) },
      {
        label: 'Oldest waiting',
        cell: (q) => (q.oldest_waiting_id ? [runLink(q.oldest_waiting_id), ` ${duration(q.oldest_waiting_age_seconds)}`] : h('span', { class: 'muted' }, '—')),
      },
      { label: 'Workers live / idle / lost', class: 'num', cell: (q) => `${q.live_workers} / ${q.idle_workers} / ${q.lost_workers}` },
    ],
    list.queues,
    { empty: 'No queue is known yet.', cls: 'grid queues', rowAttrs: (q) => ({ dataset: { queue: q.name } }) },
  );
}

function waitingTables(list) {
  const busy = list.queues.filter((q) => q.waiting?.length);
  if (!busy.length) return h('p', { class: 'muted' }, 'No run is waiting.');
  return busy.map((q) =>
    h(
      'div',
      { class: 'waiting' },
      h('h3', {}, `Waiting on ${q.name}`),
      table(
        [
          { label: '#', class: 'num', cell: (w) => String(w.position) },
          { label: 'Run', cell: (w) => runLink(w.id) },
          { label: 'State', cell: (w) => badge(w.state) },
          { label: 'Priority', class: 'num', cell: (w) => String(w.priority) },
          { label: 'Waiting for', class: 'num', cell: (w) => duration(w.age_seconds) },
          { label: 'Needs', cell: (w) => `${w.nodes} × ${w.gpus} GPU` },
          { label: 'Placeable', cell: (w) => (w.placeable_now ? 'now' : w.placeable_ever ? 'when a worker frees up' : h('strong', { class: 'late' }, 'never (no such worker)')) },
          { label: 'Why it waits', cell: (w) => w.reason || h('span', { class: 'muted' }, '—') },
        ],
        q.waiting,
        { cls: 'grid waiting-runs' },
      ),
    ),
  );
}

export async function render(root) {
  const workersBox = h('div', { id: 'workers' });
  const queuesBox = h('div', { id: 'queues' });
  const waitingBox = h('div', { id: 'waiting' });
  const brokerNote = h('div');
  replace(root, section('Workers', workersBox), section('Queues', brokerNote, queuesBox), section('Waiting runs', waitingBox));
  const refresh = async () => {
    const [workers, queues] = await Promise.all([api.workers(), api.queues()]);
    const live = workers.workers.filter((w) => w.state !== 'lost').length;
    replace(workersBox, h('p', { class: 'muted' }, `${live} live of ${workers.workers.length}; a worker is lost after ${duration(workers.lost_after_s)} without a heartbeat.`), workersTable(workers));
    replace(brokerNote, queues.broker_error ? h('p', { class: 'notice' }, `Broker depths unavailable: ${queues.broker_error}`) : null);
    replace(queuesBox, queuesTable(queues));
    replace(waitingBox, waitingTables(queues));
    status(`Updated ${new Date().toLocaleTimeString()}; refreshing every 5 s.`);
    return true;
  };
  await refresh();
  every(5000, refresh);
}
