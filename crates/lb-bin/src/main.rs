//! `lb`: an HTTP load balancer and reverse proxy. See README.md and SPEC.md.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    lb_bin::main()
}
