//! TLS with X.509 certificates made in the test by the openssl CLI:
//! nbdinfo with TLS required (`nbds://`), qemu-img with `tls-creds-x509`, our client,
//! forced TLS, and secret exports reached by a verified client certificate.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{TestServer, ok, run};
use ferry_nbd::client::Address;
use ferry_nbd::{
    Client, ClientConfig, ErrorKind, ExportOptions, MemoryExport, Server, TlsMode, tls,
};

fn openssl(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client
/// certificate, in the file names GnuTLS clients (qemu, libnbd) expect.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ferry test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &a);
    for (who, cn, eku) in [
        ("server", "localhost", "serverAuth"),
        ("client", "ferry-client", "clientAuth"),
    ] {
        let mut r = vec!["req"];
        r.extend(ec);
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let subj = format!("/CN={cn}");
        r.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &r);
        let ext = format!("{who}.ext");
        std::fs::write(
            dir.join(&ext),
            format!(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={eku}\n\
                 basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            ),
        )
        .unwrap();
        let cert = format!("{who}-cert.pem");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

fn tls_server(dir: &Path, mode: TlsMode) -> TestServer {
    let cfg = tls::server_config(
        &dir.join("server-cert.pem"),
        &dir.join("server-key.pem"),
        Some(&dir.join("ca-cert.pem")),
    )
    .unwrap();
    let s = Server::with_tls(cfg, mode);
    s.add_export(
        "open",
        Arc::new(MemoryExport::new(4 << 20)),
        ExportOptions::default(),
    )
    .unwrap();
    s.add_export(
        "vault",
        Arc::new(MemoryExport::new(4 << 20)),
        ExportOptions {
            secret: Some("s3cret".into()),
            allow_tls_clients: true,
            ..Default::default()
        },
    )
    .unwrap();
    TestServer::start(s)
}

fn client_cfg(dir: &Path, export: &str, with_cert: bool) -> ClientConfig {
    let cert = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let c = tls::client_config(
        &dir.join("ca-cert.pem"),
        with_cert.then_some((cert.0.as_path(), cert.1.as_path())),
    )
    .unwrap();
    ClientConfig {
        export: export.into(),
        meta_contexts: vec![],
        tls: Some((c, "localhost".into())),
    }
}

#[test]
fn forced_tls_with_real_clients() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let t = tls_server(certs.path(), TlsMode::Required);
    let dir = certs.path().to_str().unwrap();

    // Without TLS: refused.
    let o = run("nbdinfo", &[&t.unix_uri("open")]);
    assert!(!o.status.success());
    let o = run("nbdinfo", &[&format!("nbd://127.0.0.1:{}/open", t.port)]);
    assert!(!o.status.success());

    // nbdinfo over TCP with TLS required (this libnbd has no `--tls` flag:
    // an `nbds://` URI is its way to say `--tls=require`), presenting the
    // client certificate.
    let uri = format!("nbds://127.0.0.1:{}/open?tls-certificates={dir}", t.port);
    let info = ok("nbdinfo", &[&uri]);
    assert!(info.contains("export-size: 4194304"), "{info}");
    assert!(info.contains("TLS"), "{info}");
    // The certificate lets it reach the secret export by its bare name.
    let uri = format!("nbds://127.0.0.1:{}/vault?tls-certificates={dir}", t.port);
    ok("nbdinfo", &[&uri]);

    // qemu-img with tls-creds-x509 writes and reads back through qemu-io.
    let obj = format!("tls-creds-x509,id=tls0,endpoint=client,dir={dir}");
    let img = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=open,tls-creds=tls0",
        t.port
    );
    let info = ok(
        "qemu-img",
        &["info", "--object", &obj, "--image-opts", &img],
    );
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    let out = ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &img,
            "-c",
            "write -P 0x3c 1M 64k",
            "-c",
            "read -P 0x3c 1M 64k",
        ],
    );
    assert!(
        !out.contains("fail") && out.contains("read 65536/65536"),
        "{out}"
    );
}

