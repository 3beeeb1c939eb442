//! Reading the guest's serial console log: events (`FERRY {json}` lines)
//! and the raw text for error messages.
//!
//! QEMU appends the console to a file; the reader polls it from the last
//! offset, keeps every event it has seen in order, and lets the caller wait
//! for the next event matching a predicate.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ferry_guest::event::{self, Event};

use crate::error::{Error, ErrorKind, Result};

/// Text in the console that means the guest cannot go on (a kernel
/// warning is not: the guest may well continue).
const FATAL: [&str; 5] = [
    "Kernel panic",
    "Attempted to kill init",
    // A kernel oops: the guest may limp on, but nothing it does after is
    // worth waiting for.
    "Oops: ",
    "kernel BUG at",
    "BUG: unable to handle",
];

/// A reader of one guest's console log.
#[derive(Debug)]
pub struct Console {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    text: String,
    events: Vec<Event>,
    fatal: Option<String>,
}

impl Console {
    /// A reader of the log at `path` (it may not exist yet).
    pub fn new(path: &Path) -> Console {
        Console {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
            text: String::new(),
            events: Vec::new(),
            fatal: None,
        }
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what QEMU appended since the last call.
    pub fn poll(&mut self) -> Result<()> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("opening the console log", &self.path, e)),
        };
        f.seek(SeekFrom::Start(self.offset))
            .map_err(|e| Error::io("reading the console log", &self.path, e))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| Error::io("reading the console log", &self.path, e))?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line).into_owned();
            if let Some(ev) = event::parse(&line) {
                self.events.push(ev);
            }
            if self.fatal.is_none() && FATAL.iter().any(|f| line.contains(f)) {
                self.fatal = Some(line.trim().to_owned());
            }
            self.text.push_str(&line);
        }
        Ok(())
    }

    /// Every event read so far, in order.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The first fatal console line seen (a kernel panic, init killed).
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// The last `lines` lines of the console text read so far.
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// What a failure report shows: the tail, preceded by the start of the
    /// first kernel oops or panic if the tail does not already hold it
    /// (an oops's cause is in its first lines; the tail is its backtrace).
    pub fn excerpt(&self, lines: usize) -> String {
        const MARKERS: [&str; 6] = [
            "BUG:",
            "Oops",
            "general protection fault",
            "Kernel panic",
            "invalid opcode",
            "watchdog: ",
        ];
        let all: Vec<&str> = self.text.lines().collect();
        let tail_start = all.len().saturating_sub(lines);
        let first = all
            .iter()
            .position(|l| MARKERS.iter().any(|m| l.contains(m)));
        match first {
            Some(i) if i < tail_start => {
                let from = i.saturating_sub(5);
                let to = (i + 25).min(tail_start);
                format!(
                    "{}\n[... {} lines ...]\n{}",
                    all[from..to].join("\n"),
                    tail_start - to,
                    all[tail_start..].join("\n")
                )
            }
            _ => all[tail_start..].join("\n"),
        }
    }

    /// The index of the first event at or after `from` that `pred` accepts.
    pub fn find(&self, from: usize, pred: &mut dyn FnMut(&Event) -> bool) -> Option<usize> {
        self.events
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, e)| pred(e))
            .map(|(i, _)| i)
    }

    /// An error for a guest that failed, with the console's tail.
    pub fn guest_failed(&self, name: &str, what: &str) -> Error {
        Error::new(
            ErrorKind::Guest,
            format!(
                "guest {name}: {what}; console log {} ends with:\n{}",
                self.path.display(),
                self.excerpt(20)
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn an_excerpt_shows_where_an_oops_began() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "[ 1.0] BUG: kernel NULL pointer dereference, address: 0").unwrap();
        for i in 0..100 {
            writeln!(f, "[ 2.0] backtrace line {i}").unwrap();
        }
        f.flush().unwrap();
        let mut c = Console::new(&path);
        c.poll().unwrap();
        let e = c.excerpt(10);
        assert!(e.contains("NULL pointer"), "{e}");
        assert!(e.contains("backtrace line 99"), "{e}");
        assert!(!e.contains("backtrace line 50"), "{e}");
        // The oops inside the tail: just the tail.
        assert_eq!(c.excerpt(200), c.tail(200));
    }

    #[test]
    fn reads_events_across_partial_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let mut c = Console::new(&path);
        c.poll().unwrap();
        assert!(c.events().is_empty());
        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "[ 0.1] booting\r\nFERRY {{\"event\":\"ready\",\"up").unwrap();
        f.flush().unwrap();
        c.poll().unwrap();
        assert!(c.events().is_empty());
        writeln!(f, "time_ms\":3}}\r").unwrap();
        writeln!(f, "FERRY {{\"event\":\"record\",\"seq\":0}}").unwrap();
        f.flush().unwrap();
        c.poll().unwrap();
        assert_eq!(c.events().len(), 2);
        assert_eq!(c.events()[0].u64("uptime_ms"), Some(3));
        assert_eq!(c.find(0, &mut |e| e.name == "record"), Some(1));
        assert_eq!(c.find(2, &mut |e| e.name == "record"), None);
        assert!(c.fatal().is_none());
        writeln!(
            f,
            "[ 1.0] Kernel panic - not syncing: Attempted to kill init!"
        )
        .unwrap();
        c.poll().unwrap();
        assert!(c.fatal().unwrap().contains("Kernel panic"));
        assert!(c.tail(1).contains("Kernel panic"));
    }
}
