// The /v1 JSON API, read with the session cookie (GET only; writes need a bearer token).
import { enc, withQuery } from './dom.js';

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** GET `path` with `params` (empty ones left out) and parse the JSON answer. */
export async function get(path, params = {}) {
  const url = withQuery(path, params);
  const response = await fetch(url, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
  if (response.status === 401) {
    // The session ended (token revoked or cookie expired): sign in again, then come back.
    location.assign(`/dashboard/login?next=${enc(location.pathname + location.search)}`);
    throw new ApiError(401, 'signed out', 'unauthorized');
  }
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    const message = body?.message || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, `${message} (${url})`, body?.error);
  }
  return response.json();
}

/** The same, but null for a 404 (a resource that may not exist yet). */
export async function maybe(path, params = {}) {
  try {
    return await get(path, params);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

const run = (id) => `/v1/experiments/${enc(id)}`;

/** Where a run's artifact downloads (bytes, or a redirect to a presigned URL). */
export function artifactUrl(id, name) {
  return `${run(id)}/artifacts/${String(name).split('/').map(enc).join('/')}`;
}

export const api = {
  me: () => get('/v1/me'),
  runs: (params) => get('/v1/runs', params),
  run: (id) => get(run(id)),
  metrics: (id) => get(`${run(id)}/metrics`),
  metricsCsvUrl: (id) => `${run(id)}/metrics?format=csv`,
  artifacts: (id) => get(`${run(id)}/artifacts`),
  lrFind: (id) => maybe(`${run(id)}/lr-find`),
  interpretation: (id) => maybe(`${run(id)}/interpretation`),
  events: (id, after) => get(`${run(id)}/events`, { after }),
  compare: (params) => get('/v1/compare', params),
  leaderboard: (params) => get('/v1/leaderboard', params),
  datasets: () => get('/v1/datasets'),
  failures: (params) => get('/v1/failures', params),
  workers: () => get('/v1/admin/workers'),
  queues: () => get('/v1/admin/queues'),
  sweeps: () => get('/v1/sweeps'),
  sweep: (id) => get(`/v1/sweeps/${enc(id)}`),
};

/** The server's rule (shared/results.py HIGHER_IS_BETTER): these grow, everything else shrinks. */
const HIGHER_IS_BETTER = new Set(['accuracy', 'accuracy_thresh', 'fbeta']);

export function higherIsBetter(metric) {
  return HIGHER_IS_BETTER.has(metric);
}
