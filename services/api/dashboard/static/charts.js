// A small SVG line chart: linear or log x, several series, vertical marks; no dependencies.

const NS = 'http://www.w3.org/2000/svg';

export const PALETTE = [
  '#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd',
  '#8c564b', '#e377c2', '#17becf', '#7f7f7f', '#bcbd22',
];

export function color(index) {
  return PALETTE[index % PALETTE.length];
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(key, String(value));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

/** About `count` round tick values covering [min, max]. */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (min === max) return [min];
  const raw = (max - min) / Math.max(1, count);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => raw <= s) || 10 * power;
  const ticks = [];
  // Counted in whole steps and rounded, so 1 + 5 × 0.2 is 2, not 2.0000000000000004.
  for (let k = Math.ceil(min / step - 1e-9); k * step <= max + step * 1e-9; k += 1) {
    ticks.push(Number((k * step).toPrecision(12)));
  }
  return ticks;
}

/** Powers of ten covering [min, max] (both > 0), thinned to at most ~8. */
export function logTicks(min, max) {
  const lo = Math.floor(Math.log10(min));
  const hi = Math.ceil(Math.log10(max));
  const every = Math.max(1, Math.ceil((hi - lo + 1) / 8));
  const ticks = [];
  for (let p = lo; p <= hi; p += every) ticks.push(Number(`1e${p}`));
  return ticks.filter((t) => t >= min * 0.999 && t <= max * 1.001);
}

export function tickLabel(value) {
  if (value === 0) return '0';
  const abs = Math.abs(value);
  if (abs >= 1e4 || abs < 1e-2) {
    const [mantissa, exponent] = value.toExponential(1).split('e');
    return `${mantissa.replace(/\.0$/, '')}e${Number(exponent)}`;
  }
  return String(Number(value.toPrecision(3)));
}

/**
 * Draw a chart and return a <figure>.
 *
 * options.series: [{name, points: [[x, y|null], ...], color?, dashed?}]
 * options.logX / logY: log scales (values <= 0 are left out)
 * options.marks: [{x, label}] vertical dashed lines with a label (e.g. the LR suggestion)
 * options.bands: [{x, label}] stage starts: thin lines labelled at the top
 * options.integerX: only whole-number x ticks (epochs)
 */
