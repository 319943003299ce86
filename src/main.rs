//! The `allocation-ledger` command-line tool.

mod cli;

/// mimalloc: replay frees on one thread what decoder threads allocated, which glibc's malloc
/// handles slowly (docs/benchmarks.md has both allocators' numbers).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(cli::main().code());
}
