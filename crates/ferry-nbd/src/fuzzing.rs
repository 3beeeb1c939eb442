//! The fuzz driver, shared by the cargo-fuzz target (`fuzz/`) and by the
//! corpus test that runs on stable in CI (`tests/fuzz_corpus.rs`).
//!
//! One input is everything a client sends: it is fed to a server over an
//! in-memory pipe (greeting flags, options, requests and payloads; as over
//! TCP or, for inputs of odd length, a unix socket), after
//! the parsers of option payloads and request headers have been run on it
//! directly. The server must end the connection cleanly or with an error,
//! never panic or hang.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::{InfoRequest, MetaRequest, Request};
use crate::{ExportOptions, MemoryExport, Server};

/// Runs one input through the parsers and a whole server connection.
pub fn run_one(data: &[u8]) {
    let _ = Request::parse(data);
    let _ = InfoRequest::parse(data);
    let _ = MetaRequest::parse(data);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("fuzz runtime");
    rt.block_on(async {
        let server = Server::new();
        let m = MemoryExport::new(1 << 20);
        m.snapshot("s");
        server
            .add_export("", Arc::new(m), ExportOptions::default())
            .expect("export");
        server
            .add_export(
                "ro",
                Arc::new(MemoryExport::new(1 << 16).read_only()),
                ExportOptions {
                    secret: Some("k".into()),
                    ..Default::default()
                },
            )
            .expect("export");
        let (mut client, srv) = tokio::io::duplex(1 << 16);
        // Half the inputs (by length, so a corpus keeps its meaning) are
        // served as over a unix socket, where large writes are applied in
        // pieces as their payload arrives.
        let unix = data.len() % 2 == 1;
        let conn = tokio::spawn(async move { server.run(srv, unix).await });
        let input = data.to_vec();
        let mut sink = vec![0u8; 1 << 16];
        let (mut rd, mut wr) = tokio::io::split(&mut client);
        let write = async {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let read = async { while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {} };
        let all = async {
            tokio::join!(write, read);
        };
        // The server ends each input on its own; the limit only turns a
        // hang into a failure.
        tokio::time::timeout(std::time::Duration::from_secs(20), all)
            .await
            .expect("server hung on a fuzz input");
        let r = conn.await;
        assert!(r.is_ok(), "server task panicked");
    });
}
