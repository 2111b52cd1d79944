/**
 * The small expert-load picture drawn for each store: one SVG rect per (layer row, expert column) cell of the
 * server's bounded `load_picture`, coloured on a diverging scale around a balanced router (1x uniform load),
 * so a hot expert reads red and a starved one blue whatever the expert count.
 */
import { ILoadPicture } from './api';

const SVG_NS = 'http://www.w3.org/2000/svg';
const WIDTH = 192; // px; the sidebar is ~250 px wide by default
const ROW_HEIGHT = 6; // px per layer row
const MAX_HEIGHT = 96;

/** Colour for a load relative to uniform: log2 scale clamped to [1/8x, 8x], white at 1x. */
export function loadColour(relative: number): string {
  const t = Math.max(-1, Math.min(1, Math.log2(Math.max(relative, 1e-6)) / 3)); // [-1, 1]
  const fade = (c: number) => Math.round(255 - (255 - c) * Math.abs(t));
  return t >= 0 ? `rgb(${fade(214)}, ${fade(39)}, ${fade(40)})` : `rgb(${fade(31)}, ${fade(119)}, ${fade(180)})`;
}

function span(pair: [number, number], noun: string): string {
  return pair[0] === pair[1] ? `${noun} ${pair[0]}` : `${noun}s ${pair[0]}–${pair[1]}`;
}

export function renderLoadPicture(picture: ILoadPicture): SVGSVGElement {
  const rows = picture.rows.length;
  const cols = picture.cols.length;
  const rowHeight = rows > 0 ? Math.max(1, Math.min(ROW_HEIGHT, MAX_HEIGHT / rows)) : ROW_HEIGHT;
  const cellWidth = cols > 0 ? WIDTH / cols : WIDTH;
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'wbl-load-picture');
  svg.setAttribute('width', String(WIDTH));
  svg.setAttribute('height', String(Math.max(rowHeight * rows, 1)));
  svg.setAttribute('role', 'img');
  svg.setAttribute(
    'aria-label',
    `expert load: ${rows} layer rows x ${cols} expert columns, busiest expert ${picture.max.toFixed(2)}x uniform`
  );
  picture.cells.forEach((row, r) => {
    row.forEach((value, c) => {
      const rect = document.createElementNS(SVG_NS, 'rect');
      rect.setAttribute('x', (c * cellWidth).toFixed(2));
      rect.setAttribute('y', (r * rowHeight).toFixed(2));
      rect.setAttribute('width', cellWidth.toFixed(2));
      rect.setAttribute('height', rowHeight.toFixed(2));
      rect.setAttribute('fill', loadColour(value));
      rect.dataset.load = String(value);
      const title = document.createElementNS(SVG_NS, 'title');
      title.textContent = `${span(picture.rows[r], 'layer')}, ${span(picture.cols[c], 'expert')}: ${value.toFixed(2)}x uniform load`;
      rect.appendChild(title);
      svg.appendChild(rect);
    });
  });
  return svg;
}
