// The dashboard's entry point: load the module of the page the server named in <body data-page>.
import { errorBox, replace } from './dom.js';

const PAGES = {
  runs: () => import('./pages/runs.js'),
  run: () => import('./pages/run.js'),
  compare: () => import('./pages/compare.js'),
  leaderboard: () => import('./pages/leaderboard.js'),
  fleet: () => import('./pages/fleet.js'),
  failures: () => import('./pages/failures.js'),
  sweeps: () => import('./pages/sweeps.js'),
  sweep: () => import('./pages/sweep.js'),
};

async function main() {
  const content = document.getElementById('content');
  const page = document.body.dataset.page;
  const load = PAGES[page];
  if (!load) {
    replace(content, errorBox(new Error(`unknown page ${page}`)));
    return;
  }
  try {
    const module = await load();
    await module.render(content, { ...document.body.dataset });
    document.body.dataset.ready = 'true';
  } catch (error) {
    replace(content, errorBox(error));
    document.body.dataset.ready = 'error';
  }
}

main();
