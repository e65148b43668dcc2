//! rkube-scheduler: see ../shared/DESIGN.md (filled by its issue).
pub mod cli;
