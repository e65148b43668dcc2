//! rkube-proxy: see ../shared/DESIGN.md (filled by its issue).
