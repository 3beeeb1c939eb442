//! Child process of the crash test: runs a deterministic pool workload and
//! reports each acknowledged flush on stdout (see `ferry_pool::crashtest`).
//! Usage: ferry-pool-crashchild DIR SEED OPS

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: ferry-pool-crashchild DIR SEED OPS");
        std::process::exit(2);
    }
    let seed: u64 = args[2].parse().expect("SEED is a number");
    let ops: usize = args[3].parse().expect("OPS is a number");
    if let Err(e) = ferry_pool::crashtest::child_main(std::path::Path::new(&args[1]), seed, ops) {
        eprintln!("ferry-pool-crashchild: {e}");
        std::process::exit(1);
    }
}
