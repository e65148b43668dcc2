//! Pure Kubernetes API logic with no I/O: the resource table, quantities, selectors,
//! defaulting, validation and Table printing. Every other crate builds on it.

pub mod resources;
