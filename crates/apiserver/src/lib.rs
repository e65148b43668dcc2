//! rkube-apiserver: see ../shared/DESIGN.md (filled by its issue).
pub mod cli;
