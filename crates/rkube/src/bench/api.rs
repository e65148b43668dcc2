//! `rkube bench api`: measures this area and reports its figures.

/// Runs the benchmark and returns its figures as one JSON object.
pub async fn run(_args: &super::BenchArgs) -> anyhow::Result<serde_json::Value> {
    anyhow::bail!("`rkube bench api` is not built yet")
}

/// Renders the figures as a human table.
pub fn table(figures: &serde_json::Value) -> String {
    format!("{figures:#}")
}
