//! The fuzz target's driver on stable: seeded random inputs and mutations
//! of valid sessions, so CI exercises the parsers on every run. (The
//! coverage-guided target is `fuzz/fuzz_targets/nbd_server.rs`.)

use ferry_nbd::fuzzing::run_one;
use ferry_nbd::proto::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn opt(v: &mut Vec<u8>, o: u32, data: &[u8]) {
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

/// Valid sessions the mutations start from.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for structured in [false, true] {
        let mut v = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        opt(&mut v, OPT_LIST, &[]);
        opt(&mut v, 77, b"??");
        if structured {
            opt(&mut v, OPT_STRUCTURED_REPLY, &[]);
            let m = MetaRequest {
                export: String::new(),
                queries: vec![CONTEXT_ALLOCATION.into(), "ferry:changed:s".into()],
            };
            opt(&mut v, OPT_LIST_META_CONTEXT, &m.encode());
            opt(&mut v, OPT_SET_META_CONTEXT, &m.encode());
        }
        let i = InfoRequest {
            name: String::new(),
            infos: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        opt(&mut v, OPT_INFO, &i.encode());
        opt(&mut v, OPT_GO, &i.encode());
        let reqs = [
            (CMD_WRITE, CMD_FLAG_FUA, 4096u64, 512u32),
            // Large enough to be applied in pieces (inputs of odd length
            // are served as over a unix socket).
            (CMD_WRITE, 0, 65536, 300 << 10),
            (CMD_READ, 0, 0, 8192),
            (CMD_READ, 0, 0, 128 << 10),
            (CMD_BLOCK_STATUS, 0, 0, 1 << 20),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096),
            (CMD_TRIM, 0, 65536, 65536),
            (CMD_FLUSH, 0, 0, 0),
            (CMD_DISC, 0, 0, 0),
        ];
        for (n, (kind, flags, offset, length)) in reqs.into_iter().enumerate() {
            Request {
                flags,
                kind,
                cookie: n as u64,
                offset,
                length,
            }
            .encode(&mut v);
            if kind == CMD_WRITE {
                v.extend(std::iter::repeat_n(0xAB, length as usize));
            }
        }
        out.push(v);
    }
    let mut v = (CLIENT_FIXED_NEWSTYLE).to_be_bytes().to_vec();
    opt(&mut v, OPT_EXPORT_NAME, b"ro/k");
    Request {
        flags: 0,
        kind: CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 16,
    }
    .encode(&mut v);
    v.extend_from_slice(&[1; 16]);
    out.push(v);
    out
}

#[test]
fn valid_sessions_run_to_the_end() {
    for s in seeds() {
        run_one(&s);
    }
}

#[test]
fn mutated_and_random_inputs_never_panic_or_hang() {
    let mut rng = StdRng::seed_from_u64(0xF0221);
    let seeds = seeds();
    for i in 0..1500 {
        let mut input = if i % 5 == 0 {
            let n = rng.random_range(0..512);
            (0..n).map(|_| rng.random()).collect()
        } else {
            seeds[i % seeds.len()].clone()
        };
        let flips = rng.random_range(1..6);
        for _ in 0..flips {
            if input.is_empty() {
                break;
            }
            let at = rng.random_range(0..input.len());
            match rng.random_range(0..4) {
                0 => input[at] = rng.random(),
                1 => input[at] ^= 1 << rng.random_range(0..8),
                2 => input.truncate(at),
                _ => {
                    let b: [u8; 4] = rng.random();
                    let end = (at + 4).min(input.len());
                    input[at..end].copy_from_slice(&b[..end - at]);
                }
            }
        }
        run_one(&input);
    }
}
