//! `lb`: an HTTP load balancer and reverse proxy. See README.md and SPEC.md.
#![forbid(unsafe_code)]

/// mimalloc: a request allocates and frees dozens of small blocks on one thread, and glibc's
/// malloc spent a tenth of lb's time on them (free lists, consolidation).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lb_bin::main()
}
