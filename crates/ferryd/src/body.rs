//! A JSON body extractor whose rejections are `400` answers in the API's
//! error shape, naming the field at fault when serde says which.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::api::{Failure, error_response};

pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rej) => {
                let msg = rej.body_text();
                let field = field_of(&msg);
                Err(error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid request body: {msg}"),
                    field.as_deref(),
                ))
            }
        }
    }
}

/// serde names fields in backticks (`missing field \`size\``) or as a
/// path before a colon (`target type: size: invalid type`).
fn field_of(msg: &str) -> Option<String> {
    if let Some(start) = msg.find("field `") {
        let rest = &msg[start + 7..];
        if let Some(end) = rest.find('`') {
            return Some(rest[..end].to_string());
        }
    }
    let tail = msg.split_once("target type: ")?.1;
    let (path, _) = tail.split_once(": ")?;
    (!path.contains(' ')).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn finds_the_field() {
        assert_eq!(
            field_of(
                "Failed to deserialize the JSON body into the target type: missing field `size` at line 1 column 14"
            ),
            Some("size".into())
        );
        assert_eq!(
            field_of(
                "Failed to deserialize the JSON body into the target type: size: invalid type: string \"x\", expected u64 at line 1 column 20"
            ),
            Some("size".into())
        );
        assert_eq!(
            field_of("Expected request with `Content-Type: application/json`"),
            None
        );
    }
}
