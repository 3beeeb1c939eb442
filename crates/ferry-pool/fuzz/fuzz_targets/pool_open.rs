//! Fuzzes opening a pool whose files are damaged: the input's first byte
//! picks the file (0: `pool.hdr`, otherwise the metadata database), the
//! rest becomes its content; opening must fail cleanly or give a pool whose
//! volumes read and verify without a panic. Run from `crates/ferry-pool`:
//!
//! ```text
//! cargo +nightly fuzz run pool_open -- -max_total_time=600
//! ```
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ferry_pool::{META_FILE, Pool, PoolOptions};

/// A small valid pool made once per process, copied for every input.
fn template() -> &'static PathBuf {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-pool-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pool = Pool::create(
            &dir,
            PoolOptions {
                chunk_size: 4096,
                limit_bytes: None,
            },
        )
        .expect("create template pool");
        let v = pool.create_volume("v", 1 << 20).expect("create volume");
        v.write_at(4096, &[7u8; 8192]).expect("write");
        pool.snapshot("v", "s").expect("snapshot");
        pool.flush().expect("flush");
        dir
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let t = template();
    let dir = t.with_extension("case");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("case dir");
    for e in std::fs::read_dir(t).expect("template").flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).expect("copy template");
    }
    let target = if which == 0 {
        ferry_pool::format::HEADER_FILE
    } else {
        META_FILE
    };
    std::fs::write(dir.join(target), rest).expect("write case");
    if let Ok(pool) = Pool::open(&dir) {
        for info in pool.volumes() {
            if let Ok(v) = pool.volume(&info.name) {
                let mut buf = vec![0u8; v.size().min(1 << 20) as usize];
                let _ = v.read_at(0, &mut buf);
            }
        }
        let _ = pool.verify();
    }
});