#[test]
fn own_client_tls_access_rules() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let t = tls_server(certs.path(), TlsMode::Required);
    let d = certs.path();
    let addr = Address::Unix(t.sock.clone());
    t.rt.block_on(async {
        // Plain text is refused with TLS_REQD.
        let plain = ClientConfig {
            export: "open".into(),
            ..Default::default()
        };
        let e = Client::connect(&addr, &plain).await.err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
        // TLS with a client certificate: open and vault by name.
        let c = Client::connect(&addr, &client_cfg(d, "open", true))
            .await
            .unwrap();
        c.write_at(0, b"over tls", true).await.unwrap();
        assert_eq!(c.read(0, 8).await.unwrap(), b"over tls");
        Client::connect(&addr, &client_cfg(d, "vault", true))
            .await
            .unwrap();
        // TLS without a client certificate: vault only with its secret.
        let e = Client::connect(&addr, &client_cfg(d, "vault", false))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        Client::connect(&addr, &client_cfg(d, "vault/s3cret", false))
            .await
            .unwrap();
    });
}

#[test]
fn optional_tls_serves_both() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let t = tls_server(certs.path(), TlsMode::Optional);
    let addr = Address::Unix(t.sock.clone());
    t.rt.block_on(async {
        let plain = ClientConfig {
            export: "open".into(),
            ..Default::default()
        };
        Client::connect(&addr, &plain).await.unwrap();
        Client::connect(&addr, &client_cfg(certs.path(), "open", false))
            .await
            .unwrap();
        // A certificate from nowhere is rejected by the handshake.
        let other = tempfile::tempdir().unwrap();
        make_certs(other.path());
        let e = Client::connect(&addr, &client_cfg(other.path(), "open", true))
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::Tls, "{e}");
    });
}

/// Options negotiated before STARTTLS are forgotten: structured replies
/// asked for in clear text do not apply after the upgrade.
#[test]
fn starttls_resets_the_option_state() {
    use ferry_nbd::proto::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn opt<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, o: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        s.write_all(&v).await.unwrap();
        s.flush().await.unwrap();
    }
    async fn reply<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        let mut d = vec![0u8; be32(&h[16..20]) as usize];
        s.read_exact(&mut d).await.unwrap();
        (be32(&h[12..16]), d)
    }

    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let t = tls_server(certs.path(), TlsMode::Optional);
    let cfg = client_cfg(certs.path(), "open", false);
    t.rt.block_on(async {
        let mut s = tokio::net::UnixStream::connect(&t.sock).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        opt(&mut s, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(reply(&mut s).await.0, REP_ACK);
        opt(&mut s, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut s).await.0, REP_ACK);
        let (tls, host) = cfg.tls.clone().unwrap();
        let mut s = tokio_rustls::TlsConnector::from(tls)
            .connect(tls::server_name(&host).unwrap(), s)
            .await
            .unwrap();
        // A second STARTTLS is refused.
        opt(&mut s, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut s).await.0, REP_ERR_INVALID);
        let go = InfoRequest {
            name: "open".into(),
            infos: vec![],
        };
        opt(&mut s, OPT_GO, &go.encode()).await;
        loop {
            let (k, d) = reply(&mut s).await;
            if k == REP_INFO && be16(&d[0..2]) == INFO_EXPORT {
                assert_eq!(
                    be16(&d[10..12]) & TF_SEND_DF,
                    0,
                    "DF needs structured replies"
                );
            }
            if k == REP_ACK {
                break;
            }
            assert_eq!(k, REP_INFO);
        }
        let mut r = Vec::new();
        Request {
            flags: 0,
            kind: CMD_READ,
            cookie: 5,
            offset: 0,
            length: 16,
        }
        .encode(&mut r);
        s.write_all(&r).await.unwrap();
        s.flush().await.unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(
            be32(&h[0..4]),
            SIMPLE_REPLY_MAGIC,
            "structured replies survived STARTTLS"
        );
        assert_eq!(be64(&h[8..16]), 5);
    });
}
