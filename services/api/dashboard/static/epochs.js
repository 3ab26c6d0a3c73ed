// Epoch rows as curves: one x per epoch across every stage, the latest attempt of each.

export const LOSSES = ['train_loss', 'valid_loss'];

/** Rows in training order (stages as first seen or as named, then epoch), the latest attempt only. */
export function orderEpochs(rows, stageNames = []) {
  const order = new Map(stageNames.map((name, i) => [name, i]));
  for (const row of rows) if (!order.has(row.stage)) order.set(row.stage, order.size);
  const latest = new Map();
  for (const row of rows) {
    const key = `${row.stage}\u0000${row.epoch}`;
    const seen = latest.get(key);
    if (!seen || row.attempt >= seen.attempt) latest.set(key, row);
  }
  return [...latest.values()].sort((a, b) => order.get(a.stage) - order.get(b.stage) || a.epoch - b.epoch);
}

/** Every metric the rows carry (besides the losses), in first-seen order. */
export function metricNames(rows) {
  const names = [];
  for (const row of rows) for (const key of Object.keys(row.metrics || {})) if (!names.includes(key)) names.push(key);
  return names;
}

export function valueOf(row, metric) {
  const value = LOSSES.includes(metric) ? row[metric] : row.metrics?.[metric];
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

/** [[x, y]] with x = 1, 2, ... over the ordered rows. */
export function curve(rows, metric) {
  return rows.map((row, i) => [i + 1, valueOf(row, metric)]);
}

/** Where each stage after the first starts, to draw as a line on the chart. */
export function stageBands(rows) {
  const bands = [];
  rows.forEach((row, i) => {
    if (i > 0 && rows[i - 1].stage !== row.stage) bands.push({ x: i + 0.5, label: row.stage });
  });
  return bands;
}
