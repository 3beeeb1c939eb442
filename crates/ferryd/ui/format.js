// Numbers for people: sizes, durations, times, percentages.

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(1)} ${UNITS[i]}`;
}

export function duration(ms) {
  if (ms === null || ms === undefined) return '—';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, '0')} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
}

/** Milliseconds with one decimal (timings measured by the daemon). */
export function ms(v) {
  return v === null || v === undefined ? '—' : `${Number(v).toFixed(1)} ms`;
}

/** A time from epoch milliseconds, local, to the second. */
export function time(epochMs) {
  if (!epochMs) return '—';
  const d = new Date(epochMs);
  const p = n => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** Whole percent, padded to a fixed width ("  7 %"). */
export function percent(fraction) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  return `${String(pct).padStart(3, '\u2007')} %`;
}
