//! The process runtime's container init as a standalone program (tests start it; the rkube
//! binary runs the same `rkube_kubelet::procinit::main` as its hidden `process-init`).

fn main() {
    std::process::exit(rkube_kubelet::procinit::main(std::env::args_os().skip(1)));
}
