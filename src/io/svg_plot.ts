/**
 * A dependency-free SVG line plot (reward per step), written next to the metrics.
 * @module
 */

/** One series of (x, y) points. */
export interface Series {
  readonly label: string;
  readonly points: readonly (readonly [number, number])[];
  readonly color: string;
}

const esc = (s: string): string => s.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);

/** Renders series on shared axes with ticks and a legend. */
export const lineChartSvg = (
  title: string,
  xLabel: string,
  yLabel: string,
  series: readonly Series[],
): string => {
  const W = 720, H = 420, L = 64, R = 20, T = 40, B = 56;
  const pts = series.flatMap((s) => s.points).filter(([x, y]) =>
    Number.isFinite(x) && Number.isFinite(y)
  );
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs, 0), x1 = Math.max(...xs, 1);
  let y0 = Math.min(...ys, 0), y1 = Math.max(...ys, 1);
  if (y1 - y0 < 1e-9) [y0, y1] = [y0 - 1, y1 + 1];
  const sx = (x: number) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
  const sy = (y: number) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="22" text-anchor="middle" font-size="15">${esc(title)}</text>`,
    `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="black"/>`,
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="black"/>`,
    `<text x="${(L + W - R) / 2}" y="${H - 14}" text-anchor="middle">${esc(xLabel)}</text>`,
    `<text x="16" y="${(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 ${
      (T + H - B) / 2
    })">${esc(yLabel)}</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const yv = y0 + ((y1 - y0) * i) / 5;
    const xv = x0 + ((x1 - x0) * i) / 5;
    out.push(
      `<line x1="${L}" y1="${sy(yv)}" x2="${W - R}" y2="${sy(yv)}" stroke="#ddd"/>`,
      `<text x="${L - 6}" y="${sy(yv) + 4}" text-anchor="end">${+yv.toFixed(3)}</text>`,
      `<text x="${sx(xv)}" y="${H - B + 16}" text-anchor="middle">${+xv.toFixed(1)}</text>`,
    );
  }
  series.forEach((s, i) => {
    const d = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y))
      .map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    out.push(
      `<path d="${d}" fill="none" stroke="${s.color}" stroke-width="2"/>`,
      `<rect x="${L + 12}" y="${T + 8 + i * 18}" width="12" height="3" fill="${s.color}"/>`,
      `<text x="${L + 30}" y="${T + 13 + i * 18}">${esc(s.label)}</text>`,
    );
  });
  out.push("</svg>");
  return out.join("\n") + "\n";
};
