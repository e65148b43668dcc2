//! rkube-controllers: see ../shared/DESIGN.md (filled by its issue).
pub mod cli;