export function lineChart(options) {
  const {
    series = [],
    width = 560,
    height = 260,
    logX = false,
    logY = false,
    xLabel = '',
    yLabel = '',
    title = '',
    marks = [],
    bands = [],
    legend = true,
    integerX = false,
  } = options;
  const margin = { top: 18, right: 14, bottom: 38, left: 58 };
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const okX = (x) => Number.isFinite(x) && (!logX || x > 0);
  const okY = (y) => y !== null && Number.isFinite(y) && (!logY || y > 0);

  const xs = [];
  const ys = [];
  for (const s of series) {
    for (const [x, y] of s.points) {
      if (okX(x) && okY(y)) {
        xs.push(x);
        ys.push(y);
      }
    }
  }
  for (const m of marks) if (okX(m.x)) xs.push(m.x);

  const figure = document.createElement('figure');
  figure.className = 'chart';
  if (title) {
    const caption = document.createElement('figcaption');
    caption.textContent = title;
    figure.append(caption);
  }
  const root = svg('svg', {
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: 'img',
    'aria-label': title || 'chart',
    class: 'chart-svg',
  });
  figure.append(root);
  if (!xs.length) {
    root.append(svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle', class: 'chart-empty' }, 'no data yet'));
    return figure;
  }

  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (logX) {
    [x0, x1] = [Math.log10(x0), Math.log10(x1)];
  }
  if (logY) {
    [y0, y1] = [Math.log10(y0), Math.log10(y1)];
  }
  if (x0 === x1) {
    x0 -= 0.5;
    x1 += 0.5;
  }
  if (y0 === y1) {
    const pad = Math.abs(y0) * 0.1 || 0.5;
    y0 -= pad;
    y1 += pad;
  } else {
    const pad = (y1 - y0) * 0.06;
    y0 -= pad;
    y1 += pad;
  }
  const sx = (x) => margin.left + (((logX ? Math.log10(x) : x) - x0) / (x1 - x0)) * plotW;
  const sy = (y) => margin.top + plotH - (((logY ? Math.log10(y) : y) - y0) / (y1 - y0)) * plotH;

  // Grid and axes.
  const grid = svg('g', { class: 'chart-grid' });
  const axes = svg('g', { class: 'chart-axes' });
  root.append(grid, axes);
  let xTicks = logX ? logTicks(10 ** x0, 10 ** x1) : niceTicks(x0, x1, Math.max(2, Math.floor(plotW / 80)));
  if (integerX) xTicks = xTicks.filter((t) => Number.isInteger(t));
  const yTicks = logY ? logTicks(10 ** y0, 10 ** y1) : niceTicks(y0, y1, Math.max(2, Math.floor(plotH / 45)));
  for (const t of xTicks) {
    const x = sx(t);
    grid.append(svg('line', { x1: x, x2: x, y1: margin.top, y2: margin.top + plotH }));
    axes.append(svg('text', { x, y: margin.top + plotH + 14, 'text-anchor': 'middle' }, tickLabel(t)));
  }
  for (const t of yTicks) {
    const y = sy(t);
    grid.append(svg('line', { x1: margin.left, x2: margin.left + plotW, y1: y, y2: y }));
    axes.append(svg('text', { x: margin.left - 6, y: y + 4, 'text-anchor': 'end' }, tickLabel(t)));
  }
  axes.append(
    svg('rect', { x: margin.left, y: margin.top, width: plotW, height: plotH, class: 'chart-frame' }),
  );
  if (xLabel) {
    axes.append(svg('text', { x: margin.left + plotW / 2, y: height - 4, 'text-anchor': 'middle', class: 'chart-label' }, xLabel));
  }
  if (yLabel) {
    axes.append(
      svg('text', { x: 12, y: margin.top + plotH / 2, 'text-anchor': 'middle', transform: `rotate(-90 12 ${margin.top + plotH / 2})`, class: 'chart-label' }, yLabel),
    );
  }

  // Stage boundaries.
  for (const band of bands) {
    if (!okX(band.x)) continue;
    const x = sx(band.x);
    const g = svg('g', { class: 'chart-band' });
    g.append(svg('line', { x1: x, x2: x, y1: margin.top, y2: margin.top + plotH }));
    g.append(svg('text', { x: x + 3, y: margin.top + 10 }, band.label));
    root.append(g);
  }

  // The series: a path per series (broken where y is missing), dots when there are few points.
  series.forEach((s, index) => {
    const stroke = s.color || color(index);
    const pts = s.points.filter(([x]) => okX(x));
    let d = '';
    let pen = false;
    let count = 0;
    for (const [x, y] of pts) {
      if (!okY(y)) {
        pen = false;
        continue;
      }
      d += `${pen ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = true;
      count += 1;
    }
    if (!count) return;
    const g = svg('g', { class: 'chart-series', 'data-series': s.name });
    const path = svg('path', {
      d,
      fill: 'none',
      stroke,
      'stroke-width': 2,
      'stroke-dasharray': s.dashed ? '5 3' : null,
      class: 'series',
      'data-series': s.name,
    });
    path.append(svg('title', {}, s.name));
    g.append(path);
    if (count <= 40) {
      for (const [x, y] of pts) {
        if (!okY(y)) continue;
        const dot = svg('circle', { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 2.6, fill: stroke });
        dot.append(svg('title', {}, `${s.name}: ${tickLabel(x)} → ${y.toPrecision(4)}`));
        g.append(dot);
      }
    }
    root.append(g);
  });

  // Marks (e.g. the LR finder's suggestion).
  for (const mark of marks) {
    if (!okX(mark.x)) continue;
    const x = sx(mark.x);
    const g = svg('g', { class: 'chart-mark', 'data-mark': mark.label });
    g.append(svg('line', { x1: x, x2: x, y1: margin.top, y2: margin.top + plotH }));
    const anchor = x > margin.left + plotW * 0.7 ? 'end' : 'start';
    g.append(svg('text', { x: anchor === 'end' ? x - 4 : x + 4, y: margin.top + 12, 'text-anchor': anchor }, mark.label));
    if (mark.y !== undefined && okY(mark.y)) g.append(svg('circle', { cx: x, cy: sy(mark.y), r: 4 }));
    root.append(g);
  }

  if (legend && series.length > 1) {
    const list = document.createElement('div');
    list.className = 'legend';
    series.forEach((s, index) => {
      const item = document.createElement('span');
      item.className = 'legend-item';
      const swatch = document.createElement('span');
      swatch.className = s.dashed ? 'swatch dashed' : 'swatch';
      swatch.style.borderColor = s.color || color(index);
      item.append(swatch, document.createTextNode(s.name));
      list.append(item);
    });
    figure.append(list);
  }
  return figure;
}
