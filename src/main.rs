//! The grainfs binary: parse arguments and hand over to the CLI layer; nothing else.

use clap::Parser;

fn main() {
    let args = grainfs::cli::Args::parse();
    std::process::exit(grainfs::cli::run(args));
}
