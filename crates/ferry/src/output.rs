//! Human output: tables, sizes, times. `--json` bypasses all of it.

use serde::Serialize;

/// Prints `value` as JSON (with `--json`) or as the table `human` makes.
pub fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce(&T) -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
        );
    } else {
        print!("{}", human(value));
    }
}

/// A plain table: a header row and aligned columns.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let mut out = line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Bytes in binary units: `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Milliseconds since the epoch, as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the Gregorian calendar.
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 << 30), "3.0 GiB");
        assert_eq!(time_ms(0), "1970-01-01 00:00:00");
        assert_eq!(time_ms(1_795_000_000_000), "2026-11-18 11:06:40");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["name", "size"], vec![vec!["a".into(), "1".into()]]);
        assert_eq!(t, "NAME  SIZE\na     1\n");
    }
}
