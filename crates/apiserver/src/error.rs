//! Every failure of a request becomes a Kubernetes `Status` with upstream's reason and code, so
//! kubectl and the client libraries print the messages their users know.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    Status { code: u16, reason: &'static str, message: String, details: Option<Value> },
    #[error("pki: {0}")]
    Pki(String),
    #[error("tls: {0}")]
    Tls(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("store: {0}")]
    Store(rkube_store::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status(code: u16, reason: &'static str, message: impl Into<String>) -> Error {
        Error::Status { code, reason, message: message.into(), details: None }
    }
    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::status(400, "BadRequest", message)
    }
    pub fn not_found(qualified: &str, name: &str) -> Error {
        let (group, kind) = split_qualified(qualified);
        Error::Status {
            code: 404,
            reason: "NotFound",
            message: format!("{qualified} \"{name}\" not found"),
            details: Some(json!({"name": name, "group": group, "kind": kind})),
        }
    }
    pub fn already_exists(qualified: &str, name: &str) -> Error {
        let (group, kind) = split_qualified(qualified);
        Error::Status {
            code: 409,
            reason: "AlreadyExists",
            message: format!("{qualified} \"{name}\" already exists"),
            details: Some(json!({"name": name, "group": group, "kind": kind})),
        }
    }
    pub fn conflict(qualified: &str, name: &str) -> Error {
        let (group, kind) = split_qualified(qualified);
        Error::Status {
            code: 409,
            reason: "Conflict",
            message: format!(
                "Operation cannot be fulfilled on {qualified} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
            details: Some(json!({"name": name, "group": group, "kind": kind})),
        }
    }
    pub fn conflict_msg(qualified: &str, name: &str, why: &str) -> Error {
        let (group, kind) = split_qualified(qualified);
        Error::Status {
            code: 409,
            reason: "Conflict",
            message: format!("Operation cannot be fulfilled on {qualified} \"{name}\": {why}"),
            details: Some(json!({"name": name, "group": group, "kind": kind})),
        }
    }
    /// 422 Invalid with one cause per (field, message).
    pub fn invalid(kind: &str, name: &str, causes: Vec<(String, String)>) -> Error {
        let text = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join(", ");
        let causes: Vec<Value> = causes
            .into_iter()
            .map(|(f, m)| json!({"reason": "FieldValueInvalid", "message": m, "field": f}))
            .collect();
        Error::Status {
            code: 422,
            reason: "Invalid",
            message: format!("{kind} \"{name}\" is invalid: {text}"),
            details: Some(json!({"name": name, "kind": kind, "causes": causes})),
        }
    }
    pub fn gone(message: impl Into<String>) -> Error {
        Error::status(410, "Expired", message)
    }
    pub fn method_not_supported(message: impl Into<String>) -> Error {
        Error::status(405, "MethodNotAllowed", message)
    }
    pub fn unauthorized() -> Error {
        Error::status(401, "Unauthorized", "Unauthorized")
    }
    pub fn internal(message: impl Into<String>) -> Error {
        Error::status(500, "InternalError", message)
    }

    pub fn to_status(&self) -> (u16, Value) {
        let (code, reason, message, details) = match self {
            Error::Status { code, reason, message, details } => {
                (*code, *reason, message.clone(), details.clone())
            }
            Error::Store(e) => return store_status(e),
            other => (500, "InternalError", other.to_string(), None),
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        });
        if let Some(d) = details {
            status["details"] = d;
        }
        (code, status)
    }
}

fn store_status(e: &rkube_store::Error) -> (u16, Value) {
    use rkube_store::Error as S;
    let err = match e {
        S::Compacted { .. } => {
            Error::gone("The resourceVersion for the provided watch is too old.".to_string())
        }
        S::FutureRevision { .. } => Error::Status {
            code: 504,
            reason: "Timeout",
            message: "Too large resource version".into(),
            details: Some(
                json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1}),
            ),
        },
        S::ValueTooLarge { .. } => {
            Error::status(413, "RequestEntityTooLarge", "etcdserver: request is too large")
        }
        S::InvalidContinue(m) => Error::bad_request(format!("invalid continue token: {m}")),
        S::Unavailable(m) => Error::status(503, "ServiceUnavailable", m.clone()),
        other => Error::internal(other.to_string()),
    };
    err.to_status()
}

impl From<rkube_store::Error> for Error {
    fn from(e: rkube_store::Error) -> Self {
        Error::Store(e)
    }
}

fn split_qualified(q: &str) -> (&str, &str) {
    match q.split_once('.') {
        Some((kind, group)) => (group, kind),
        None => ("", q),
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (code, body) = self.to_status();
        let mut resp = (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(body),
        )
            .into_response();
        if code == 401 {
            resp.headers_mut().insert("www-authenticate", http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
