//! The `allocation-ledger` command-line tool.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
