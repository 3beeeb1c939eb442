//! Model-based property test: random sequences of write / read / trim /
//! write-zeroes / snapshot / group snapshot / clone / delete / flush /
//! reopen, every read compared with an in-memory model, `verify` clean and
//! the whole pool equal to the model at the end and after a reopen.

use ferry_pool::workload::{Generator, Model, Op, compare, run_op};
use ferry_pool::{Pool, PoolOptions};
use proptest::prelude::*;

const CHUNK: u64 = 4096;

fn run(seed: u64, n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pool");
    let mut pool = Pool::create(
        &path,
        PoolOptions {
            chunk_size: CHUNK as u32,
            limit_bytes: None,
        },
    )?;
    let mut m = Model::default();
    m.vols
        .insert("a".into(), vec![0u8; (20 * CHUNK + 1000) as usize]);
    m.vols.insert("b".into(), vec![0u8; (12 * CHUNK) as usize]);
    for (name, c) in &m.vols {
        pool.create_volume(name, c.len() as u64)?;
    }
    let mut g = Generator::new(seed, CHUNK);
    g.reopen = true;
    for i in 0..n {
        let op = g.next(&m);
        if op == Op::Reopen {
            pool.flush()?;
            drop(pool);
            pool = Pool::open(&path)?;
        } else if let Some(msg) = run_op(&pool, &m, &op)? {
            anyhow::bail!("seed {seed} op {i} {op:?}: {msg}");
        }
        m.apply(&op);
    }
    let diff = compare(&pool, &m)?;
    anyhow::ensure!(diff.is_empty(), "seed {seed}: {diff:?}");
    let problems = pool.verify()?;
    anyhow::ensure!(problems.is_empty(), "seed {seed}: verify: {problems:?}");
    drop(pool);
    let pool = Pool::open(&path)?;
    let diff = compare(&pool, &m)?;
    anyhow::ensure!(diff.is_empty(), "seed {seed} after reopen: {diff:?}");
    let problems = pool.verify()?;
    anyhow::ensure!(
        problems.is_empty(),
        "seed {seed} after reopen: verify: {problems:?}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model(seed in any::<u64>(), n in 20usize..250) {
        if let Err(e) = run(seed, n) {
            prop_assert!(false, "{e:#}");
        }
    }
}

#[test]
fn fixed_seeds_long_sequences() -> anyhow::Result<()> {
    for seed in 0..6 {
        run(seed, 600)?;
    }
    Ok(())
}
