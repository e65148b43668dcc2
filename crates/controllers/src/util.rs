//! Small helpers the controllers share: pod readiness, controller references, int-or-percent.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub fn controller_uid(refs: Option<&Vec<OwnerReference>>) -> Option<String> {
    refs?.iter().find(|r| r.controller == Some(true)).map(|r| r.uid.clone())
}

/// The controller owner's uid, borrowed (for loops over every pod).
pub fn controller_uid_ref(refs: Option<&Vec<OwnerReference>>) -> Option<&str> {
    refs?.iter().find(|r| r.controller == Some(true)).map(|r| r.uid.as_str())
}

pub fn is_active(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && !matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

pub fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready for at least `min_ready` seconds.
pub fn is_available(p: &Pod, min_ready: i32) -> bool {
    let Some(cond) = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
    else {
        return false;
    };
    if min_ready <= 0 {
        return true;
    }
    cond.last_transition_time
        .as_ref()
        .is_some_and(|t| jiff::Timestamp::now().as_second() - t.0.as_second() >= min_ready as i64)
}

/// An int-or-percent of `total`; percentages round up when `round_up`.
pub fn scaled(v: Option<&IntOrString>, total: i32, round_up: bool, default_pct: i32) -> i32 {
    let pct = |p: i32| {
        let x = total as i64 * p as i64;
        if round_up { ((x + 99) / 100) as i32 } else { (x / 100) as i32 }
    };
    match v {
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => {
            s.trim_end_matches('%').parse::<i32>().map(pct).unwrap_or(0)
        }
        None => pct(default_pct),
    }
}

pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    rkube_client::now_time()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_as_upstream() {
        assert_eq!(scaled(Some(&IntOrString::String("25%".into())), 3, true, 25), 1);
        assert_eq!(scaled(Some(&IntOrString::String("25%".into())), 3, false, 25), 0);
        assert_eq!(scaled(Some(&IntOrString::Int(2)), 3, false, 25), 2);
        assert_eq!(scaled(None, 10, true, 25), 3);
    }
}
