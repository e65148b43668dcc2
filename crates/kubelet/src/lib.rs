//! rkube-kubelet: see ../shared/DESIGN.md (filled by its issue).
pub mod cli;
