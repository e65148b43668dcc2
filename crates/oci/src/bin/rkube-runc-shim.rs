//! The runc shim as a standalone program (tests start it; the rkube binary runs the same
//! `rkube_oci::runc::shim::main` as a hidden subcommand).

fn main() {
    std::process::exit(rkube_oci::runc::shim::main(std::env::args_os().skip(1)));
}
