//! HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
//!
//! Every failure a handler can meet ends here, so a client always gets a JSON body with the
//! right status — never an empty 500, a panic or a hung connection. [`ApiJson`] replaces axum's
//! `Json` extractor, whose rejections are plain text and use 415/422 where OpenAI clients expect
//! 400.
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// OpenAI's error categories (the `type` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request cannot be served as written.
    InvalidRequest,
    /// 401: missing or wrong API key.
    Authentication,
    /// 404: no such route or model.
    NotFound,
    /// 405: the route exists, not with this method.
    MethodNotAllowed,
    /// 413: the body is over the size limit.
    TooLarge,
    /// 429: the engine's waiting queue is full; retry later.
    RateLimit,
    /// 503: the model is still loading, or the server is shutting down.
    Unavailable,
    /// 500: the engine failed while running the request.
    Server,
    /// 408: the request ran past `--request-timeout` and was aborted.
    Timeout,
}

impl ErrorKind {
    fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Server => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn type_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::TooLarge | ErrorKind::MethodNotAllowed => {
                "invalid_request_error"
            }
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::RateLimit => "rate_limit_exceeded",
            ErrorKind::Unavailable => "service_unavailable",
            ErrorKind::Server => "server_error",
            ErrorKind::Timeout => "timeout_error",
        }
    }
}

/// One API error, rendered as OpenAI's error object.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `model_not_found`, `queue_full`, ...).
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message).with_param(param)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The JSON body, also sent as the `data:` of an error event inside an SSE stream.
    pub fn body_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorObject {
                message: &self.message,
                kind: self.kind.type_str(),
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_string()
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), self.body_json()).into_response();
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::sampling::SamplingError;
        use crate::Error as E;
        let message = e.to_string();
        match e {
            E::Sampling(SamplingError::InvalidParam { param, .. }) => {
                ApiError::invalid(param, message)
            }
            E::PromptTooLong { .. } => ApiError::invalid("prompt", message),
            E::EmptyPrompt => ApiError::invalid("prompt", message),
            E::TokenOutOfVocab { .. } => ApiError::invalid("prompt", message),
            E::Tokenizer(_) => ApiError::new(ErrorKind::InvalidRequest, message),
            E::DuplicateRequest(_) => ApiError::new(ErrorKind::InvalidRequest, message),
            E::QueueFull { .. } => {
                ApiError::new(ErrorKind::RateLimit, message).with_code("queue_full")
            }
            E::EngineStopped => ApiError::new(ErrorKind::Unavailable, message),
            E::EngineDead { .. } => {
                ApiError::new(ErrorKind::Server, message).with_code("engine_dead")
            }
            E::Timeout { .. } => {
                ApiError::new(ErrorKind::Timeout, message).with_code("request_timeout")
            }
            _ => ApiError::new(ErrorKind::Server, message),
        }
    }
}

/// A JSON body parsed with serde_json whatever its content type; every failure is a 400 in
/// OpenAI's shape (413 when over the body limit).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let kind = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ErrorKind::TooLarge
            } else {
                ErrorKind::InvalidRequest
            };
            ApiError::new(kind, r.body_text())
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let parsed: Result<T, _> = parse_one(&mut de);
        parsed.map(ApiJson).map_err(|e| {
            ApiError::new(ErrorKind::InvalidRequest, format!("invalid JSON body: {e}"))
                .with_code("invalid_json")
        })
    }
}

/// Deserializes one value and checks nothing but whitespace follows.
fn parse_one<T: DeserializeOwned>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> serde_json::Result<T> {
    let v = T::deserialize(&mut *de)?;
    de.end()?;
    Ok(v)
}

/// The response for routes that do not exist.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no route for {}", uri.path()))
}

/// The response for a route called with a method it does not serve.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{} does not accept {method}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::invalid("temperature", "bad").with_code("x");
        let v: serde_json::Value = serde_json::from_str(&e.body_json()).unwrap();
        assert_eq!(v["error"]["message"], "bad");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(v["error"]["code"], "x");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let full: ApiError = crate::Error::QueueFull { limit: 3 }.into();
        assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
        let long: ApiError = crate::Error::PromptTooLong {
            prompt_len: 10,
            needed: 20,
            max_model_len: 15,
        }
        .into();
        assert_eq!(long.status(), StatusCode::BAD_REQUEST);
        assert_eq!(long.param.as_deref(), Some("prompt"));
        let bad: ApiError = crate::Error::Sampling(crate::sampling::SamplingError::InvalidParam {
            param: "top_p",
            reason: "x".into(),
        })
        .into();
        assert_eq!(bad.param.as_deref(), Some("top_p"));
        let stopped: ApiError = crate::Error::StepFailed("boom".into()).into();
        assert_eq!(stopped.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let dead: ApiError = crate::Error::EngineDead {
            reason: "panic".into(),
        }
        .into();
        assert_eq!(dead.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(dead.code, Some("engine_dead"));
        let late: ApiError = crate::Error::Timeout { seconds: 1.0 }.into();
        assert_eq!(late.status(), StatusCode::REQUEST_TIMEOUT);
    }
}
